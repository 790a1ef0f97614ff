"""What a run shows a person: the banner, the live progress (a bar with rate and ETA on a terminal, one line every
``logging.every`` steps elsewhere), evaluations as they are taken, warnings, saves, and the summary at the end.

The loop in ``train.py`` calls these; none of them changes what the run computes.
"""

from __future__ import annotations

import contextlib
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .allocator import tensor_heap_usage
from .evaluate import METRICS
from .lora import is_lora
from .models import bf16_units, machine_description

def _size(model: torch.nn.Module) -> str:
    return _count(sum(p.numel() for p in model.parameters()))


def _count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


def _trainable(model: torch.nn.Module) -> str:
    """``1.2M`` when every parameter trains; ``1.1M of 135.6M trainable`` when only some do (a LoRA adapter)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return _size(model) if trained == total else f"{_count(trained)} of {_count(total)} trainable"


def duration(seconds: float) -> str:
    """``4.2s``, ``3m 07s``, ``1h 05m``: one decimal under a minute, where short runs live."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


def _value(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def eval_line(measured: dict) -> str:
    return "  ".join(f"{METRICS[k][0].split(' (')[0]} {_value(v, METRICS[k][1])}"
                     for k, v in measured.items() if k in METRICS and v is not None)


def step_line(record: dict) -> str:
    """The per-step numbers people watch: loss, the KL the step measured, the student's entropy (and the teacher's),
    the share of sampled tokens with a negative signal, the student's mass on the teacher's top-k, the positions
    where a token would repeat an n-gram (``repeat_penalty``), lr, gradient norm, length, time."""
    parts = [f"loss {record['loss']:+.4f}"]
    for key, label in (("reverse_kl_k1", "rkl~k1"), ("reverse_kl_topk", "rkl@topk"), ("reverse_kl_full", "rkl")):
        if key in record:
            parts.append(f"{label} {record[key]:.4f}")
    if "student_entropy" in record:
        parts.append(f"H {record['student_entropy']:.2f}" + (f"/{record['teacher_entropy']:.2f}" if "teacher_entropy" in record else ""))
    if "signal_negative_share" in record:
        parts.append(f"neg {record['signal_negative_share']:.0%}")
    if "student_topk_mass" in record:
        parts.append(f"top-k mass {record['student_topk_mass']:.0%}")
    if record.get("repeat_positions"):  # repeat_penalty: where a token would repeat, and the teacher's p of it there
        there = record["teacher_repeat_mass"] / record["repeat_positions"]
        parts.append(f"repeats {record['repeat_positions']:.0%} (teacher p {there:.2f} there)")
    seconds = sum(v for k, v in record.items() if k.startswith("time_"))
    parts += [f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.2f}", f"len {record['completion_length']:.1f}",
              f"{seconds:.2f} s/step"]
    return "  ".join(parts)


