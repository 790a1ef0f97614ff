"""Which of SmolLM2-135M-Instruct's 30 layers to remove: the cuts measured for ``builtin:smollm2/student-20``
(ten layers) and ``student-24-bridge`` (six, ``--removed 6 --bridged``).

    .venv/bin/python bench/prune_cuts.py [--removed 10] [--bridged]

Each cut is the teacher without ``--removed`` decoder layers (embeddings, final norm and head kept:
``opdkit.scenarios.smollm2.prune_layers``), measured untrained by the evaluation every run uses, on the held-out
prompts of ``configs/smollm2-heal.yaml``: exact reverse KL to the teacher on the student's samples, token agreement
with the teacher's greedy answers, mean greedy length. The cuts: every third layer (the last one kept; ten layers
only), the layers of lowest block influence (ShortGPT, Men et al. 2024: one minus the mean cosine similarity between
a layer's input and output hidden states, here over 24 training prompts followed by the teacher's greedy answers),
and the contiguous blocks starting at every second layer from 8. ``--bridged`` also measures each contiguous block
with the linear bridge that ``opd build smollm2`` folds into its bridged students (``bridged_student``, fitted on the
teacher's answers to the same calibration prompts). The cuts are taken from the teacher as the run loads it
(``teacher.dtype: auto``: bf16 where the processor has bf16 units), the build's from the float32 teacher.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.demo import shipped_config
from opdkit.rollout import sample
from opdkit.scenarios.smollm2 import (BRIDGED, CALIBRATION_PROMPTS, STUDENTS, TEACHER_LAYERS, bridged_student,
                                      calibration_answers, prune_layers)
from opdkit.train import setup


@torch.no_grad()
def block_influence(model, tokenizer, examples, length: int) -> list[float]:
    """Per decoder layer, one minus the mean cosine similarity of its input and output at every real token."""
    rollouts = sample(model, tokenizer, examples, max_completion_length=length, temperature=0.0)
    mask = rollouts.attention_mask.bool()
    hidden = model(rollouts.input_ids, attention_mask=rollouts.attention_mask, output_hidden_states=True).hidden_states
    return [1 - torch.cosine_similarity(a[mask], b[mask], dim=-1).mean().item() for a, b in zip(hidden, hidden[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--removed", type=int, default=10, help="how many decoder layers each cut removes")
    parser.add_argument("--bridged", action="store_true", help="also measure each contiguous block with its bridge")
    args = parser.parse_args()
    console = Console()
    config = load_config(shipped_config("smollm2-heal.yaml"), [f"threads={args.threads}"])
    run = setup(config)
    teacher = run.teacher.model
    train = load_examples(config.data.train)
    influence = block_influence(teacher, run.tokenizer, train[:24], length=40)
    console.print("block influence per layer: " + ", ".join(f"{i}: {b:.3f}" for i, b in enumerate(influence)))
    blocks = {f"block {s}-{s + args.removed - 1}": list(range(s, s + args.removed))
              for s in range(8, TEACHER_LAYERS - args.removed - 1, 2)}
    cuts = {**({"every third layer": [i for i in range(2, TEACHER_LAYERS - 1, 3)] + [TEACHER_LAYERS - 2]}
               if args.removed == 10 else {}),
            "lowest block influence": sorted(sorted(range(TEACHER_LAYERS), key=influence.__getitem__)[:args.removed]),
            **blocks}
    table = Table(title=f"SmolLM2-135M-Instruct without {args.removed} of its {TEACHER_LAYERS} layers, untrained "
                        f"({len(run.evaluator.examples)} held-out prompts)")
    for column in ("cut", "layers removed", "reverse KL", "token agreement", "greedy length"):
        table.add_column(column, justify="right")
    if args.bridged:
        for column in ("bridged: reverse KL", "token agreement", "greedy length"):
            table.add_column(column, justify="right")
        answers = calibration_answers(teacher, run.tokenizer, train[:CALIBRATION_PROMPTS])  # one decode for every fit
    for name, removed in cuts.items():
        keep = [i for i in range(TEACHER_LAYERS) if i not in removed]
        row = [name, " ".join(map(str, removed)), *figures(run.evaluator(prune_layers(teacher, keep)))]
        if args.bridged and name in blocks:
            row += figures(run.evaluator(bridged_student(teacher, keep, answers)))
        table.add_row(*row)
        console.print(f"measured {name}")
    console.print(table)
    for student, keep in STUDENTS.items():
        if len(keep) == TEACHER_LAYERS - args.removed:
            console.print(f"builtin:smollm2/{student} removes "
                          f"{' '.join(str(i) for i in range(TEACHER_LAYERS) if i not in keep)}"
                          f"{' (bridged)' if student in BRIDGED else ''}")


def figures(measured: dict) -> list[str]:
    return [f"{measured['reverse_kl']:.2f}", f"{measured['token_agreement']:.1%}", f"{measured['mean_length']:.1f}"]


if __name__ == "__main__":
    main()
