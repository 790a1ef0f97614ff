"""Which ten of SmolLM2-135M-Instruct's 30 layers to remove: the cuts measured for ``builtin:smollm2/student-20``.

    .venv/bin/python bench/prune_cuts.py

Each cut is the teacher without those ten decoder layers (embeddings, final norm and head kept:
``opdkit.scenarios.smollm2.prune_layers``), measured untrained by the evaluation every run uses, on the held-out
prompts of ``configs/smollm2-heal.yaml``: exact reverse KL to the teacher on the student's samples, token agreement
with the teacher's greedy answers, mean greedy length. The cuts: every third layer (the last one kept), the ten
layers of lowest block influence (ShortGPT, Men et al. 2024: one minus the mean cosine similarity between a layer's
input and output hidden states, here over 24 training prompts followed by the teacher's greedy answers), and the
contiguous blocks of ten starting at layers 8 to 18.
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
from opdkit.scenarios.smollm2 import STUDENTS, TEACHER_LAYERS, prune_layers
from opdkit.train import setup

REMOVED = 10


@torch.no_grad()
def block_influence(model, tokenizer, examples, length: int) -> list[float]:
    """Per decoder layer, one minus the mean cosine similarity of its input and output at every real token."""
    rollouts = sample(model, tokenizer, examples, max_completion_length=length, greedy=True)
    mask = rollouts.attention_mask.bool()
    hidden = model(rollouts.input_ids, attention_mask=rollouts.attention_mask, output_hidden_states=True).hidden_states
    return [1 - torch.cosine_similarity(a[mask], b[mask], dim=-1).mean().item() for a, b in zip(hidden, hidden[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    console = Console()
    config = load_config(shipped_config("smollm2-heal.yaml"), [f"threads={args.threads}"])
    run = setup(config)
    teacher = run.teacher.model
    influence = block_influence(teacher, run.tokenizer, load_examples(config.data.train)[:24], length=40)
    console.print("block influence per layer: " + ", ".join(f"{i}: {b:.3f}" for i, b in enumerate(influence)))
    cuts = {"every third layer": [i for i in range(2, TEACHER_LAYERS - 1, 3)] + [TEACHER_LAYERS - 2],
            "lowest block influence": sorted(sorted(range(TEACHER_LAYERS), key=influence.__getitem__)[:REMOVED]),
            **{f"block {s}-{s + REMOVED - 1}": list(range(s, s + REMOVED)) for s in range(8, 19, 2)}}
    table = Table(title=f"SmolLM2-135M-Instruct without {REMOVED} of its {TEACHER_LAYERS} layers, untrained "
                        f"({len(run.evaluator.examples)} held-out prompts)")
    for column in ("cut", "layers removed", "reverse KL", "token agreement", "greedy length"):
        table.add_column(column, justify="right")
    for name, removed in cuts.items():
        assert len(removed) == REMOVED, (name, removed)
        student = prune_layers(teacher, [i for i in range(TEACHER_LAYERS) if i not in removed])
        measured = run.evaluator(student)
        table.add_row(name, " ".join(map(str, removed)), f"{measured['reverse_kl']:.2f}",
                      f"{measured['token_agreement']:.1%}", f"{measured['mean_length']:.1f}")
    console.print(table)
    shipped = [i for i in range(TEACHER_LAYERS) if i not in STUDENTS["student-20"]]
    console.print(f"builtin:smollm2/student-20 removes {' '.join(map(str, shipped))}")


if __name__ == "__main__":
    main()
