"""Which branch trained students take on the branching-addition task, and how they fare on each (issue 19, GAE-OPD).

    .venv/bin/python bench/branch_shares.py runs/gae/norm-*          # every <method>/seed<k>/final under each
    .venv/bin/python bench/branch_shares.py runs/gae/norm-* --before --baseline runs/gae/norm-immediate/opd

For each finished run's ``final/`` student, ``opdkit.scenarios.branch.fork_report`` on the run's held-out split
(its config's ``data.eval``, first ``data.eval_size`` records): ``p_direct`` (mean probability of the direct
branch's fork token, i.e. the share of temperature-1 samples that take it), ``greedy_direct`` (share of greedy
answers that take it), greedy accuracy overall and per branch taken, and greedy accuracy with the fork forced to
each branch; and the exact reverse KL to the run's teacher over one temperature-1 sample per prompt (seed 0), both
per sequence (``seq_kl``: the sum over its tokens, fork included, the sequence-level objective return-to-go credit
is unbiased for; ``seq_kl_<branch>`` over the samples that took that branch) and per token (``token_kl``, as ``opd train``'s evaluation reports it; shorter direct answers weigh
less in it). Writes ``branch.json`` beside each ``final/`` and prints mean ± sd [95% interval] per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from opdkit.data import load_examples
from opdkit.objectives.divergence import kl
from opdkit.rollout import sample
from opdkit.models import load_model, load_tokenizer
from opdkit.scenarios import branch
from opdkit.tasks import branching
from opdkit.sweep import interval95, spread

KEYS = ["accuracy", "seq_kl", "token_kl", "seq_kl_scratchpad", "seq_kl_direct", "p_direct", "greedy_direct", "accuracy_scratchpad", "accuracy_direct", "forced_scratchpad",
        "forced_direct"]


def reverse_kl(model, teacher, tokenizer, examples, batch_size: int = 256) -> dict:
    """Exact ``KL(pi_S || pi_T)`` at every position of one temperature-1 student sample per prompt (seed 0)."""
    torch.manual_seed(0)
    per_sequence, branches, tokens = [], [], 0
    for start in range(0, len(examples), batch_size):
        rollouts = sample(model, tokenizer, examples[start : start + batch_size],
                          max_completion_length=branch.MAX_LENGTH)
        with torch.no_grad():
            student = rollouts.completion_logits(model).float().log_softmax(-1)
            reference = rollouts.completion_logits(teacher).float().log_softmax(-1)
        per_sequence += (kl(student, reference) * rollouts.completion_mask).sum(1).tolist()
        branches += [branching.branch(text) for text in rollouts.texts(tokenizer)]
        tokens += int(rollouts.completion_mask.sum())
    report = {"seq_kl": sum(per_sequence) / len(per_sequence), "token_kl": sum(per_sequence) / tokens}
    for name in branching.BRANCHES.values():
        on = [v for v, b in zip(per_sequence, branches) if b == name]
        report[f"seq_kl_{name}"] = sum(on) / len(on) if on else None
    return report


def measure(model_dir: str, config: dict) -> dict:
    tokenizer, model, teacher = load_tokenizer(model_dir), load_model(model_dir), load_model(config["teacher"]["path"])
    examples = load_examples(config["data"]["eval"])[: config["data"]["eval_size"]]
    return {**branch.fork_report(model, tokenizer, examples), **reverse_kl(model, teacher, tokenizer, examples)}


def reports(root: Path) -> dict[str, dict[int, dict]]:
    """``{method: {seed: fork report}}`` for every finished run under ``root``, measured once into ``branch.json``."""
    found: dict[str, dict[int, dict]] = {}
    for final in sorted(root.glob("*/seed*/final")):
        path = final.parent / "branch.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        if not report:
            report = measure(str(final), yaml.safe_load((final.parent / "config.yaml").read_text()))
            path.write_text(json.dumps(report, indent=2))
        found.setdefault(final.parent.parent.name, {})[int(final.parent.name.removeprefix("seed"))] = report
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+", help="sweep output folders (<method>/seed<k>/ under each)")
    parser.add_argument("--before", action="store_true", help="also measure the config's student and teacher")
    parser.add_argument("--baseline", metavar="ROOT/METHOD",
                        help="also print each run's difference to this arm's run of the same seed (mean [95%% interval])")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    by_arm = {f"{root.name}/{method}": runs for root in args.roots for method, runs in reports(root).items()}
    if args.before:
        config = yaml.safe_load(next(args.roots[0].glob("*/seed*/config.yaml")).read_text())
        for name in ("student", "teacher"):
            by_arm[f"({name}, untrained)"] = {0: measure(config[name]["path"], config)}
    print("| arm | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for arm, runs in by_arm.items():
        cells = [spread([r[k] for r in runs.values() if r[k] is not None], ".2f" if "kl" in k else ".1%",
                        interval=len(runs) > 2) for k in KEYS]
        print(f"| {arm} (n={len(runs)}) | " + " | ".join(cells) + " |")
    if args.baseline:
        base_root, _, base_method = args.baseline.rpartition("/")
        base = reports(Path(base_root))[base_method]
        print(f"\nPaired by seed, minus {args.baseline}:")
        for arm, runs in by_arm.items():
            seeds = sorted(set(runs) & set(base))
            if len(seeds) < 2 or arm.startswith("("):
                continue
            cells = []
            for k in ("accuracy", "seq_kl", "forced_scratchpad", "forced_direct"):
                diffs = [runs[s][k] - base[s][k] for s in seeds]
                scale, fmt = (1, "+.2f") if "kl" in k else (100, "+.1f")
                lo, hi = interval95(diffs)
                cells.append(f"{k} {statistics.fmean(diffs) * scale:{fmt}} [{lo * scale:{fmt}}, {hi * scale:{fmt}}]")
            print(f"  {arm}: " + "; ".join(cells))
    print(json.dumps({arm: {k: [r[k] for r in runs.values()] for k in KEYS} for arm, runs in by_arm.items()}))


if __name__ == "__main__":
    main()
