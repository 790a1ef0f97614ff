"""A local Hugging Face causal LM as the teacher."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..models import autocast
from ..rollout import Rollouts
from . import Support, TeacherSignal


class LocalTeacher:
    def __init__(self, model: PreTrainedModel, amp_dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.amp_dtype = amp_dtype
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None) -> TeacherSignal:
        with autocast(self.device, self.amp_dtype):
            logits = rollouts.completion_logits(self.model)
        logprobs = logits.float().log_softmax(-1)  # fp32 log-softmax whatever the matmul precision
        token = logprobs.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1) * rollouts.completion_mask
        if support == "full":
            return TeacherSignal(token, logprobs=logprobs)
        if support == "topk":
            values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            return TeacherSignal(token, topk_ids=ids, topk_logprobs=values)
        return TeacherSignal(token)
