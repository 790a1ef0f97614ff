"""opdkit's trainer against TRL's ``DistillationTrainer`` on the same work, side by side, in one run.

    .venv/bin/python bench/vs_trl.py --pair smollm2 --rounds 2 --steps 10
    .venv/bin/python bench/vs_trl.py --pair arith --rounds 2 --steps 10
    .venv/bin/python bench/vs_trl.py --pair smollm2 --rounds 1 --seed 1     # another seed for both trainers
    .venv/bin/python bench/vs_trl.py --rounds 1 --seed 2 --variants ours-bf16 ours-8bit   # some variants only

TRL is an optional extra: ``pip install -e '.[bench]'``.

Both sides do the same work: the same 64 training prompts, batch 4, ``--max-completion-length`` tokens
sampled by the student at temperature 1, full-vocabulary reverse KL to the teacher on them (opdkit: ``gkd``
with beta 1 and lmbda 1; TRL: ``beta=1.0``), AdamW (0.9, 0.999) at a constant 1e-5 with no weight decay,
gradient clipping at 1.0, ``--steps`` optimizer steps, the same number of torch threads. Variants: ``ours``
(``opd train``: float32 weights under ``precision: auto``), ``ours-bf16`` (the same with ``student.dtype: bf16``
and ``teacher.dtype: bf16``: bf16 weights for both models, and the student's gradients and AdamW moments in bf16
with stochastic rounding; on a processor where ``auto`` is float32 both compute in float32 on their bf16 weights),
``ours-8bit`` (``ours-bf16`` with ``optim.moments: 8bit``: the AdamW moments in 8-bit codes, half of bf16's memory),
``ours-8bit-system`` (``ours-8bit`` with ``allocator: system``: the steps' tensors in glibc's heap rather than the
tensor heap), ``trl-fp32`` and ``trl-bf16`` (TRL's ``bf16`` flag). Each runs in its own fresh process, one at a time;
each round runs all six, its starting variant rotated from round to round to cancel drift.

Per run: the median step time after the first step (opdkit: the sum of its logged stage times; TRL: wall
time from ``on_step_begin`` to ``on_step_end``, generation included), opdkit's per-stage split, the peak RSS
of the process, and the held-out reverse KL of the trained student, measured for every student by the same
``opdkit.evaluate.Evaluator`` in a separate process (evaluation is never timed). Prints a line per run, a
summary of medians over rounds with the ratios ours / TRL, and writes everything as JSON to ``--output``.

TRL's ``bf16=True`` in one process puts only generation in bf16: accelerate wraps ``model.forward`` in an
autocast, but the loss reaches both models through ``_ForwardRedirection``, which swaps that ``forward`` out
for the call, so the student's loss pass and the teacher's forward run in float32 (seen with forward hooks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ours", "ours-bf16", "ours-8bit", "ours-8bit-system", "trl-fp32", "trl-bf16")
OURS, TRL = VARIANTS[:4], VARIANTS[4:]
STAGES = ("rollout", "teacher", "forward_backward", "optimizer", "diagnostics")
TRAIN_PROMPTS, BATCH_SIZE, LEARNING_RATE = 64, 4, 1e-5
HELDOUT_PROMPTS, EVAL_LENGTH, EVAL_BATCH = 32, 32, 16
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def builtin(pair: str, name: str) -> str:
    from opdkit.scenarios import resolve_builtin

    return str(resolve_builtin(f"builtin:{pair}/{name}"))


def train_prompts(pair: str) -> list:
    """The 64 prompts in the order opdkit's sampler draws them (seed 0, first epoch); TRL reads them in that
    order unshuffled, so both sides see the same prompts at every step."""
    from opdkit.data import PromptSampler, load_examples

    examples = load_examples(builtin(pair, "train"))[:TRAIN_PROMPTS]
    return PromptSampler(examples, seed=0).next_batch(len(examples))


def after_first(values: list[float]) -> float:
    """The median after the first step (which pays one-time warm-up), or the only value."""
    return statistics.median(values[1:] or values)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


# ---- the children: one variant, or the held-out evaluation, per fresh process ----------------------------

def ours_config(pair: str, workdir: Path, seed: int = 0, threads: int = 2, steps: int = 10,
                max_completion_length: int = 32, dtype: str = "fp32", moments: str = "auto",
                allocator: str = "auto") -> dict:
    """The ``opd train`` config of the bench's work (its 64 training prompts written into ``workdir``); also what
    ``bench/step_profile.py`` profiles."""
    from opdkit.data import load_examples

    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": e.messages}) + "\n"
                               for e in load_examples(builtin(pair, "train"))[:TRAIN_PROMPTS]))
    return {
        "seed": seed, "output_dir": str(workdir / "run"), "threads": threads, "allocator": allocator,
        "student": {"path": f"builtin:{pair}/student", "dtype": dtype},
        "teacher": {"path": f"builtin:{pair}/teacher", "dtype": "bf16" if dtype == "bf16" else "auto"},
        "data": {"train": str(prompts)},  # no eval: no before/after evaluation inside the run
        "rollout": {"temperature": 1.0, "max_completion_length": max_completion_length, "batch_size": BATCH_SIZE},
        "objective": {"method": "gkd", "beta": 1.0, "lmbda": 1.0},
        "optim": {"steps": steps, "learning_rate": LEARNING_RATE, "warmup_steps": 0, "min_lr_ratio": 1.0,
                  "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "gradient_accumulation_steps": 1,
                  "max_grad_norm": 1.0, "moments": moments},
        "checkpoint": {"every": 0},
    }


def run_ours(args, workdir: Path, dtype: str, moments: str = "auto", allocator: str = "auto") -> dict:
    import yaml

    from opdkit.cli import main as opd

    config = ours_config(args.pair, workdir, args.seed, args.threads, args.steps, args.max_completion_length, dtype,
                         moments, allocator)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if opd(["train", str(workdir / "config.yaml")]) != 0:
        raise SystemExit("opd train failed")
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time_rollout" in r]
    return {
        "step_times_s": [sum(r[f"time_{stage}"] for stage in STAGES) for r in steps],
        "stages_s": {stage: after_first([r[f"time_{stage}"] for r in steps]) for stage in STAGES},
        "completion_length": statistics.mean(r["completion_length"] for r in steps),
        "student": str(workdir / "run" / f"checkpoint-{args.steps}"),  # save_pretrained weights (checkpoint.py)
    }


def run_trl(args, workdir: Path, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opdkit.models import load_model, load_tokenizer

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step. TRL generates inside it: Trainer.training_step calls
        self._prepare_inputs (transformers/trainer.py), which DistillationTrainer overrides to run
        _generate_and_score_completions -> _generate -> _generate_single_turn -> model.generate
        (trl/trainer/distillation_trainer.py); on_step_begin fires before the first micro-batch's
        training_step, on_step_end after clipping, optimizer.step, lr_scheduler.step and zero_grad."""

        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(builtin(args.pair, "student"))
    config = DistillationConfig(
        output_dir=str(workdir / "trl"), max_steps=args.steps, per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0, beta=1.0, temperature=1.0,
        max_completion_length=args.max_completion_length, gradient_checkpointing=False, disable_dropout=True,
        bf16=bf16, shuffle_dataset=False, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0, seed=args.seed,
    )
    timer = StepTimer()
    trainer = DistillationTrainer(
        model=load_model(builtin(args.pair, "student")), teacher_model=load_model(builtin(args.pair, "teacher")),
        args=config, train_dataset=Dataset.from_list([{"prompt": e.messages} for e in train_prompts(args.pair)]),
        processing_class=tokenizer, callbacks=[timer],
    )
    trainer.train()
    student = workdir / "student"
    trainer.model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    return {"step_times_s": timer.times, "student": str(student), "completion_length": statistics.mean(lengths),
            "optim": config.optim.value}


