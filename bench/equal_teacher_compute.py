"""On-policy distillation against SeqKD counted at equal teacher compute (issue 19), on the embedded task.

At the same steps both methods push the same number of tokens through the teacher (SeqKD decodes about 22 per
sample, one at a time; on-policy scores the student's 22 in one forward pass), so their teacher FLOPs are level. Their
teacher seconds are not: decoding is sequential, scoring is one batched pass. Counted in teacher seconds, on-policy
gets more steps for SeqKD's teacher budget, and SeqKD, which only needs the teacher's samples, can write them once and
train on them for as many steps as it likes (offline SeqKD, Kim & Rush's original). This script does the two parts
that are not a plain ``opd train``:

``samples``: the teacher's temperature-1 answers to the prompts an online SeqKD run with seed ``s`` draws in
``--steps`` steps of ``--batch`` prompts (the run's ``PromptSampler``), written as a training file, with the seconds
the teacher took (``<out>.json``). Train on them with ``--set objective.lmbda=0`` (every batch from the dataset's
completions) and ``--set data.train=<out>``.

    python bench/equal_teacher_compute.py samples --seed 0 --out runs/eqc/teacher-samples-s0.jsonl

``table``: per arm (``label=glob`` of run folders), final held-out accuracy and reverse KL (mean ± sd [95%
interval]), steps, and the teacher's seconds per step and in all (SeqKD online: its rollout stage, where the teacher
decodes; on-policy: its teacher stage; offline: the ``samples`` file's seconds), then differences paired by seed
against the first arm.

    python bench/equal_teacher_compute.py table "SeqKD online=runs/eqc/seqkd150-s*" "GKD=runs/eqc/gkd540-s*"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def samples(seed: int, steps: int, batch: int, out: Path, temperature: float) -> None:
    from opdkit.data import PromptSampler, load_examples
    from opdkit.models import load_model, load_tokenizer
    from opdkit.rollout import sample

    teacher, tok = load_model("builtin:arith/teacher"), load_tokenizer("builtin:arith/teacher")
    prompts = PromptSampler(load_examples("builtin:arith/train"), seed).next_batch(steps * batch)
    torch.manual_seed(seed)
    started, records = time.perf_counter(), []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            texts = sample(teacher, tok, chunk, max_completion_length=32, temperature=temperature).texts(tok)
            records += [{"prompt": e.messages[-1]["content"], "completion": t, "answer": e.answer}
                        for e, t in zip(chunk, texts)]
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    record = {"seed": seed, "prompts": len(records), "teacher_seconds": seconds, "temperature": temperature,
              "threads": torch.get_num_threads()}
    Path(f"{out}.json").write_text(json.dumps(record) + "\n")
    print(json.dumps(record))


def run_summary(log) -> dict:
    """A finished run (``report.RunLog``): its final held-out figures and its teacher's seconds."""
    if log.config.objective.lmbda == 0:  # offline: the teacher wrote the training file beforehand
        per_step, total = None, json.loads(Path(f"{log.config.data.train}.json").read_text())["teacher_seconds"]
    else:
        per_step, total = statistics.median(log.teacher_seconds[1:]), sum(log.teacher_seconds)
    return {"seed": log.config.seed, "steps": len(log.steps), "accuracy": log.final["eval"]["accuracy"],
            "reverse_kl": log.final["eval"]["reverse_kl"], "teacher_s_per_step": per_step, "teacher_s": total}


def table(arms: list[str]) -> None:
    from opdkit.report import read_arm
    from opdkit.sweep import paired, spread

    print("| arm | seeds | steps | held-out accuracy | reverse KL | teacher s per step | teacher s in all |")
    print("|---|---|---|---|---|---|---|")
    summaries = {}
    for arm in arms:
        label, logs = read_arm(arm)
        runs = summaries[label] = list(map(run_summary, logs))
        per_step = [r["teacher_s_per_step"] for r in runs if r["teacher_s_per_step"] is not None]
        print(f"| {label} | {','.join(str(r['seed']) for r in runs)} | {runs[0]['steps']} | "
              f"{spread([100 * r['accuracy'] for r in runs], '.1f', interval=True)} | "
              f"{spread([r['reverse_kl'] for r in runs], '.3f', interval=True)} | "
              f"{spread(per_step, '.4f') if per_step else '-'} | {spread([r['teacher_s'] for r in runs], '.1f')} |")
    (first, base), *rest = summaries.items()
    for label, runs in rest:
        accuracy, kl = paired(runs, base, "accuracy", 100), paired(runs, base, "reverse_kl")
        if accuracy:
            print(f"{label} minus {first}, paired by seed ({accuracy[0]}): accuracy {accuracy[1]:+.1f} points "
                  f"[{accuracy[2]:+.1f}, {accuracy[3]:+.1f}], reverse KL {kl[1]:+.3f} [{kl[2]:+.3f}, {kl[3]:+.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples", help="the teacher's answers to an online SeqKD run's prompts, as a training file")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("table", help="one row per arm of run folders")
    t.add_argument("arms", nargs="+", help="label=glob of run folders")
    args = parser.parse_args()
    if args.command == "samples":
        samples(args.seed, args.steps, args.batch, args.out, args.temperature)
    else:
        table(args.arms)


if __name__ == "__main__":
    main()
