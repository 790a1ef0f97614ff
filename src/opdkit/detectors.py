"""Failure detectors: plain-language warnings over the per-step diagnostics of ``metrics.jsonl``.

Each detector reads the step records so far (``opdkit.diagnostics.step_diagnostics`` wrote their diagnostic keys)
and the thresholds of ``DetectorsConfig``, and fires at most once per run: an ``Alert`` with what it saw, the likely
cause and what to try (the failure modes of section 8 of ``/work/shared/methods/taxonomy.md``). They are pure
functions of the logs, so ``opd report`` and tests run them on any ``metrics.jsonl``.
"""

from __future__ import annotations

import operator
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

from .checkpoint import LOWER_IS_BETTER


@dataclass
class Alert:
    detector: str
    step: int
    message: str  # what was seen, with the numbers
    cause: str  # the likely cause
    advice: str  # what to try
    value: float
    threshold: float

    def as_record(self) -> dict:
        """The ``alerts`` entry of a step record (``advice`` is written ``try``)."""
        record = asdict(self)
        record["try"] = record.pop("advice")
        return record

    def text(self) -> str:
        return f"{self.message}. Likely cause: {self.cause}. Try: {self.advice}."


def _values(history: list[dict], key: str) -> list[float]:
    return [r[key] for r in history if r.get(key) is not None]


def _recent(history: list[dict], key: str, window: int) -> float | None:
    """The mean of ``key`` over the last ``window`` steps that logged it; None before there are that many."""
    values = _values(history, key)
    return statistics.fmean(values[-window:]) if len(values) >= window else None


def _early_recent(history: list[dict], key: str, window: int) -> tuple[float, float] | None:
    """The means over the first and over the last ``window`` steps, once there are ``2 * window`` of them."""
    values = _values(history, key)
    if len(values) < 2 * window:
        return None
    return statistics.fmean(values[:window]), statistics.fmean(values[-window:])


def _recent_past(history: list[dict], key: str, window: int, threshold: float | None, fires) -> float | None:
    """The recent mean of ``key`` when ``fires(mean, threshold)``; None when the detector is off (``threshold``
    null), there are too few steps, or the mean is within the threshold."""
    value = _recent(history, key, window)
    return value if threshold is not None and value is not None and fires(value, threshold) else None


def _change_past(history: list[dict], key: str, window: int, threshold: float | None,
                 fires) -> tuple[float, float] | None:
    """``(early, recent)`` means of ``key`` when ``fires(recent / early, threshold)`` (early above zero); else None."""
    pair = _early_recent(history, key, window)
    if threshold is None or pair is None or pair[0] <= 0 or not fires(pair[1] / pair[0], threshold):
        return None
    return pair


def truncation(history, cfg, context) -> Alert | None:
    rate = _recent_past(history, "truncation_rate", cfg.window, cfg.truncation_rate, operator.ge)
    if rate is None:
        return None
    return Alert("truncation", history[-1]["step"],
                 f"{rate:.0%} of recent rollouts reached rollout.max_completion_length ({context['max_completion_length']}) "
                 "without ending",
                 "completions longer than the budget (or a student that no longer emits its end token), so the signal "
                 "on their last tokens is cut off and long, repetitive rollouts are favoured",
                 "raise rollout.max_completion_length, check that the student's end token is the tokenizer's "
                 "eos_token, or lower the learning rate", rate, cfg.truncation_rate)


def length_inflation(history, cfg, context) -> Alert | None:
    pair = _change_past(history, "completion_length", cfg.window, cfg.length_growth, operator.ge)
    if pair is None:
        return None
    growth = pair[1] / pair[0]
    return Alert("length_inflation", history[-1]["step"],
                 f"completions grew from {pair[0]:.1f} to {pair[1]:.1f} tokens on average ({growth:.1f}x)",
                 "the objective and the student's own data collection favour long rollouts (length inflation, which "
                 "ends in truncation and repetition)",
                 "watch truncation_rate and repeated_ngram_share; lower the learning rate, use objective.aggregation "
                 "sequence_mean, or add objective.ref_kl_coef", growth, cfg.length_growth)


