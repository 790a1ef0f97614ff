"""Which vocabulary entries a distributional loss sees (the support ``Omega``).

- ``full``: both distributions over the whole vocabulary;
- ``teacher_topk``: the teacher's k most likely tokens at each position;
- ``student_topk``: the student's k most likely tokens (needs the teacher's full distribution);
- ``sampled``: the sampled token only (route B: see ``divergence.phi`` and ``policy_gradient``).

On a truncated support both distributions are renormalised over it, or, with ``tail=True``, the
remaining mass of each is kept as one extra "tail" category so that nothing is thrown away.
For the full vocabulary, ``chunked_full`` evaluates a divergence a block of positions at a time, with
recomputation in backward, so that no ``[N, V]`` student tensor is kept for the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def sampled(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The sampled-token support: ``logprobs[b, t, ids[b, t]]``, ``[B, C, V] -> [B, C]``."""
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """Append ``log(1 - sum p)`` as a last category (clamped away from log 0)."""
    tail = torch.log1p(-logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([logprobs, tail], dim=-1)


def restrict(student_logprobs: torch.Tensor, teacher_on_support: torch.Tensor, ids: torch.Tensor, tail: bool = False):
    """``(student, teacher)`` log-probs on the support ``ids`` (``[..., k]``), renormalised or with a tail.

    ``student_logprobs`` is over the whole vocabulary; ``teacher_on_support[..., j]`` is the teacher's
    log-prob of ``ids[..., j]`` (as a server returns its top-k, or gathered by the caller)."""
    student = student_logprobs.gather(-1, ids)
    if tail:
        return _with_tail(student), _with_tail(teacher_on_support)
    return student.log_softmax(-1), teacher_on_support.log_softmax(-1)


def student_topk(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, k: int, tail: bool = False):
    """The student's top-k support (the teacher's full distribution gathered on it); the ids are chosen
    without gradient."""
    ids = student_logprobs.detach().topk(min(k, student_logprobs.shape[-1]), dim=-1).indices
    return restrict(student_logprobs, teacher_logprobs.gather(-1, ids), ids, tail)


def chunked_full(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], teacher_logprobs: torch.Tensor,
                 divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk_size: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-position ``divergence(log_softmax(head(h) / temperature), teacher)`` for ``hidden [N, d]``,
    ``chunk_size`` rows at a time. Each block's logits are recomputed in backward, so peak memory is
    ``O(chunk_size * V)`` instead of ``O(N * V)``."""

    def block(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return divergence((head(h).float() / temperature).log_softmax(-1), t)

    hidden = hidden.to(next(iter(head.parameters()), hidden).dtype) if isinstance(head, torch.nn.Module) else hidden

    out = [checkpoint(block, hidden[i : i + chunk_size], teacher_logprobs[i : i + chunk_size], use_reentrant=False)
           for i in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(out) if out else hidden.new_zeros(0)
