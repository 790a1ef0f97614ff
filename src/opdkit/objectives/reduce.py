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


def aggregation_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights whose sum over a step is the loss normaliser.

    ``token_mean``: every token counts once (weights = mask; normaliser = tokens in the step).
    ``sequence_mean``: each sequence's tokens share weight 1 (weights = mask / length; normaliser = sequences).
    """
    if mode == "token_mean":
        return mask
    if mode == "sequence_mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}")
