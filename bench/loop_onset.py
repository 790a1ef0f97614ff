"""Does the teacher endorse a student's loop? Its probability of the student's greedy tokens before, at the entry of
and inside a loop.

    .venv/bin/python bench/loop_onset.py runs/bridge/gkd-s0 runs/bridge/gkd-t03-s0 ... [--length 96] [--output F.json]

On the 32 held-out prompts of ``configs/smollm2-heal.yaml``, each model (the teacher first, then the ``final`` student
of each run folder) answers greedily with up to ``--length`` new tokens, in the precision ``precision: auto`` picks.
The teacher then scores every answer token. A loop (``opdkit.evaluate.loops``) is a run of four tokens that occurs
three times or more; each token of an answer is classed by the four-token run that it ends:

- **inside** a loop: that run has occurred at least twice before (the third occurrence on);
- **entry**: the first run of the answer to occur a second time, in an answer that goes on to loop;
- **free**: every other token before the answer's first entry.

Per model and class: the tokens, the teacher's mean probability of the token the student chose, and how often it is
the teacher's own greedy choice. A teacher that gives a loop's continuation a high probability endorses the loop
once entered: a per-token signal from it cannot push the student out, only away from the entry.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.demo import shipped_config
from opdkit.evaluate import LOOP_TIMES, LOOP_TOKENS, looping, loops
from opdkit.models import autocast, load_model, machine_description
from opdkit.rollout import sample
from opdkit.train import setup

CLASSES = ("free", "entry", "inside")


def classes(ids: list[int]) -> list[str | None]:
    """Each token's class (None after the first entry, outside a loop; before position LOOP_TOKENS - 1: free)."""
    seen: Counter = Counter()
    looped, entered, out = loops(ids), False, []
    for t in range(len(ids)):
        run = tuple(ids[max(0, t - LOOP_TOKENS + 1) : t + 1])
        if len(run) < LOOP_TOKENS:
            out.append(None if entered else "free")
            continue
        seen[run] += 1
        if seen[run] >= LOOP_TIMES:
            out.append("inside")
        elif seen[run] == 2 and looped and not entered:
            out.append("entry")
            entered = True
        else:
            out.append(None if entered else "free")
    return out


def measure(model, teacher, tokenizer, examples, length: int, amp_dtype) -> dict:
    with torch.no_grad(), autocast(torch.device("cpu"), amp_dtype):
        rollouts = sample(model, tokenizer, examples, max_completion_length=length, temperature=0.0)
        logits = rollouts.completion_logits(teacher).float()
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    agrees = logits.argmax(-1) == rollouts.completion_ids
    sums = {c: {"tokens": 0, "probability": 0.0, "teacher_greedy": 0} for c in CLASSES}
    for row, ids in enumerate(rollouts.completions()):
        for t, kind in enumerate(classes(ids)):
            if kind is not None:
                sums[kind]["tokens"] += 1
                sums[kind]["probability"] += float(chosen[row, t])
                sums[kind]["teacher_greedy"] += int(agrees[row, t])
    return {"looping": looping([rollouts]),
            **{c: {"tokens": s["tokens"], "probability": s["probability"] / max(1, s["tokens"]),
                   "teacher_greedy": s["teacher_greedy"] / max(1, s["tokens"])} for c, s in sums.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders whose final/ student to measure")
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    config = load_config(shipped_config("smollm2-heal.yaml"), [])
    run = setup(config)
    examples = load_examples(config.data.eval)
    teacher = run.teacher.model
    models = {"teacher": teacher, **{str(folder): load_model(str(folder / "final")).eval() for folder in args.runs}}
    measured = {name: measure(model, teacher, run.tokenizer, examples, args.length, run.amp_dtype)
                for name, model in models.items()}
    table = Table(title=f"the teacher on greedy answers to {len(examples)} held-out prompts, up to {args.length} "
                        "tokens: tokens, its probability of the chosen token, its greedy choice")
    table.add_column("model", overflow="fold")
    table.add_column("loop", justify="right")
    for kind in CLASSES:
        table.add_column(kind, justify="right")
    for name, m in measured.items():
        table.add_row(name, f"{m['looping']:.0%}", *(
            f"{m[k]['tokens']}: {m[k]['probability']:.2f}, {m[k]['teacher_greedy']:.0%}" for k in CLASSES))
    console = Console()
    console.print(f"machine: {machine_description(run.amp_dtype)}")
    console.print(table)
    if args.output:
        args.output.write_text(json.dumps({"length": args.length, "machine": machine_description(run.amp_dtype),
                                           "models": measured}, indent=1) + "\n")


if __name__ == "__main__":
    main()
