"""The training loop, in the order a step runs:

    prompts -> rollout (student samples, or teacher / dataset states) -> teacher scoring
            -> per-token loss (the method) -> token mean over the whole step -> AdamW step
            -> periodic eval -> checkpoint

``setup`` validates every input before any work starts; ``train`` runs the loop and returns the
before/after measurements. Everything a step does is logged to ``metrics.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import Config, dump_config
from .data import PromptSampler, load_examples, validate_lengths
from .errors import OPDError
from .evaluate import Evaluator
from .methods import Method, build_method
from .models import autocast, context_length, load_model, load_tokenizer, pick_device, resolve_precision, set_threads
from .objectives.divergence import entropy
from .objectives.reduce import token_sum
from .rollout import Rollouts, from_dataset, sample
from .tasks import get_verifier
from .teachers import Teacher, build_teacher


@dataclass
class Run:
    """Everything a run needs, loaded and validated."""

    config: Config
    student: torch.nn.Module
    teacher: Teacher
    tokenizer: object
    method: Method
    prompts: PromptSampler
    evaluator: Evaluator
    device: torch.device
    amp_dtype: torch.dtype
    run_dir: Path
    history: list[dict] = field(default_factory=list)


def setup(config: Config, student_path: str | None = None) -> Run:
    """Load models and data and check that they fit together; raise OPDError before any training."""
    set_threads(config.threads)
    torch.manual_seed(config.seed)
    device = pick_device()
    amp_dtype = resolve_precision(config.precision, device)
    method = build_method(config.objective)

    student_path = student_path or config.student.path
    tokenizer = load_tokenizer(student_path)
    verifier = get_verifier(config.data.task) if config.data.task else None

    train_examples = load_examples(config.data.train)
    eval_examples = load_examples(config.data.eval)[: config.data.eval_size] if config.data.eval else []
    if method.needs_completions() and any(e.completion is None for e in train_examples):
        raise OPDError(f"method {method.name!r} with lmbda < 1 trains on dataset completions, but {config.data.train!r} "
                       "has records without one: add a 'completion' field (or a final assistant message), or set lmbda: 1.0")
    student = load_model(student_path, device)
    teacher = build_teacher(config.teacher, tokenizer, student.config, device, amp_dtype)
    context = min(context_length(student), context_length(teacher.model))
    eval_length = config.eval.max_completion_length or config.rollout.max_completion_length
    validate_lengths(tokenizer, train_examples, config.rollout.max_completion_length, context, config.data.train)
    if eval_examples:
        validate_lengths(tokenizer, eval_examples, eval_length, context, config.data.eval)

    evaluator = Evaluator(teacher.model, tokenizer, eval_examples, verifier, eval_length, config.eval.batch_size,
                          config.seed, amp_dtype)
    run_dir = Path(config.output_dir)
    return Run(config, student, teacher, tokenizer, method,
               PromptSampler(train_examples, config.seed), evaluator, device, amp_dtype, run_dir)


def lr_lambda(config: Config):
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    optim = config.optim

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def collect(run: Run, rng: random.Random) -> Rollouts:
    """One micro-batch of states from the source the method asks for."""
    cfg = run.config.rollout
    examples = run.prompts.next_batch(cfg.batch_size)
    source = run.method.state_source(rng)
    if source == "dataset":
        return from_dataset(run.tokenizer, examples, cfg.max_completion_length)
    model = run.student if source == "student" else run.teacher.model
    with autocast(run.device, run.amp_dtype):
        return sample(model, run.tokenizer, examples, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature, top_p=cfg.top_p, source=source)


def save_checkpoint(run: Run, step: int, metrics: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` through a temporary folder and a rename; keep the newest ``keep``."""
    final = run.run_dir / f"checkpoint-{step}"
    tmp = run.run_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    run.student.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    checkpoints = sorted(run.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[: -run.config.checkpoint.keep]:
        shutil.rmtree(old)
    return final


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step(run: Run, optimizer, scheduler, rng: random.Random) -> dict:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its log record."""
    timings = {"rollout": 0.0, "teacher": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    start = time.perf_counter()
    batches = [collect(run, rng) for _ in range(run.config.optim.gradient_accumulation_steps)]
    timings["rollout"] = time.perf_counter() - start

    start = time.perf_counter()
    signals = [run.teacher.score(b, run.method.teacher_support, run.method.top_k) for b in batches]
    timings["teacher"] = time.perf_counter() - start

    start = time.perf_counter()
    total_tokens = max(1, sum(b.num_tokens for b in batches))  # token mean over the whole step
    run.student.train()
    sums: dict[str, float] = {"loss": 0.0, "entropy": 0.0}
    for batch, signal in zip(batches, signals):
        with autocast(run.device, run.amp_dtype):
            logits = batch.completion_logits(run.student)
        token_loss = run.method.token_loss(logits, batch, signal)
        loss = token_sum(token_loss.loss, batch.completion_mask) / total_tokens
        loss.backward()
        sums["loss"] += float(loss.detach())
        with torch.no_grad():
            sums["entropy"] += float(token_sum(entropy(logits.float().log_softmax(-1)), batch.completion_mask)) / total_tokens
            for name, values in token_loss.stats.items():
                sums[name] = sums.get(name, 0.0) + float(token_sum(values, batch.completion_mask)) / total_tokens
    timings["forward_backward"] = time.perf_counter() - start

    start = time.perf_counter()
    max_norm = run.config.optim.max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), max_norm if max_norm else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    timings["optimizer"] = time.perf_counter() - start

    seconds = sum(timings.values())
    lengths = torch.cat([b.lengths() for b in batches])
    return {
        **sums,
        "grad_norm": float(grad_norm),
        "lr": scheduler.get_last_lr()[0],
        "completion_length": float(lengths.mean()),
        "truncation_rate": float(torch.cat([b.truncated for b in batches]).float().mean()),
        "tokens_per_s": total_tokens / seconds,
        "peak_memory_mib": peak_memory_mib(run.device),
        "sources": sorted({b.source for b in batches}),
        **{f"time_{k}": v for k, v in timings.items()},
    }


def _write_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _describe(record: dict) -> str:
    parts = [f"loss {record['loss']:+.3f}"]
    if "advantage" in record:
        parts.append(f"adv {record['advantage']:+.3f}")
    if "reverse_kl" in record:
        parts.append(f"rkl {record['reverse_kl']:.3f}")
    parts += [f"H {record['entropy']:.2f}", f"len {record['completion_length']:.1f}", f"{record['tokens_per_s']:.0f} tok/s"]
    return "  ".join(parts)


def train(run: Run, console: Console | None = None) -> dict:
    """Measure, train ``optim.steps`` steps, measure again; return ``{"before", "after", "teacher", ...}``."""
    config, console = run.config, console or Console()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run.run_dir / "config.yaml")
    metrics_path = run.run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)

    optimizer = torch.optim.AdamW(run.student.parameters(), lr=config.optim.learning_rate,
                                  betas=config.optim.adam_betas, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

    started = time.perf_counter()
    before = run.evaluator(run.student) if run.evaluator.examples else {}
    teacher = run.evaluator.teacher_metrics() if run.evaluator.examples else {}
    _write_jsonl(metrics_path, {"step": 0, "eval": before, "teacher": teacher})

    columns = [TextColumn(f"[bold]{run.method.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=config.optim.steps)
        for step in range(1, config.optim.steps + 1):
            record = {"step": step, **train_step(run, optimizer, scheduler, rng)}
            if not math.isfinite(record["loss"]):
                raise OPDError(f"step {step}: loss is {record['loss']}; lower optim.learning_rate or check the teacher's log-probs")
            if config.eval.every and step % config.eval.every == 0 and step < config.optim.steps and run.evaluator.examples:
                record["eval"] = run.evaluator(run.student)
            run.history.append(record)
            _write_jsonl(metrics_path, record)
            progress.update(task, advance=1, description=_describe(record))
            if not console.is_terminal and (step % max(1, config.optim.steps // 10) == 0 or step == 1):
                console.print(f"{run.method.name} step {step}/{config.optim.steps}  {_describe(record)}")
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < config.optim.steps:
                save_checkpoint(run, step)

    after = run.evaluator(run.student) if run.evaluator.examples else {}
    wall = time.perf_counter() - started
    _write_jsonl(metrics_path, {"step": config.optim.steps, "eval": after, "wall_s": wall})
    checkpoint = save_checkpoint(run, config.optim.steps, after)
    return {"before": before, "after": after, "teacher": teacher, "wall_s": wall, "checkpoint": str(checkpoint),
            "method": run.method.name, "steps": config.optim.steps}
