"""The demo's three methods with a student too small for its teacher: does on-policy distillation beat SeqKD there?

    .venv/bin/python bench/small_student.py --seeds 0,1,2,3,4

A one-layer student with two attention heads (d=64, the demo student's width) trained on the reference completions
plateaus at a validation cross-entropy of about 0.13 nats and 5-7% accuracy (steps 4000 to 8000 of the build's
recipe), where the two-layer demo student goes on to 100%; with four heads one layer reaches 88% by step 4000
(``docs/results.md``). Such a student cannot represent its teacher; it is the
regime in which the mode-seeking reverse KL of on-policy distillation is argued to pay over supervised training on
the teacher's samples (SeqKD), which spreads the student's mass over everything the teacher writes.

The student is warmed up once (``--warm-steps`` steps of cross-entropy on the reference completions, the build's
recipe, seed 1) into ``OUT/student``; then each method of ``opd demo`` (classic OPD, GKD on student samples, SeqKD)
trains a copy of it with the demo's budget (150 steps x 64 prompts, learning rate 3e-4) once per run seed, and is
measured on the 512 held-out problems. Printed: per seed, and the mean, standard deviation and 95% interval of the
mean over seeds of the accuracy, the reverse KL and each on-policy method's paired difference to SeqKD. Results:
``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

SMALL = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256)


def warm_student(folder: Path, steps: int) -> dict:
    from rich.console import Console

    from opdkit.scenarios import arith
    from opdkit.tasks import arithmetic

    examples = arith.as_examples(arithmetic.make_splits(arith.SPLITS, seed=arith.SEED))
    tokenizer = arith.build_tokenizer()
    student = arith.new_model(tokenizer, SMALL, seed=1)
    arith.supervised(student, tokenizer, examples["train"], lambda model: (True, "done"), max_steps=steps, lr=1e-3,
                     check_every=steps, seed=1, console=Console(stderr=True), label="one-layer student")
    ids, mask = arith._encode(tokenizer, examples["validation"])
    record = {"shape": SMALL, "warm_steps": steps,
              "validation_ce": arith.validation_ce(student, ids, mask, tokenizer.pad_token_id),
              "validation_accuracy": arith.accuracy(student, tokenizer, examples["validation"])}
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "build.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--warm-steps", type=int, default=6000)
    parser.add_argument("--output-dir", default="runs/small-student")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from opdkit.config import load_config
    from opdkit.demo import RUNS, shipped_config
    from opdkit.scenarios import resolve_builtin
    from opdkit.sweep import spread
    from opdkit.train import setup, train

    out = Path(args.output_dir)
    folder = out / "student"
    resolve_builtin("builtin:arith/teacher")  # the demo's scenario, built once
    if not (folder / "build.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        warm_student(folder, args.warm_steps)
    build = json.loads((folder / "build.json").read_text())
    console = Console()
    console.print(f"one-layer student after {build['warm_steps']} warm-up steps: validation cross-entropy "
                  f"{build['validation_ce']:.3f}, accuracy {build['validation_accuracy']:.1%}")
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, overrides in RUNS:
            key = f"{label} / seed {seed}"
            if key in results:  # finished earlier
                continue
            name = overrides[0].split("=")[1]
            config = load_config(shipped_config("arith-opd.yaml"),
                                 [*overrides, f"seed={seed}", f"student.path={folder.resolve()}",
                                  f"output_dir={out / f'{name}-{seed}'}"])
            measured = train(setup(config), Console(quiet=True))
            results[key] = {"before": measured["before"], "after": measured["after"]}
            results_path.write_text(json.dumps(results, indent=2))
            console.print(f"{key}: accuracy {measured['before']['accuracy']:.1%} -> {measured['after']['accuracy']:.1%}, "
                          f"reverse KL {measured['before']['reverse_kl']:.4f} -> {measured['after']['reverse_kl']:.4f}")

    seeds = sorted({int(k.rsplit(" ", 1)[1]) for k in results})

    summary = partial(spread, interval=True)
    console.print(f"\nover seeds {seeds}: mean ± sd [95% interval of the mean]")
    for label, _ in RUNS:
        accuracy = [results[f"{label} / seed {s}"]["after"]["accuracy"] for s in seeds]
        kl = [results[f"{label} / seed {s}"]["after"]["reverse_kl"] for s in seeds]
        console.print(f"{label:16s} accuracy {summary(accuracy, '.2%')}  reverse KL {summary(kl, '.4f')}")
        console.print(f"{'':16s} per seed: " + ", ".join(f"{a:.1%} / {k:.4f}" for a, k in zip(accuracy, kl)))
    baseline = RUNS[-1][0]
    for label, _ in RUNS[:-1]:
        accuracy = [results[f"{label} / seed {s}"]["after"]["accuracy"] - results[f"{baseline} / seed {s}"]["after"]["accuracy"]
                    for s in seeds]
        kl = [results[f"{label} / seed {s}"]["after"]["reverse_kl"] - results[f"{baseline} / seed {s}"]["after"]["reverse_kl"]
              for s in seeds]
        console.print(f"{label} - {baseline}: accuracy {summary(accuracy, '+.2%')}, reverse KL {summary(kl, '+.4f')}")


if __name__ == "__main__":
    main()