def run_eval(args, workdir: Path) -> dict:
    """Held-out reverse KL of each student in ``students.json``, all measured with the same seed and samples."""
    import torch

    from opdkit.data import load_examples
    from opdkit.evaluate import Evaluator
    from opdkit.models import load_model, load_tokenizer
    from opdkit.teachers import LocalTeacher

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(builtin(args.pair, "student"))
    teacher = LocalTeacher(load_model(builtin(args.pair, "teacher")), tokenizer)
    evaluator = Evaluator(teacher, tokenizer, load_examples(builtin(args.pair, "heldout"))[:HELDOUT_PROMPTS],
                          verifier=None, max_completion_length=EVAL_LENGTH, batch_size=EVAL_BATCH, seed=0)
    students = json.loads((workdir / "students.json").read_text())
    return {name: evaluator(load_model(path))["reverse_kl"] for name, path in students.items()}


def child(args) -> None:
    workdir = Path(args.workdir)
    if args.variant == "eval":
        result = run_eval(args, workdir)
    else:
        if args.variant in OURS:
            result = run_ours(args, workdir, "fp32" if args.variant == "ours" else "bf16",
                              "8bit" if args.variant.startswith("ours-8bit") else "auto",
                              "system" if args.variant.endswith("-system") else "auto")
        else:
            result = run_trl(args, workdir, args.variant == "trl-bf16")
        import torch

        result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))  # the last stdout line is the parent's


# ---- the parent ---------------------------------------------------------------------------------------------

