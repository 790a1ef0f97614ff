"""Rollouts: who produced the completion tokens, and the tensors every later stage reads.

Layout: ``prompt_ids`` are left-padded ``[B, P]``; with several samples per prompt (``grouped``) the samples of
one prompt are adjacent rows and ``group`` holds each row's prompt index; ``completion_ids`` are right-padded ``[B, C]``; the
completion mask covers every generated token up to and including the first end-of-sequence token.
``sampler_logprobs[b, t] = log mu(y_t | s_t)`` is the behaviour policy's log-prob of each sampled token
(after temperature and top-p), so that an importance ratio ``pi_theta / mu`` is exactly 1 when sampling
is synchronous at temperature 1 with no truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Example, left_pad, render_completion, render_prompt, right_pad
from .decode import decode
from .objectives.support import sampled_from_logits


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C] float, 1 on tokens that count
    truncated: torch.Tensor  # [B] bool: no end-of-sequence token within the budget
    examples: list[Example]
    source: str  # "student", "teacher" or "dataset"
    sampler_logprobs: torch.Tensor | None = None  # [B, C] log mu(y_t); None when not sampled by the student
    guidance_mask: torch.Tensor | None = None  # [B, C] 1 on teacher-prefix tokens placed before the student's own
    reference_logprobs: torch.Tensor | None = None  # [B, C] log pi_ref(y_t), set by the loop when a regularizer needs it
    group: torch.Tensor | None = None  # [B] long: the prompt index of each row, with rollout.num_samples > 1 (grouped)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.long()], dim=1)

    def with_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> "Rollouts":
        """The same completions (ids, masks, sampler log-probs) after other left-padded prompts: a teacher's own
        view of the states (``teachers.context``)."""
        return replace(self, prompt_ids=prompt_ids, prompt_mask=prompt_mask)

    @property
    def own_mask(self) -> torch.Tensor:
        """``[B, C]`` 1 on the completion tokens the sampler wrote itself (not a guidance prefix)."""
        return self.completion_mask if self.guidance_mask is None else self.completion_mask * (1 - self.guidance_mask)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, indices: list[int]) -> "Rollouts":
        """Rows ``indices`` alone, in that order (a teacher's share of the batch, ``teachers.multi``): completions
        keep their width, so what is scored on them lines up with the whole batch's columns; prompt columns that
        are padding in every kept row are dropped."""
        pick = lambda t: None if t is None else t[torch.as_tensor(indices, dtype=torch.long, device=t.device)]  # noqa: E731
        prompt_mask = pick(self.prompt_mask)
        start = int((prompt_mask.sum(0) == 0).sum())  # left padding: the all-pad columns come first
        return replace(self, prompt_ids=pick(self.prompt_ids)[:, start:], prompt_mask=prompt_mask[:, start:],
                       completion_ids=pick(self.completion_ids), completion_mask=pick(self.completion_mask),
                       truncated=pick(self.truncated), examples=[self.examples[i] for i in indices],
                       sampler_logprobs=pick(self.sampler_logprobs), guidance_mask=pick(self.guidance_mask),
                       reference_logprobs=pick(self.reference_logprobs), group=pick(self.group))

    def completions(self) -> list[list[int]]:
        """Each row's completion token ids, padding dropped."""
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.completion_ids, self.completion_mask)]

    def texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in self.completions()]

    def completion_logits(self, model: PreTrainedModel, return_hidden: bool = False, logits: bool = True):
        """``[B, C, V]`` logits that predict each completion token, from one forward pass (and, with
        ``return_hidden``, the ``[B, C, d]`` last hidden states they come from).

        Position ids follow the attention mask, exactly as ``generate`` assigns them with left padding.
        Only the last ``C + 1`` positions go through the LM head; with ``logits=False`` none do (an empty index
        for ``logits_to_keep``) and the logits come back as None, for a caller that applies the head itself in
        chunks.
        """
        mask = self.attention_mask
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        width = self.completion_ids.shape[1]
        out = model(input_ids=self.input_ids, attention_mask=mask, position_ids=position_ids,
                    logits_to_keep=width + 1 if logits else torch.zeros(0, dtype=torch.long), use_cache=False,
                    output_hidden_states=return_hidden)
        completion_logits = out.logits[:, :-1] if logits else None
        if return_hidden:
            return completion_logits, out.hidden_states[-1][:, -width - 1 : -1]
        return completion_logits

    def token_logprobs(self, model: PreTrainedModel) -> torch.Tensor:
        """``[B, C]`` float32 log-probs of the completion tokens under ``model``, masked."""
        return sampled_from_logits(self.completion_logits(model), self.completion_ids)[0] * self.completion_mask


