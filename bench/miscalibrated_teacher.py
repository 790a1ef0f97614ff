"""A teacher with a hidden temperature, and the table of issue 19's chunk-level (logit-free) OPD comparison.

``make``: copy a Llama-style teacher folder and scale its final RMSNorm weight (``model.norm.weight``) by
``alpha``. The LM head is a bias-free linear map of the normed hidden state, so every logit is multiplied by
``alpha`` exactly: the teacher's distributions become ``softmax(alpha * z)`` (``alpha < 1``: flattened, a hidden
temperature ``1 / alpha``; ``alpha > 1``: sharpened), while its argmax, hence its greedy text, is unchanged. The head
is tied to the embedding, so it is the norm, not the head, that is scaled. The copy is checked (logits ratio,
greedy answers) and described (entropy, accuracy of temperature-1 samples) on the held-out prompts.

    python bench/miscalibrated_teacher.py make --alpha 0.33 --out runs/chunk19/teacher-a0.33

``table``: one markdown row per arm from run folders (``metrics.jsonl``) and, where given, the JSON line that
``opd eval`` printed for each run's final student against the calibrated teacher (``<run>/eval-calibrated.json``):
held-out accuracy and exact reverse KL (mean ± sd [95% interval of the mean]) and the teacher cost per step.

    python bench/miscalibrated_teacher.py table "token OPD, calibrated=runs/chunk19/opd-cal-s*" ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch


def scale_logits(src: Path, out: Path, alpha: float) -> None:
    """Copy the model folder ``src`` to ``out`` with ``model.norm.weight`` (the final RMSNorm) times ``alpha``."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = state["model.norm.weight"] * alpha
    save_file(state, weights, metadata={"format": "pt"})
    (out / "MISCALIBRATED.txt").write_text(f"{src} with model.norm.weight scaled by {alpha}: logits x {alpha}\n")


