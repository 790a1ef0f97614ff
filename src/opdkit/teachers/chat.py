"""A text-only chat teacher (no log-probs at all) for the logit-free chunk-level method (``chunk_opd``), and for
``seqkd`` (supervised fine-tuning on its answers, which needs no log-prob either).

Per student rollout (OmniOPD-style speculative verification; the paper's exact recipe is not public, so
every choice here is a named option of the ``chat`` teacher spec, see docs and ``/work/shared`` notes):

1. forks: smooth the student's per-token surprisal ``-log mu(y_t)`` (a one-sample estimate of its
   entropy, free from the rollout) over ``smoothing_window`` tokens; keep local maxima above the
   ``fork_quantile`` of the row, best first, at least ``chunk_length`` apart, at most ``max_forks``;
2. at fork ``t`` the student's draft chunk is ``y[t : t+L]``; the teacher is sent the prompt and the
   student's text ``y[:t]`` (as an assistant prefix to continue, or an instruction) and writes
   ``samples_per_fork`` continuations of at most ``L`` tokens;
3. each continuation scores ``s_k = sim(chunk, continuation) in [0, 1]`` over the same span of text
   (``teachers.similarity``: characters, words or sentence embeddings; an answer that ends is marked with an end
   symbol on both sides, so stopping early or late counts);
4. Dirichlet-multinomial smoothing of the soft match votes, ``p = (a1 + sum_k s_k) / (a1 + a0 + K)``,
   so a few samples cannot give a +-1 reward; the chunk's reward ``r = p - b`` (``b``: the batch mean
   of ``p``, or the prior mean ``a1 / (a0 + a1)``) is the advantage of each of its tokens; unaudited
   tokens get 0 (only the shared ``objective.ref_kl_coef`` anchor acts on them).

Requests go through :class:`~opdkit.teachers.server.ApiClient` (replicas, retries, concurrency) and,
with ``cache_dir``, identical requests are answered from disk. Calls and tokens are counted per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console

from ..data import Example
from ..errors import OPDError
from ..rollout import Rollouts
from . import Support, TeacherSignal
from .context import TeacherContext
from .prefix_probe import PrefixProbe, probe_prefixes
from .server import ApiClient, Malformed, rollouts_from_texts
from .similarity import Similarity


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average, shrinking at the edges."""
    half = window // 2
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def pick_forks(surprisal: list[float], chunk_length: int, max_forks: int, quantile: float, window: int) -> list[int]:
    """Peak-surprisal scheduler: local maxima of the smoothed signal at or above its ``quantile``,
    highest first, pairwise at least ``chunk_length`` apart, at most ``max_forks``; sorted by position."""
    if not surprisal:
        return []
    s = smooth(surprisal, window)
    threshold = sorted(s)[min(len(s) - 1, int(quantile * len(s)))]
    peaks = [i for i in range(len(s)) if s[i] >= threshold
             and (i == 0 or s[i] >= s[i - 1]) and (i == len(s) - 1 or s[i] >= s[i + 1])]
    chosen: list[int] = []
    for i in sorted(peaks, key=lambda i: (-s[i], i)):
        if len(chosen) == max_forks:
            break
        if all(abs(i - j) >= chunk_length for j in chosen):
            chosen.append(i)
    return sorted(chosen)


@dataclass
class Chunk:
    """An audited chunk: tokens ``start : start + width`` of row ``row``'s completion, their ``text``, whether the
    answer ends within them, and the student's ``prefix`` text the teacher continues."""

    row: int
    start: int
    width: int
    text: str
    ended: bool
    prefix: str


def similarities(measure: Similarity, chunks: list[Chunk],
                 continued: list[list[tuple[str, bool]]]) -> list[list[float]]:
    """Each chunk's similarity by ``measure`` to each of its continuations (``(text, ended)``), in one batch."""
    flat = measure([(c.text, c.ended, text, ended) for c, texts in zip(chunks, continued) for text, ended in texts])
    out, at = [], 0
    for texts in continued:
        out.append(flat[at : at + len(texts)])
        at += len(texts)
    return out


