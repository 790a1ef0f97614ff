"""Several teachers behind the one ``Teacher`` interface (``teachers:`` and ``teacher_routing``).

``column`` and ``mixture`` give each example one teacher: the batch's rows are split by teacher
(``Rollouts.rows``), each teacher scores its rows, and the signals are put back row by row, so the loop and
the objectives see one signal aligned with the batch. A ``mixture`` draws each example's teacher once, from a
generator seeded with the run's seed and the example's position in its dataset: the same example always goes to
the same teacher, in every epoch, after a resume and in evaluation, and the share of each teacher tends to its
weight. ``combine`` has every teacher score every row and combines the signals (``combine``).

On the full vocabulary the row-merged (or mixed) distribution is materialised as ``[B, C, V]`` float32 per
teacher and once more for the result: a local teacher alone hands over hidden states to project block by block,
several do not. The signal also says which rows each teacher scored and its own token log-probs
(``TeacherSignal.by_teacher``), from which the loop logs each teacher's reverse KL and token share
(``teacher_metrics``).
"""

from __future__ import annotations

import math
import random
import time

import torch

from ..errors import OPDError
from ..rollout import Rollouts, join_rows
from . import Support, Teacher, TeacherSignal


def route(routing, names: list[str], seed: int, examples: list) -> list[str]:
    """The teacher name of each example under ``column`` or ``mixture`` (see the module docstring)."""
    if routing.rule == "column":
        out = []
        for example in examples:
            value = example.columns.get(routing.column)
            name = (routing.map or {}).get(value, value)
            if name not in names:
                where = f"record {example.index}" if example.index is not None else "a record"
                raise OPDError(f"{where} has {routing.column}={value!r}, which names none of the teachers {names}: "
                               f"fill its {routing.column!r} field with a teacher's name, or map the value to one in "
                               "teacher_routing.map")
            out.append(name)
        return out
    weights = routing.weight_of(names)
    return [random.Random(f"{seed}:{e.index}").choices(names, [weights[n] for n in names])[0] for e in examples]


def check_routing(config, examples: list, source: str) -> None:
    """Every record of ``source`` goes to a teacher (``column``: has the column, naming one): checked when the
    data is read, before any model loads."""
    if config.teachers is None or config.teacher_routing.rule != "column" or not examples:
        return
    column = config.teacher_routing.column
    missing = [e.index for e in examples if column not in e.columns]
    if missing:
        raise OPDError(f"teacher_routing.column is {column!r}, and {len(missing)} records of {source!r} have no such "
                       f"field (first: record {missing[0]}): add it to every record, or set teacher_routing.column "
                       "to the field that names the teacher")
    route(config.teacher_routing, [spec.name for spec in config.teachers], config.seed, examples)


