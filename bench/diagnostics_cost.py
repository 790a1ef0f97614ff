"""What the per-step diagnostics cost: steps with them against steps without, alternated in one process.

    .venv/bin/python bench/diagnostics_cost.py [CONFIG] [--rounds 6]

Loads the config's run once (default ``configs/smollm2-compress.yaml``), then alternates optimizer steps with
``diagnostics.top_k: 20`` (a local teacher hands its top-k and entropy; the loop computes the signals, top-k mass
and overlap, n-gram repeats and position buckets) and with ``diagnostics.top_k: 0`` (only what the method needs;
the signal statistics are still computed, from tensors the step holds anyway). Prints the median seconds of each
stage and of the whole step, and the ratio with / without.
"""

from __future__ import annotations

import argparse
import random
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/smollm2-compress.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    from opdkit.config import load_config
    from opdkit.models import machine_description
    from opdkit.train import optimizer_and_schedule, setup, train_step

    config = load_config(args.config)
    run = setup(config)
    optimizer, scheduler = optimizer_and_schedule(run)
    rng = random.Random(0)
    times: dict[int, list[dict]] = {20: [], 0: []}
    train_step(run, optimizer, scheduler, rng)  # warm-up
    for _ in range(args.rounds):
        for k in (20, 0):
            run.config.diagnostics.top_k = k
            record = train_step(run, optimizer, scheduler, rng)
            times[k].append({key[5:]: value for key, value in record.items() if key.startswith("time_")})
    print(f"{args.config}: {run.method.name}, batch {config.rollout.batch_size} x {config.rollout.max_completion_length} "
          f"tokens; {run.device.type}: {machine_description(run.amp_dtype)}; "
          f"medians of {args.rounds} alternated steps")
    print(f"{'stage':<18}{'top_k 20 (s)':>14}{'top_k 0 (s)':>14}{'ratio':>8}")
    for stage in [*times[20][0], "step"]:
        pick = (lambda t: sum(t.values())) if stage == "step" else (lambda t, s=stage: t[s])
        with_, without = (statistics.median(pick(t) for t in times[k]) for k in (20, 0))
        print(f"{stage:<18}{with_:>14.3f}{without:>14.3f}{with_ / without:>8.2f}")


if __name__ == "__main__":
    main()
