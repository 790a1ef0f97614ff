"""GKD (Agarwal et al. 2024): generalized JSD(beta) on a mix of student and dataset states.

With probability ``lmbda`` a batch is sampled by the student, otherwise it is the dataset's completions.
Per token, ``JSD_beta(pi_T, pi_S)`` over the full vocabulary, or over the teacher's top-k renormalised,
both distributions computed from ``logits / temperature``. ``beta = 0`` is forward KL, ``1`` reverse KL.
"""

from __future__ import annotations

import random

from ..objectives.divergence import generalized_jsd, kl
from ..objectives.support import teacher_topk
from . import Method, StateSource, TokenLoss


class GKD(Method):
    name = "gkd"

    def __init__(self, beta: float = 0.5, lmbda: float = 0.5, temperature: float = 1.0, top_k: int | None = None):
        self.beta, self.lmbda, self.temperature, self.top_k = beta, lmbda, temperature, top_k
        self.teacher_support = "full" if top_k is None else "topk"

    def state_source(self, rng: random.Random) -> StateSource:
        return "student" if rng.random() < self.lmbda else "dataset"

    def needs_completions(self) -> bool:
        return self.lmbda < 1.0

    def token_loss(self, student_logits, rollouts, teacher):
        student = (student_logits.float() / self.temperature).log_softmax(-1)
        if self.top_k is None:
            teacher_lp = (teacher.logprobs / self.temperature).log_softmax(-1)
        else:
            student, teacher_lp = teacher_topk(student, teacher.topk_ids, teacher.topk_logprobs / self.temperature)
        loss = generalized_jsd(student, teacher_lp, self.beta)
        return TokenLoss(loss, {"reverse_kl": kl(student.detach(), teacher_lp)})
