"""Diagnostics over scored rollouts: pure functions of per-token tensors, shared by training logs and reports.

Per step (``TokenSignals`` of each micro-batch, pooled by ``step_diagnostics``): the signals of section 8 of
``/work/shared/methods/taxonomy.md`` that need no extra forward pass. The signal is ``r_t = log pi_T(y_t) -
log pi_S(y_t)`` on the student's own sampled tokens (negative: the teacher likes the token less than the student).

The near-future diagnostic (arXiv 2606.00305, section 2 of ``/work/shared/methods/near_future.md``; the paper
reports about 30% for its pairs). The paper's exact definition was not available to us: ``NEAR_FUTURE_DEFINITION``
is OUR RECONSTRUCTION; print it beside every figure, and replace it with the paper's when it is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .objectives.bridge import high_loss
from .objectives.support import sampled_from_logits
from .token_table import low_divergence, topk_overlap

RATIO_CLIP = 0.2  # the ratio band |pi_S / mu - 1| <= 0.2 of PPO's clip, for the share of ratios outside it
EDGE_FRACTION = 0.3  # the loss share from the first and the last 30% of each completion

NEAR_FUTURE_DEFINITION = (
    "share of high-loss tokens in a low-divergence region: high-loss = the top q of completion positions by "
    "k1 = log pi_S(y_t) - log pi_T(y_t), pooled over the batch; low-divergence = KL(pi_S(.|s_t) || pi_T(.|s_t)) "
    "below the pooled median of that KL (or below tau when given); share = |high-loss and low-divergence| / "
    "|high-loss|; 95% interval: percentile bootstrap over rollouts (reconstruction of arXiv 2606.00305, section 2)")


@dataclass
class Share:
    share: float
    low: float  # bootstrap interval
    high: float
    high_loss_tokens: int
    fraction: float  # q
    threshold: float | None  # tau, or None for the pooled median
    definition: str = NEAR_FUTURE_DEFINITION

    def __str__(self) -> str:
        region = f"KL < {self.threshold:g}" if self.threshold is not None else "KL < median"
        return (f"{100 * self.share:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] of {self.high_loss_tokens} "
                f"high-loss tokens (q = {self.fraction:g}, {region}); {self.definition}")


def _share(k1_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor, fraction: float,
           threshold: float | None) -> tuple[float, int]:
    if not mask_BT.bool().any():
        return math.nan, 0
    high = high_loss(k1_BT, mask_BT, fraction)
    n = int(high.sum())
    return float((high & low_divergence(divergence_BT, mask_BT, threshold)).sum()) / n, n


def near_future_share(k1_BT: torch.Tensor, divergence_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                      fraction: float = 0.1, threshold: float | None = None, resamples: int = 1000,
                      level: float = 0.95, seed: int = 0) -> Share:
    """The near-future diagnostic (``NEAR_FUTURE_DEFINITION``) over ``[B, T]`` tensors of completion positions:
    ``k1`` per sampled token, the local ``divergence`` per position (the full-vocabulary reverse KL, or its top-k
    form with a tail bucket when only a top-k is known), and the mask. The interval resamples whole rollouts
    (``resamples`` times, percentile bootstrap at ``level``), since the positions of one rollout are not
    independent; thresholds are recomputed in every resample."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is the share q of positions called high-loss, in (0, 1]; got {fraction}")
    share, n = _share(k1_BT, divergence_BT, mask_BT, fraction, threshold)
    generator = torch.Generator().manual_seed(seed)
    rows = k1_BT.shape[0]
    draws = []
    for _ in range(resamples):
        pick = torch.randint(rows, (rows,), generator=generator)
        value, _ = _share(k1_BT[pick], divergence_BT[pick], mask_BT[pick], fraction, threshold)
        if not math.isnan(value):
            draws.append(value)
    tail = (1 - level) / 2
    low, high = (torch.tensor(draws).quantile(torch.tensor([tail, 1 - tail])).tolist() if draws else (math.nan, math.nan))
    return Share(share, low, high, n, fraction, threshold)


