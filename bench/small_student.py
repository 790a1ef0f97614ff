"""The demo's three methods with a student too small for its teacher: does on-policy distillation beat SeqKD there?

    .venv/bin/python bench/small_student.py --seeds 0,1,2,3,4 [--builds 0,1,2,3,4] [--output F.json]

A one-layer student with two attention heads (d=64, the demo student's width) trained on the reference completions
plateaus at a validation cross-entropy of about 0.13 nats and 5-7% accuracy (steps 4000 to 8000 of the build's
recipe), where the two-layer demo student goes on to 100%; with four heads one layer reaches 88% by step 4000
(``docs/results.md``). Such a student cannot represent its teacher; it is the
regime in which the mode-seeking reverse KL of on-policy distillation is argued to pay over supervised training on
the teacher's samples (SeqKD), which spreads the student's mass over everything the teacher writes.

The student is warmed up once per build seed (``--builds``, default 1: ``--warm-steps`` steps of cross-entropy on
the reference completions, the build's recipe, with that seed for its initial weights and batches) into
``OUT/build-B/student``; then each method of ``opd demo`` (classic OPD, GKD on student samples, SeqKD) trains a copy
of it with the demo's budget (150 steps x 64 prompts, learning rate 3e-4) once per run seed, and is measured on the
512 held-out problems. Printed per build: per seed, and the mean, standard deviation and 95% interval of the mean
over seeds of the accuracy, the reverse KL and each on-policy method's paired difference to SeqKD; over several
builds, each build's mean paired difference and their mean, standard deviation and 95% interval over builds (the
build is then the unit: its run seeds share one student). Results: ``OUT/results.json`` (and ``--output``); a
rerun skips what that file already holds.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

SMALL = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256)


def warm_student(folder: Path, steps: int, seed: int) -> dict:
    from rich.console import Console

    from opdkit.scenarios import arith
    from opdkit.tasks import arithmetic

    examples = arith.as_examples(arithmetic.make_splits(arith.SPLITS, seed=arith.SEED))
    tokenizer = arith.build_tokenizer()
    student = arith.new_model(tokenizer, SMALL, seed=seed)
    arith.supervised(student, tokenizer, examples["train"], lambda model: (True, "done"), max_steps=steps, lr=1e-3,
                     check_every=steps, seed=seed, console=Console(stderr=True),
                     label=f"one-layer student, build {seed}")
    ids, mask = arith.encode(tokenizer, examples["validation"])
    record = {"shape": SMALL, "warm_steps": steps, "seed": seed,
              "validation_ce": arith.validation_ce(student, ids, mask, tokenizer.pad_token_id),
              "validation_accuracy": arith.accuracy(student, tokenizer, examples["validation"])}
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "build.json").write_text(json.dumps(record, indent=2))
    return record


def paired(results: dict, label: str, baseline: str, build: int, seeds: list[int], measure: str) -> list[float]:
    """``label`` minus ``baseline`` after training, per run seed of one build."""
    runs = results["runs"]
    return [runs[f"{label} / build {build} / seed {s}"]["after"][measure]
            - runs[f"{baseline} / build {build} / seed {s}"]["after"][measure] for s in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="run seeds, comma-separated")
    parser.add_argument("--builds", default="1", help="build seeds of the one-layer student, comma-separated")
    parser.add_argument("--warm-steps", type=int, default=6000)
    parser.add_argument("--output-dir", default="runs/small-student")
    parser.add_argument("--output", help="also write the results here (a JSON file)")
    args = parser.parse_args()
    seeds, builds = ([int(s) for s in text.split(",")] for text in (args.seeds, args.builds))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from opdkit.config import load_config
    from opdkit.demo import RUNS, shipped_config
    from opdkit.scenarios import resolve_builtin
    from opdkit.sweep import spread
    from opdkit.train import setup, train

    out = Path(args.output_dir)
    resolve_builtin("builtin:arith/teacher")  # the demo's scenario, built once
    console = Console()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"builds": {}, "runs": {}}

    def save() -> None:
        for path in [results_path, *([Path(args.output)] if args.output else [])]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))

    for build in builds:
        folder = out / f"build-{build}" / "student"
        if not (folder / "build.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            warm_student(folder, args.warm_steps, build)
        record = results["builds"][str(build)] = json.loads((folder / "build.json").read_text())
        console.print(f"build {build}: one-layer student after {record['warm_steps']} warm-up steps: validation "
                      f"cross-entropy {record['validation_ce']:.3f}, accuracy {record['validation_accuracy']:.1%}")
        for seed in seeds:
            for label, overrides in RUNS:
                key = f"{label} / build {build} / seed {seed}"
                if key in results["runs"]:  # finished earlier
                    continue
                name = overrides[0].split("=")[1]
                config = load_config(shipped_config("arith-opd.yaml"),
                                     [*overrides, f"seed={seed}", f"student.path={folder.resolve()}",
                                      f"output_dir={out / f'build-{build}' / f'{name}-{seed}'}"])
                measured = train(setup(config), Console(quiet=True))
                results["runs"][key] = {"before": measured["before"], "after": measured["after"]}
                save()
                console.print(f"{key}: accuracy {measured['before']['accuracy']:.1%} -> "
                              f"{measured['after']['accuracy']:.1%}, reverse KL {measured['before']['reverse_kl']:.4f}"
                              f" -> {measured['after']['reverse_kl']:.4f}")
    save()

    summary = partial(spread, interval=True)
    baseline = RUNS[-1][0]
    for build in builds:
        console.print(f"\nbuild {build}, over seeds {seeds}: mean ± sd [95% interval of the mean]")
        for label, _ in RUNS:
            after = [results["runs"][f"{label} / build {build} / seed {s}"]["after"] for s in seeds]
            accuracy, kl = [a["accuracy"] for a in after], [a["reverse_kl"] for a in after]
            console.print(f"{label:16s} accuracy {summary(accuracy, '.2%')}  reverse KL {summary(kl, '.4f')}")
            console.print(f"{'':16s} per seed: " + ", ".join(f"{a:.1%} / {k:.4f}" for a, k in zip(accuracy, kl)))
        for label, _ in RUNS[:-1]:
            accuracy = paired(results, label, baseline, build, seeds, "accuracy")
            kl = paired(results, label, baseline, build, seeds, "reverse_kl")
            console.print(f"{label} - {baseline}: accuracy {summary(accuracy, '+.2%')}, "
                          f"reverse KL {summary(kl, '+.4f')}")
    if len(builds) > 1:
        console.print(f"\nover builds {builds} (each a mean over seeds {seeds}): mean ± sd [95% interval over builds]")
        for label, _ in RUNS[:-1]:
            for measure, fmt in (("accuracy", "+.2%"), ("reverse_kl", "+.4f")):
                means = [sum(d) / len(d) for d in (paired(results, label, baseline, b, seeds, measure) for b in builds)]
                ahead = sum(m > 0 for m in means) if measure == "accuracy" else sum(m < 0 for m in means)
                console.print(f"{label} - {baseline}, {measure}: {summary(means, fmt)}; per build "
                              + ", ".join(format(m, fmt) for m in means)
                              + f"; on-policy better in {ahead} of {len(builds)}")


if __name__ == "__main__":
    main()
