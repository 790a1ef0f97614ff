"""A local Hugging Face causal LM as the teacher."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Example
from ..models import autocast
from ..objectives.divergence import entropy as full_entropy
from ..objectives.support import sampled
from ..rollout import Rollouts, sample
from . import Support, TeacherSignal


class LocalTeacher:
    returns_logprobs = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, amp_dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.amp_dtype = amp_dtype
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        with autocast(self.device, self.amp_dtype):
            logits = rollouts.completion_logits(self.model)
        logprobs = logits.float().log_softmax(-1)  # fp32 log-softmax whatever the matmul precision
        token = sampled(logprobs, rollouts.completion_ids) * rollouts.completion_mask
        signal = TeacherSignal(token, entropy=full_entropy(logprobs) if entropy else None)
        if support == "full":
            signal.logprobs = logprobs
        elif support == "topk":
            signal.topk_logprobs, signal.topk_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        return signal

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0, greedy: bool = False) -> Rollouts:
        """Teacher completions of the prompts (teacher states, guidance prefixes, greedy teacher accuracy)."""
        with autocast(self.device, self.amp_dtype):
            return sample(self.model, self.tokenizer, examples, max_completion_length=max_completion_length,
                          temperature=temperature, top_p=top_p, greedy=greedy, source="teacher")

    def take_usage(self) -> dict[str, float]:
        """A local teacher makes no calls to count."""
        return {}
