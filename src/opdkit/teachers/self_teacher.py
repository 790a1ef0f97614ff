"""``teacher: {kind: self}``: on-policy self-distillation, the student's own weights as its teacher.

The teacher is a frozen copy of the student taken at setup, in the teacher's dtype (one more set of weights).
With ``ema`` it follows the student slowly: after each optimizer step ``theta_T <- d * theta_T + (1 - d) *
theta_S``. A LoRA student (``student.lora``) needs no copy: its base weights never train, so ``AdapterOffTeacher``
scores and samples with the student itself, the adapter disabled. Without a context (``teacher.prompt``) the
teacher sees what the student sees, so at step 0 the log-ratio is zero at every token; with one (a reference
solution, a system prompt) it is the student conditioned on what the student cannot see, the self-teacher of OPSD.
"""

from __future__ import annotations

import contextlib
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


class AdapterOffTeacher(LocalTeacher):
    """A LoRA student's base weights as its teacher: ``model`` is the student itself (no copy, nothing frozen
    that trains), and every call runs in eval mode with the adapter disabled, then leaves the student as it was."""

    def __init__(self, student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, amp_dtype: torch.dtype,
                 context: TeacherContext | None = None):
        self.model, self.tokenizer, self.amp_dtype, self.context = student, tokenizer, amp_dtype, context
        self.device = next(student.parameters()).device

    @contextlib.contextmanager
    def _base(self):
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self.model.train(training)

    def output_head(self) -> torch.nn.Module:
        """The base layer of an adapted LM head (target_modules naming it): the hidden states are projected later,
        outside ``_base``."""
        head = self.model.get_output_embeddings()
        return head.get_base_layer() if hasattr(head, "get_base_layer") else head

    def score(self, *args, **kwargs):
        with self._base():
            return super().score(*args, **kwargs)

    def sample(self, *args, **kwargs):
        with self._base():
            return super().sample(*args, **kwargs)

    def continue_ids(self, *args, **kwargs):
        with self._base():
            return super().continue_ids(*args, **kwargs)