def repetition(history, cfg, context) -> Alert | None:
    share = _recent_past(history, "repeated_ngram_share", cfg.window, cfg.repeated_ngram_share, operator.ge)
    if share is None:
        return None
    return Alert("repetition", history[-1]["step"],
                 f"{share:.0%} of recent n-grams repeat an earlier one in their completion (a repetition loop)",
                 "the teacher still scores locally plausible tokens inside a loop, so the loop is not penalised",
                 "look at the rollouts in tokens.jsonl (opd report); lower the learning rate, lower "
                 "rollout.max_completion_length, or add objective.entropy_coef or objective.ref_kl_coef",
                 share, cfg.repeated_ngram_share)


def entropy_collapse(history, cfg, context) -> Alert | None:
    pair = _change_past(history, "student_entropy", cfg.window, cfg.entropy_drop, operator.le)
    if pair is None:
        return None
    ratio = pair[1] / pair[0]
    return Alert("entropy_collapse", history[-1]["step"],
                 f"the student's entropy fell from {pair[0]:.3f} to {pair[1]:.3f} nats per token ({ratio:.0%} of where "
                 "it started)",
                 "reverse KL is mode-seeking: suppressed mass goes to the student's own mode and its samples lose "
                 "diversity",
                 "compare with the teacher's entropy (teacher_entropy); try objective.method eopd (entropy-gated "
                 "forward KL), a forward or JS divergence, or objective.entropy_coef", ratio, cfg.entropy_drop)


def one_sided_signal(history, cfg, context) -> Alert | None:
    share = _recent(history, "signal_negative_share", cfg.window)
    limit = cfg.negative_share
    if limit is None or share is None or 1 - limit < share < limit:
        return None
    if share >= limit:
        seen = f"{share:.0%} of recently sampled tokens have a negative signal (the teacher likes them less than the student)"
        cause = ("most of the student's tokens are pushed down, and the mass suppressed goes wherever the student's "
                 "logits send it, rarely to the teacher's choice")
    else:
        seen = f"only {share:.0%} of recently sampled tokens have a negative signal"
        cause = "the teacher rates almost every sampled token above the student: an under-confident student, or a teacher at another temperature"
    return Alert("one_sided_signal", history[-1]["step"], seen, cause,
                 "objective.method cr_opd (routes suppressed mass to the teacher's tokens) or a top-k support "
                 "(gkd with top_k), and check that both models are scored at the same temperature", share, limit)


def signal_spike(history, cfg, context) -> Alert | None:
    values = _values(history, "log_ratio_abs_p999")
    if cfg.spike_factor is None or len(values) <= cfg.window or "log_ratio_abs_p999" not in history[-1]:
        return None
    current, before = values[-1], statistics.median(values[:-1])
    limit = max(cfg.spike_floor, cfg.spike_factor * before)
    if current < limit:
        return None
    return Alert("signal_spike", history[-1]["step"],
                 f"the largest log-ratios spiked: p99.9 |log pi_T - log pi_S| = {current:.1f} nats against a median of "
                 f"{before:.1f} before (grad norm {history[-1].get('grad_norm', float('nan')):.2f})",
                 "the log-ratio is unbounded: a token the teacher gives almost no mass (often early in the completion, "
                 "or a special token) dominates the step",
                 "lower objective.log_ratio_clip, keep optim.max_grad_norm set, or use a bounded divergence (jsd, "
                 "or OPD+ with tv/hellinger)", current, limit)


def teacher_confidence_decay(history, cfg, context) -> Alert | None:
    if cfg.teacher_entropy_growth is None:
        return None
    rows = [r["by_position"]["teacher_entropy"] for r in history
            if "teacher_entropy" in r.get("by_position", {})][-cfg.window:]
    pairs = [(row[0], next(v for v in reversed(row) if v is not None)) for row in rows
             if row and row[0] is not None and any(v is not None for v in row[1:])]
    if len(pairs) < cfg.window:
        return None
    first, last = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
    if first <= 0.05 or last < cfg.teacher_entropy_growth * first:
        return None
    return Alert("teacher_confidence_decay", history[-1]["step"],
                 f"the teacher's entropy grows with position: {first:.2f} nats in the first position bucket, "
                 f"{last:.2f} in the last ({last / first:.1f}x)",
                 "the teacher is less sure on the student's drifted late prefixes, so the supervision there is weak "
                 "(supervision decay)",
                 "use objective.position_decay below 1, shorter rollouts, or near_future / TrOPD guidance",
                 last / first, cfg.teacher_entropy_growth)


