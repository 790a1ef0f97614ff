"""``teacher: {kind: self}``: on-policy self-distillation, the student's own weights as its teacher.

The teacher is a frozen copy of the student taken at setup, in the teacher's dtype (one more set of weights; a
LoRA student, which would need none, is not trained by opdkit yet). With ``ema`` it follows the student slowly:
after each optimizer step ``theta_T <- d * theta_T + (1 - d) * theta_S``. Without a context (``teacher.prompt``) it
sees what the student sees, so at step 0 the log-ratio is zero at every token; with one (a reference solution, a
system prompt) it is the student conditioned on what the student cannot see, the self-teacher of OPSD.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .context import TeacherContext
from .local import LocalTeacher


class SelfTeacher(LocalTeacher):
    def __init__(self, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, amp_dtype: torch.dtype,
                 dtype: torch.dtype, ema: float | None = None, context: TeacherContext | None = None):
        super().__init__(copy.deepcopy(student).to(dtype), tokenizer, amp_dtype, context)
        self.ema = ema

    @torch.no_grad()
    def after_step(self, student: torch.nn.Module) -> None:
        """Called by the loop after each optimizer step that changed the student: the EMA update (frozen: nothing)."""
        if self.ema is None:
            return
        own = dict(self.model.named_parameters())
        for name, param in student.named_parameters():
            own[name].lerp_(param.detach().to(own[name].dtype), 1 - self.ema)