def join_rows(parts: list[tuple[list[int], Rollouts]], pad_id: int) -> Rollouts:
    """One batch from ``(rows, rollouts)`` parts that each hold some rows of it (teachers' samples of their share,
    ``teachers.multi``): prompts left-padded and completions right-padded to the widest part."""
    size = sum(len(rows) for rows, _ in parts)
    first = parts[0][1]
    device = first.completion_ids.device
    width_p = max(r.prompt_ids.shape[1] for _, r in parts)
    width_c = max(r.completion_ids.shape[1] for _, r in parts)

    def place(name: str, width: int, fill: float, left: bool):
        if getattr(first, name) is None:
            return None
        out = torch.full((size, width), fill, dtype=getattr(first, name).dtype, device=device)
        for rows, part in parts:
            value = getattr(part, name)
            cols = slice(width - value.shape[1], width) if left else slice(0, value.shape[1])
            out[torch.as_tensor(rows, device=device), cols] = value.to(device)
        return out

    truncated = torch.zeros(size, dtype=torch.bool)
    examples: list = [None] * size
    for rows, part in parts:
        truncated[torch.as_tensor(rows)] = part.truncated.cpu()
        for row, example in zip(rows, part.examples):
            examples[row] = example
    return Rollouts(place("prompt_ids", width_p, pad_id, True), place("prompt_mask", width_p, 0, True),
                    place("completion_ids", width_c, pad_id, False), place("completion_mask", width_c, 0, False),
                    truncated.to(first.truncated.device), examples, first.source,
                    place("sampler_logprobs", width_c, 0.0, False), place("guidance_mask", width_c, 0.0, False))


def grouped(examples: list[Example], n: int) -> tuple[list[Example], torch.Tensor]:
    """Each example ``n`` times in a row (``[a, a, b, b]`` for ``n = 2``), and the ``[B * n]`` prompt index of each
    row, for ``Rollouts.group``."""
    return [e for e in examples for _ in range(n)], torch.arange(len(examples)).repeat_interleave(n)


