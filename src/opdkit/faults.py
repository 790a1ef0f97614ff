"""Faults a run survives: non-finite steps (skipped, explained, their batch saved) and stop signals.

A step whose loss or gradient norm is NaN or infinite does not update the weights. Its micro-batches and
teacher signals are saved to ``run_dir/nonfinite/step-<k>.pt`` with a diagnosis of the likely cause, so
the user can load the file and see the offending tokens. SIGINT and SIGTERM ask the loop to stop at the
end of the current step; the loop then saves a checkpoint and raises :class:`~opdkit.errors.Interrupted`.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import torch

from .rollout import Rollouts
from .teachers import TeacherSignal


class StopSignals:
    """Context manager: the first SIGINT or SIGTERM sets ``signum`` and calls ``acknowledge`` (which tells the
    person at once); a second one acts as usual (Ctrl-C twice interrupts at once). Outside the main thread
    signals cannot be caught: a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, acknowledge: Callable[[], None] | None = None):
        self.signum: int | None = None
        self.acknowledge = acknowledge
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        if self.acknowledge is not None:
            self.acknowledge()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def diagnose(student: torch.nn.Module | None, batches: list[Rollouts], signals: list[TeacherSignal],
             loss: float, grad_norm: float) -> str:
    """The most likely cause of a non-finite loss or gradient, in words that name a fix."""
    for index, (batch, teacher) in enumerate(zip(batches, signals)):
        counted = batch.completion_mask.bool()
        teacher_lp = teacher.token_logprobs.float()
        bad = counted & torch.isneginf(teacher_lp)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            token = int(batch.completion_ids[row, col])
            return (f"the teacher's log-prob is -inf on a sampled token (micro-batch {index}, row {row}, position {col}, "
                    f"token id {token}): the teacher gives it zero probability. Check that teacher and student share "
                    "the tokenizer and that the teacher's scores are not truncated (top-k/top-p) or masked")
        if (counted & ~torch.isfinite(teacher_lp) & ~torch.isneginf(teacher_lp)).any():
            return "the teacher returned NaN or +inf log-probs: its weights or precision overflow; try precision: fp32"
        if batch.sampler_logprobs is not None and (counted & ~torch.isfinite(batch.sampler_logprobs)).any():
            return ("the sampler's log-prob of a sampled token is not finite: lower rollout.temperature or raise "
                    "rollout.top_p, or turn off importance correction")
    if student is not None:  # None: a sharded student, whose forward is a collective of every process
        if any(not torch.isfinite(p).all() for p in student.parameters()):
            return "the student's weights are not finite: an earlier update diverged; lower optim.learning_rate"
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if not torch.isfinite(batch.completion_logits(student)).all():
                    return (f"the student's logits are not finite on micro-batch {index}: an activation overflows; "
                            "use precision: fp32 or lower optim.learning_rate")
    if math.isfinite(loss):
        return (f"the loss is finite ({loss:.4g}) but the gradient norm is {grad_norm}: backward overflowed; "
                "lower optim.learning_rate, set optim.max_grad_norm, or use precision: fp32")
    return (f"the loss is {loss} although the teacher's and student's log-probs are finite: the objective "
            "overflowed (for example a large importance ratio or log-ratio); lower rollout.temperature or clip it")


def save_batch(path: Path, batches: list[Rollouts], signals: list[TeacherSignal], reason: str, tokenizer) -> Path:
    """Write the offending micro-batches, their texts and the diagnosis for inspection (``torch.load``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "reason": reason,
        "micro_batches": [{
            "prompts": [e.messages for e in batch.examples],
            "completions": batch.texts(tokenizer),
            "rollouts": {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)},
            "teacher": {f.name: getattr(teacher, f.name) for f in fields(teacher)  # pending statistics completed
                        if isinstance(getattr(teacher, f.name), torch.Tensor)},
        } for batch, teacher in zip(batches, signals)],
    }
    torch.save(payload, path)
    return path
