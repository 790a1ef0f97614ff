"""Named methods: small presets over the objective axes.

A method says where the states of a batch come from (``state_source``), what the teacher must return
(``teacher_support``), and the per-token loss. The loop aggregates it (token mean over the whole
optimizer step) and knows nothing else about the method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import ObjectiveConfig
from ..errors import OPDError
from ..rollout import Rollouts
from ..teachers import Support, TeacherSignal

StateSource = Literal["student", "teacher", "dataset"]


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [B, C] per-token loss, differentiable; the loop masks and aggregates
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, C] detached per-token values to log


class Method:
    name: str
    teacher_support: Support = "token"
    top_k: int | None = None

    def state_source(self, rng: random.Random) -> StateSource:
        return "student"

    def needs_completions(self) -> bool:
        """Whether the dataset must carry reference completions."""
        return False

    def token_loss(self, student_logits: torch.Tensor, rollouts: Rollouts, teacher: TeacherSignal) -> TokenLoss:
        raise NotImplementedError


def build_method(config: ObjectiveConfig) -> Method:
    from .gkd import GKD
    from .opd import OPD
    from .seqkd import SeqKD

    if config.method == "opd":
        return OPD()
    if config.method == "gkd":
        return GKD(beta=config.beta, lmbda=config.lmbda, temperature=config.temperature, top_k=config.top_k)
    if config.method == "seqkd":
        return SeqKD()
    raise OPDError(f"unknown method {config.method!r}")
