"""A student and a teacher of real sizes on this machine: two optimizer steps and the peak memory they took.

    .venv/bin/python bench/scale_memory.py [--teacher-dtype auto|fp32|bf16] [--student-dtype fp32|bf16]
        [--moments auto|8bit] [--steps 2] [--length 256]

A randomly initialised Qwen2-0.5B-shaped student (24 layers, width 896) and a Qwen2-1.5B-shaped teacher (28
layers, width 1536), both with Qwen's 151,936-token vocabulary, built from ``transformers`` configs and saved
once into ``--workdir``; SmolLM2's tokenizer stands in for Qwen's (nothing is downloaded; ids beyond it are
never decoded). ``opd train`` then runs full-vocabulary reverse KL (``gkd``, ``beta: 1``) on batch 2 with
``--length`` new tokens for ``--steps`` optimizer steps in a fresh process, and this script prints that
process's peak RSS, its step times and the stage split from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SHAPES = {  # Qwen2-0.5B and Qwen2-1.5B
    "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2),
    "teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2),
}
VOCAB = 151_936


def build(workdir: Path) -> None:
    """Both models (random weights, seeded) and SmolLM2's tokenizer, saved once."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from opdkit.models import load_tokenizer
    from opdkit.scenarios import resolve_builtin

    tokenizer = load_tokenizer(str(resolve_builtin("builtin:smollm2/student")))
    for name, shape in SHAPES.items():
        folder = workdir / name
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **shape)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {folder}")
        del model


def train(workdir: Path, args) -> dict:
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = {
        "seed": 0, "output_dir": str(run_dir), "threads": args.threads,
        "student": {"path": str(workdir / "student"), "dtype": args.student_dtype},
        "teacher": {"path": str(workdir / "teacher"), "dtype": args.teacher_dtype},
        "data": {"train": "builtin:smollm2/train"},
        "rollout": {"batch_size": 2, "max_completion_length": args.length, "temperature": 1.0},
        "objective": {"method": "gkd", "beta": 1.0, "lmbda": 1.0},
        "optim": {"steps": args.steps, "learning_rate": 1e-5, "warmup_steps": 0, "moments": args.moments},
        "checkpoint": {"every": 0, "keep": 1},
    }
    path = workdir / "config.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    code = ("import resource, sys; from opdkit.cli import main; rc = main(['train', sys.argv[1]]); "
            "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    peak = [line for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    if out.returncode != 0 or not peak:
        sys.exit(f"opd train failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "time_rollout" in r]
    return {"peak_rss_gib": int(peak[0].split()[1]) / 2**20, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/opdkit/bench-scale"))
    parser.add_argument("--teacher-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--student-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="student.dtype: bf16 keeps its weights, gradients and AdamW moments in bf16")
    parser.add_argument("--moments", default="auto", choices=["auto", "8bit"], help="optim.moments")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--length", type=int, default=256, help="new tokens per rollout")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    build(workdir)
    result = train(workdir, args)
    import torch

    from opdkit.models import machine_description, pick_device, resolve_precision

    torch.set_num_threads(args.threads)
    print(machine_description(resolve_precision("auto", pick_device())))
    print(f"student Qwen2-0.5B-shaped (student.dtype {args.student_dtype}, optim.moments {args.moments}), teacher Qwen2-1.5B-shaped (teacher.dtype "
          f"{args.teacher_dtype}), vocabulary "
          f"{VOCAB:,}, batch 2 x {args.length} new tokens, {args.steps} optimizer steps")
    print(f"peak RSS of the training process: {result['peak_rss_gib']:.2f} GiB")
    for r in result["steps"]:
        stages = "  ".join(f"{k[5:]} {v:.1f} s" for k, v in r.items() if k.startswith("time_"))
        print(f"  step {r['step']}: {stages}  ({r['completion_length']:.0f} tokens per rollout)")


if __name__ == "__main__":
    main()
