"""Peak memory and time of a full-vocabulary loss plus its backward: ours, the plain computation, TRL's.

    .venv/bin/python bench/loss_memory.py                      # the three cases below, 2 threads
    .venv/bin/python bench/loss_memory.py --case 49152:576:8192

Each case is ``vocabulary:hidden:tokens``: student and teacher hidden states ``[tokens, hidden]`` through
their own LM heads (``hidden -> vocabulary``, no bias), reverse KL ``KL(student || teacher)`` per token (TRL's
``beta=1``), a token mean, backward into the student's hidden states and head. Variants, each in its own fresh
process so that peak RSS is its own:

- ``ours``: ``opdkit.objectives.support.chunked_full``, block size from the default ``chunk_memory_mib``;
- ``plain``: both ``[tokens, V]`` logits and log-softmaxes whole, as an unchunked trainer computes them
  (skipped, with the memory it would need, where that exceeds what this machine has);
- ``trl``: TRL's ``_chunked_divergence_loss`` (its CPU path), when ``trl`` is installed (``pip install -e .[bench]``).

Printed per variant: peak RSS above the process's baseline after the inputs exist, seconds for loss plus
backward, the loss, and the ratios to plain. Default cases: SmolLM2's vocabulary and width at 8 x 1024 tokens,
and Qwen2's at 8 x 1024 and at 2 x 1024 (where the plain computation still fits in 24 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = ["49152:576:8192", "151936:896:8192", "151936:896:2048"]
PLAIN_LIVE = 7  # float32 [tokens, V] tensors the plain computation holds at its peak (measured: 6.6 at V = 49,152)


def run_variant(variant: str, vocab: int, hidden: int, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    for head in (student_head, teacher_head):
        torch.nn.init.normal_(head.weight, std=hidden**-0.5, generator=g)
    student_hidden = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden, generator=g)
    if variant == "ours":  # imports before the baseline: they are not the loss's memory
        from opdkit.config import ObjectiveConfig
        from opdkit.objectives.support import chunked_full
    elif variant == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "plain":
        student = student_head(student_hidden).float().log_softmax(-1)
        teacher = teacher_head(teacher_hidden).float().log_softmax(-1)
        loss = (student.exp() * (student - teacher)).sum(-1).mean()
    elif variant == "ours":
        per_token, _, _ = chunked_full(student_hidden, student_head, lambda i, j: teacher_head(teacher_hidden[i:j]),
                                       "reverse_kl", memory_mib=ObjectiveConfig().chunk_memory_mib)
        loss = per_token.mean()
    else:
        mask = torch.ones(1, tokens)
        loss, _, _ = _chunked_divergence_loss(student_hidden.unsqueeze(0), teacher_hidden.unsqueeze(0),
                                              student_head.weight, teacher_head.weight, mask, beta=1.0)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_mib": (peak - baseline) / 1024, "seconds": seconds, "loss": float(loss.detach())}


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def machine(threads: int) -> str:
    import torch

    from opdkit.models import machine_description

    torch.set_num_threads(threads)
    return machine_description(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", help="vocabulary:hidden:tokens (repeatable; default: three cases)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="bench/results/loss_memory.json")
    args = parser.parse_args()
    if args.variant:
        vocab, hidden, tokens = map(int, args.case[0].split(":"))
        print(json.dumps(run_variant(args.variant, vocab, hidden, tokens, args.threads)))
        return
    try:
        import trl  # noqa: F401

        variants = ["ours", "plain", "trl"]
    except ImportError:
        print("trl is not installed (pip install -e .[bench]): comparing with the plain computation only")
        variants = ["ours", "plain"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = []
    print(machine(args.threads))
    for case in args.case or CASES:
        vocab, hidden, tokens = map(int, case.split(":"))
        print(f"\nV={vocab:,} d={hidden} tokens={tokens:,}")
        rows = {}
        for variant in variants:
            need = PLAIN_LIVE * tokens * vocab * 4 / 2**20
            if variant == "plain" and need > 0.8 * available_mib():
                print(f"  plain    skipped: needs about {need / 1024:.0f} GiB, {available_mib() / 1024:.0f} GiB available")
                continue
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--case", case,
                                  "--threads", str(args.threads)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"  {variant:8s} failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                continue
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[variant]
            print(f"  {variant:8s} peak +{r['peak_mib']:8.0f} MiB  {r['seconds']:7.2f} s  loss {r['loss']:.5f}")
        if "plain" in rows:
            for variant in [v for v in rows if v != "plain"]:
                r, p = rows[variant], rows["plain"]
                print(f"  {variant} / plain: memory {r['peak_mib'] / max(p['peak_mib'], 1):.3f}x, "
                      f"time {r['seconds'] / p['seconds']:.2f}x, loss difference {abs(r['loss'] - p['loss']):.1e}")
        if "trl" in rows and "ours" in rows:
            print(f"  ours / trl: memory {rows['ours']['peak_mib'] / max(rows['trl']['peak_mib'], 1):.3f}x, "
                  f"time {rows['ours']['seconds'] / rows['trl']['seconds']:.2f}x")
        results.append({"case": case, **rows})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"machine": machine(args.threads), "results": results}, indent=1))


if __name__ == "__main__":
    main()
