"""Route B: policy-gradient losses from detached per-token advantages."""

from __future__ import annotations

import torch


def log_ratio_advantage(teacher_token_logprobs: torch.Tensor, student_token_logprobs: torch.Tensor) -> torch.Tensor:
    """Classic OPD reward on the sampled token, detached: ``A_t = log pi_T(y_t) - log pi_S(y_t)`` (= -k1)."""
    return (teacher_token_logprobs - student_token_logprobs).detach()


def policy_gradient_loss(student_token_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, advantages: torch.Tensor,
                         clip_epsilon: float | None = None) -> torch.Tensor:
    """Per-token importance-sampled PG loss ``-(pi_theta(y_t) / mu(y_t)) * A_t``.

    Its gradient is ``-ratio * A_t * grad log pi_theta(y_t)``; the ratio is exactly 1 when the sampler is
    the current student at temperature 1, giving plain REINFORCE. With ``clip_epsilon`` it is PPO's
    pessimistic ``-min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)`` for stale samples. Returns ``[B, C]``.
    """
    ratio = torch.exp(student_token_logprobs - sampler_logprobs.detach())
    advantages = advantages.detach()
    loss = -ratio * advantages
    if clip_epsilon is not None:
        loss = torch.maximum(loss, -ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * advantages)
    return loss
