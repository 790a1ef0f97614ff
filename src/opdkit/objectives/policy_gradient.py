"""Route B: policy-gradient losses from detached per-token advantages."""

from __future__ import annotations

import torch


def policy_gradient_loss(student_token_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                         advantages: torch.Tensor) -> torch.Tensor:
    """Per-token importance-sampled PG loss ``-(pi_theta(y_t) / mu(y_t)) * A_t``, ``[B, C]``.

    Its gradient is ``-ratio * A_t * grad log pi_theta(y_t)``, so under ``y_t ~ mu`` its expectation is that of
    ``-A_t * grad log pi_theta`` under ``pi_theta``. The ratio is exactly 1 when the sampler is the current
    student at temperature 1 (plain REINFORCE); at another ``rollout.temperature`` or ``top_p`` it corrects the
    sampled token (not the states, so only per-token credit stays unbiased: ``Config`` refuses the rest).
    """
    ratio = torch.exp(student_token_logprobs - sampler_logprobs.detach())
    return -ratio * advantages.detach()
