"""Where a step's time goes on this machine: the matrix products of one SmolLM2 step by shape, and the rate at which
this processor streams a decode step's weights through a product of a few rows.

    .venv/bin/python bench/step_profile.py [--threads 2] [--variant ours-bf16] [--no-products]
        [--output bench/results/step_profile-MACHINE.json]

- **step**: the work of ``bench/vs_trl.py --pair smollm2`` (64 chat prompts, batch 4, 32 sampled tokens,
  full-vocabulary reverse KL, AdamW at 1e-5), ``precision: auto``, as its ``--variant`` (``ours``: float32
  weights; ``ours-bf16``: ``student.dtype: bf16``; ``ours-8bit``: and 8-bit moments); three steps to warm up, then
  one step under ``torch.profiler``: the stage times the run logs, the share of the step's operator time spent in
  ``aten::mm``, the products grouped by input shape, and the operators that took most time, grouped by name and
  input shape (calls and milliseconds).
- **products**: ``[rows, d] x [d, out]`` for the shapes of one decode step of the SmolLM2 student (its
  projections and the LM head), 4, 8 and 16 rows (a rollout batch), in bf16 as ``W @ x.T`` (what ``decode``
  computed for at most 16 rows before this bench) and as ``x @ W.T``, and in float32 as ``W @ x.T``. Each form
  cycles through enough distinct weights (about 150 MB) that they come from memory, not from the cache, as in a
  real decode; reported as ms per product and GB/s of weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

SHAPES = [(49152, 576, "LM head"), (1536, 576, "gate or up"), (576, 1536, "down"), (576, 576, "q or o"),
          (192, 576, "k or v")]


VARIANTS = {"ours": ("fp32", "auto"), "ours-bf16": ("bf16", "auto"), "ours-8bit": ("bf16", "8bit")}


def step(threads: int, variant: str) -> dict:
    from torch.profiler import profile

    from opdkit import train
    from opdkit.config import Config
    from opdkit.models import machine_description
    from vs_trl import ours_config  # bench/ is the script's folder

    workdir = Path("runs/step_profile")
    workdir.mkdir(parents=True, exist_ok=True)
    dtype, moments = VARIANTS[variant]
    run = train.setup(Config.model_validate(ours_config("smollm2", workdir, threads=threads, dtype=dtype,
                                                        moments=moments)))
    optimizer, scheduler = train.optimizer_and_schedule(run)
    rng = random.Random(0)
    for _ in range(3):
        train.train_step(run, optimizer, scheduler, rng)
    with profile(record_shapes=True) as prof:
        record = train.train_step(run, optimizer, scheduler, rng)
    events = prof.key_averages(group_by_input_shape=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    products = sorted(([str(e.input_shapes), e.count, e.self_cpu_time_total / 1e3] for e in events if e.key == "aten::mm"),
                      key=lambda row: -row[2])
    mm_ms = sum(row[2] for row in products)
    operators = sorted(([e.key, str(e.input_shapes), e.count, e.self_cpu_time_total / 1e3] for e in events),
                       key=lambda row: -row[3])
    return {"machine": machine_description(run.amp_dtype), "variant": variant,
            "stages_s": {k.removeprefix("time_"): v for k, v in record.items() if k.startswith("time_")},
            "operator_ms": total_ms, "mm_ms": mm_ms, "mm_share": mm_ms / total_ms,
            "products": [{"shapes": s, "calls": n, "ms": ms} for s, n, ms in products[:16]],
            "operators": [{"name": k, "shapes": s, "calls": n, "ms": ms} for k, s, n, ms in operators[:24]]}


def products(threads: int) -> list[dict]:
    torch.set_num_threads(threads)

    def per_call(fn, weights, repeats=3) -> float:
        for w in weights:
            fn(w)
        start = time.perf_counter()
        for _ in range(repeats):
            for w in weights:
                fn(w)
        return (time.perf_counter() - start) / repeats / len(weights) * 1e3

    measured = []
    for out, d, name in SHAPES:
        count = max(2, int(150e6 // (out * d * 2)))  # about 150 MB of bf16 weights: more than the caches hold
        weights = [torch.randn(out, d).bfloat16() for _ in range(count)]
        weights32 = [w.float() for w in weights]
        megabytes = out * d * 2 / 1e6  # bf16 bytes; float32 reads twice as many
        for rows in (4, 8, 16):
            x = torch.randn(rows, d).bfloat16()
            x32 = x.float()
            forms = {"bf16 W @ x.T": per_call(lambda w: w @ x.T, weights),
                     "bf16 x @ W.T": per_call(lambda w: x @ w.T, weights),
                     "float32 W @ x.T": per_call(lambda w: w @ x32.T, weights32)}
            measured.append({"shape": [out, d], "name": name, "rows": rows, "ms": forms, "GB_per_s": {
                k: (2 if k.startswith("float32") else 1) * megabytes / ms for k, ms in forms.items()}})
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), default="ours")
    parser.add_argument("--no-products", action="store_true", help="profile the step only")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    result = {"step": step(args.threads, args.variant)}
    if not args.no_products:
        result["products"] = products(args.threads)
    s = result["step"]
    print(f"machine: {s['machine']}, {s['variant']}")
    print("stages: " + ", ".join(f"{k} {v:.3f} s" for k, v in s["stages_s"].items()))
    print(f"operators {s['operator_ms']:.0f} ms, of which aten::mm {s['mm_ms']:.0f} ms ({s['mm_share']:.0%})")
    for p in s["products"]:
        print(f"  {p['shapes']:<40} {p['calls']:>5} calls {p['ms']:8.1f} ms")
    print("operators taking most time:")
    for o in s["operators"]:
        print(f"  {o['name'][:48]:<48} {o['shapes'][:60]:<60} {o['calls']:>5} calls {o['ms']:8.1f} ms")
    if "products" in result:
        print("\nfew-row products, weights from memory (ms per product; GB/s of weights read):")
        for r in result["products"]:
            print(f"  {r['name']:<10} {str(r['shape']):<12} {r['rows']:>2} rows  " + "  ".join(
                f"{k}: {ms:.3f} ms ({r['GB_per_s'][k]:.1f} GB/s)" for k, ms in r["ms"].items()))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