def spawn(args, variant: str, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--pair", args.pair, "--steps", str(args.steps), "--threads", str(args.threads),
               "--max-completion-length", str(args.max_completion_length), "--seed", str(args.seed), "--variant", variant,
               "--workdir", str(workdir)]
    with (workdir / "stderr.log").open("w") as stderr:
        done = subprocess.run(command, env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if done.returncode != 0:
        tail = (workdir / "stderr.log").read_text()[-4000:]
        raise SystemExit(f"{variant} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_round(args, index: int, root: Path, before: bool) -> list[dict]:
    """All variants, the starting one rotated by ``index``, then one evaluation of their students."""
    variants = args.variants
    order = variants[index % len(variants):] + variants[:index % len(variants)]
    runs = [{"round": index, "variant": v, **spawn(args, v, root / f"round{index}-{v}")} for v in order]
    students = {run["variant"]: run.pop("student") for run in runs}
    if before:
        students["before"] = builtin(args.pair, "student")
    (root / f"round{index}-eval").mkdir()
    (root / f"round{index}-eval" / "students.json").write_text(json.dumps(students))
    kl = spawn(args, "eval", root / f"round{index}-eval")
    for run in runs:
        run["median_step_s"] = after_first(run["step_times_s"])
        run["reverse_kl"] = kl[run["variant"]]
    return runs + ([{"round": index, "variant": "before", "reverse_kl": kl["before"]}] if before else [])


def summarize(runs: list[dict]) -> dict:
    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    ran = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    table = {v: {key: median(v, key) for key in ("median_step_s", "peak_rss_gb", "reverse_kl")} for v in ran}
    ours_ran, trl_ran = [v for v in OURS if v in ran], [v for v in TRL if v in ran]
    for ours in ours_ran:
        table[ours]["stages_s"] = {s: statistics.median(r["stages_s"][s] for r in runs if r["variant"] == ours)
                                   for s in STAGES}
    fastest = min(trl_ran, key=lambda v: table[v]["median_step_s"]) if trl_ran else None
    ratios = {f"{ours} / {name}": {"time": table[ours]["median_step_s"] / table[v]["median_step_s"],
                                   "memory": table[ours]["peak_rss_gb"] / table[v]["peak_rss_gb"]}
              for ours in ours_ran
              for name, v in [(v, v) for v in trl_ran] + ([(f"TRL's fastest ({fastest})", fastest)] if fastest else [])}
    return {"medians": table, "before_reverse_kl": median("before", "reverse_kl"), "trl_fastest": fastest,
            "ratios": ratios}


def machine(threads: int) -> dict:
    import torch

    from opdkit.models import bf16_units, machine_description, pick_device, resolve_precision

    torch.set_num_threads(threads)
    precision = resolve_precision("auto", pick_device())  # what opd train's precision: auto picked here
    return {"description": machine_description(precision), "bf16_units": bf16_units(), "torch_threads": threads}


def report(runs: list[dict], summary: dict, host: dict) -> None:
    for run in runs:
        if run["variant"] == "before":
            continue
        print(f"round {run['round']}  {run['variant']:<16}  step {run['median_step_s']:7.3f} s  "
              f"peak RSS {run['peak_rss_gb']:5.2f} GB  held-out reverse KL after {run['reverse_kl']:.4f}  "
              f"(mean completion {run['completion_length']:.1f} tokens)")
        if run["variant"] in OURS:
            print(f"          {run['variant']} stages: " + ", ".join(f"{s} {t:.3f} s" for s, t in run["stages_s"].items()))
    print(f"\nmedians over rounds (held-out reverse KL before: {summary['before_reverse_kl']:.4f})")
    print(f"{'variant':<17}{'step s':>10}{'RSS GB':>10}{'rev. KL':>10}")
    for variant, row in summary["medians"].items():
        print(f"{variant:<17}{row['median_step_s']:>10.3f}{row['peak_rss_gb']:>10.2f}{row['reverse_kl']:>10.4f}")
    for ours in [v for v in OURS if v in summary["medians"]]:
        print(f"{ours} stages: " + ", ".join(f"{s} {t:.3f} s" for s, t in summary["medians"][ours]["stages_s"].items()))
    for name, ratio in summary["ratios"].items():
        print(f"{name:<35} time {ratio['time']:.2f}x  memory {ratio['memory']:.2f}x")
    print(f"machine: {host['description']} (ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=["smollm2", "arith"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (default: all); ratios to TRL need a TRL variant among them")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (both sides)")
    parser.add_argument("--seed", type=int, default=0, help="both trainers' seed (sampling, initialisation); the "
                        "prompts' order and the held-out evaluation's samples stay the same")
    parser.add_argument("--output", default=None, help="JSON results (default: bench/results/vs_trl-<pair>.json)")
    parser.add_argument("--variant", choices=[*VARIANTS, "eval"], help=argparse.SUPPRESS)  # a child
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        print("TRL is an optional extra: pip install -e '.[bench]'")
        sys.exit(2)
    builtin(args.pair, "teacher")  # build the scenario once, before any child needs it
    host = machine(args.threads)
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as root:
        runs = [run for r in range(args.rounds) for run in run_round(args, r, Path(root), before=r == 0)]
    summary = summarize(runs)
    report(runs, summary, host)
    output = Path(args.output or Path(__file__).parent / "results" / f"vs_trl-{args.pair}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("pair", "rounds", "steps", "max_completion_length", "threads", "seed",
                                              "variants")}
    settings |= {"train_prompts": TRAIN_PROMPTS, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                 "heldout_prompts": HELDOUT_PROMPTS, "eval_max_completion_length": EVAL_LENGTH}
    output.write_text(json.dumps({"settings": settings, "machine": host, "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
