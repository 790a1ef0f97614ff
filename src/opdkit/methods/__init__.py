"""Named methods: small presets over the axes of the OPD formula.

Each ``methods/<name>.py`` holds a ``PRESET``: the axis values that define the method (see
``ObjectiveConfig``); a config's own values override them. :class:`~opdkit.methods.formula.Formula`
turns any point on the axes into a per-token loss.

A method says where the states of a batch come from (``state_source``), what the teacher must return
(``teacher_support``), and the per-token loss. The loop aggregates it and knows nothing else about it.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import OPDError, closest
from ..rollout import Rollouts
from ..teachers import Support, TeacherSignal

StateSource = Literal["student", "teacher", "dataset"]
METHODS = ("opd", "gkd", "seqkd", "opd_plus", "tropd", "gae_opd", "eopd", "vopd", "skew_kl", "chunk_opd", "near_future",
           "cr_opd")


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [B, C] per-token loss, differentiable; the loop masks and aggregates
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, C] detached per-token values to log
    scalars: dict[str, float] = field(default_factory=dict)  # per-batch values to log (rates, explained variance)
    token_logprobs: torch.Tensor | None = None  # [B, C] detached log pi_S(y_t) where computed (the loop's diagnostics reuse it)
    # [B, C] regression loss of the method's own value head, on detached inputs: it trains that head alone; the loop
    # aggregates it like ``loss``, adds it to the backward and logs it apart (``value_loss``)
    value_loss: torch.Tensor | None = None


class Method:
    name: str
    teacher_support: Support = "token"
    top_k: int | None = None
    needs_hidden: bool = False  # the loop also hands over the student's last hidden states
    hidden_only: bool = False  # ... and no logits: the method applies the LM head itself
    needs_teacher_entropy: bool = False  # the teacher's full entropy per position, where it can give it
    normalizes_advantages: bool = False  # standardises advantages with the step's moments (set by the loop)
    advantage_moments: tuple[float, float] | None = None
    own_learning_rate: float | None = None  # peak learning rate of ``parameters()`` (None: the student's)

    def state_source(self, rng: random.Random) -> StateSource:
        return "student"

    def needs_completions(self) -> bool:
        """Whether the dataset must carry reference completions."""
        return False

    def attach(self, student: torch.nn.Module) -> None:
        """Keep or create what the method needs of the student before training (a value head, say)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters the method owns besides the student's (a value head, say): the loop trains them in an
        optimizer group of their own at ``own_learning_rate`` and clips their gradient apart from the student's."""
        return []

    def guide(self, rollouts: Rollouts, teacher_signal: TeacherSignal, teacher) -> None:
        """After the teacher scored a batch and before the loss: ask the teacher for more where the scores say so
        (near-future bridges), into ``teacher_signal``. Most methods ask nothing."""

    def token_loss(self, student_logits: torch.Tensor, rollouts: Rollouts, teacher: TeacherSignal,
                   hidden: torch.Tensor | None = None) -> TokenLoss:
        raise NotImplementedError


def _module(name: str):
    if name not in METHODS:
        raise OPDError(f"unknown method {name!r}{closest(name, METHODS)}; known: {', '.join(METHODS)}")
    return importlib.import_module(f".{name}", __name__)


def preset(name: str) -> dict:
    """The axis values a named method fixes (a copy)."""
    import copy

    return copy.deepcopy(getattr(_module(name), "PRESET", {}))


def build_method(objective) -> Method:
    _module(objective.method)  # a known name
    from .formula import Formula

    return Formula(objective)
