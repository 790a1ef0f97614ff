"""Classic on-policy distillation (Agarwal et al.; Thinking Machines' recipe).

States from the current student; per-token reward on the sampled token ``A_t = log pi_T(y_t) - log pi_S(y_t)``
(detached, no discount); loss ``-(pi_S/mu)(y_t) * A_t`` masked to completion tokens. Its expectation is the
per-token reverse-KL gradient ``grad KL(pi_S || pi_T)`` at each visited state.
"""

from __future__ import annotations

from ..objectives.policy_gradient import log_ratio_advantage, policy_gradient_loss
from . import Method, TokenLoss


class OPD(Method):
    name = "opd"
    teacher_support = "token"

    def token_loss(self, student_logits, rollouts, teacher):
        student_logprobs = student_logits.float().log_softmax(-1)
        token_logprobs = student_logprobs.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
        advantage = log_ratio_advantage(teacher.token_logprobs, token_logprobs)
        loss = policy_gradient_loss(token_logprobs, rollouts.sampler_logprobs, advantage)
        return TokenLoss(loss, {"advantage": advantage, "reverse_kl": -advantage})
