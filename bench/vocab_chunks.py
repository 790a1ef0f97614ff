"""Peak memory and time of a full-vocabulary divergence, plain vs vocabulary-chunked, side by side.

    .venv/bin/python bench/vocab_chunks.py [--tokens 1024] [--vocab 49152] [--hidden 576] [--chunk 64]

Each variant runs in its own fresh process (peak RSS is per process) on the same inputs: student hidden
states through an LM head, generalized JSD against fixed teacher log-probs, backward. The teacher's
``[N, V]`` log-probs exist in both; the difference is the student side, which the chunked path keeps to
``O(chunk * V)`` by recomputing each block in backward. Prints both peaks above the common baseline, the
ratio, and the agreement of the two losses.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args) -> dict:
    import torch

    from opdkit.objectives.divergence import distributional
    from opdkit.objectives.support import chunked_full

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, generator=g, requires_grad=True)
    teacher = (torch.randn(args.tokens, args.vocab, generator=g) * 2).log_softmax(-1)
    divergence = lambda s, t: distributional("jsd", s, t, beta=0.5)  # noqa: E731
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.variant == "plain":
        loss = divergence(head(hidden).log_softmax(-1), teacher).sum()
    else:
        loss = chunked_full(hidden, head, teacher, divergence, args.chunk).sum()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": args.variant, "peak_above_baseline_mib": (peak - baseline) / 1024, "seconds": seconds,
            "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["plain", "chunked"])
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True,
                             capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    plain, chunked = results["plain"], results["chunked"]
    print(f"N={args.tokens} tokens, V={args.vocab}, d={args.hidden}, chunk={args.chunk}")
    for r in (plain, chunked):
        print(f"  {r['variant']:8s} peak +{r['peak_above_baseline_mib']:8.0f} MiB   {r['seconds']:.2f} s   loss {r['loss']:.4f}")
    print(f"  memory ratio plain/chunked: {plain['peak_above_baseline_mib'] / max(chunked['peak_above_baseline_mib'], 1):.1f}x; "
          f"time ratio chunked/plain: {chunked['seconds'] / plain['seconds']:.2f}x; "
          f"loss difference {abs(plain['loss'] - chunked['loss']):.2e}")


if __name__ == "__main__":
    main()
