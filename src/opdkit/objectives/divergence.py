"""Divergences between the teacher's and the student's next-token distributions, per position.

Inputs are log-probabilities over the last dimension (a full vocabulary or a renormalised support).
"""

from __future__ import annotations

import math

import torch


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` over the last dimension; 0 * log 0 = 0."""
    p = p_logprobs.exp()
    return torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p)).sum(-1)


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL defines ``beta``:

        M = beta * pi_T + (1 - beta) * pi_S
        JSD_beta = beta * KL(pi_T || M) + (1 - beta) * KL(pi_S || M)

    The formula tends to 0 at both ends, so the endpoints are explicit branches by convention:
    ``beta = 0`` is forward KL ``KL(pi_T || pi_S)``, ``beta = 1`` is reverse KL ``KL(pi_S || pi_T)``.
    """
    if beta == 0.0:
        return kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return kl(student_logprobs, teacher_logprobs)
    mixture = torch.logaddexp(student_logprobs + math.log(1 - beta), teacher_logprobs + math.log(beta))
    return beta * kl(teacher_logprobs, mixture) + (1 - beta) * kl(student_logprobs, mixture)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_v p(v) log p(v)`` over the last dimension."""
    return -(logprobs.exp() * logprobs).sum(-1)