def incompatible_teacher(history, cfg, context) -> Alert | None:
    mass = _recent_past(history, "student_topk_mass", cfg.window, cfg.topk_mass, operator.lt)
    if mass is None:
        return None
    overlap = _recent(history, "topk_overlap", cfg.window)
    seen = f"the student puts only {mass:.0%} of its mass on the teacher's top-k tokens"
    if overlap is not None:
        seen += f" (top-k overlap {overlap:.0%})"
    return Alert("incompatible_teacher", history[-1]["step"], seen,
                 "teacher and student disagree on which tokens are plausible (a large gap, another way of thinking, or "
                 "a tokenizer or chat-template mismatch), so a top-k objective leaves most of the student's mass out "
                 "and the sampled-token signal is noisy",
                 "check the chat templates (the banner's first prompt), try a closer teacher, a full-vocabulary "
                 "support, or TrOPD prefix guidance", mass, cfg.topk_mass)


def heldout_regression(history, cfg, context) -> Alert | None:
    """The tracked held-out metric (``checkpoint.best_metric``), or the verifier's accuracy, worse than before
    training at each of the last ``EVALUATIONS`` evaluations, by at least ``cfg.heldout_regression`` of its value."""
    evals = [r["eval"] for r in history if "eval" in r][-EVALUATIONS:]
    if cfg.heldout_regression is None or "eval" not in history[-1] or len(evals) < EVALUATIONS:
        return None
    for metric in dict.fromkeys(m for m in (context.get("metric"), "accuracy") if m):
        before = context.get("before", {}).get(metric)
        values = [e.get(metric) for e in evals]
        if before is None or None in values:
            continue
        sign = 1 if metric in LOWER_IS_BETTER else -1
        losses = [sign * (v - before) for v in values]
        if min(losses) <= 0 or min(losses) < cfg.heldout_regression * abs(before):  # a metric stuck at 0 is no regression
            continue
        return Alert("heldout_regression", history[-1]["step"],
                     f"held-out {metric} is worse than before training at the last {EVALUATIONS} evaluations: "
                     f"{before:.4g} at step 0, then " + ", ".join(f"{v:.4g}" for v in values),
                     "the updates carry the student away from its teacher: a per-step signal that is mostly noise at "
                     "this batch (chunk rewards from few forks, say: Adam moves the weights at the learning rate's pace "
                     "whatever the gradient's size), a learning rate too high, or an objective whose optimum is not "
                     "this metric (a falling KL with a falling accuracy)",
                     "lower optim.learning_rate or draw more rollouts per step (rollout.batch_size); for chunk_opd, "
                     "first measure whether its chunk rewards rank chunks as the teacher does at all "
                     "(bench/chunk_reward_validity.py, with the teacher also loaded locally): on open text they may "
                     "not, whatever teacher.samples_per_fork; the best checkpoint (checkpoint.best_metric) keeps the "
                     "best student so far", min(losses) / abs(before) if before else float("inf"), cfg.heldout_regression)
    return None


EVALUATIONS = 2  # held-out regression: evaluations in a row worse than before training

DETECTORS: dict[str, Callable] = {f.__name__: f for f in (
    truncation, length_inflation, repetition, entropy_collapse, one_sided_signal, signal_spike,
    teacher_confidence_decay, incompatible_teacher, heldout_regression)}


def fired(history: list[dict]) -> set[str]:
    """The detectors that already fired in these step records (a resumed run does not warn twice)."""
    return {alert["detector"] for record in history for alert in record.get("alerts", [])}


def check(history: list[dict], cfg, max_completion_length: int, before: dict | None = None,
          metric: str | None = None) -> list[Alert]:
    """The detectors that fire at the last record of ``history`` for the first time. ``before``: the evaluation
    before training; ``metric``: the one ``checkpoint.best_metric`` tracks."""
    done = fired(history)
    context = {"max_completion_length": max_completion_length, "before": before or {}, "metric": metric}
    alerts = [detector(history, cfg, context) for name, detector in DETECTORS.items() if name not in done]
    return [a for a in alerts if a is not None]