def dirichlet_preference(similarities: list[float], prior: tuple[float, float]) -> float:
    """Posterior mean of the match probability: ``(a1 + sum s_k) / (a1 + a0 + K)``."""
    a1, a0 = prior
    return (a1 + sum(similarities)) / (a1 + a0 + len(similarities))


class ChatTeacher:
    """Per-chunk rewards from a text-only chat API; ``score`` fills ``TeacherSignal.token_advantages``."""

    model = None
    returns_logprobs = False

    def __init__(self, spec, tokenizer, context: TeacherContext | None = None, console: Console | None = None):
        self.spec, self.tokenizer = spec, tokenizer
        self.client = ApiClient(spec, cache_dir=spec.cache_dir, console=console)
        self.context = context  # teacher.prompt: the conversation the teacher is asked in (teachers.context)
        self.similarity = Similarity(spec.similarity, spec.embedding_model)
        self.findings: PrefixProbe | None = None  # check_prefixes', for the run log

    def check_prefixes(self, examples: list[Example], max_completion_length: int) -> None:
        """``teacher.prefix_probe``: does the teacher continue its own answers from cuts after each student token?"""
        if self.spec.prefix_probe:
            self.findings = probe_prefixes(self, examples[: self.spec.prefix_probe], max_completion_length)

    def _view(self, example: Example) -> list[dict]:
        return example.messages if self.context is None else self.context.messages(example)

    def take_usage(self) -> dict[str, float]:
        """Calls and tokens since the last ``score`` or ``take_usage`` (``score`` reports its own in the signal)."""
        return self.client.take_usage()

    def probe(self) -> None:
        self.client.check_model(self.spec.model)

    def _messages(self, example: Example, prefix: str) -> tuple[list[dict], dict]:
        if self.spec.continuation == "prefill":
            return self._view(example) + [{"role": "assistant", "content": prefix}], {
                "continue_final_message": True, "add_generation_prompt": False}
        *history, last = self._view(example)
        ask = (f"{last['content']}\n\nHere is the beginning of an answer:\n{prefix}\n\nContinue it from exactly where "
               "it stops. Reply with the continuation only, without repeating the beginning.")
        return history + [{"role": last["role"], "content": ask}], {}

    def forks(self, rollouts: Rollouts) -> tuple[list[list[int]], int]:
        """Each row's fork positions, and how many of them ``fork_snap`` moved."""
        if rollouts.sampler_logprobs is None:
            raise OPDError("the chat teacher audits student samples (it picks forks from the sampler's log-probs); "
                           f"these states come from the {rollouts.source}: use objective.method chunk_opd")
        out, moved = [], 0
        for row, ids, mask in zip(rollouts.sampler_logprobs, rollouts.completion_ids, rollouts.completion_mask):
            n = int(mask.sum())
            forks = pick_forks((-row[:n]).tolist(), self.spec.chunk_length, self.spec.max_forks,
                               self.spec.fork_quantile, self.spec.smoothing_window)
            if self.spec.fork_snap and forks:
                row_ids = ids[:n].tolist()
                text = self.tokenizer.decode(row_ids, skip_special_tokens=True)
                snapped = [self._snap(row_ids, text, t) for t in forks]
                moved += sum(a != b for a, b in zip(forks, snapped))
                forks = sorted(set(snapped))
            out.append(forks)
        return out, moved

    def _snap(self, ids: list[int], text: str, t: int) -> int:
        """``teacher.fork_snap``: the nearest cut at or before token ``t`` of ``ids`` (whose text is ``text``) whose
        context the teacher reads right. Two forks can then land closer than ``chunk_length``: the later chunk's reward
        is the one on the tokens they share."""
        while t > 0:
            prefix = self.tokenizer.decode(ids[:t], skip_special_tokens=True)
            if text.startswith(prefix) and self.findings.reads(prefix, text[len(prefix):]):
                return t
            t -= 1
        return t

    def chunks(self, rollouts: Rollouts) -> tuple[list[Chunk], int]:
        """The chunks to audit in the student's rollouts, in row order, and how many forks ``fork_snap`` moved."""
        forks, moved = self.forks(rollouts)
        tok, out = self.tokenizer, []
        for row, ts in enumerate(forks):
            ids = rollouts.completion_ids[row, : int(rollouts.completion_mask[row].sum())].tolist()
            for t in ts:
                chunk = ids[t : t + self.spec.chunk_length]
                out.append(Chunk(row, t, len(chunk), tok.decode(chunk, skip_special_tokens=True),
                                 tok.eos_token_id in chunk, tok.decode(ids[:t], skip_special_tokens=True)))
        return out, moved

    def asked(self, rollouts: Rollouts, chunks: list[Chunk]) -> list[list[tuple[str, bool]]]:
        """The teacher's ``samples_per_fork`` continuations of each chunk's prefix, as ``(text, ended)``."""
        asks = [(rollouts.examples[c.row], c.prefix) for c in chunks]
        return self.continuations(asks, self.spec.samples_per_fork, self.spec.temperature)

    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        """Chunk rewards for the student's rollouts (``chunk_opd``). Rows the student did not write (the teacher's
        own answers for ``seqkd``, dataset completions) have nothing to audit: an empty signal, with the calls and
        tokens since the last one (the answers' sampling)."""
        if support != "token":
            raise OPDError("a chat teacher returns text only, no log-probs: use objective.method chunk_opd or seqkd "
                           "(or a teacher of kind server/local for log-prob objectives)")
        mask = rollouts.completion_mask
        if rollouts.source != "student":
            return TeacherSignal(torch.zeros_like(mask), usage=self.client.take_usage())
        spec = self.spec
        chunks, moved = self.chunks(rollouts)
        preferences = [dirichlet_preference(sims, spec.prior)
                       for sims in similarities(self.similarity, chunks, self.asked(rollouts, chunks))]
        if spec.baseline == "batch":
            baseline = sum(preferences) / len(preferences) if preferences else 0.0
        else:
            baseline = spec.prior[0] / sum(spec.prior)
        advantages = torch.zeros(rollouts.completion_ids.shape)
        for c, p in zip(chunks, preferences):
            advantages[c.row, c.start : c.start + c.width] = p - baseline
        usage = self.client.take_usage()
        usage.update(forks=float(len(chunks)), audited_tokens=float(sum(c.width for c in chunks)))
        if spec.fork_snap:
            usage["forks_moved"] = float(moved)
        return TeacherSignal(torch.zeros_like(mask), token_advantages=advantages.to(mask.device) * mask, usage=usage)

    def continuations(self, asks: list[tuple[Example, str]], n: int, temperature: float) -> list[list[tuple[str, bool]]]:
        """The teacher's ``n`` continuations of each ``(example, prefix)``, at most ``chunk_length`` tokens each, as
        ``(text, ended)`` per choice."""
        requests = []
        for example, prefix in asks:
            messages, extra = self._messages(example, prefix)
            requests.append({"model": self.spec.model, "messages": messages, "n": n,
                             "max_tokens": self.spec.chunk_length, "temperature": temperature, **extra})

        def check(body: dict) -> None:
            choices = body["choices"]
            if len(choices) != n or not all(isinstance(c["message"]["content"], str) for c in choices):
                raise Malformed(f"expected {n} choices with text, got {len(choices)}")

        return [[(c["message"]["content"], c.get("finish_reason") == "stop") for c in answer["choices"]]
                for answer in self.client.map("/chat/completions", requests, check)]

    def answers(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
                top_p: float = 1.0) -> list[tuple[str, bool]]:
        """The teacher's answer to each prompt (asked in the teacher's view; greedy at temperature 0) as
        ``(text, ended)``."""
        payloads = [{"model": self.spec.model, "messages": self._view(e), "max_tokens": max_completion_length,
                     "temperature": temperature, "top_p": top_p} for e in examples]

        def check(body: dict) -> None:
            if len(body["choices"]) != 1 or not isinstance(body["choices"][0]["message"]["content"], str):
                raise Malformed("expected exactly one choice with text")

        return [(a["choices"][0]["message"]["content"], a["choices"][0].get("finish_reason") == "stop")
                for a in self.client.map("/chat/completions", payloads, check)]

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """Teacher answers to the prompts (``answers``), tokenized by the student after the student's prompts."""
        answers = self.answers(examples, max_completion_length, temperature, top_p)
        return rollouts_from_texts(self.tokenizer, examples, [text for text, _ in answers],
                                   [ended for _, ended in answers], max_completion_length)
