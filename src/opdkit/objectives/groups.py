"""Several samples of one prompt (``rollout.num_samples``): the per-prompt baseline, and the spread it works on.

``group[b]`` is the index of row ``b``'s prompt; rows with equal ids are samples of the same prompt. With
``R_i = sum_t r_{i,t}`` the sequence return of row ``i`` (the per-token OPD reward summed over its own tokens)
and ``G(i)`` its group of ``n`` rows:

- ``group_mean`` (GRPO's baseline): ``b_i = (1/n) sum_{j in G(i)} R_j``. It contains ``R_i`` itself, so
  ``R_i - b_i = ((n-1)/n) (R_i - mean_{j != i} R_j)``: the expected gradient is the true one scaled by
  ``(n-1)/n`` (for equal group sizes), biased in size but not in direction;
- ``leave_one_out`` (RLOO's): ``b_i = (1/(n-1)) sum_{j in G(i), j != i} R_j``, which does not depend on row
  ``i``'s own tokens, so ``E[b_i grad log pi(y_{i,t} | s_{i,t})] = 0`` and the gradient is unbiased. A row alone
  in its group has no others and gets ``b_i = 0``.

Both are ``0`` advantage shifts when every sample of a prompt has the same return (``R_i - b_i = 0``).
``tests/test_proofs.py`` checks both statements by exact enumeration.
"""

from __future__ import annotations

import torch


def _sums(values_B: torch.Tensor, group_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's group total and group size, ``[B]`` each."""
    _, index = torch.unique(group_B, return_inverse=True)
    size = int(index.max()) + 1
    totals = torch.zeros(size, dtype=values_B.dtype, device=values_B.device).index_add_(0, index, values_B)
    counts = torch.zeros(size, dtype=values_B.dtype, device=values_B.device).index_add_(0, index, torch.ones_like(values_B))
    return totals[index], counts[index]


def baseline(returns_B: torch.Tensor, group_B: torch.Tensor, kind: str) -> torch.Tensor:
    """``[B]`` baseline ``b_i`` of each row from the returns of its group (``group_mean`` or ``leave_one_out``)."""
    totals, counts = _sums(returns_B, group_B)
    if kind == "group_mean":
        return totals / counts
    return (totals - returns_B) / (counts - 1).clamp(min=1)


def spread(values_B: torch.Tensor, group_B: torch.Tensor) -> float:
    """Mean over prompts of the standard deviation (``n - 1`` in the denominator) of ``values`` across each
    prompt's samples; prompts with one sample are left out (0 when none has more)."""
    values_B = values_B.double()
    totals, counts = _sums(values_B, group_B)
    squares, _ = _sums((values_B - totals / counts) ** 2, group_B)
    several = counts > 1
    if not several.any():
        return 0.0
    std_B = (squares[several] / (counts[several] - 1)).sqrt()
    return float((std_B / counts[several]).sum() / (1 / counts[several]).sum())  # each prompt once, not each row
