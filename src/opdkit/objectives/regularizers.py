"""Regularizers added to any objective.

- ``reference_kl``: k3 estimate of the KL to a frozen reference (the initial student), backpropagated
  directly on the sampled tokens: ``(e^r - 1) - r`` with ``r = log pi_ref(y) - log pi_S(y)``. Its gradient
  is that of ``KL(pi_ref || pi_S)`` (the GRPO convention); it keeps unaudited tokens near the start.
- ``entropy_bonus``: ``-H(pi_S(.|s_t))`` over the full vocabulary (minimising it raises entropy).
"""

from __future__ import annotations

import torch

from .divergence import entropy, estimator


def reference_kl(student_token_logprobs: torch.Tensor, reference_token_logprobs: torch.Tensor) -> torch.Tensor:
    return estimator("k3", reference_token_logprobs.detach() - student_token_logprobs)


def entropy_bonus(student_logprobs: torch.Tensor) -> torch.Tensor:
    return -entropy(student_logprobs)