def _entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy (nats) of ``softmax(logits)`` over the positions of ``mask``."""
    from opdkit.objectives.divergence import entropy

    return float(entropy(logits.float().log_softmax(-1))[mask].mean())


def make(alpha: float, out: Path, source: str, prompts: int) -> None:
    """Write the scaled copy of ``source`` to ``out`` and print, as JSON, how it compares with the original on the
    first ``prompts`` held-out arith prompts (logits ratio, argmax and greedy answers, entropy, sample accuracy)."""
    from opdkit.data import load_examples
    from opdkit.models import load_model, load_tokenizer, resolve_model_path
    from opdkit.rollout import sample
    from opdkit.tasks.arithmetic import is_correct

    src = Path(resolve_model_path(source))
    scale_logits(src, out, alpha)
    tok = load_tokenizer(str(src))
    original, scaled = load_model(str(src)), load_model(str(out))
    examples = load_examples("builtin:arith/heldout")[:prompts]

    def accuracy(rollouts) -> float:
        return sum(is_correct(t, e.answer) for t, e in zip(rollouts.texts(tok), examples)) / len(examples)

    def draw(model, temperature: float):
        torch.manual_seed(0)
        return sample(model, tok, examples, max_completion_length=32, temperature=temperature)

    with torch.no_grad():
        greedy, scaled_greedy = draw(original, 0.0), draw(scaled, 0.0)
        z0, z1 = greedy.completion_logits(original), greedy.completion_logits(scaled)
        mask = greedy.completion_mask.bool()
        hot0, hot1 = draw(original, 1.0), draw(scaled, 1.0)
    print(json.dumps({
        "alpha": alpha, "out": str(out), "prompts": len(examples),
        "max_relative_error_of_logits_vs_alpha_z": float((z1 - alpha * z0).abs().max() / z0.abs().max()),
        "argmax_agreement": float((z0.argmax(-1) == z1.argmax(-1))[mask].float().mean()),
        "greedy_accuracy": {"original": accuracy(greedy), "scaled": accuracy(scaled_greedy)},
        "greedy_texts_identical": greedy.texts(tok) == scaled_greedy.texts(tok),
        "entropy_on_greedy_answers_nats": {"original": _entropy(z0, mask), "scaled": _entropy(z1, mask)},
        "temperature1_sample_accuracy": {"original": accuracy(hot0), "scaled": accuracy(hot1)}}, indent=1))


def _final(log, prompt_tokens: int) -> tuple[dict, dict]:
    """(final eval, teacher cost per step) of a finished run (``report.RunLog``). A local teacher logs no traffic:
    its cost is one forward pass over each rollout's prompt and completion, ``rows x (prompt_tokens +
    completion_length)`` positions; a chat teacher's is its logged prefill (``teacher_prompt_tokens``) plus its
    generated tokens."""
    steps, n = log.steps, len(log.steps)
    cost = {"steps": n, "train_s": sum(sum(v for k, v in r.items() if k.startswith("time_")) for r in steps) / n}
    if any("teacher_requests" in r for r in steps):
        for key in ("requests", "prompt_tokens", "completion_tokens", "audited_tokens"):
            cost[key] = sum(r.get(f"teacher_{key}", 0.0) for r in steps) / n
        cost["positions"] = cost["prompt_tokens"] + cost["completion_tokens"]
    else:
        rows = log.config.rollout.batch_size
        cost.update(requests=0.0, prompt_tokens=0.0, completion_tokens=0.0,
                    scored_tokens=sum(r["completion_length"] * rows for r in steps) / n,
                    positions=sum((prompt_tokens + r["completion_length"]) * rows for r in steps) / n)
    return log.final.get("eval", {}), cost


def table(arms: list[str], prompt_tokens: int) -> None:
    from opdkit.report import read_arm
    from opdkit.sweep import spread

    print("| arm | seeds | held-out accuracy | exact reverse KL to the calibrated teacher | reverse KL to the run's "
          "own teacher | teacher cost per step | teacher positions per step | train s per step |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        name, logs = read_arm(arm)
        runs = [log.run_dir for log in logs]
        finals = [_final(log, prompt_tokens) for log in logs]
        if not finals:
            print(f"| {name} | no finished run matches {arm.rsplit('=', 1)[1]} | | | | | | |")
            continue
        cal = [json.loads((r / "eval-calibrated.json").read_text()) for r in runs
               if (r / "eval-calibrated.json").exists() and (r / "eval-calibrated.json").read_text().strip()]
        own_acc = [100 * f[0]["accuracy"] for f in finals]
        acc = [100 * c["accuracy"] for c in cal]
        if len(cal) == len(runs):  # the two evaluations agree on accuracy (same greedy decode): say if not
            assert all(abs(a - b) < 1e-9 for a, b in zip(own_acc, acc)), (name, own_acc, acc)
        kl = [c["reverse_kl"] for c in cal]
        own_kl = [f[0]["reverse_kl"] for f in finals if "reverse_kl" in f[0]]
        cost = {k: statistics.fmean(f[1][k] for f in finals) for k in finals[0][1]}
        if cost["requests"]:
            traffic = (f"{cost['requests']:.0f} requests, {cost['prompt_tokens']:,.0f} prompt + "
                       f"{cost['completion_tokens']:,.0f} generated tokens")
        else:
            traffic = f"1 forward over the rollouts, {cost['scored_tokens']:,.0f} completion tokens scored"
        print(f"| {name} | {','.join(str(log.config.seed) for log in logs)} | {spread(own_acc, '.1f', True)} | "
              f"{spread(kl, '.3f', True)} | {spread(own_kl, '.3f', True) if own_kl else '-'} | {traffic} | "
              f"{cost['positions']:,.0f} | {cost['train_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="a copy of the teacher with every logit multiplied by alpha")
    m.add_argument("--alpha", type=float, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--source", default="builtin:arith/teacher")
    m.add_argument("--prompts", type=int, default=256, help="held-out prompts for the check")
    t = sub.add_parser("table", help="one markdown row per arm: 'name=glob of run folders'")
    t.add_argument("arms", nargs="+")
    t.add_argument("--prompt-tokens", type=int, default=11, help="tokens of each prompt (arith: 11)")
    args = parser.parse_args()
    if args.command == "make":
        torch.set_num_threads(1)
        make(args.alpha, args.out, args.source, args.prompts)
    else:
        table(args.arms, args.prompt_tokens)


if __name__ == "__main__":
    main()
