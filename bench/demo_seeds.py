"""``opd demo`` over several teacher-student pairs and run seeds: does its verdict hold whichever pair and run?

    .venv/bin/python bench/demo_seeds.py --seeds 0,1,2,3,4                        # pairs trained here
    .venv/bin/python bench/demo_seeds.py --seeds shipped --run-seeds 0,1,2,3,4    # the shipped pair, 5 runs

Float rounding differs between processors, so the arithmetic recipe trains a different teacher and student on each
(the plateau of the student's warm-up ends at a different step). Different build seeds do the same on one machine,
so they stand in for other processors. Seed ``s`` trains a pair into its own cache (``OUT/cache-s``: the teacher's
initialisation and batches from ``s``, the student's from ``s + 1``; the shipped pair is seed 0's on the machine
that made it), ``shipped`` unpacks the pair ``make demo`` uses, and the demo runs on each pair once per run seed
(the config's ``seed``: sampling and batch order). ``--set`` passes overrides to every run (``precision=bf16``).
Printed per run: the pair (warm-up steps, the student's validation cross-entropy), held-out accuracy before and
after each method, and the demo's verdict on the best on-policy run against SeqKD; then the mean, standard
deviation and 95% interval of the mean over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opdkit.config import load_config
from opdkit.demo import RUNS, run_demo, shipped_config, verdict
from opdkit.scenarios import arith, build_atomically
from opdkit.sweep import interval95


def one_seed(seed: str, out: Path, console: Console, run_seed: int, overrides: list[str]) -> dict:
    cache = out / f"cache-{seed}"
    os.environ["OPDKIT_CACHE"] = str(cache)  # builtin:arith/... resolve here from now on
    folder = cache / arith.FOLDER
    if not (folder / "build.json").exists():
        build_atomically(arith, folder, **({} if seed == "shipped" else {"seed": int(seed)}))
    build = json.loads((folder / "build.json").read_text())
    name = f"{seed}" if run_seed == 0 else f"{seed}-run-{run_seed}"
    summary = out / f"seed-{name}.json"
    if summary.exists():  # finished earlier: a re-run only prints
        return json.loads(summary.read_text())
    demo = run_demo([f"seed={run_seed}", *overrides], output_dir=str(out / f"demo-{name}"), console=console)
    results = demo["results"]
    first = next(iter(results.values()))
    row = {"seed": seed, "run_seed": run_seed, "build": build, "before": first["before"]["accuracy"],
           "before_reverse_kl": first["before"]["reverse_kl"],
           "after": {label: r["after"]["accuracy"] for label, r in results.items()},
           "reverse_kl": {label: r["after"]["reverse_kl"] for label, r in results.items()}}
    summary.write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated build seeds, or shipped")
    parser.add_argument("--run-seeds", default="0", help="comma-separated run seeds (the config's seed: sampling "
                        "and batch order), each run on every build")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--out", default="runs/demo-seeds", help="caches, runs and per-seed summaries")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    rows = [one_seed(s, out, console, int(r), args.overrides)
            for s in args.seeds.split(",") for r in args.run_seeds.split(",")]

    labels = [label for label, _ in RUNS]
    n = load_config(shipped_config("arith-opd.yaml")).data.eval_size  # the held-out problems the demo measures
    table = Table(title=f"opd demo over pairs and runs: held-out accuracy ({n} problems)")
    for column in ("build seed", "run seed", "warm-up steps", "val. CE", "before", "KL before", *labels, "verdict"):
        table.add_column(column, justify="right")
    for row in rows:
        *on_policy, baseline = labels
        best = max(on_policy, key=lambda label: row["after"][label])
        sentence, _ = verdict(best, row["after"][best], row["after"][baseline], n)
        table.add_row(str(row["seed"]), str(row["run_seed"]), str(row["build"]["student_steps"]),
                      f"{row['build']['student_validation_ce']:.3f}", f"{row['before']:.1%}",
                      f"{row['before_reverse_kl']:.3f}",
                      *(f"{row['after'][label]:.1%}" for label in labels), sentence)
    if len(rows) > 1:
        columns = [[r["before"] for r in rows], *([r["after"][label] for r in rows] for label in labels)]
        mean_sd = lambda xs: f"{statistics.mean(xs):.1%} ± {statistics.stdev(xs):.1%}"  # noqa: E731
        table.add_row("mean ± sd", "", "", "", mean_sd(columns[0]), "", *map(mean_sd, columns[1:]), "")
        span = lambda xs: "{:.1%} to {:.1%}".format(*interval95(xs))  # noqa: E731
        table.add_row("95% interval", "", "", "", span(columns[0]), "", *map(span, columns[1:]), "")
    console.print(table)


if __name__ == "__main__":
    main()
