"""The near-future diagnostic of a student against its teacher, on held-out prompts.

    .venv/bin/python bench/near_future_share.py configs/smollm2-compress.yaml
    .venv/bin/python bench/near_future_share.py configs/smollm2-compress.yaml --student runs/x/checkpoint-20

Samples one completion per held-out prompt from the student (the config's rollout temperature and length and
seed), scores it with the teacher (``opdkit.diagnose.score_prompts``, what ``opd diagnose`` scores with: the full
distribution of a local teacher), and prints ``opdkit.diagnostics.near_future_share`` at q = 0.05, 0.1 and 0.2
with its bootstrap interval and its definition (print it beside every figure). ``opd diagnose`` prints the same
shares beside the whole token-level table.
"""

from __future__ import annotations

import argparse

from opdkit.config import load_config
from opdkit.diagnose import SHARE_FRACTIONS, score_prompts
from opdkit.diagnostics import NEAR_FUTURE_DEFINITION, near_future_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--student", default=None, help="a checkpoint folder (default: the config's student)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.config)
    path = args.student or config.student.path
    scored = score_prompts(config, path, args.prompts, args.batch_size)
    stats = scored.stats
    print(f"student {scored.student}, teacher {scored.teacher}, {len(scored.prompts)} prompts, "
          f"{int(stats.mask.sum())} tokens")
    for q in SHARE_FRACTIONS:
        share = near_future_share(stats.k1, stats.divergence, stats.mask, fraction=q)
        print(f"q = {q}: {100 * share.share:.1f}% [{100 * share.low:.1f}, {100 * share.high:.1f}] of "
              f"{share.high_loss_tokens} high-loss tokens")
    print(f"definition: {NEAR_FUTURE_DEFINITION}")


if __name__ == "__main__":
    main()
