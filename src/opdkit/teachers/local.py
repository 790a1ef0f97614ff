"""A local Hugging Face causal LM as the teacher.

Scoring never upcasts more than it needs: the sampled token's log-prob is its logit minus the logsumexp over
the vocabulary, the top-k is taken on the raw logits before any float32 copy, and the full distribution is
handed over as the last hidden states and the LM head, so that a full-vocabulary loss projects it block by
block (``objectives.support.chunked_full``) and no ``[B, C, V]`` teacher tensor is held between stages. The
statistics of that distribution (token log-probs, entropy, top-k) come from the same blocks (``HeadStats``): the
head is applied once a step, not once for them and again for the loss.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import Example, left_pad
from ..decode import decode
from ..models import autocast
from ..objectives.divergence import entropy as full_entropy
from ..objectives.support import chunk_rows, sampled_from_logits
from ..products import float32_arithmetic, other_layers, through
from ..rollout import Rollouts, sample
from . import Support, TeacherSignal
from .context import TeacherContext

BLOCK_MEMORY_MIB = 256  # per block of positions when the full distribution is reduced (token log-probs, entropy)
OBSERVED_MEMORY_MIB = 16  # per part of a loss block reduced by HeadStats.observe, while the loss's own blocks live


def _reduce(logits: torch.Tensor, ids: torch.Tensor, entropy: bool, top_k: int | None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(log_softmax(logits)[ids], entropy, top-k ids, top-k log-probs)`` in float32 over ``[..., V]`` logits, the
    top-k taken on the raw logits before any upcast; the entropy from float32 log-probs block by block (rows of
    ``BLOCK_MEMORY_MIB``), the logits less the token's logsumexp (not a log-softmax taking it again)."""
    token, lse = sampled_from_logits(logits, ids)
    teacher_entropy = None
    if entropy:
        flat, flat_lse = logits.reshape(-1, logits.shape[-1]), lse.reshape(-1, 1)
        rows = chunk_rows(logits.shape[-1], BLOCK_MEMORY_MIB, live=2)
        teacher_entropy = torch.cat([full_entropy(flat[i : i + rows].float() - flat_lse[i : i + rows])
                                     for i in range(0, flat.shape[0], rows)]).view(logits.shape[:-1])
    topk_ids, topk_logprobs = _top_k(logits, lse, top_k)
    return token, teacher_entropy, topk_ids, topk_logprobs


def _top_k(logits: torch.Tensor, lse: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor | None, ...]:
    """The top-k ids of raw ``[..., V]`` logits (before any upcast) and their float32 log-probs, given the logits'
    logsumexp; ``(None, None)`` without ``top_k``."""
    if not top_k:
        return None, None
    values, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return ids, values.float() - lse.unsqueeze(-1)


