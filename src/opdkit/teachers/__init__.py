"""Teachers: one interface, ``score(rollouts, support) -> TeacherSignal``.

The teacher is always scored at temperature 1 on the student's exact token ids; any temperature an
objective wants is applied in the objective, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ..products import through
from ..rollout import Rollouts

Support = Literal["token", "topk", "full"]


@dataclass
class Bridge:
    """Teacher continuations from states of the student's rollouts (near-future ``teacher_bridge``): row ``i`` of
    ``rollouts`` continues rollout ``rows[i]`` from its prefix before completion position ``positions[i]``."""

    rollouts: Rollouts  # prompt: x + y_<t (left-padded); completion: the teacher's tokens (source "teacher")
    rows: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long


class FromHead:
    """A field of ``TeacherSignal`` that a local teacher's full distribution gives (token log-probs, entropy, top-k):
    where the signal carries ``pending`` statistics (``teachers.local.HeadStats``), the first read completes them
    all, projecting only the positions the full-vocabulary loss's blocks did not already hand over."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = "_" + name

    def __get__(self, signal, owner=None):
        if signal is None:
            return None  # the dataclass's default
        if signal.__dict__.get("pending") is not None:
            signal.complete()
        return signal.__dict__[self.name]

    def __set__(self, signal, value) -> None:
        signal.__dict__[self.name] = value


@dataclass
class TeacherSignal:
    """What a teacher says about a batch of rollouts. The full distribution (support "full") comes either as
    ``logprobs`` or, from a local teacher, as its last ``hidden`` states and LM ``head``: ``[B, C, d]`` instead
    of ``[B, C, V]``, projected block by block where it is used (``full_logprobs`` materialises it whole); the
    statistics of that distribution then come ``pending`` (``FromHead``): computed from the blocks the loss projects
    anyway, not from a projection of their own."""

    token_logprobs: torch.Tensor = FromHead()  # [B, C] log pi_T(y_t | s_t) of the rollout's tokens
    logprobs: torch.Tensor | None = None  # [B, C, V] log-softmax over the vocabulary (support "full")
    hidden: torch.Tensor | None = None  # [B, C, d] last hidden states of the completion positions (support "full")
    head: torch.nn.Module | None = None  # the teacher's LM head: logits = head(hidden)
    topk_ids: torch.Tensor | None = FromHead()  # [B, C, k] (support "topk")
    topk_logprobs: torch.Tensor | None = FromHead()  # [B, C, k] log pi_T of those ids, normalised over the vocabulary
    entropy: torch.Tensor | None = FromHead()  # [B, C] H(pi_T(.|s_t)) over the whole vocabulary, when asked and known
    token_advantages: torch.Tensor | None = None  # [B, C] logit-free per-token reward (chat teacher, chunk_opd)
    usage: dict[str, float] = field(default_factory=dict)  # remote teachers: calls, retries, tokens of this call
    bridge: Bridge | None = None  # near-future bridges, set by the method's ``guide`` after scoring
    # several teachers (``teachers.multi``): name -> ([B] bool, the rows it scored; [B, C] its token log-probs)
    by_teacher: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    # a local teacher's statistics not yet computed (``teachers.local.HeadStats``): ``observe`` and ``complete``
    pending: object | None = None

    def complete(self) -> None:
        """Compute the ``pending`` statistics now (a no-op without)."""
        stats, self.pending = self.pending, None
        if stats is not None:
            self.token_logprobs, self.entropy, self.topk_ids, self.topk_logprobs = stats.complete()

    def full_logprobs(self) -> torch.Tensor:
        """``[B, C, V]`` float32 log-probs over the whole vocabulary (from ``hidden`` when that is what came)."""
        if self.logprobs is not None:
            return self.logprobs
        with torch.no_grad():
            return through(self.head, self.hidden).float().log_softmax(-1)


