"""Near-future teacher bridges (arXiv 2606.00305): where the teacher continues from the student's own states.

The paper's definitions were not available to us; the selection rule below is OUR RECONSTRUCTION
(``/work/shared/methods/near_future.md`` section 3.2), to be replaced by the paper's when it is known:
high-loss tokens are the top ``fraction`` of a batch's own positions by the sampled-token loss
``k1_t = log pi_S(y_t) - log pi_T(y_t)`` (pooled, as in the diagnostic of ``opdkit.diagnostics``); per rollout, at
most ``max_positions`` of them, highest first, pairwise at least ``spacing`` apart. The teacher then writes ``W``
tokens from the prefix ``x + y_<t`` (the token ``y_t`` itself is replaced), and the student is trained on them by
cross-entropy (``bridge_cross_entropy``), a term added at position ``t`` of the per-token loss.
"""

from __future__ import annotations

import math

import torch


def high_loss(k1_BT: torch.Tensor, mask_BT: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[B, T]`` bool: the ``ceil(fraction * N)`` masked positions of largest ``k1`` over the whole batch."""
    keep = mask_BT.bool()
    n = int(keep.sum())
    out = torch.zeros_like(keep)
    if n == 0:
        return out
    count = min(n, math.ceil(fraction * n))
    scores = k1_BT.masked_fill(~keep, float("-inf")).flatten()
    out.view(-1)[scores.topk(count).indices] = True
    return out


def pick_positions(k1_BT: torch.Tensor, mask_BT: torch.Tensor, fraction: float, max_positions: int,
                   spacing: int) -> list[list[int]]:
    """Per row, the bridge positions: high-loss (``high_loss``), largest ``k1`` first, pairwise at least
    ``spacing`` apart, at most ``max_positions``; sorted by position."""
    candidates = high_loss(k1_BT, mask_BT, fraction)
    chosen_rows = []
    for row_k1, row_candidates in zip(k1_BT.tolist(), candidates.tolist()):
        order = sorted((t for t, c in enumerate(row_candidates) if c), key=lambda t: (-row_k1[t], t))
        chosen: list[int] = []
        for t in order:
            if len(chosen) == max_positions:
                break
            if all(abs(t - u) >= spacing for u in chosen):
                chosen.append(t)
        chosen_rows.append(sorted(chosen))
    return chosen_rows


def bridge_cross_entropy(bridge_token_logprobs_NW: torch.Tensor, bridge_mask_NW: torch.Tensor, rows_N: torch.Tensor,
                         positions_N: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[B, T]``: each bridge's summed cross-entropy ``-sum_k log pi_S(b_k | x, y_<t, b_<k)`` placed at its origin
    ``(row, position)`` (zero elsewhere), so that the loop's aggregation counts each bridge token like a rollout token."""
    per_bridge = -(bridge_token_logprobs_NW * bridge_mask_NW).sum(-1)
    out = torch.zeros(shape, dtype=per_bridge.dtype, device=per_bridge.device)
    return out.index_put((rows_N, positions_N), per_bridge, accumulate=True)
