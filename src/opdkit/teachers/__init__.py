"""Teachers: one interface, ``score(rollouts, support) -> TeacherSignal``.

The teacher is always scored at temperature 1 on the student's exact token ids; any temperature an
objective wants is applied in the objective, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..rollout import Rollouts

Support = Literal["token", "topk", "full"]


@dataclass
class TeacherSignal:
    token_logprobs: torch.Tensor  # [B, C] log pi_T(y_t | s_t) of the rollout's tokens
    logprobs: torch.Tensor | None = None  # [B, C, V] log-softmax over the vocabulary (support "full")
    topk_ids: torch.Tensor | None = None  # [B, C, k] (support "topk")
    topk_logprobs: torch.Tensor | None = None  # [B, C, k] log pi_T of those ids, normalised over the vocabulary


class Teacher(Protocol):
    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None) -> TeacherSignal: ...


from .local import LocalTeacher  # noqa: E402

__all__ = ["LocalTeacher", "Support", "Teacher", "TeacherSignal"]
