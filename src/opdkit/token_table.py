"""The token-level table: what the teacher and the student say about each token the student sampled.

A run's aggregate numbers say that something is off; this table says where. Per completion token ``y_t``:

- ``log_ratio``: ``r_t = log pi_T(y_t) - log pi_S(y_t)``, the OPD signal (negative: the teacher likes the token
  less than the student does);
- ``divergence``: ``KL(pi_S || pi_T)`` at the token's state, over the whole vocabulary when the teacher's full
  distribution is known, else over the teacher's top-k with one tail bucket (``reverse_kl_topk``);
- ``student_entropy``, ``teacher_entropy``: of each model's full next-token distribution;
- ``teacher_rank``: the teacher's 1-based rank of the sampled token (unknown beyond a top-k);
- ``overlap``: ``|top-k of the student ∩ top-k of the teacher| / k``;
- ``high_loss``, ``low_divergence``: the two flags of the near-future diagnostic
  (``opdkit.diagnostics.NEAR_FUTURE_DEFINITION``), pooled over the table's rollouts.

The tensor functions take ``[B, C, V]`` (or ``[B, C, k]``) and return ``[B, C]``. ``token_stats`` applies them to
one scored batch, ``TokenStats.cat`` pools batches, ``records`` writes the per-rollout records of the run
folder's ``tokens.jsonl`` (the same records ``opd diagnose`` writes); ``token_table`` does the three for one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from .objectives.bridge import high_loss
from .objectives.divergence import entropy, kl
from .objectives.support import restrict, sampled
from .products import through
from .rollout import Rollouts
from .teachers import TeacherSignal

BEYOND_TOPK = 0  # teacher_rank where the sampled token is not among the teacher's known top-k (its rank is > k)
TOP_K = 20  # k of the overlap and of the rank's top-k share when the teacher's full distribution is known


def teacher_rank(teacher_logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` long: the teacher's 1-based rank of each sampled token ``ids`` in its full distribution
    ``[B, C, V]``: 1 + the number of tokens it finds strictly more likely (tied tokens share the better rank).
    Rank 1 is the token the teacher would have chosen greedily; a large rank marks a choice it would not make."""
    chosen = sampled(teacher_logprobs, ids)
    return 1 + (teacher_logprobs > chosen.unsqueeze(-1)).sum(-1)