# ---- per step ---------------------------------------------------------------------------------------------
@dataclass
class TokenSignals:
    """The per-token diagnostic tensors of one micro-batch, ``[B, C]`` each and detached; None where the run
    cannot know them (no teacher top-k, no student logits on the chunked path)."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor  # every completion token
    own_mask: torch.Tensor  # the tokens the student sampled itself
    loss: torch.Tensor  # |loss_t| before aggregation
    signal: torch.Tensor | None = None  # r_t = log pi_T(y_t) - log pi_S(y_t)
    student_entropy: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    student_topk_mass: torch.Tensor | None = None  # pi_S's mass on the teacher's top-k
    teacher_topk_mass: torch.Tensor | None = None  # pi_T's mass on its own top-k
    topk_overlap: torch.Tensor | None = None  # |top-k(pi_S) & top-k(pi_T)| / k
    ratio: torch.Tensor | None = None  # pi_S(y_t) / mu(y_t), the importance ratio of the sampled token


def topk_agreement(student_logits_BCV: torch.Tensor, teacher_ids_BCK: torch.Tensor,
                   teacher_logprobs_BCK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(student mass on the teacher's top-k, teacher mass on it, overlap of the two top-k sets / k)``, ``[B, C]``
    each: how much of the student's distribution a top-k objective sees (healthy pairs share 97-99%)."""
    lse = student_logits_BCV.float().logsumexp(-1, keepdim=True)
    student_mass = (student_logits_BCV.gather(-1, teacher_ids_BCK).float() - lse).exp().sum(-1)
    overlap = topk_overlap(student_logits_BCV, teacher_ids_BCK)  # the top-k of the logits is that of the log-probs
    return student_mass, teacher_logprobs_BCK.float().exp().sum(-1), overlap


def student_token_logprobs(rollouts, student_logits_BCV: torch.Tensor | None, exact_sampler: bool) -> torch.Tensor | None:
    """``[B, C]`` log pi_S of each sampled token: from the student's logits, or on the chunked path (no logits) from
    the sampler's where that is exact (``exact_sampler``: temperature 1, no top-p, no dropout); else None."""
    if student_logits_BCV is not None:
        return sampled_from_logits(student_logits_BCV.detach(), rollouts.completion_ids)[0]
    return rollouts.sampler_logprobs if exact_sampler else None


def token_signals(rollouts, teacher, loss_BC: torch.Tensor, student_logits_BCV: torch.Tensor | None,
                  student_token_BC: torch.Tensor | None, student_entropy_BC: torch.Tensor | None) -> TokenSignals:
    """What one micro-batch's scored rollouts say, per token (``student_token_BC``: ``student_token_logprobs``); the
    top-k terms need the teacher's top-k and the student's logits."""
    out = TokenSignals(rollouts.completion_ids, rollouts.completion_mask, rollouts.own_mask, loss_BC.detach().abs(),
                       student_entropy=None if student_entropy_BC is None else student_entropy_BC.detach(),
                       teacher_entropy=teacher.entropy)
    if rollouts.source == "student" and student_token_BC is not None:
        out.signal = (teacher.token_logprobs - student_token_BC) * rollouts.completion_mask
        if rollouts.sampler_logprobs is not None and student_logits_BCV is not None:
            out.ratio = (student_token_BC - rollouts.sampler_logprobs).exp() * rollouts.completion_mask
    if teacher.topk_ids is not None and student_logits_BCV is not None:
        out.student_topk_mass, out.teacher_topk_mass, out.topk_overlap = topk_agreement(
            student_logits_BCV.detach(), teacher.topk_ids, teacher.topk_logprobs)
    elif teacher.topk_logprobs is not None:
        out.teacher_topk_mass = teacher.topk_logprobs.float().exp().sum(-1)
    return out


def _pool(parts: list[TokenSignals]) -> TokenSignals:
    """One ``TokenSignals`` over every micro-batch (rows stacked, widths padded); a field known for only some
    micro-batches is kept over those, its mask zero elsewhere (see ``_known``)."""
    width = max(p.completion_ids.shape[1] for p in parts)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    fields = {}
    for name in TokenSignals.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if all(v is None for v in values):
            fields[name] = None
        else:
            fields[name] = torch.cat([pad(torch.full_like(parts[i].loss, math.nan) if v is None else v)
                                      for i, v in enumerate(values)])
    return TokenSignals(**fields)


