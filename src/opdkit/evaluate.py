"""Held-out measurement of a student against its teacher, the same way everywhere (demo, train, eval).

- ``accuracy``: greedy completions checked by the task verifier (when the dataset has a task);
- ``reverse_kl``: mean per-token ``KL(pi_S || pi_T)`` over the full vocabulary, exact at every position of
  student samples at temperature 1 (a fixed seed, so two checkpoints see comparable samples); local
  teacher only;
- ``reverse_kl_k1`` instead, for a server teacher (no full logits): the mean over the same
  samples' tokens of ``log pi_S(y_t) - log pi_T(y_t)`` (the k1 estimator: unbiased, noisier, can be < 0);
  a chat teacher (text only) gives none;
- ``token_agreement``: the student's argmax equals the teacher's on the teacher's greedy answers (for a
  remote teacher, its greedy text tokenized by the student's tokenizer);
- ``greedy_match``: the student's whole greedy answer equals the teacher's;
- ``looping``: the share of greedy answers in which one sequence of ``LOOP_TOKENS`` tokens occurs ``LOOP_TIMES``
  times or more ("a garden is a garden, a garden is a garden"): the degenerate repetition that makes a small
  student unusable while its KL falls. The teacher's own share is measured beside it, since greedy decoding makes
  small teachers loop too.

A teacher with its own context (``teacher.prompt``) is measured in that context, the one the student is trained
toward: the KLs score the student's samples after the teacher's view of each prompt, and its greedy answers are
written in that view; the student is always measured on its own prompt. The teacher's greedy answers are taken
once, except from a self-teacher that follows the student (``ema``), which answers anew at every evaluation.

Each call also keeps ``last_samples``: the first ``samples`` prompts with the student's and the teacher's greedy
answers (and the reference answer where the dataset has one), for people to read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import Example
from .models import autocast
from .objectives.divergence import kl
from .objectives.support import sampled
from .rollout import Rollouts, sample
from .tasks import Verifier
from .teachers import Teacher


# Every metric an evaluation may return: key -> (label, format), in the order tables show them and plots prefer
# them (accuracy needs a task, the exact reverse KL a local teacher, its k1 estimate a server; every teacher gives
# token agreement).
METRICS = {
    "accuracy": ("held-out accuracy", ".1%"),
    "reverse_kl": ("exact reverse KL to teacher (nats/token)", ".4f"),
    "reverse_kl_k1": ("reverse KL to teacher, k1 estimate (nats/token)", ".4f"),
    "token_agreement": ("token agreement with teacher", ".1%"),
    "greedy_match": ("greedy answer = teacher's", ".1%"),
    "mean_length": ("mean greedy length (tokens)", ".1f"),
    "looping": ("greedy answers that loop", ".1%"),
}
LOOP_TOKENS, LOOP_TIMES = 4, 3


def loops(ids: list[int]) -> bool:
    """Whether one run of ``LOOP_TOKENS`` consecutive tokens occurs ``LOOP_TIMES`` times or more in ``ids``."""
    counts = Counter(tuple(ids[i : i + LOOP_TOKENS]) for i in range(len(ids) - LOOP_TOKENS + 1))
    return max(counts.values(), default=0) >= LOOP_TIMES


def looping(rollouts: list[Rollouts]) -> float:
    """The share of the rows of ``rollouts`` (greedy answers) that loop."""
    rows = [ids for r in rollouts for ids in r.completions()]
    return sum(map(loops, rows)) / max(len(rows), 1)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Evaluator:
    teacher: Teacher  # local, self, server or chat
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    verifier: Verifier | None
    max_completion_length: int
    batch_size: int = 128
    seed: int = 0
    amp_dtype: torch.dtype = torch.float32
    samples: int = 3

    def __post_init__(self):
        self._teacher_greedy: list[Rollouts] | None = None
        self.last_samples: list[dict] = []
        self._exact_kl = self.teacher.model is not None  # full logits only from a local teacher

    def _greedy(self, model) -> list[Rollouts]:
        with autocast(next(model.parameters()).device, self.amp_dtype):
            return [sample(model, self.tokenizer, batch, max_completion_length=self.max_completion_length, temperature=0.0)
                    for batch in _batches(self.examples, self.batch_size)]

    def _accuracy(self, rollouts: list[Rollouts]) -> float | None:
        if self.verifier is None or any(e.answer is None for e in self.examples):
            return None
        texts = [t for r in rollouts for t in r.texts(self.tokenizer)]
        return sum(self.verifier(t, e.answer) for t, e in zip(texts, self.examples)) / len(self.examples)

    @property
    def teacher_greedy(self) -> list[Rollouts]:
        if self._teacher_greedy is None:
            self._teacher_greedy = [self.teacher.sample(batch, self.max_completion_length, temperature=0.0)
                                    for batch in _batches(self.examples, self.batch_size)]
            self.teacher.take_usage()  # evaluation calls are not a training step's
        return self._teacher_greedy

    def teacher_metrics(self) -> dict:
        return {"accuracy": self._accuracy(self.teacher_greedy), "looping": looping(self.teacher_greedy)}

    def _reverse_kl(self, student, rollouts: Rollouts) -> torch.Tensor:
        """Per-token ``KL(pi_S || pi_T)``: exact over the vocabulary, or the k1 estimate from the sampled token."""
        with autocast(next(student.parameters()).device, self.amp_dtype):
            student_logprobs = rollouts.completion_logits(student).float().log_softmax(-1)
        if self._exact_kl:
            return kl(student_logprobs, self.teacher.score(rollouts, "full").full_logprobs())
        return sampled(student_logprobs, rollouts.completion_ids) - self.teacher.score(rollouts, "token").token_logprobs

    def _samples(self, greedy: list[Rollouts]) -> list[dict]:
        examples = self.examples[: self.samples]
        batches = -(-len(examples) // self.batch_size)  # decode only the batches that hold them
        students = [t for r in greedy[:batches] for t in r.texts(self.tokenizer)][: len(examples)]
        teachers = [t for r in self.teacher_greedy[:batches] for t in r.texts(self.tokenizer)][: len(examples)]
        return [{"prompt": e.messages[-1]["content"], "student": s, "teacher": t,
                 **({"answer": e.answer} if e.answer is not None else {})}
                for e, s, t in zip(examples, students, teachers)]

    @torch.no_grad()
    def __call__(self, student: PreTrainedModel) -> dict:
        was_training = student.training
        student.eval()
        if getattr(self.teacher, "ema", None) is not None:  # a self-teacher that follows the student: answers anew
            self._teacher_greedy = None
        device = next(student.parameters()).device
        greedy = self._greedy(student)
        kl_sum = tokens = agree = 0.0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for batch in _batches(self.examples, self.batch_size) if self.teacher.returns_logprobs else ():
                with autocast(device, self.amp_dtype):
                    rollouts = sample(student, self.tokenizer, batch, max_completion_length=self.max_completion_length)
                kl_sum += float((self._reverse_kl(student, rollouts) * rollouts.completion_mask).sum())
                tokens += rollouts.num_tokens
        greedy_match = 0
        for mine, theirs in zip(greedy, self.teacher_greedy):
            with autocast(device, self.amp_dtype):
                argmax = theirs.completion_logits(student).argmax(-1)
            agree += float(((argmax == theirs.completion_ids).float() * theirs.completion_mask).sum())
            greedy_match += sum(a == b for a, b in zip(mine.texts(self.tokenizer), theirs.texts(self.tokenizer)))
        teacher_tokens = sum(r.num_tokens for r in self.teacher_greedy)
        student.train(was_training)
        self.last_samples = self._samples(greedy)
        kl_name = "reverse_kl" if self._exact_kl else "reverse_kl_k1"
        return {
            "accuracy": self._accuracy(greedy),
            **({kl_name: kl_sum / tokens} if tokens else {}),
            "token_agreement": agree / max(teacher_tokens, 1),
            "greedy_match": greedy_match / len(self.examples),
            "mean_length": sum(float(r.lengths().sum()) for r in greedy) / len(self.examples),
            "looping": looping(greedy),
        }