def teacher_rank_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` long: the teacher's 1-based rank of each sampled token from its top-k only (``[B, C, k]``, in any
    order, as a server returns it): the true rank where the token is among the k (every more likely token is
    among them too), else ``BEYOND_TOPK`` (0), since all that is known is that its rank exceeds k."""
    hit = topk_ids == ids.unsqueeze(-1)
    chosen = topk_logprobs.masked_fill(~hit, float("-inf")).amax(-1)
    rank = 1 + (topk_logprobs > chosen.unsqueeze(-1)).sum(-1)
    return torch.where(hit.any(-1), rank, torch.full_like(rank, BEYOND_TOPK))


def topk_overlap(student_logprobs: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: ``|top-k of the student ∩ top-k of the teacher| / k`` with ``k = teacher_topk_ids.shape[-1]``,
    from the student's full distribution ``[B, C, V]``. 1 where both would pick from the same candidates, whatever
    their probabilities; a low overlap means the student's mass sits on tokens the teacher barely considers."""
    k = teacher_topk_ids.shape[-1]
    student_ids = student_logprobs.topk(k, dim=-1).indices
    common = (student_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)).any(-1).sum(-1)
    return common.float() / k


def reverse_kl_topk(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: ``KL(pi_S || pi_T)`` over the teacher's top-k ids plus one tail bucket holding each side's
    remaining mass (``support.restrict`` with ``tail``), when only the teacher's top-k is known. Merging categories
    never raises a KL, so this is a lower bound of the full-vocabulary KL, equal to it when both sides put the
    same share of their tail mass on each tail token."""
    return kl(*restrict(student_logprobs, topk_logprobs, topk_ids, tail=True))


def low_divergence(divergence: torch.Tensor, mask: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """``[B, C]`` bool: masked positions whose divergence is below ``threshold``, by default below the median of
    the masked positions pooled over the batch: the low-divergence region of
    ``diagnostics.NEAR_FUTURE_DEFINITION`` (the same rule ``diagnostics.near_future_share`` applies)."""
    keep = mask.bool()
    if not keep.any():
        return torch.zeros_like(keep)
    tau = threshold if threshold is not None else float(divergence[keep].median())
    return keep & (divergence < tau)


@dataclass
class TokenStats:
    """``[B, C]`` per-token tensors of scored rollouts, float32 on the CPU. A field is None where the inputs
    cannot give it: the divergence, the student's entropy and the overlap need the student's full distribution;
    the divergence, the rank and the overlap need the teacher's full distribution or its top-k."""

    ids: torch.Tensor  # completion token ids, long
    mask: torch.Tensor  # 1 on completion tokens (through the end token), 0 on padding
    log_ratio: torch.Tensor  # r_t = log pi_T(y_t) - log pi_S(y_t)
    divergence: torch.Tensor | None = None
    divergence_kind: str | None = None  # "full" or "topk"
    student_entropy: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_rank: torch.Tensor | None = None  # long, 1-based; BEYOND_TOPK beyond the teacher's known top-k
    overlap: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # the method's per-token loss, when the caller has it
    top_k: int | None = None  # the k of ``overlap`` and of a top-k rank

    @property
    def k1(self) -> torch.Tensor:
        """``log pi_S(y_t) - log pi_T(y_t)``: the score by which the high-loss tokens are chosen."""
        return -self.log_ratio

    @staticmethod
    def cat(parts: list["TokenStats"]) -> "TokenStats":
        """The batches as one, right-padded to the widest completion (a field present in every batch, or None)."""
        width = max(p.ids.shape[1] for p in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        tensors = {}
        for f in fields(TokenStats):
            values = [getattr(p, f.name) for p in parts]
            if isinstance(values[0], torch.Tensor):
                tensors[f.name] = torch.cat([pad(v) for v in values]) if all(v is not None for v in values) else None
        return replace(parts[0], **tensors)


def _teacher_full(signal: TeacherSignal, row: int) -> torch.Tensor:
    """``[C, V]`` float32 log-probs of the teacher for one rollout, so that no ``[B, C, V]`` teacher tensor is
    made from hidden states and head (``TeacherSignal``) at once."""
    if signal.logprobs is not None:
        return signal.logprobs[row].float()
    with torch.no_grad():
        return through(signal.head, signal.hidden[row]).float().log_softmax(-1)


@torch.no_grad()
def token_stats(rollouts: Rollouts, student_logprobs: torch.Tensor | None, student_token_logprobs: torch.Tensor,
                signal: TeacherSignal, loss: torch.Tensor | None = None, top_k: int = TOP_K) -> TokenStats:
    """The per-token tensors of one scored batch. ``student_logprobs``: the student's ``[B, C, V]`` log-probs, or
    None when only ``student_token_logprobs`` ``[B, C]`` are at hand; ``signal``: the teacher's, whose full
    distribution (``logprobs`` or ``hidden`` and ``head``) is used where present, else its top-k; ``loss``: the
    method's per-token loss ``[B, C]``, or None; ``top_k``: the k of the overlap when the teacher's full
    distribution is known (a teacher's top-k brings its own k)."""
    mask, ids = rollouts.completion_mask.float(), rollouts.completion_ids
    student = None if student_logprobs is None else student_logprobs.float()
    cpu = lambda t: None if t is None else t.detach().float().cpu() * mask.cpu()  # noqa: E731
    stats = TokenStats(ids=ids.cpu(), mask=mask.cpu(),
                       log_ratio=cpu(signal.token_logprobs.float() - student_token_logprobs.float()),
                       student_entropy=None if student is None else cpu(entropy(student)),
                       teacher_entropy=cpu(signal.entropy), loss=cpu(loss))
    if signal.logprobs is not None or signal.hidden is not None:
        rank, divergence, overlap, teacher_entropy = [], [], [], []
        for b in range(ids.shape[0]):
            teacher = _teacher_full(signal, b)
            stats.top_k = min(top_k, teacher.shape[-1])
            rank.append(teacher_rank(teacher, ids[b]))
            if signal.entropy is None:
                teacher_entropy.append(entropy(teacher))
            if student is not None:
                divergence.append(kl(student[b], teacher))
                overlap.append(topk_overlap(student[b], teacher.topk(stats.top_k, dim=-1).indices))
        stats.teacher_rank = (torch.stack(rank) * mask.long()).cpu()
        if teacher_entropy:
            stats.teacher_entropy = cpu(torch.stack(teacher_entropy))
        if student is not None:
            stats.divergence, stats.divergence_kind = cpu(torch.stack(divergence)), "full"
            stats.overlap = cpu(torch.stack(overlap))
    elif signal.topk_ids is not None:
        topk_ids, topk_logprobs = signal.topk_ids, signal.topk_logprobs.float()
        stats.teacher_rank = (teacher_rank_topk(topk_ids, topk_logprobs, ids) * mask.long()).cpu()
        stats.top_k = topk_ids.shape[-1]
        if student is not None:
            stats.divergence = cpu(reverse_kl_topk(student, topk_ids, topk_logprobs))
            stats.divergence_kind = "topk"
            stats.overlap = cpu(topk_overlap(student, topk_ids))
    return stats


def prompt_texts(rollouts: Rollouts, tokenizer) -> list[str]:
    """Each rollout's prompt as a person reads it: the last message of its example (as ``samples.jsonl`` shows it),
    or, for rollouts made from token prefixes (no examples), the decoded prompt."""
    if rollouts.examples:
        return [e.messages[-1]["content"] for e in rollouts.examples]
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            for ids, mask in zip(rollouts.prompt_ids.cpu(), rollouts.prompt_mask.cpu())]


def _number(x: float) -> float | None:
    """Six significant digits for JSON (None for a non-finite value, which JSON cannot hold)."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def records(stats: TokenStats, prompts: list[str], tokenizer, fraction: float) -> list[dict]:
    """One record per rollout, as ``tokens.jsonl`` holds them: ``{"prompt", "tokens", "log_ratio", "divergence",
    "divergence_kind", "student_entropy", "teacher_entropy", "teacher_rank", "overlap", "loss", "high_loss",
    "low_divergence"}``; each list has one entry per completion token (padding left out), a field that cannot
    be computed is None. The flags are pooled over all of ``stats``: ``high_loss`` marks the top ``fraction`` of
    tokens by ``k1`` (``objectives.bridge.high_loss``), ``low_divergence`` those below the median divergence."""
    flags_high = high_loss(stats.k1, stats.mask, fraction)
    flags_low = None if stats.divergence is None else low_divergence(stats.divergence, stats.mask)
    out = []
    for b, prompt in enumerate(prompts):
        keep = stats.mask[b].bool()
        column = lambda t: None if t is None else [_number(x) for x in t[b][keep].tolist()]  # noqa: E731
        ids = stats.ids[b][keep].tolist()
        rank = None if stats.teacher_rank is None else [r if r != BEYOND_TOPK else None
                                                        for r in stats.teacher_rank[b][keep].tolist()]
        out.append({
            "prompt": prompt,
            "tokens": tokenizer.batch_decode([[i] for i in ids]),
            "log_ratio": column(stats.log_ratio),
            "divergence": column(stats.divergence),
            "divergence_kind": stats.divergence_kind,
            "student_entropy": column(stats.student_entropy),
            "teacher_entropy": column(stats.teacher_entropy),
            "teacher_rank": rank,
            "overlap": column(stats.overlap),
            "loss": column(stats.loss),
            "high_loss": flags_high[b][keep].tolist(),
            "low_divergence": None if flags_low is None else flags_low[b][keep].tolist(),
        })
    return out


def token_table(rollouts: Rollouts, student_logprobs: torch.Tensor | None, student_token_logprobs: torch.Tensor,
                signal: TeacherSignal, loss: torch.Tensor | None, tokenizer, fraction: float,
                top_k: int = TOP_K) -> list[dict]:
    """The ``tokens.jsonl`` records of one scored batch (``token_stats`` then ``records``, flags pooled over the
    batch). To pool the flags over several micro-batches, ``TokenStats.cat`` their ``token_stats`` first."""
    stats = token_stats(rollouts, student_logprobs, student_token_logprobs, signal, loss, top_k)
    return records(stats, prompt_texts(rollouts, tokenizer), tokenizer, fraction)
