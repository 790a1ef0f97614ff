"""Route B: policy-gradient losses from detached per-token advantages."""

from __future__ import annotations

import torch


def log_ratio_advantage(teacher_token_logprobs: torch.Tensor, student_token_logprobs: torch.Tensor) -> torch.Tensor:
    """Classic OPD reward on the sampled token, detached: ``A_t = log pi_T(y_t) - log pi_S(y_t)`` (= -k1)."""
    return (teacher_token_logprobs - student_token_logprobs).detach()


def policy_gradient_loss(
    student_token_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """Per-token importance-sampled PG loss ``-(pi_theta(y_t) / mu(y_t)) * A_t``.

    Its gradient is ``-ratio * A_t * grad log pi_theta(y_t)``; the ratio is exactly 1 when the sampler is
    the current student at temperature 1, giving plain REINFORCE. Returns ``[B, C]``; mask and reduce.
    """
    ratio = torch.exp(student_token_logprobs - sampler_logprobs.detach())
    return -ratio * advantages.detach()