class RunView:
    """The console side of one run."""

    def __init__(self, console: Console, run):
        self.console, self.run = console, run
        self.progress: Progress | None = None
        self._task = None
        self._warned: set[str] = set()

    # ---- start ------------------------------------------------------------------------------------------
    def banner(self, first_step: int, save_every: int) -> None:
        run, config = self.run, self.run.config
        if config.teacher is not None:
            teachers = [("teacher", _teacher_line(config.teacher, run.teacher)), *(("", Text(line)) for line in
                                                                                   probe_lines(run.teacher))]
        else:  # several: one line each (and its probe's), then the routing
            teachers = [row for spec in config.teachers for row in (
                (f"teacher {spec.name}", _teacher_line(spec, run.teacher.teachers[spec.name])),
                *(("", Text(line)) for line in probe_lines(run.teacher.teachers[spec.name])))]
            teachers.append(("routing", routing_text(config.teacher_routing)))
        data = f"{len(run.prompts.examples)} train prompts ({config.data.train})"
        if run.evaluator.examples:
            data += f", {len(run.evaluator.examples)} eval prompts ({config.data.eval})"
        if config.data.task:
            data += f", task {config.data.task}"
        steps = config.optim.steps
        accumulation = config.optim.gradient_accumulation_steps
        schedule = (f"{steps} steps x {config.rollout.batch_size} prompts" + (f" x {accumulation} micro-batches"
                    if accumulation > 1 else "") + f", {config.rollout.max_completion_length} new tokens at most, "
                    f"lr {config.optim.learning_rate:g}")
        if first_step > 1:
            schedule += f"; resuming at step {first_step}"
        next_save = (first_step - 1) // save_every * save_every + save_every if save_every else None
        saving = (f"every {save_every} steps (next at step {next_save})" if next_save and next_save < steps
                  else "at the end, on a new best and on a stop")
        best = config.checkpoint.best_metric
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        rows = [
            ("method", f"{run.method.name}: {_method_line(run.method.name)}"),
            ("student", f"{config.student.path} ({_trainable(run.student)} parameters)"),
            *teachers,  # Text: no markup in a server's answers
            ("precision", precisions(run)),
            ("decoding", decoding(run)),
            ("machine", f"{run.device.type}: {machine_description(run.amp_dtype)}"),
            *([("memory", allocator_line(config.allocator))] if run.device.type == "cpu" else []),
            ("data", data),
            ("steps", schedule),
            ("checkpoints", f"{saving}, newest {config.checkpoint.keep} kept" + (f", best by {best}" if best else "")),
            ("output", str(run.run_dir)),
        ]
        for name, text in rows:
            table.add_row(name, text)
        self.console.rule("[bold]opd train")
        self.console.print(table)
        if run.amp_dtype == torch.bfloat16 and run.device.type == "cpu" and not bf16_units():
            self.warn("bf16", "precision bf16 on a processor without bf16 matrix units: the run computes in bf16 "
                      "autocast as asked, but emulated, so it is likely slower than precision: fp32")
        self.rendered_prompt()

    def rendered_prompt(self) -> None:
        """The first training prompt exactly as the student sees it, and how it was rendered."""
        from .data import render_prompt

        tokenizer, config = self.run.tokenizer, self.run.config
        text = tokenizer.decode(render_prompt(tokenizer, self.run.prompts.examples[0].messages))
        if tokenizer.chat_template is not None:
            how = ("rendered with the student's chat template (it may add a default system prompt; "
                   "data.chat_template: false sends the raw text, for base models)")
        elif config.data.chat_template:
            how = "raw text: the student's tokenizer has no chat template"
        else:
            how = "raw text (data.chat_template: false)"
        self.console.print(f"[bold]first prompt[/], {how}:", highlight=False)
        self.console.print(repr(text), markup=False, highlight=False)
        context = getattr(self.run.teacher, "context", None)
        if context is not None:  # teacher.prompt: the teacher scores the same completion after its own view
            seen = tokenizer.decode(render_prompt(tokenizer, context.messages(self.run.prompts.examples[0])))
            if seen != text:
                self.console.print("[bold]the teacher's view of it[/] (teacher.prompt; it scores the student's "
                                   "completion after this):", highlight=False)
                self.console.print(repr(seen), markup=False, highlight=False)

    # ---- during -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def live(self, completed: int):
        """The progress display for the steps from ``completed + 1`` on: a live bar on a terminal, else nothing
        (``step`` prints a line every ``logging.every`` steps)."""
        if not self.console.is_terminal:
            yield self
            return
        self.progress = Progress(TextColumn(f"[bold]{self.run.method.name}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=self.console, transient=False)
        self._task = self.progress.add_task("starting the first step...", total=self.run.config.optim.steps,
                                            completed=completed)
        try:
            with self.progress:
                yield self
        finally:
            self.progress = None

    def step(self, record: dict) -> None:
        step, steps = record["step"], self.run.config.optim.steps
        if self.progress is not None:
            self.progress.update(self._task, advance=1, description=step_line(record))
        elif step == 1 or step == steps or step % self.run.config.logging.print_every(steps) == 0:
            self.console.print(f"{self.run.method.name} step {step}/{steps}  {step_line(record)}", highlight=False)
        if "nonfinite" in record:
            self.console.print(f"[yellow]step {step} skipped:[/] {record['nonfinite']} (batch: {record['nonfinite_batch']})")

    def alert(self, alert) -> None:
        """A failure detector that fired (``opdkit.detectors``): once per run, in plain words."""
        self.console.print(f"[yellow]warning ({alert.detector}, step {alert.step}):[/] {alert.text()}", highlight=False)

    def evaluation(self, step: int, measured: dict, new_best: bool) -> None:
        best = f"  (best {self.run.config.checkpoint.best_metric} so far)" if new_best else ""
        self.console.print(f"[bold]eval at step {step}:[/] {eval_line(measured)}{best}", highlight=False)

    def saved(self, path, next_due: int | None) -> None:
        due = f"; next save at step {next_due}" if next_due else ""
        self.console.print(f"saved {path.name}{due}", style="dim", highlight=False)

    def warn(self, key: str, text: str) -> None:
        """Print a warning once per run."""
        if key not in self._warned:
            self._warned.add(key)
            self.console.print(f"[yellow]warning:[/] {text}", highlight=False)

    def extended(self, finished_at: int, last_lr: float, next_lr: float) -> None:
        steps = self.run.config.optim.steps
        self.console.print(f"extending the finished run from {finished_at} to {steps} steps, with its optimizer and "
                           f"schedule state: the schedule's horizon moves from {finished_at} to {steps} steps, so the "
                           f"learning rate goes from {last_lr:.3g} (where it ended) to {next_lr:.3g} at step "
                           f"{finished_at + 1}", highlight=False)

    def interrupt(self, step: int) -> None:
        self.console.print(f"[bold yellow]stop asked: finishing step {step}, then saving a checkpoint; press Ctrl-C "
                           "again to stop now[/]")

    # ---- measurements -----------------------------------------------------------------------------------
    def before(self, measured: dict, teacher: dict) -> None:
        if measured:
            self.console.print(f"[bold]before training:[/] {eval_line(measured)}", highlight=False)
        if line := eval_line(teacher):
            self.console.print(f"[bold]teacher:[/] {line}", highlight=False)

    def summary(self, result: dict, samples: list[dict]) -> None:
        before, after, teacher = result["before"], result["after"], result["teacher"]
        if after:
            table = Table(title=f"held-out, before and after {result['steps']} steps of {result['method']}")
            table.add_column("metric")
            for column in ("before", "after", "teacher"):
                table.add_column(column, justify="right")
            for key, (label, fmt) in METRICS.items():
                if after.get(key) is not None or before.get(key) is not None:
                    table.add_row(label, _value(before.get(key), fmt), _value(after.get(key), fmt),
                                  _value(teacher.get(key), fmt) if key in teacher else "")
            self.console.print(table)
        if samples:
            table = Table(title="evaluation completions (greedy), after training", show_lines=True)
            for column in ("prompt", "student", "teacher"):
                table.add_column(column, overflow="fold")
            for sample in samples:
                table.add_row(sample["prompt"], sample["student"], sample.get("teacher") or "-")
            self.console.print(table)
        if result.get("best_checkpoint"):
            best = result["best"]
            self.console.print(f"best checkpoint: {result['best_checkpoint']} ({best['metric']} {best['value']:.4f} at "
                               f"step {best['step']})", highlight=False)
        self.console.print(f"final model: {result['final']} (loads with AutoModelForCausalLM.from_pretrained)", highlight=False)
        self.console.print(f"time: {duration(result['wall_s'])} in all, of which training steps "
                           f"{duration(result['train_s'])} (the rest: loading, evaluation, saving)", highlight=False)


def teacher_text(spec) -> str:
    """One teacher in words, from its config alone (the report's; the banner adds what loading found)."""
    if spec.kind == "local":
        return f"local {spec.path}"
    if spec.kind == "self":
        return f"self: the student's own weights, {_following(spec.ema)}"
    urls = spec.base_url if isinstance(spec.base_url, str) else ", ".join(spec.base_url)
    return f"{spec.kind} {spec.model} at {urls}"


def _teacher_line(spec, teacher) -> str:
    """One teacher in the banner: ``teacher_text`` and, for a local model, its size."""
    if spec.kind == "local":
        return f"{teacher_text(spec)} ({_size(teacher.model)} parameters)"
    if spec.kind == "self" and is_lora(teacher.model):
        return "self: the student's base weights with the LoRA adapter disabled (no copy)"
    return teacher_text(spec)


def routing_text(routing) -> str:
    """How several teachers share the work, in words (the banner and the report)."""
    weights = ", ".join(f"{k} {v:g}" for k, v in (routing.weights or {}).items()) or "equal weights"
    if routing.rule == "column":
        mapped = f" through {routing.map}" if routing.map else ""
        return f"by the dataset column {routing.column!r}{mapped}"
    if routing.rule == "mixture":
        return f"each example drawn once by weight ({weights})"
    return f"every teacher on every example, {routing.combine} ({weights})"


def _following(ema: float | None) -> str:
    return "frozen at the start" if ema is None else f"an exponential moving average of it (decay {ema:g})"


def allocator_line(allocator: str) -> str:
    """Where the steps' CPU tensors live (``allocator``), once ``train.optimizer_and_schedule`` has chosen."""
    if tensor_heap_usage() is not None:
        return "each step's tensors in a heap of their own (allocator: auto)"
    if allocator == "auto":
        return "torch's own allocator: no C++ compiler built the tensor heap (allocator: auto)"
    return "torch's own allocator (allocator: system)"


def _method_line(name: str) -> str:
    from .catalog import method_summary

    return method_summary(name)[0]


def probe_lines(teacher) -> list[str]:
    """What the probe found about a server or chat teacher (nothing for other teachers), shown under the teacher."""
    findings = getattr(teacher, "findings", None)
    return findings.lines() if findings is not None else []


def decoding(run) -> str:
    """How the student's rollouts are decoded, for the run log."""
    from .llama_step import unsupported

    if run.served is not None:
        return "by the server that serves the student (rollout.engine: server)"
    reason = unsupported(run.student)
    return ("opdkit's Llama-family step over a preallocated KV cache (llama_step)" if reason is None
            else f"transformers' forward over its KV cache (llama_step does not support {reason})")


def precisions(run) -> str:
    """What each model computes in, for the run log."""
    from .products import is_float32_arithmetic
    from .teachers import LocalTeacher

    name = {torch.float32: "float32", torch.bfloat16: "bf16"}.get
    if run.config.student.dtype == "bf16" and run.config.student.lora is not None:
        student = "bf16 frozen weights, float32 adapter with bf16 autocast"
    elif run.config.student.dtype == "bf16":
        from .optimizer import fused_on

        student = ("bf16 weights, gradients and AdamW moments (stochastic rounding, "
                   f"{'C kernel' if fused_on(run.device) else 'torch operators'})"
                   + (" in float32 arithmetic" if is_float32_arithmetic(run.student) else ""))
    else:
        student = "float32 weights" + (" with bf16 autocast" if run.amp_dtype == torch.bfloat16 else "")
    teacher = (f"{name(run.teacher.dtype, str(run.teacher.dtype))} weights" if isinstance(run.teacher, LocalTeacher)
               else "served")
    if isinstance(run.teacher, LocalTeacher) and is_float32_arithmetic(run.teacher.model):
        teacher += " in float32 arithmetic"
    reference = ""
    if run.reference is not None:
        dtype = next(run.reference.parameters()).dtype
        reference = f", reference {name(dtype, str(dtype))} weights"
    return f"student {student}, teacher {teacher}{reference}"