class Teacher(Protocol):
    """``model`` is the local ``PreTrainedModel`` or None for a remote teacher; every teacher samples
    completions (tokenized by the student's tokenizer) and scores the student's tokens."""

    model: object | None
    returns_logprobs: bool  # False for a text-only teacher

    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        """The teacher's log-probs on ``support``; with ``entropy``, also its full entropy per position where it
        has the whole distribution (a local model; None from a server, which gives only a top-k)."""
        ...

    def sample(self, examples: list, max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """The teacher's answers to the prompts, after the student's prompts; greedy at temperature 0."""
        ...

    def continue_ids(self, prefixes: list[list[int]], max_new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
        """The teacher's continuation (token ids, through its end token if it ends) of each unpadded prefix of ids
        (prompt and completion so far, in the student's tokenizer); greedy at temperature 0."""
        ...

    def take_usage(self) -> dict[str, float]:
        """Calls and tokens since the last ``score`` or ``take_usage``."""
        ...


def teacher_request(config, method) -> tuple[Support, int | None, bool]:
    """``(support, top_k, entropy)`` the loop asks the teacher for, from the config alone: what the method needs
    and, from a local teacher (for which they cost no extra forward pass), its top-k and entropy for the
    diagnostics (``diagnostics.top_k``; 0 asks only what the method needs). A self teacher is a local one; several
    teachers give them when all are local and each row has one teacher (not under ``combine``)."""
    support, top_k, entropy = method.teacher_support, method.top_k, method.needs_teacher_entropy
    k = config.diagnostics.top_k
    combined = config.teachers is not None and config.teacher_routing.rule == "combine"  # extras: a [B, C, V] mixture
    if any(spec.kind not in ("local", "self") for spec in config.teacher_specs()) or combined or not k:
        return support, top_k, entropy
    return ("topk" if support == "token" else support), max(top_k or 0, k), True


from .local import LocalTeacher  # noqa: E402


def build_teacher(spec, student_tokenizer, student_config, device: torch.device, amp_dtype: torch.dtype,
                  chat_template: bool = True, top_k_needed: int = 1, student: torch.nn.Module | None = None) -> Teacher:
    """The teacher a config names, checked against the student's config (and ``student``, the loaded model, which
    ``kind: self`` copies and so needs) before any training. ``chat_template``: whether prompts are rendered with
    the chat template, so whether the two templates must agree; ``top_k_needed``: the teacher log-probs per position
    the objective reads. Every kind takes ``prompt``, the teacher's own view; a server keeps its probe's
    ``findings``."""
    from ..errors import OPDError
    from ..models import check_tokenizers_match, load_model, load_tokenizer, weights_dtype
    from .context import TeacherContext

    context = TeacherContext(spec.prompt, student_tokenizer) if spec.prompt is not None else None  # its own view
    if spec.kind in ("local", "self"):
        dtype = weights_dtype(spec.dtype, amp_dtype)
        if spec.kind == "self":
            from .self_teacher import SelfTeacher

            if student is None:
                raise ValueError("build_teacher: a self teacher copies the student: pass the loaded student")
            from ..lora import is_lora

            if is_lora(student):  # the base weights with the adapter off: no copy (ema refused by the config)
                from .self_teacher import AdapterOffTeacher

                return AdapterOffTeacher(student, student_tokenizer, amp_dtype, context)
            return SelfTeacher(student, student_tokenizer, amp_dtype, dtype, spec.ema, context)
        check_tokenizers_match(student_tokenizer, load_tokenizer(spec.path), chat_template)
        model = load_model(spec.path, device, dtype)
        if student_config.vocab_size != model.config.vocab_size:
            raise OPDError(f"student and teacher output layers differ in size ({student_config.vocab_size} vs "
                           f"{model.config.vocab_size}) although their tokenizers match: resize one embedding matrix")
        return LocalTeacher(model, student_tokenizer, amp_dtype, context)
    if spec.kind == "server":
        from .server import ServerTeacher

        teacher = ServerTeacher(spec, student_tokenizer, context)
        teacher.probe(top_k_needed, chat_template)
        return teacher
    if spec.kind == "chat":
        from .chat import ChatTeacher

        teacher = ChatTeacher(spec, student_tokenizer, context)
        teacher.probe()
        return teacher
    raise OPDError(f"unknown teacher kind {spec.kind!r}")


def build_teachers(config, student_tokenizer, student_config, device: torch.device, amp_dtype: torch.dtype,
                   top_k_needed: int = 1, student: torch.nn.Module | None = None) -> Teacher:
    """The run's teacher: ``build_teacher`` of ``config.teacher``, or a ``MultiTeacher`` over ``config.teachers``."""
    if config.teacher is not None:
        return build_teacher(config.teacher, student_tokenizer, student_config, device, amp_dtype,
                             config.data.chat_template, top_k_needed, student=student)
    from .multi import MultiTeacher

    teachers = {spec.name: build_teacher(spec, student_tokenizer, student_config, device, amp_dtype,
                                         config.data.chat_template, top_k_needed, student=student)
                for spec in config.teachers}
    return MultiTeacher(teachers, config.teacher_routing, config.seed, student_tokenizer.pad_token_id)


__all__ = ["Bridge", "LocalTeacher", "Support", "Teacher", "TeacherSignal", "build_teacher", "build_teachers",
           "teacher_request"]
