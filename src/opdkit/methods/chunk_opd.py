"""Logit-free chunk-level OPD (OmniOPD-style; a reconstruction, see ``opdkit.teachers.chat``).

States from the current student. A text-only teacher (``teacher.kind: chat``) audits a few uncertain
chunks of each rollout and returns a per-token advantage ``A_t``: the chunk's Dirichlet-smoothed
similarity to the teacher's continuations minus a baseline, 0 on unaudited tokens. Loss per token

    -(pi_S/mu)(y_t) * A_t  +  ref_kl_coef * k3(pi_ref(y_t) / pi_S(y_t))

Unaudited tokens get gradient from the anchor only, so use it with ``objective.ref_kl_coef > 0`` (the
shared k3 regularizer to the frozen initial student; 0.01-0.05 is the reconstruction's range). Every
chunk-level knob lives in the ``chat`` teacher spec.
"""

from __future__ import annotations

from ..errors import OPDError
from ..objectives import regularizers
from ..objectives.policy_gradient import policy_gradient_loss
from . import Method, TokenLoss


class ChunkOPD(Method):
    name = "chunk_opd"
    teacher_support = "token"

    def __init__(self, ref_kl_coef: float = 0.0):
        self.ref_kl_coef = ref_kl_coef

    def token_loss(self, student_logits, rollouts, teacher, hidden=None):
        if teacher.token_advantages is None:
            raise OPDError("objective.method chunk_opd needs per-chunk rewards from a text-only teacher: "
                           "set teacher.kind: chat")
        token_logprobs = student_logits.float().log_softmax(-1).gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
        advantage = teacher.token_advantages.detach()
        loss = policy_gradient_loss(token_logprobs, rollouts.sampler_logprobs, advantage)
        if self.ref_kl_coef:
            loss = loss + self.ref_kl_coef * regularizers.reference_kl(token_logprobs, rollouts.reference_logprobs)
        return TokenLoss(loss, {"advantage": advantage, "audited": (advantage != 0).float()})


def build(objective) -> ChunkOPD:
    return ChunkOPD(objective.ref_kl_coef)