def _known(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked entries of ``values`` that are known (not NaN), flattened."""
    return values[mask.bool() & ~values.isnan()]


def _mean(values: torch.Tensor | None, mask: torch.Tensor) -> float | None:
    if values is None:
        return None
    kept = _known(values, mask)
    return float(kept.mean()) if kept.numel() else None


def _p999(values: torch.Tensor) -> float | None:
    return float(values.quantile(0.999)) if values.numel() else None


def skewness(values: torch.Tensor) -> float:
    """``E[(x - mean)^3] / std^3`` (population moments); 0 for fewer than three values or no spread."""
    if values.numel() < 3:
        return 0.0
    centred = values.double() - values.double().mean()
    std = centred.pow(2).mean().sqrt()
    return float(centred.pow(3).mean() / std.pow(3)) if std > 0 else 0.0


def repeated_ngram_share(ids_BC: torch.Tensor, mask_BC: torch.Tensor, n: int = 4) -> float | None:
    """The share of a completion's n-grams that repeat an earlier n-gram of the same completion, pooled over the
    batch: near 0 for ordinary text, near 1 inside a loop. None when no completion has n tokens."""
    total = repeated = 0
    for row, keep in zip(ids_BC.tolist(), mask_BC.bool().tolist()):
        tokens = [t for t, k in zip(row, keep) if k]
        seen = set()
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else None


def edge_loss_shares(loss_BC: torch.Tensor, mask_BC: torch.Tensor,
                     fraction: float = EDGE_FRACTION) -> tuple[float | None, float | None]:
    """The share of ``sum |loss_t|`` that comes from the first and from the last ``fraction`` of each completion
    (by its own length): where the signal concentrates (early spikes, or supervision on drifted late prefixes)."""
    lengths = mask_BC.sum(-1, keepdim=True)
    position = torch.arange(mask_BC.shape[1], device=mask_BC.device).expand_as(mask_BC)
    weight = loss_BC.abs() * mask_BC
    total = float(weight.sum())
    if total <= 0:
        return None, None
    first = float((weight * (position < fraction * lengths)).sum()) / total
    last = float((weight * (position >= (1 - fraction) * lengths)).sum()) / total
    return first, last


def position_edges(max_completion_length: int, buckets: int) -> list[int]:
    """Edges of ``buckets`` equal buckets of completion positions ``[0, max_completion_length)``."""
    buckets = max(1, min(buckets, max_completion_length))
    return [round(i * max_completion_length / buckets) for i in range(buckets + 1)]


def by_position(pooled: TokenSignals, edges: list[int]) -> dict[str, list]:
    """Per bucket of completion positions: own tokens, the signal's mean and p99.9 of its size, the teacher's
    entropy and the top-k overlap (each list holds None for an empty bucket; a key is absent when unknown)."""
    own = pooled.own_mask.bool()
    position = torch.arange(own.shape[1]).expand_as(own)
    out: dict[str, list] = {"edges": edges, "tokens": []}
    columns = {"signal_mean": (pooled.signal, lambda v: float(v.mean())),
               "log_ratio_abs_p999": (pooled.signal, lambda v: _p999(v.abs())),
               "teacher_entropy": (pooled.teacher_entropy, lambda v: float(v.mean())),
               "topk_overlap": (pooled.topk_overlap, lambda v: float(v.mean()))}
    for name, (values, _) in columns.items():
        if values is not None:
            out[name] = []
    for low, high in zip(edges, edges[1:]):
        bucket = own & (position >= low) & (position < high)
        out["tokens"].append(int(bucket.sum()))
        for name, (values, reduce) in columns.items():
            if values is not None:
                kept = _known(values, bucket)
                out[name].append(reduce(kept) if kept.numel() else None)
    return out


def step_diagnostics(parts: list[TokenSignals], edges: list[int], ngram: int = 4) -> dict:
    """The step's diagnostics over its micro-batches (see the module docstring); keys the run cannot compute are
    left out, so ``metrics.jsonl`` never holds a made-up value."""
    pooled = _pool(parts)
    own = pooled.own_mask
    out: dict = {}
    if pooled.signal is not None:
        signal = _known(pooled.signal, own)
        if signal.numel():
            out.update(signal_mean=float(signal.mean()), signal_negative_share=float((signal < 0).float().mean()),
                       signal_skew=skewness(signal), log_ratio_abs_p999=_p999(signal.abs()))
    teacher_entropy = _mean(pooled.teacher_entropy, own)
    if teacher_entropy is not None:
        out["teacher_entropy"] = teacher_entropy
        student_entropy = _mean(pooled.student_entropy, own)
        if student_entropy is not None:
            out["entropy_gap"] = teacher_entropy - student_entropy
    for name in ("student_topk_mass", "teacher_topk_mass", "topk_overlap"):
        value = _mean(getattr(pooled, name), own)
        if value is not None:
            out[name] = value
    student = own.bool()
    repeated = repeated_ngram_share(pooled.completion_ids[student.any(-1)], own[student.any(-1)], ngram)
    if repeated is not None:
        out["repeated_ngram_share"] = repeated
    first, last = edge_loss_shares(pooled.loss.nan_to_num(0.0), pooled.completion_mask)
    if first is not None:
        out.update(loss_share_first30=first, loss_share_last30=last)
    if pooled.ratio is not None:
        ratio = _known(pooled.ratio, own)
        if ratio.numel():
            out.update(ratio_mean=float(ratio.mean()), ratio_max=float(ratio.max()),
                       ratio_clip_share=float(((ratio - 1).abs() > RATIO_CLIP).float().mean()))
    if own.any():
        out["by_position"] = by_position(pooled, edges)
    return out
