"""Sequence-level KD (Kim & Rush 2016): supervised fine-tuning on teacher samples.

Not on-policy: the teacher writes the completions, the student maximises their likelihood,
``loss_t = -log pi_S(y_t)``. The baseline every OPD run should beat.
"""

from __future__ import annotations

import random

from . import Method, StateSource, TokenLoss


class SeqKD(Method):
    name = "seqkd"
    teacher_support = "token"

    def state_source(self, rng: random.Random) -> StateSource:
        return "teacher"

    def token_loss(self, student_logits, rollouts, teacher):
        student_logprobs = student_logits.float().log_softmax(-1)
        token_logprobs = student_logprobs.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
        return TokenLoss(-token_logprobs, {"nll": -token_logprobs.detach()})
