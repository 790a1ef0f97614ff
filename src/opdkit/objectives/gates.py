"""Gates and weights on tokens: which tokens learn, and how much.

- trust region (TrOPD): accept the sampled token with probability ``min(1, pi_T(y)/pi_S(y))``, tested in
  log space as ``log u < log pi_T(y) - log pi_S(y)``; rejected tokens are "outliers";
- entropy gate (EOPD): ``1[H(pi) > tau]``;
- position weights: ``w_t = decay^t``;
- guidance schedule (TrOPD): the fraction of the answer given as a prefix at a step.
"""

from __future__ import annotations

import math

import torch


def trust_region(teacher_token_logprobs: torch.Tensor, student_token_logprobs: torch.Tensor,
                 uniforms: torch.Tensor) -> torch.Tensor:
    """Bernoulli acceptance mask (bool) with ``P = min(1, pi_T / pi_S)``; ``uniforms ~ U(0, 1)`` of the same shape."""
    return torch.log(uniforms) < (teacher_token_logprobs - student_token_logprobs).detach()


def entropy_gate(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    return (entropy > threshold).float()


def position_weights(mask: torch.Tensor, decay: float) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    return decay ** positions * mask


def guidance_fraction(step: int, horizon: int) -> float:
    """``alpha(t) = (1 + cos(pi min(t, T) / T)) / 2``: 1 at the first step, 0 from step ``T`` on."""
    return 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon))
