"""Do the healed students answer, or loop? Greedy answers of the teacher, the cut students and trained ones.

    .venv/bin/python bench/heal_answers.py runs/heal/gkd-s0 runs/heal/seqkd-s0 ... [--length 96] [--output F.json]

On the 32 held-out prompts of ``configs/smollm2-heal.yaml``, each model answers greedily with up to ``--length`` new
tokens (longer than the evaluation's 32, since a loop needs room to show), in the precision ``precision: auto``
picks; ``--temperature T`` (with ``--top-p``) samples instead, ``--samples K`` answers per prompt (generator seeds
0 to K-1, the same for every model). SmolLM2-135M-Instruct's model card decodes at ``--temperature 0.2 --top-p
0.9``. Per model: the share of answers that loop (``opdkit.evaluate.looping``: one run of four tokens three times
or more), pooled over the samples and per sample, the share that end (emit the end token within the length) and the
mean length. The models: the teacher, ``builtin:smollm2/student-20`` (the plain cut),
``builtin:smollm2/student-20-bridge`` (the same cut with its linear bridge, untrained),
``builtin:smollm2/student-24-bridge`` (the milder bridged cut, untrained), then the ``final`` folder of each run
folder given (``--runs-only``: those alone). ``--show N`` prints N prompts' answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.demo import shipped_config
from opdkit.evaluate import looping
from opdkit.models import autocast, load_model, machine_description
from opdkit.rollout import sample
from opdkit.train import setup


def answers(model, tokenizer, examples, length: int, amp_dtype, temperature: float, top_p: float,
            samples: int) -> dict:
    """Pooled over ``samples`` answers per prompt; the texts are the first sample's."""
    drawn = []
    for seed in range(samples):
        torch.manual_seed(seed)  # every model samples from the same generator states
        with torch.no_grad(), autocast(torch.device("cpu"), amp_dtype):
            drawn.append(sample(model, tokenizer, examples, max_completion_length=length,
                                temperature=temperature, top_p=top_p))
    return {"looping": looping(drawn), "looping_per_sample": [looping([r]) for r in drawn],
            "ended": 1 - torch.cat([r.truncated for r in drawn]).float().mean().item(),
            "mean_length": torch.cat([r.lengths() for r in drawn]).float().mean().item(),
            "texts": drawn[0].texts(tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders whose final/ student to measure")
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1, help="answers per prompt when sampling (seeds 0..K-1)")
    parser.add_argument("--show", type=int, default=3)
    parser.add_argument("--runs-only", action="store_true",
                        help="measure only the runs given, not the teacher and the untrained cuts")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.samples = args.samples if args.temperature else 1  # greedy answers are the same every time
    console = Console()
    config = load_config(shipped_config("smollm2-heal.yaml"), [])
    run = setup(config)
    examples = load_examples(config.data.eval)
    references = {} if args.runs_only else {
        "teacher": run.teacher.model,
        **{path: load_model(path) for path in ("builtin:smollm2/student-20", "builtin:smollm2/student-20-bridge",
                                               "builtin:smollm2/student-24-bridge")}}
    models = {**references, **{str(folder): load_model(str(folder / "final")) for folder in args.runs}}
    console.print(f"machine: {machine_description(run.amp_dtype)}")
    measured = {}
    for name, model in models.items():
        measured[name] = answers(model.eval(), run.tokenizer, examples, args.length, run.amp_dtype,
                                 args.temperature, args.top_p, args.samples)
    how = ("greedy" if args.temperature == 0 else
           f"{args.samples} sampled (temperature {args.temperature}, top-p {args.top_p})")
    table = Table(title=f"{how} answers to {len(examples)} held-out prompts, up to {args.length} new tokens")
    table.add_column("model", overflow="fold")
    for column in ("answers that loop", "answers that end", "mean length"):
        table.add_column(column, justify="right")
    for name, m in measured.items():
        per_sample = ", ".join(f"{share:.0%}" for share in m["looping_per_sample"])
        table.add_row(name, f"{m['looping']:.1%}" + (f" ({per_sample})" if len(m["looping_per_sample"]) > 1 else ""),
                      f"{m['ended']:.1%}", f"{m['mean_length']:.1f}")
    console.print(table)
    for i, example in enumerate(examples[: args.show]):
        console.print(f"\n[bold]{example.messages[-1]['content']}[/]")
        for name, m in measured.items():
            console.print(f"  [dim]{name}:[/] {m['texts'][i]!r}", highlight=False)
    if args.output:
        args.output.write_text(json.dumps({"length": args.length, "temperature": args.temperature, "top_p": args.top_p,
                                           "samples": args.samples,
                                           "machine": machine_description(run.amp_dtype),
                                           "models": measured}, indent=1) + "\n")


if __name__ == "__main__":
    main()