class HeadStats:
    """The token log-probs, entropy (with ``entropy``) and top-k (with ``top_k``) of a local teacher's full
    distribution at every completion position, from its hidden states ``[B, C, d]`` and LM head. A full-vocabulary
    loss projects the kept positions block by block anyway and hands each block's raw logits to ``observe``
    (``methods.formula``); ``complete`` projects the positions no block covered (the masked ones after a loss pass,
    every one without), a block at a time, and returns the four tensors as the teacher stage computed them."""

    def __init__(self, hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 entropy: bool, top_k: int | None):
        self.hidden, self.head, self.ids, self.mask = hidden, head, ids, mask
        self.entropy, self.top_k = entropy, min(top_k, head.weight.shape[0]) if top_k else None

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*ids.shape, *shape, dtype=dtype, device=ids.device)

        self.token, self.done = zeros(), zeros(dtype=torch.bool)
        self.teacher_entropy = zeros() if entropy else None
        self.topk_ids = zeros(self.top_k, dtype=torch.long) if self.top_k else None
        self.topk_logprobs = zeros(self.top_k) if self.top_k else None

    @torch.no_grad()
    def observe(self, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Record the statistics of the flat ``positions`` (indices into ``[B * C]``) from their raw logits
        ``[n, V]``, a few rows at a time (``OBSERVED_MEMORY_MIB``); returns their float32 log-probs, normalised in
        place by the logsumexp those statistics take, so that the loss's block takes none of its own
        (``chunked_full``'s ``teacher_logprobs``)."""
        logits = logits.float()
        if bool(self.done.view(-1)[positions].all()):  # seen already (a loss pass run again): normalised only
            return logits.sub_(logits.logsumexp(-1, keepdim=True))
        rows = chunk_rows(logits.shape[-1], OBSERVED_MEMORY_MIB, live=2)
        for i in range(0, len(positions), rows):
            self._fill(positions[i : i + rows], logits[i : i + rows])
        return logits

    def _fill(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """The statistics of ``positions`` from their float32 logits, which become their log-probs in place: the
        top-k on the raw logits, the entropy on the log-probs (the values of ``_reduce``, without its copy)."""
        token, lse = sampled_from_logits(logits, self.ids.reshape(-1)[positions])
        topk_ids, topk_logprobs = _top_k(logits, lse, self.top_k)
        logprobs = logits.sub_(lse.unsqueeze(-1))
        teacher_entropy = full_entropy(logprobs) if self.entropy else None
        for store, values in ((self.token, token), (self.teacher_entropy, teacher_entropy),
                              (self.topk_ids, topk_ids), (self.topk_logprobs, topk_logprobs)):
            if store is not None:
                store.view(-1, *store.shape[2:])[positions] = values.to(store.dtype)
        self.done.view(-1)[positions] = True

    @torch.no_grad()
    def complete(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(token log-probs * mask, entropy, top-k ids, top-k log-probs)``, the positions not observed projected
        here as the loss projects the others (``products.through``), ``BLOCK_MEMORY_MIB`` of logits at a time."""
        missing = (~self.done).reshape(-1).nonzero().squeeze(-1)
        flat_hidden = self.hidden.reshape(-1, self.hidden.shape[-1])
        rows = chunk_rows(self.head.weight.shape[0], BLOCK_MEMORY_MIB, live=3)
        for i in range(0, len(missing), rows):
            self._fill(missing[i : i + rows], through(self.head, flat_hidden[missing[i : i + rows]]).float())
        return self.token * self.mask, self.teacher_entropy, self.topk_ids, self.topk_logprobs


class LocalTeacher:
    """``context`` (``teacher.prompt``): the teacher scores and samples in its own view of each prompt; what it
    returns is always aligned with, and placed after, the student's prompt."""

    returns_logprobs = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, amp_dtype: torch.dtype = torch.float32,
                 context: TeacherContext | None = None):
        self.model = model.eval().requires_grad_(False)
        # bf16 weights in a float32 run: float32 arithmetic on them where every matrix is in a layer it widens, else
        # (GPT-2's Conv1D) bf16 arithmetic, emulated where the processor has no bf16 units
        if self.dtype == torch.bfloat16 and amp_dtype == torch.float32 and not other_layers(self.model):
            float32_arithmetic(self.model)
        self.tokenizer = tokenizer
        self.amp_dtype = amp_dtype
        self.context = context
        self.device = next(model.parameters()).device

    def output_head(self) -> torch.nn.Module:
        """The LM head that projects the hidden states ``score`` hands over, wherever they are projected later."""
        return self.model.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        """``top_k`` with support "full" also gives the top-k (for diagnostics), taken block by block."""
        if self.context is not None:
            rollouts = self.context.view(rollouts)
        mask, ids = rollouts.completion_mask, rollouts.completion_ids
        k = top_k if support in ("topk", "full") else None
        if support == "full":  # hidden states and head; token log-probs, entropy and top-k when first read
            with autocast(self.device, self.amp_dtype):
                _, hidden = rollouts.completion_logits(self.model, return_hidden=True, logits=False)
            head = self.output_head()
            return TeacherSignal(hidden=hidden, head=head, pending=HeadStats(hidden, head, ids, mask, entropy, k))
        with autocast(self.device, self.amp_dtype):
            logits = rollouts.completion_logits(self.model)
        token, teacher_entropy, topk_ids, topk_logprobs = _reduce(logits, ids, entropy, k)
        return TeacherSignal(token * mask, entropy=teacher_entropy, topk_ids=topk_ids, topk_logprobs=topk_logprobs)

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """Teacher completions of the prompts (teacher states, guidance prefixes, greedy teacher accuracy), written
        in the teacher's view and returned after the student's prompts."""
        seen = examples if self.context is None else self.context.examples(examples)
        with autocast(self.device, self.amp_dtype):
            rollouts = sample(self.model, self.tokenizer, seen, max_completion_length=max_completion_length,
                              temperature=temperature, top_p=top_p, source="teacher")
        return rollouts if self.context is None else self.context.student_view(rollouts, examples)

    @torch.no_grad()
    def continue_ids(self, prefixes: list[list[int]], max_new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
        """Continuations of the prefixes (ids) by ``decode.decode``, through the end token when one comes."""
        ids, mask = left_pad(prefixes, self.tokenizer.pad_token_id)
        eos = self.tokenizer.eos_token_id
        with autocast(self.device, self.amp_dtype):
            out, _ = decode(self.model, ids.to(self.device), mask.to(self.device), max_new_tokens, eos,
                            self.tokenizer.pad_token_id, temperature)
        return [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]

    def take_usage(self) -> dict[str, float]:
        """A local teacher makes no calls to count."""
        return {}