class MultiTeacher:
    """``teachers``: name -> teacher, in the config's order. Under ``combine`` the teacher with the largest weight
    (the first on a tie) samples and continues for all."""

    model = None  # no single set of logits: the evaluator measures the sampled-token estimate through the routing

    def __init__(self, teachers: dict[str, Teacher], routing, seed: int, pad_id: int):
        self.teachers, self.routing, self.seed, self.pad_id = teachers, routing, seed, pad_id
        self.names = list(teachers)
        self.weights = routing.weight_of(self.names)
        self.primary = max(self.names, key=self.weights.__getitem__)
        self.returns_logprobs = all(t.returns_logprobs for t in teachers.values())

    def _score(self, name: str, rollouts: Rollouts, usage: dict, *args, **kwargs) -> TeacherSignal:
        """``name`` scores ``rollouts``; its calls, tokens, time and own counters go into ``usage``, prefixed."""
        start = time.perf_counter()
        signal = self.teachers[name].score(rollouts, *args, **kwargs)
        for key, value in {"calls": 1, "tokens": rollouts.num_tokens, "time_s": time.perf_counter() - start,
                           **signal.usage}.items():
            usage[f"{name}_{key}"] = usage.get(f"{name}_{key}", 0.0) + value
        return signal

    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        usage: dict[str, float] = {}
        if self.routing.rule == "combine":
            signals = {n: self._score(n, rollouts, usage, support, top_k, entropy) for n in self.names}
            signal = self._combine(signals, rollouts.completion_mask, support, top_k, entropy)
            everyone = torch.ones(len(rollouts.completion_ids), dtype=torch.bool, device=rollouts.completion_ids.device)
            signal.by_teacher = {n: (everyone, s.token_logprobs) for n, s in signals.items()}
        else:
            if len(rollouts.examples) != len(rollouts.completion_ids):
                raise OPDError("several teachers route by example, and these rollouts carry none (token prefixes): "
                               "use one teacher for this")
            chosen = route(self.routing, self.names, self.seed, rollouts.examples)
            groups = {n: [i for i, c in enumerate(chosen) if c == n] for n in self.names}
            parts = {n: (rows, self._score(n, rollouts.rows(rows), usage, support, top_k, entropy))
                     for n, rows in groups.items() if rows}
            signal = self._merge(parts, rollouts, support)
        signal.usage = usage
        return signal

    def _merge(self, parts: dict[str, tuple[list[int], TeacherSignal]], rollouts: Rollouts,
               support: Support) -> TeacherSignal:
        """One signal from the teachers' row subsets: each field where every teacher gave it (top-k of one k)."""
        size, device = len(rollouts.completion_ids), rollouts.completion_ids.device
        signals = [s for _, s in parts.values()]

        def rows_of(get) -> torch.Tensor | None:
            values = [get(s) for s in signals]
            if any(v is None for v in values) or len({v.shape[2:] for v in values}) > 1:
                return None
            out = torch.zeros(size, *values[0].shape[1:], dtype=values[0].dtype, device=device)
            for (rows, _), value in zip(parts.values(), values):
                out[torch.as_tensor(rows, device=device)] = value.to(device)
            return out

        merged = TeacherSignal(rows_of(lambda s: s.token_logprobs), topk_ids=rows_of(lambda s: s.topk_ids),
                               topk_logprobs=rows_of(lambda s: s.topk_logprobs), entropy=rows_of(lambda s: s.entropy),
                               token_advantages=rows_of(lambda s: s.token_advantages))
        if support == "topk" and merged.topk_ids is None:
            raise OPDError(f"the teachers returned top-k log-probs of different sizes "
                           f"{sorted({tuple(s.topk_ids.shape[2:]) for s in signals if s.topk_ids is not None})}: set "
                           "the same top_k on every server teacher")
        if support == "full":
            merged.logprobs = rows_of(lambda s: s.full_logprobs())
        merged.by_teacher = {}
        for name, (rows, _) in parts.items():
            mask = torch.zeros(size, dtype=torch.bool, device=device)
            mask[torch.as_tensor(rows, device=device)] = True
            merged.by_teacher[name] = (mask, merged.token_logprobs)
        return merged

    def _combine(self, signals: dict[str, TeacherSignal], mask: torch.Tensor, support: Support, top_k: int | None,
                 entropy: bool) -> TeacherSignal:
        """Every teacher's signal on every row, combined by ``routing.combine`` (weights ``w_i``, summing to 1):
        ``mean_log_ratio``: ``sum_i w_i log pi_i(y_t)``; ``distribution_mixture``: ``log sum_i w_i pi_i`` at the
        sampled token, and over the vocabulary where the support or the entropy needs it."""
        weights = [self.weights[n] for n in signals]
        tokens = torch.stack([s.token_logprobs.float() for s in signals.values()])
        if self.routing.combine == "mean_log_ratio":
            if support != "token" or entropy:
                raise OPDError("combine: mean_log_ratio gives the sampled token's signal only: use a sampled-token "
                               "method, or combine: distribution_mixture")
            mean = sum(w * t for w, t in zip(weights, tokens))
            return TeacherSignal(mean * mask)
        logw = torch.tensor([math.log(w) for w in weights], device=tokens.device).view(-1, 1, 1)
        signal = TeacherSignal(torch.logsumexp(tokens + logw, 0) * mask)
        if support == "token" and not entropy:
            return signal
        full = torch.stack([s.full_logprobs().float() for s in signals.values()])  # every teacher is local
        mixture = torch.logsumexp(full + logw.unsqueeze(-1), 0)
        if support == "full":
            signal.logprobs = mixture
        if top_k and support in ("topk", "full"):
            signal.topk_logprobs, signal.topk_ids = mixture.topk(min(top_k, mixture.shape[-1]), dim=-1)
        if entropy:
            signal.entropy = -(mixture.exp() * mixture).sum(-1)
        return signal

    def sample(self, examples: list, max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """Each example's teacher writes its completion (``combine``: the primary teacher writes all)."""
        if self.routing.rule == "combine":
            return self.teachers[self.primary].sample(examples, max_completion_length, temperature, top_p)
        chosen = route(self.routing, self.names, self.seed, examples)
        parts = []
        for name in self.names:
            rows = [i for i, c in enumerate(chosen) if c == name]
            if rows:
                parts.append((rows, self.teachers[name].sample([examples[i] for i in rows], max_completion_length,
                                                                temperature, top_p)))
        return join_rows(parts, self.pad_id)

    def continue_ids(self, prefixes: list[list[int]], max_new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
        """Token prefixes carry no example to route by: the primary teacher continues them."""
        return self.teachers[self.primary].continue_ids(prefixes, max_new_tokens, temperature)

    def take_usage(self) -> dict[str, float]:
        """Each teacher's counters since its last ``score`` or ``take_usage``, prefixed with its name."""
        return {f"{n}_{k}": v for n, t in self.teachers.items() for k, v in t.take_usage().items()}


def teacher_metrics(parts: list[tuple[Rollouts, TeacherSignal, torch.Tensor | None]], total_tokens: float,
                    reduce=lambda sums: sums) -> dict:
    """Per teacher over one step's micro-batches ``(batch, signal, student token log-probs or None)``: its share of
    the step's completion tokens (``combine``: every teacher scores every token, so each share is 1) and, on the
    student's own samples, the mean k1 estimate ``log pi_S - log pi_T`` of the reverse KL over its tokens.
    ``reduce`` sums the counts over processes (``total_tokens`` is already the step's total over them)."""
    sums: dict[str, float] = {}
    for batch, signal, student in parts:
        for name, (rows, teacher_token) in signal.by_teacher.items():
            mask = batch.completion_mask * rows.to(batch.completion_mask.dtype).unsqueeze(1)
            sums[f"tokens {name}"] = sums.get(f"tokens {name}", 0.0) + float(mask.sum())
            if student is not None and batch.source == "student":
                sums[f"k1 {name}"] = sums.get(f"k1 {name}", 0.0) + float(((student - teacher_token) * mask).sum())
                sums[f"k1 tokens {name}"] = sums.get(f"k1 tokens {name}", 0.0) + float(mask.sum())
    sums = reduce(sums)
    names = [key.removeprefix("tokens ") for key in sums if key.startswith("tokens ")]
    out = {f"teacher_{n}_token_share": sums[f"tokens {n}"] / max(1, total_tokens) for n in names}
    out.update({f"teacher_{n}_reverse_kl_k1": sums[f"k1 {n}"] / sums[f"k1 tokens {n}"] for n in names
                if sums.get(f"k1 tokens {n}")})
    return out