def _completion_mask(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask through the first end token, and whether each row ran out of budget before one."""
    is_eos = completion_ids == eos_id
    ended = is_eos.any(dim=1)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first eos
    return (~after_eos).float(), ~ended


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    source: str = "student",
    prefixes: list[list[int]] | None = None,
    rows: tuple[int, int] | None = None,
) -> Rollouts:
    """Batched sampling over the KV cache from left-padded prompts (``decode.decode``), the model in eval mode.

    With ``prefixes`` (token ids of a teacher's answer prefix per prompt), the model continues after the
    prefix; the completion holds prefix + continuation, and ``guidance_mask`` marks the prefix tokens.
    ``rows = (offset, total)``: these examples are rows ``offset`` onward of a batch of ``total`` shared among
    processes, each row drawn as in one process holding the whole batch (``decode.choose``).
    """
    device = next(model.parameters()).device
    rendered, starts = starts_of(tokenizer, examples, prefixes)
    prompt_ids, prompt_mask = left_pad(starts, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    completion_ids, sampler_logprobs = decode(model, prompt_ids, prompt_mask, max_completion_length,
                                              tokenizer.eos_token_id, tokenizer.pad_token_id, temperature, top_p,
                                              rows)
    completion_mask, truncated = _completion_mask(completion_ids, tokenizer.eos_token_id)
    greedy = temperature == 0  # decode.choose took the argmax: no sampler whose log-probs to keep
    return _assemble(examples, rendered, prefixes, prompt_ids, prompt_mask, completion_ids, completion_mask, truncated,
                     None if greedy else sampler_logprobs, source, tokenizer.pad_token_id)


def starts_of(tokenizer: PreTrainedTokenizerBase, examples: list[Example],
              prefixes: list[list[int]] | None) -> tuple[list[list[int]], list[list[int]]]:
    """``(rendered prompts, what the sampler continues)``: each prompt's ids, followed by its prefix if any."""
    rendered = [render_prompt(tokenizer, e.messages) for e in examples]
    return rendered, [r + p for r, p in zip(rendered, prefixes)] if prefixes else rendered


def from_samples(tokenizer: PreTrainedTokenizerBase, examples: list[Example], draws: list[tuple[list[int], list[float]]],
                 max_completion_length: int, device: torch.device, prefixes: list[list[int]] | None = None) -> Rollouts:
    """The student's rollouts from completions another sampler drew (a server serving the student,
    ``served_rollout``): per row the sampled ids after ``starts_of`` and their ``log mu``; masked, truncated and
    padded exactly as ``sample`` does (through the first end token; truncated when none within the budget)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rendered, starts = starts_of(tokenizer, examples, prefixes)
    prompt_ids, prompt_mask = left_pad(starts, pad)
    rows = [ids[: ids.index(eos) + 1] if eos in ids else ids[:max_completion_length] for ids, _ in draws]
    completion_ids, completion_mask = right_pad(rows, pad, max(1, max(map(len, rows))))
    sampler_logprobs = torch.zeros(completion_ids.shape)
    for row, (ids, (_, logprobs)) in enumerate(zip(rows, draws)):
        sampler_logprobs[row, : len(ids)] = torch.tensor(logprobs[: len(ids)])
    truncated = torch.tensor([eos not in ids for ids in rows])
    return _assemble(examples, rendered, prefixes, prompt_ids.to(device), prompt_mask.to(device),
                     completion_ids.to(device), completion_mask.float().to(device), truncated.to(device),
                     sampler_logprobs.to(device), "student", pad)


def _assemble(examples: list[Example], rendered: list[list[int]], prefixes: list[list[int]] | None,
              prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, truncated: torch.Tensor, sampler_logprobs: torch.Tensor | None,
              source: str, pad_id: int) -> Rollouts:
    """Rollouts of completions drawn after ``rendered + prefix``: padding after the mask, then the prefixes moved
    into the completions (``_move_prefixes``)."""
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    sampler_logprobs = None if sampler_logprobs is None else sampler_logprobs * completion_mask
    rollouts = Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, examples, source,
                        sampler_logprobs)
    return _move_prefixes(rollouts, rendered, prefixes, pad_id) if prefixes else rollouts


def _move_prefixes(rollouts: Rollouts, rendered: list[list[int]], prefixes: list[list[int]], pad_id: int) -> Rollouts:
    """Re-split ``prompt + prefix | continuation`` into ``prompt | prefix + continuation``."""
    device = rollouts.completion_ids.device
    rows, logprob_rows, guidance_rows = [], [], []
    for i, prefix in enumerate(prefixes):
        keep = rollouts.completion_mask[i].bool()
        continuation = rollouts.completion_ids[i][keep].tolist()
        rows.append(prefix + continuation)
        sampled = rollouts.sampler_logprobs[i][keep].tolist() if rollouts.sampler_logprobs is not None else [0.0] * len(continuation)
        logprob_rows.append([0.0] * len(prefix) + sampled)
        guidance_rows.append([1.0] * len(prefix) + [0.0] * len(continuation))
    prompt_ids, prompt_mask = left_pad(rendered, pad_id)
    completion_ids, completion_mask = right_pad(rows, pad_id)
    width = completion_ids.shape[1]
    pad = lambda r: r + [0.0] * (width - len(r))  # noqa: E731
    return Rollouts(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                    completion_mask.float().to(device), rollouts.truncated, rollouts.examples, rollouts.source,
                    torch.tensor([pad(r) for r in logprob_rows], device=device),
                    guidance_mask=torch.tensor([pad(r) for r in guidance_rows], device=device))


def from_prefixes(prefixes: list[list[int]], continuations: list[list[int]], pad_id: int, eos_id: int,
                  source: str, device: torch.device) -> Rollouts:
    """Rollouts whose prompts are ``prefixes`` (token ids, left-padded) and whose completions are ``continuations``
    (right-padded; truncated where no end token)."""
    prompt_ids, prompt_mask = left_pad(prefixes, pad_id)
    completion_ids, completion_mask = right_pad(continuations, pad_id, max(1, max(map(len, continuations))))
    truncated = torch.tensor([eos_id not in c for c in continuations])
    return Rollouts(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                    completion_mask.float().to(device), truncated, [], source)


def from_dataset(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_completion_length: int) -> Rollouts:
    """Rollouts whose completions are the dataset's reference completions (off-policy states)."""
    prompt_ids, prompt_mask = left_pad([render_prompt(tokenizer, e.messages) for e in examples], tokenizer.pad_token_id)
    completions = [render_completion(tokenizer, e.messages, e.completion)[:max_completion_length] for e in examples]
    completion_ids, completion_mask = right_pad(completions, tokenizer.pad_token_id)
    truncated = torch.tensor([tokenizer.eos_token_id not in c for c in completions])
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask.float(), truncated, examples, "dataset")
