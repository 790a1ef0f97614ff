"""Temporal credit: from per-token rewards ``r_t`` to advantages ``A_t``.

- immediate (``gamma = 0``): ``A_t = r_t`` (classic OPD; Tinker's ``kl_discount_factor = 0``);
- return-to-go: ``G_t = sum_{k >= t} gamma^(k-t) r_k``; with ``gamma = 1`` it is the unbiased
  score-function gradient of the sequence-level objective;
- windowed return (near-future lookahead): ``G_t = sum_{k=t}^{t+W-1} gamma^(k-t) r_k``, a token judged by the
  next ``W`` rewards it leads to; its expected gradient is, at each visited state (held fixed), the gradient of
  ``sum_a pi(a|s) Q_W(s, a)`` with ``Q_W`` the expected ``W``-step return under the current policy
  (``W = 1`` is the immediate reward, ``W >= horizon`` the return-to-go; ``tests/test_axes_grid.py``);
- baseline: ``A_t = G_t - b(s_t)``, unbiased for any action-independent ``b``;
- GAE: ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = sum_l (gamma lam)^l delta_{t+l}``, with
  ``V = 0`` after the last token (end of sequence or truncation).
"""

from __future__ import annotations

import torch


def discounted_cumsum(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """``out_t = sum_{k >= t} discount^(k-t) values_k`` over masked positions, right to left, ``[B, T]``."""
    values = values * mask
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + discount * running
        out[:, t] = running
    return out * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    return discounted_cumsum(rewards, mask, gamma)


def windowed_return(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float, window: int) -> torch.Tensor:
    """``G_t = sum_{k=t}^{t+W-1} gamma^(k-t) r_k`` over masked positions (the window ends at the sequence's end),
    ``[B, T]``: the full return minus ``gamma^W`` times the full return ``W`` tokens later."""
    full = discounted_cumsum(rewards_BT, mask_BT, gamma)
    later = torch.cat([full[:, window:], torch.zeros_like(full[:, :window])], dim=1)[:, : full.shape[1]]
    return (full - gamma**window * later) * mask_BT


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalized advantage estimation; ``V(s_{T+1}) = 0`` after each sequence's last masked token."""
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    return discounted_cumsum(deltas, mask, gamma * lam)


def step_moments(pairs, reduce=lambda sums: sums) -> tuple[float, float]:
    """``(mean, standard deviation)`` over the masked positions of several ``(values, mask)`` micro-batches
    together, so that standardising is the same whatever the split of a step (``reduce`` sums the counts over
    processes, ``Processes.sum``, for the split of a step among them)."""
    sums = {"n": 0.0, "total": 0.0, "squares": 0.0}
    for values, mask in pairs:
        m = mask.bool()
        sums["n"] += float(m.sum())
        sums["total"] += float(values[m].double().sum())
        sums["squares"] += float(values[m].double().pow(2).sum())
    n, total, squares = (reduce(sums)[k] for k in ("n", "total", "squares"))
    if n < 2:
        return total / max(n, 1.0), 1.0
    mean = total / n
    return mean, max((squares - n * mean**2) / (n - 1), 0.0) ** 0.5


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over masked positions (1 is perfect, 0 is no better than a constant)."""
    m = mask.bool()
    target = returns[m]
    if target.numel() < 2 or target.var() == 0:
        return float("nan")
    return float(1 - (target - values[m]).var() / target.var())
