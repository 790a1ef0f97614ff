"""Masked aggregation of per-token values."""

from __future__ import annotations

import torch


def token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t} values * mask``: the loop divides by the step's total token count, so gradient
    accumulation over micro-batches gives the same gradient as one large batch."""
    return (values * mask).sum()


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)``, 0 for an empty mask."""
    return token_sum(values, mask) / mask.sum().clamp(min=1)
