"""Diagnostics over scored rollouts: pure functions of per-token tensors, shared by training logs and reports.

The near-future diagnostic (arXiv 2606.00305, section 2 of ``/work/shared/methods/near_future.md``; the paper
reports about 30% for its pairs). The paper's exact definition was not available to us: ``NEAR_FUTURE_DEFINITION``
is OUR RECONSTRUCTION; print it beside every figure, and replace it with the paper's when it is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .objectives.bridge import high_loss

NEAR_FUTURE_DEFINITION = (
    "share of high-loss tokens in a low-divergence region: high-loss = the top q of completion positions by "
    "k1 = log pi_S(y_t) - log pi_T(y_t), pooled over the batch; low-divergence = KL(pi_S(.|s_t) || pi_T(.|s_t)) "
    "below the pooled median of that KL (or below tau when given); share = |high-loss and low-divergence| / "
    "|high-loss|; 95% interval: percentile bootstrap over rollouts (reconstruction of arXiv 2606.00305, section 2)")


@dataclass
class Share:
    share: float
    low: float  # bootstrap interval
    high: float
    high_loss_tokens: int
    fraction: float  # q
    threshold: float | None  # tau, or None for the pooled median
    definition: str = NEAR_FUTURE_DEFINITION

    def __str__(self) -> str:
        region = f"KL < {self.threshold:g}" if self.threshold is not None else "KL < median"
        return (f"{100 * self.share:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] of {self.high_loss_tokens} "
                f"high-loss tokens (q = {self.fraction:g}, {region}); {self.definition}")


def _share(k1_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor, fraction: float,
           threshold: float | None) -> tuple[float, int]:
    keep = mask_BT.bool()
    if not keep.any():
        return math.nan, 0
    tau = threshold if threshold is not None else float(divergence_BT[keep].median())
    high = high_loss(k1_BT, mask_BT, fraction)
    n = int(high.sum())
    return float((high & (divergence_BT < tau)).sum()) / n, n


def near_future_share(k1_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                      fraction: float = 0.1, threshold: float | None = None, resamples: int = 1000,
                      level: float = 0.95, seed: int = 0) -> Share:
    """The near-future diagnostic (``NEAR_FUTURE_DEFINITION``) over ``[B, T]`` tensors of completion positions:
    ``k1`` per sampled token, the local ``divergence`` per position (the full-vocabulary reverse KL, or its top-k
    form with a tail bucket when only a top-k is known), and the mask. The interval resamples whole rollouts
    (``resamples`` times, percentile bootstrap at ``level``), since the positions of one rollout are not
    independent; thresholds are recomputed in every resample."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is the share q of positions called high-loss, in (0, 1]; got {fraction}")
    share, n = _share(k1_BT, divergence_BT, mask_BT, fraction, threshold)
    generator = torch.Generator().manual_seed(seed)
    rows = k1_BT.shape[0]
    draws = []
    for _ in range(resamples):
        pick = torch.randint(rows, (rows,), generator=generator)
        value, _ = _share(k1_BT[pick], divergence_BT[pick], mask_BT[pick], fraction, threshold)
        if not math.isnan(value):
            draws.append(value)
    tail = (1 - level) / 2
    low, high = (torch.tensor(draws).quantile(torch.tensor([tail, 1 - tail])).tolist() if draws else (math.nan, math.nan))
    return Share(share, low, high, n, fraction, threshold)
