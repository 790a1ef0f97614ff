"""The held-out table of ``smollm2-heal`` runs: per arm over seeds, and each arm against the first, paired by seed.

    .venv/bin/python bench/heal_table.py "GKD=runs/heal/gkd-s*" "SeqKD=runs/heal/seqkd-s*" \\
        [--cut "plain cut=runs/heal-long/gkd-s*"] [--plot docs/heal]

Each ``LABEL=GLOB`` names an arm: the finished runs among the folders the glob matches (``report.read_arm``). Per arm:
the seeds, the steps, the held-out reverse KL after training and the share of the gap recovered from the run's
own start (1 - after / before, per seed), token agreement, the share of greedy answers that loop at the
evaluation's length (runs that logged it), the teacher's seconds per step (scoring for on-policy runs, decoding
for SeqKD, whose teacher writes the completions) and the wall time. ``--cut`` names runs whose reverse KL before
training is the gap compression left (the plain cut's, for students that start from a bridged one): the table
then also gives the share of that gap recovered, per seed against the cut's run of the same seed.

A run whose teacher measured no reverse KL during training (a chat teacher gives text only) is measured afterwards
against the local teacher, and the table reads those files in its folder in place of its own evaluations:

    opd eval configs/smollm2-heal-24.yaml --untouched --set seed=$s | tail -1 > RUN/eval-before.json
    opd eval configs/smollm2-heal-24.yaml --checkpoint RUN/final --set seed=$s | tail -1 > RUN/eval-after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opdkit.report import read_arm
from opdkit.sweep import paired, plot, spread


def measured(log, when: str, own: dict) -> dict:
    """``own`` (the run's evaluation before or after training), or ``RUN/eval-{when}.json`` where it has no KL."""
    path = log.run_dir / f"eval-{when}.json"
    return json.loads(path.read_text()) if "reverse_kl" not in own and path.exists() else own


def summary(log) -> dict:
    """A finished run (``report.RunLog``): its held-out figures and its teacher's seconds."""
    before, after = measured(log, "before", log.before), measured(log, "after", log.final["eval"])
    return {"seed": log.config.seed, "steps": len(log.steps), "before": before["reverse_kl"], "evals": log.evals,
            "reverse_kl": after["reverse_kl"], "agreement": after["token_agreement"], "looping": after.get("looping"),
            "teacher_s": statistics.median(log.teacher_seconds[1:]), "wall_min": log.final["wall_s"] / 60}


def arm(spec: str) -> tuple[str, list[dict]]:
    label, logs = read_arm(spec)
    if not logs:
        raise SystemExit(f"{spec}: no finished run folder matches")
    return label, list(map(summary, logs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--cut", help="LABEL=GLOB: runs whose reverse KL before training is compression's gap")
    parser.add_argument("--plot", type=Path, help="write PLOT-reverse_kl.png and PLOT-token_agreement.png: each arm's "
                                                  "held-out curve, mean over seeds (band: min to max)")
    args = parser.parse_args()
    arms = dict(map(arm, args.arms))
    cut = {r["seed"]: r["before"] for r in arm(args.cut)[1]} if args.cut else {}
    header = ["arm", "seeds", "steps", "reverse KL after", "gap recovered from its start"]
    header += [f"gap recovered from the {args.cut.split('=')[0]}"] if cut else []
    header += ["token agreement", "greedy answers that loop", "teacher s per step", "wall min"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, runs in arms.items():
        cells = [label, ",".join(str(r["seed"]) for r in runs), str(runs[0]["steps"]),
                 spread([r["reverse_kl"] for r in runs], ".3f", interval=True),
                 spread([100 * (1 - r["reverse_kl"] / r["before"]) for r in runs], ".0f", interval=True) + "%"]
        if cut:
            cells.append(spread([100 * (1 - r["reverse_kl"] / cut[r["seed"]]) for r in runs if r["seed"] in cut],
                                ".0f", interval=True) + "%")
        looping = [100 * r["looping"] for r in runs if r["looping"] is not None]
        cells += [spread([100 * r["agreement"] for r in runs], ".1f", interval=True) + "%",
                  spread(looping, ".0f") + "%" if looping else "-",
                  spread([r["teacher_s"] for r in runs], ".2f"), spread([r["wall_min"] for r in runs], ".1f")]
        print("| " + " | ".join(cells) + " |")
    for metric in ("reverse_kl", "token_agreement") if args.plot else ():
        path = args.plot.with_name(f"{args.plot.name}-{metric}.png")
        plot(arms, metric, path, title="smollm2-heal, held-out (mean over seeds; band: min to max)")
        print(f"wrote {path}")
    (first, base), *rest = arms.items()
    for label, runs in rest:
        kl, agreement = paired(runs, base, "reverse_kl"), paired(runs, base, "agreement", 100)
        if kl:
            print(f"\n{label} minus {first}, paired by seed ({kl[0]}): reverse KL {kl[1]:+.3f} "
                  f"[{kl[2]:+.3f}, {kl[3]:+.3f}], token agreement {agreement[1]:+.1f} points "
                  f"[{agreement[2]:+.1f}, {agreement[3]:+.1f}]")


if __name__ == "__main__":
    main()
