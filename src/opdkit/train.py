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
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from . import checkpoint, detectors, version
from .allocator import keep_freed_memory, use_tensor_heap
from .attention import float32_training_attention
from .config import Config, dump_config
from .console import RunView
from .data import PromptSampler, load_examples, read_jsonl, validate_lengths
from .decode import lockstep
from .diagnostics import position_edges, step_diagnostics, student_token_logprobs, token_signals
from .distributed import Processes
from .errors import Interrupted, OPDError
from .evaluate import Evaluator
from .faults import StopSignals, diagnose, save_batch
from .lean_layers import keep_fewer_activations
from .lora import adapter_folder, require_peft
from .methods import Method, build_method
from .models import (autocast, context_length, enable_gradient_checkpointing, load_model,
                     load_student, load_tokenizer, machine_description, pick_device, resolve_precision, set_threads)
from .objectives import credit, gates, groups
from .objectives.divergence import entropy
from .objectives.reduce import aggregation_weights, token_sum
from .optimizer import AdamW, allocate_state
from .products import float32_arithmetic, other_layers
from .rollout import Rollouts, from_dataset, grouped, sample
from .served_rollout import ServedStudent
from .tasks import get_verifier
from .teachers import Teacher, build_teachers, teacher_request
from .teachers.context import TeacherContext
from .teachers.multi import check_routing, teacher_metrics
from .teachers.stored import StoredTeacher, open_signals
from .token_table import TOP_K, TokenStats, prompt_texts, records, token_stats
from .trackers import Trackers


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
    processes: Processes = field(default_factory=Processes)
    trained: torch.nn.Module | None = None  # what the loss pass runs through: DDP's wrapper, else the student
    reference: torch.nn.Module | None = None
    served: ServedStudent | None = None  # rollout.engine: server; None: the student samples here
    history: list[dict] = field(default_factory=list)
    guidance_answers: dict[str, list[int]] = field(default_factory=dict)  # the teacher's greedy answer per prompt
    guidance_tokens: float = 0.0  # tokens the teacher decoded for those answers since the last step's record


@dataclass
class Data:
    """The prompts of a run, checked against the student's tokenizer and both models' context."""

    tokenizer: object
    train: list
    eval: list
    verifier: object | None
    eval_length: int  # new tokens per held-out completion


def check_data(config: Config, student_path: str | None = None) -> Data:
    """Read and check the data against the tokenizer and the models' configs, without loading any weights: what
    ``setup`` does first, and what ``opd sweep`` does for every run before the first one trains."""
    method = build_method(config.objective)
    if config.student.lora is not None:
        require_peft()
    student_path = student_path or config.student.path
    # a LoRA checkpoint holds the adapter alone: tokenizer and context are its base model's
    weights = config.student.path if config.student.lora and adapter_folder(student_path) else student_path
    tokenizer = load_tokenizer(weights)
    if not config.data.chat_template:
        tokenizer.chat_template = None  # prompts are their raw text (data.render_prompt), for base models
    verifier = get_verifier(config.data.task) if config.data.task else None
    train_examples = load_examples(config.data.train)
    eval_examples = load_examples(config.data.eval)[: config.data.eval_size] if config.data.eval else []
    if method.needs_completions() and any(e.completion is None for e in train_examples):
        raise OPDError(f"method {method.name!r} trains on dataset completions (lmbda < 1, or prefix_guidance.answer: "
                       f"dataset), but {config.data.train!r} has records without one: add a 'completion' field (or a "
                       "final assistant message), or set lmbda: 1.0 and prefix_guidance.answer: teacher")
    context = min([context_length(weights)] + [context_length(spec.path) for spec in config.teacher_specs()
                                                     if spec.kind == "local"])
    eval_length = config.eval.max_completion_length or config.rollout.max_completion_length
    budget = config.rollout.max_completion_length
    # a guidance prefix (at most one answer, which is at most max_completion_length) goes before the budget
    prefix = budget if config.objective.prefix_guidance.enabled else 0
    bridge = config.objective.near_future.window if config.objective.teacher_bridge else 0
    validate_lengths(tokenizer, train_examples, budget, context, config.data.train, prefix, bridge)
    if eval_examples:
        validate_lengths(tokenizer, eval_examples, eval_length, context, config.data.eval)
    for spec in config.teacher_specs():
        if getattr(spec, "prompt", None) is not None:  # the teacher's own view: its columns, and its length
            teacher_view = TeacherContext(spec.prompt, tokenizer)
            for examples, name, length in ((train_examples, config.data.train, budget + prefix),
                                           (eval_examples, config.data.eval, eval_length)):
                teacher_view.check(examples, name)
                validate_lengths(tokenizer, teacher_view.examples(examples), length, context,
                                 f"{name} (the teacher's view)")
    check_routing(config, train_examples, config.data.train)  # several teachers: each record names one
    check_routing(config, eval_examples, config.data.eval)
    return Data(tokenizer, train_examples, eval_examples, verifier, eval_length)


def setup(config: Config, student_path: str | None = None) -> Run:
    """Load models and data and check that they fit together; raise OPDError before any training."""
    set_threads(config.threads)
    keep_freed_memory()
    torch.manual_seed(config.seed)
    processes = Processes.start(config.distributed.strategy)
    if processes.strategy == "fsdp" and (reason := config.cannot_shard()):  # FSDP from the accelerate config
        raise OPDError(f"the accelerate config enables FSDP: {reason}, or FSDP off in the accelerate config")
    device = processes.device() if processes.several else pick_device()
    amp_dtype = resolve_precision(config.precision, device)
    float32_student = config.student.dtype == "bf16" and amp_dtype == torch.float32  # float32 arithmetic, bf16 weights
    if float32_student and config.student.lora is not None:  # precision auto, on a machine without bf16
        raise OPDError(f"student.dtype bf16 with student.lora computes in bf16, but precision {config.precision!r} "
                       f"is float32 on this {device.type} ({machine_description(amp_dtype)}): set precision: bf16 to "
                       "compute in bf16 anyway (emulated, slower here), or student.dtype: fp32")
    method = build_method(config.objective)
    data = check_data(config, student_path)
    store = (open_signals(config, method, data.tokenizer, data.train, amp_dtype)  # checked before any weights load
             if config.data.teacher_signals else None)

    student_path = student_path or config.student.path
    student = load_student(config.student, student_path, device)
    if float32_student and (others := other_layers(student)):
        raise OPDError(f"student.dtype bf16 in a float32 run computes in float32 on the bf16 weights of nn.Linear and "
                       f"nn.Embedding layers, and this student also has {', '.join(others)}: set precision: bf16 "
                       "(bf16 arithmetic, emulated where the processor has no bf16 units), or student.dtype: fp32")
    if float32_student:
        float32_arithmetic(student)
    # the same values and gradients, fewer activations kept for backward; the embedding's rows added into its
    # gradient where no other process's reduction hooks on it
    keep_fewer_activations(student, rows_into_grad=not processes.several)
    float32_training_attention(student, device)  # where torch's bf16 attention backward is slow (AVX512-BF16)
    if config.optim.gradient_checkpointing:
        enable_gradient_checkpointing(student, config.student.disable_dropout)
    method.attach(student)
    # a frozen copy of the initial student for the KL-to-reference regularizer, in bf16 where the run is
    # (with LoRA: the base weights, as loaded before the adapter)
    reference = (load_model(config.student.path if config.student.lora else student_path, device, amp_dtype)
                 .requires_grad_(False) if config.objective.ref_kl_coef else None)
    teacher = build_teachers(config, data.tokenizer, student.config, device, amp_dtype,
                             method.top_k if method.teacher_support == "topk" else 1, student=student)
    forks = config.objective.reward == "teacher"  # chunk_opd cuts the student's text; seqkd asks whole answers
    for each in getattr(teacher, "teachers", {None: teacher}).values():  # text-only ones: do they read our cuts?
        if forks and hasattr(each, "check_prefixes"):
            each.check_prefixes(data.train, config.rollout.max_completion_length)
    if store is not None:
        teacher = StoredTeacher(teacher, store, data.tokenizer, device)
    evaluator = Evaluator(teacher, data.tokenizer, data.eval, data.verifier, data.eval_length, config.eval.batch_size,
                          config.seed, amp_dtype, config.logging.samples)
    run_dir = Path(config.output_dir)
    served = (ServedStudent(config.rollout.server, data.tokenizer, student,
                            config.rollout.server.adapter_dir or run_dir / "served-adapter", processes)
              if config.rollout.engine == "server" else None)
    trained = processes.wrap(student)  # last: a self teacher copies the student whole first
    return Run(config, student, teacher, data.tokenizer, method, PromptSampler(data.train, config.seed), evaluator,
               device, amp_dtype, run_dir, processes, trained, reference, served)


def trainable_parameters(run: Run) -> list[torch.nn.Parameter]:
    """The student's trainable parameters (with LoRA, the adapter's alone) and any the method owns (a value head)."""
    return student_parameters(run) + run.method.parameters()


def student_parameters(run: Run) -> list[torch.nn.Parameter]:
    """The student's trainable parameters (with LoRA, the adapter's alone)."""
    return [p for p in run.student.parameters() if p.requires_grad]


def optimizer_groups(run: Run) -> list[dict]:
    """The optimizer's parameter groups: the student's (``processes.param_groups``), then the method's own (a value
    head) at its own peak learning rate, both on the run's schedule."""
    groups = run.processes.param_groups(student_parameters(run))
    if own := run.method.parameters():
        groups.append({"params": own, "lr": run.method.own_learning_rate or run.config.optim.learning_rate})
    return groups


def lr_lambda(config: Config):
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    optim = config.optim

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_and_schedule(run: Run):
    """The run's AdamW over ``optimizer_groups`` and its learning-rate schedule (``lr_lambda``). float32 weights:
    torch's fused AdamW, one kernel over all parameters, measured here twice as fast as foreach, without its
    temporaries; bf16 weights (``student.dtype``) or 8-bit moments (``optim.moments``): ``opdkit.optimizer.AdamW``,
    the same arithmetic with stochastic rounding. Tensors made after these (the steps') come from the tensor heap
    (``allocator``)."""
    optim = run.config.optim
    if run.config.student.dtype == "bf16" or optim.moments == "8bit":
        optimizer = AdamW(optimizer_groups(run), lr=optim.learning_rate, betas=optim.adam_betas,
                          weight_decay=optim.weight_decay, seed=run.config.seed, moments=optim.moments)
    else:
        optimizer = torch.optim.AdamW(optimizer_groups(run), lr=optim.learning_rate, fused=True,
                                      betas=optim.adam_betas, weight_decay=optim.weight_decay)
    allocate_state(optimizer)  # before any step's temporaries
    use_tensor_heap(run.config.allocator, run.device)  # what steps make, apart from what lasts
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.config))


def collect(run: Run, rng: random.Random, step: int) -> Rollouts:
    """One micro-batch of states from the source the method asks for. The student draws ``rollout.num_samples``
    completions per prompt (adjacent rows, ``Rollouts.group``); teacher and dataset states are one per prompt (a
    stored teacher sample or a dataset completion would only repeat)."""
    cfg, processes = run.config.rollout, run.processes
    # every process draws the global batch alike and keeps its share (rollout.batch_size prompts)
    examples = processes.share(run.prompts.next_batch(cfg.batch_size * processes.world))
    source = run.method.state_source(rng)
    if source == "dataset":
        return from_dataset(run.tokenizer, examples, cfg.max_completion_length)
    if source == "teacher":
        return run.teacher.sample(examples, cfg.max_completion_length, cfg.temperature, cfg.top_p)
    group = None
    if cfg.num_samples > 1:
        examples, group = grouped(examples, cfg.num_samples)
    guidance = run.config.objective.prefix_guidance
    prefixes = teacher_prefixes(run, examples, step) if guidance.enabled else None
    if run.served is not None:
        rollouts = run.served.sample(examples, cfg.max_completion_length, cfg.temperature, cfg.top_p, prefixes)
    else:
        rows = (processes.rank * len(examples), processes.world * len(examples))  # drawn as one process would
        with autocast(run.device, run.amp_dtype):
            rollouts = sample(run.student, run.tokenizer, examples, max_completion_length=cfg.max_completion_length,
                              temperature=cfg.temperature, top_p=cfg.top_p, prefixes=prefixes, rows=rows)
    rollouts.group = None if group is None else group.to(rollouts.completion_ids.device)
    return rollouts


def teacher_prefixes(run: Run, examples, step: int) -> list[list[int]]:
    """TrOPD guidance: the first ``floor(alpha(t) * len)`` tokens of each prompt's answer (its end token
    excluded), ``alpha(t)`` annealed from 1 to 0 over ``anneal_steps`` (``gates.guidance_fraction``)."""
    guidance = run.config.objective.prefix_guidance
    fraction = gates.guidance_fraction(step, guidance.anneal_steps or run.config.optim.steps)
    if fraction * run.config.rollout.max_completion_length < 1:  # every prefix is empty: no answer to ask for
        return [[] for _ in examples]
    return [answer[: int(fraction * len(answer))] for answer in guidance_answers(run, examples)]


def guidance_answers(run: Run, examples) -> list[list[int]]:
    """Each prompt's answer token ids without the end token: the teacher's greedy answer (deterministic, so
    asked once per prompt and kept in ``run.guidance_answers``), or with ``answer: dataset`` the completion."""
    length, eos = run.config.rollout.max_completion_length, run.tokenizer.eos_token_id

    def ids(rollouts: Rollouts) -> list[list[int]]:
        return [[t for t, m in zip(row, mask) if m and t != eos]
                for row, mask in zip(rollouts.completion_ids.tolist(), rollouts.completion_mask.tolist())]

    if run.config.objective.prefix_guidance.answer == "dataset":
        return ids(from_dataset(run.tokenizer, examples, length))
    keys = [json.dumps(e.messages, sort_keys=True) for e in examples]
    missing = {k: e for k, e in zip(keys, examples) if k not in run.guidance_answers}
    if missing:
        answers = run.teacher.sample(list(missing.values()), length, temperature=0.0)
        run.guidance_answers.update(zip(missing, ids(answers)))
        run.guidance_tokens += float(answers.completion_mask.sum())
    return [run.guidance_answers[k] for k in keys]


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def student_forward(run: Run, batch: Rollouts, model: torch.nn.Module) -> tuple[torch.Tensor | None,
                                                                              torch.Tensor | None]:
    """``(logits, hidden)`` of the completion positions, as much of each as the method asks for, through ``model``
    (``run.trained`` for the loss pass, whose backward DDP reduces; else ``run.student``)."""
    needs_hidden, hidden_only = run.method.needs_hidden, run.method.hidden_only
    with autocast(run.device, run.amp_dtype):
        out = batch.completion_logits(model, return_hidden=needs_hidden or hidden_only, logits=not hidden_only)
    return out if needs_hidden or hidden_only else (out, None)


def step_advantage_moments(run: Run, batches: list[Rollouts], signals) -> tuple[float, float]:
    """``credit.normalize`` over the whole step: every micro-batch's advantages first, without gradient, so that
    accumulation does not change the loss. The RNG is forked so the gates draw the same uniforms again after."""
    pairs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for batch, signal in zip(batches, signals):
            logits, hidden = student_forward(run, batch, run.student)
            pairs.append((run.method.token_loss(logits, batch, signal, hidden=hidden).stats["advantage"], batch.own_mask))
    return credit.step_moments(pairs, run.processes.sum)


def train_step(run: Run, optimizer, scheduler, rng: random.Random, keep_tokens: bool = False) -> dict:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its log record, with
    ``keep_tokens`` also the token table of the student's rollouts under ``"tokens"`` (``token_table.records``)."""
    timings = {"rollout": 0.0, "teacher": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "diagnostics": 0.0}
    start = time.perf_counter()
    step = scheduler.last_epoch  # optimizer steps completed so far
    batches = [collect(run, rng, step) for _ in range(run.config.optim.gradient_accumulation_steps)]
    timings["rollout"] = time.perf_counter() - start

    start = time.perf_counter()
    method = run.method
    support, top_k, teacher_entropy = teacher_request(run.config, method)
    signals = [run.teacher.score(b, support, top_k, entropy=teacher_entropy) for b in batches]
    for batch, signal in zip(batches, signals):  # near-future bridges: the teacher continues from chosen student states
        method.guide(batch, signal, run.teacher)
    processes = run.processes
    usage_keys = set().union(*(s.usage for s in signals))  # teacher calls and tokens (remote teachers)
    teacher_usage = processes.sum({f"teacher_{k}": sum(s.usage.get(k, 0.0) for s in signals)
                                   for k in sorted(usage_keys)})
    if run.config.objective.prefix_guidance.enabled and run.config.objective.prefix_guidance.answer == "teacher":
        teacher_usage |= processes.sum({"teacher_guidance_tokens": run.guidance_tokens})  # decoded by collect
        run.guidance_tokens = 0.0
    if run.reference is not None:
        with torch.no_grad(), autocast(run.device, run.amp_dtype):
            for b in batches:
                b.reference_logprobs = b.token_logprobs(run.reference)
    timings["teacher"] = time.perf_counter() - start

    start = time.perf_counter()
    # token mean (or sequence mean) over the whole step of every process, so that neither accumulation nor the
    # number of processes changes the loss; each process's loss is scaled by their number, which DDP's and FSDP's
    # gradient averaging divides out
    weights = [aggregation_weights(b.completion_mask, run.config.objective.aggregation) for b in batches]
    counts = processes.sum({"tokens": sum(b.num_tokens for b in batches),
                            "weight": float(sum(w.sum() for w in weights))})
    total_tokens, normalizer = max(1.0, counts["tokens"]), max(1e-8, counts["weight"])
    # sampling ran without dropout; the loss pass does too unless the config keeps it (student.disable_dropout);
    # gradient checkpointing needs train mode, its dropouts zeroed at setup when disabled
    run.student.train(not run.config.student.disable_dropout or run.config.optim.gradient_checkpointing)
    if method.normalizes_advantages and (len(batches) > 1 or processes.several):
        method.advantage_moments = step_advantage_moments(run, batches, signals)
    sums: dict[str, float] = {"loss": 0.0}
    cfg = run.config
    exact_sampler = cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0 and cfg.student.disable_dropout
    parts, tables = [], []  # per-token diagnostics of each micro-batch (diagnostics.token_signals, token_table)
    by_teacher = []  # several teachers: (batch, signal, student token log-probs) for teacher_metrics
    for index, (batch, signal, weight) in enumerate(zip(batches, signals, weights)):
        with processes.no_sync(run.trained, last=index == len(batches) - 1):
            logits, hidden = student_forward(run, batch, run.trained)
            token_loss = method.token_loss(logits, batch, signal, hidden=hidden)
            loss = (token_loss.loss * weight).sum() / normalizer
            total = loss
            if token_loss.value_loss is not None:  # trains the method's value head alone (detached inputs)
                value_loss = (token_loss.value_loss * weight).sum() / normalizer
                total = loss + value_loss
                sums["value_loss"] = sums.get("value_loss", 0.0) + float(value_loss.detach())
            (total * processes.world).backward()
        sums["loss"] += float(loss.detach())
        share = batch.num_tokens / total_tokens
        with torch.no_grad():
            if "student_entropy" not in token_loss.stats and logits is not None:
                token_loss.stats["student_entropy"] = entropy(logits.float().log_softmax(-1))
            for name, values in token_loss.stats.items():
                sums[name] = sums.get(name, 0.0) + float(token_sum(values, batch.completion_mask)) / total_tokens
            student_token = (token_loss.token_logprobs if token_loss.token_logprobs is not None
                             else student_token_logprobs(batch, logits, exact_sampler))
            if signal.by_teacher is not None:
                by_teacher.append((batch, signal, student_token))
            if run.teacher.returns_logprobs and batch.source == "student":
                parts.append(token_signals(batch, signal, token_loss.loss, logits, student_token,
                                           token_loss.stats.get("student_entropy")))
                if keep_tokens and student_token is not None:
                    student = None if logits is None else logits.float().log_softmax(-1)
                    tables.append((token_stats(batch, student, student_token, signal, token_loss.loss,
                                               cfg.diagnostics.top_k or TOP_K), prompt_texts(batch, run.tokenizer)))
            for name, value in token_loss.scalars.items():
                sums[name] = sums.get(name, 0.0) + value * share
    method.advantage_moments = None
    for signal in signals:  # a local teacher's statistics the loss did not take, while its weights are the step's
        signal.complete()
    processes.average_gradients(method.parameters())
    sums = processes.sum(sums)
    timings["forward_backward"] = time.perf_counter() - start

    start = time.perf_counter()
    max_norm = run.config.optim.max_grad_norm or float("inf")
    # the student's gradient and the method's own (a value head) are clipped apart: the head's loss cannot shrink
    # the student's step
    grad_norm = processes.clip_grad_norm(student_parameters(run), max_norm)
    own_parameters = method.parameters()
    own = {"value_grad_norm": processes.clip_grad_norm(own_parameters, max_norm)} if own_parameters else {}
    finite = (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
              and all(math.isfinite(v) for v in [*own.values(), sums.get("value_loss", 0.0)]))
    if finite:  # a non-finite step leaves the weights alone; the loop counts it
        optimizer.step()
        if run.served is not None:  # the served student follows the trained one
            run.served.sync()
        if (after_step := getattr(run.teacher, "after_step", None)) is not None:  # a self-teacher's EMA
            after_step(run.student)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    timings["optimizer"] = time.perf_counter() - start

    start = time.perf_counter()
    parts, tables = processes.concat(parts), processes.concat(tables)  # every process's rows, on every process
    edges = position_edges(cfg.rollout.max_completion_length, cfg.diagnostics.position_buckets)
    diagnostics = step_diagnostics(parts, edges, cfg.diagnostics.ngram) if parts else {}
    if tables:  # the high-loss and low-divergence flags pooled over the step, as for the near-future share
        diagnostics["tokens"] = records(TokenStats.cat([t for t, _ in tables]), [p for _, ps in tables for p in ps],
                                        run.tokenizer, cfg.diagnostics.high_loss_fraction)
    timings["diagnostics"] = time.perf_counter() - start

    seconds = sum(timings.values())
    rollouts = processes.sum({"rows": sum(len(b.truncated) for b in batches),
                              "truncated": sum(float(b.truncated.sum()) for b in batches)})
    skipped = {}
    if not finite:
        # under FSDP the student's forward is a collective, which this process's own checks must not start
        reason = diagnose(run.student if processes.strategy != "fsdp" else None, batches, signals, sums["loss"], grad_norm)
        dump = run.run_dir / "nonfinite" / f"step-{step + 1}.pt"
        if processes.main:
            save_batch(dump, batches, signals, reason, run.tokenizer)
        skipped = {"nonfinite": reason, "nonfinite_batch": str(dump)}
    return {
        **sums,
        **diagnostics,
        **skipped,
        **teacher_usage,
        **(teacher_metrics(by_teacher, total_tokens, processes.sum) if by_teacher else {}),
        "grad_norm": grad_norm,
        **own,
        "lr": scheduler.get_last_lr()[0],
        "completion_length": total_tokens / rollouts["rows"],
        "truncation_rate": rollouts["truncated"] / rollouts["rows"],
        **group_spread(batches, processes.sum),
        "tokens_per_s": total_tokens / seconds,
        "peak_memory_mib": peak_memory_mib(run.device),
        "sources": sorted({b.source for b in batches}),
        **{f"time_{k}": v for k, v in timings.items()},
    }


def group_spread(batches: list[Rollouts], reduce=lambda sums: sums) -> dict:
    """``group_length_std``: the mean over the step's prompts of the spread of their samples' lengths (with
    ``rollout.num_samples > 1``; the spread of their returns, ``group_return_std``, comes from the method);
    ``reduce`` sums over processes."""
    grouped_batches = [b for b in batches if b.group is not None]
    if not grouped_batches:
        return {}
    prompts = [int(b.group.unique().numel()) for b in grouped_batches]
    spreads = [groups.spread(b.lengths(), b.group) for b in grouped_batches]
    sums = reduce({"spread": sum(s * n for s, n in zip(spreads, prompts)), "prompts": sum(prompts)})
    return {"group_length_std": sums["spread"] / sums["prompts"]}


def _write_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _keep_until(path: Path, step: int) -> None:
    """On resume: drop the records of ``samples.jsonl`` or ``tokens.jsonl`` written after the checkpoint's step."""
    if path.is_file():
        records = read_jsonl(path, "the file is damaged: delete it (it is rewritten from the next kept step on)")
        checkpoint.write_log(path, [r for r in records if r["step"] <= step])


def train(run: Run, console: Console | None = None, resume: bool = False) -> dict:
    """``train_loop`` (below), its decoding in lockstep with the other processes where there are several: a sharded
    student's forward is a collective they all join, and every process draws the uniforms of the whole global batch
    at each decoding step, which keeps its generator where one process holding that batch would have it."""
    if not run.processes.several:
        return train_loop(run, console, resume)
    with lockstep(run.processes.all_true):
        return train_loop(run, console, resume)


def train_loop(run: Run, console: Console | None = None, resume: bool = False) -> dict:
    """Measure, train ``optim.steps`` steps, measure again; return ``{"before", "after", "teacher", ...}``.

    ``resume``: continue from the latest checkpoint in the run folder exactly as if never stopped; a finished
    run whose ``optim.steps`` was raised continues to the new horizon. A step with a non-finite loss or
    gradient is skipped; ``optim.max_nonfinite_steps`` in a row stop the run with an OPDError. SIGINT or
    SIGTERM save a checkpoint after the current step and raise ``Interrupted``.
    """
    processes = run.processes
    config, view = run.config, RunView(console if processes.main and console else Console(quiet=not processes.main), run)
    steps, save_every = config.optim.steps, config.checkpoint.save_every(config.optim.steps)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, samples_path = run.run_dir / "metrics.jsonl", run.run_dir / "samples.jsonl"
    tokens_path = run.run_dir / "tokens.jsonl"
    write = _write_jsonl if processes.main else lambda path, record: None  # one process writes the run's files
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer, scheduler = optimizer_and_schedule(run)

    if resume:
        loop = checkpoint.restore(run, optimizer, scheduler, rng, checkpoint.latest(run.run_dir))
        for path in (samples_path, tokens_path) if processes.main else ():
            _keep_until(path, loop.step)
    else:
        checkpoint.check_fresh(run.run_dir)
        processes.barrier()  # every process checked the folder before the first writes to it
        for path in (samples_path, tokens_path) if processes.main else ():
            path.unlink(missing_ok=True)
        loop = checkpoint.LoopState()
    started = time.perf_counter() - loop.wall_s
    view.banner(loop.step + 1, save_every)
    if loop.finished:  # a finished run extended by a larger optim.steps
        view.extended(loop.step, scheduler.get_last_lr()[0], config.optim.learning_rate * lr_lambda(config)(loop.step))
        loop.finished = False

    def evaluate(step: int) -> dict:
        measured = run.evaluator(run.student)
        if run.evaluator.last_samples:
            write(samples_path, {"step": step, "samples": run.evaluator.last_samples})
        return measured

    if not resume and run.evaluator.examples:
        loop.before, loop.teacher = evaluate(0), run.evaluator.teacher_metrics()
    if not resume:
        view.before(loop.before, loop.teacher)
    if not resume:
        loop.machine = {"machine": f"{run.device.type}: {machine_description(run.amp_dtype)}", "opdkit": version(),
                        **({"processes": processes.world, "strategy": processes.strategy} if processes.several else {})}
    log = [{"step": 0, "eval": loop.before, "teacher": loop.teacher, **loop.machine}, *run.history]
    if processes.main:
        checkpoint.write_log(metrics_path, log)
        dump_config(config, run.run_dir / "config.yaml")
        if (findings := getattr(run.teacher, "findings", None)) is not None:  # a server or chat teacher's probe
            (run.run_dir / "teacher_probe.json").write_text(json.dumps(findings.as_dict(), indent=2) + "\n")
    trackers = Trackers(config, log, resume, active=processes.main)

    def save(metrics: dict | None = None) -> Path:
        loop.wall_s = time.perf_counter() - started
        saved = checkpoint.save(run, optimizer, scheduler, rng, loop, metrics)
        due = loop.step + save_every - loop.step % save_every if save_every else 0
        view.saved(saved, due if loop.step < due < steps else None)
        return saved

    with trackers, StopSignals(lambda: view.interrupt(loop.step + 1)) as stop:
        with view.live(loop.step):
            for step in range(loop.step + 1, steps + 1):
                evaluates = config.eval.every and step % config.eval.every == 0 and step < steps and run.evaluator.examples
                keep_tokens = step in (1, steps) or evaluates  # tokens.jsonl: the first and last steps, and each evaluation's
                record = {"step": step, **train_step(run, optimizer, scheduler, rng, keep_tokens)}
                if "tokens" in record:
                    write(tokens_path, {"step": step, "high_loss_fraction": config.diagnostics.high_loss_fraction,
                                               "rollouts": record.pop("tokens")})
                loop.step, loop.train_s = step, loop.train_s + sum(v for k, v in record.items() if k.startswith("time_"))
                loop.nonfinite_streak = loop.nonfinite_streak + 1 if "nonfinite" in record else 0
                if evaluates:
                    record["eval"] = evaluate(step)
                run.history.append(record)
                alerts = detectors.check(run.history, config.diagnostics.detectors, config.rollout.max_completion_length,
                                         loop.before, config.checkpoint.best_metric)
                if alerts:
                    record["alerts"] = [a.as_record() for a in alerts]
                write(metrics_path, record)
                trackers.log(record)
                view.step(record)
                for alert in alerts:
                    view.alert(alert)
                if loop.nonfinite_streak >= config.optim.max_nonfinite_steps:
                    saved = save()
                    raise OPDError(f"{loop.nonfinite_streak} steps in a row had a non-finite loss or gradient (the limit is "
                                   f"optim.max_nonfinite_steps); likely cause: {record['nonfinite']}. Their batches are in "
                                   f"{run.run_dir / 'nonfinite'}; the last good weights are in {saved}: fix the cause, then "
                                   f"opd train --resume {run.run_dir}")
                new_best = "eval" in record and loop.track_best(config.checkpoint.best_metric, record["eval"])
                if "eval" in record:
                    view.evaluation(step, record["eval"], new_best)
                periodic = save_every and step % save_every == 0 and step < steps
                # a signal reaches the processes at different moments: they stop together, at the first that heard it
                stopping = processes.sum({"stop": float(stop.signum is not None)})["stop"] > 0
                if periodic or new_best or stopping:
                    saved = save(record.get("eval"))
                if stopping:
                    raise Interrupted(stop.signum or signal.SIGTERM, step, saved)

        after = evaluate(steps) if run.evaluator.examples else {}  # a stop asked now still saves the last step
        loop.track_best(config.checkpoint.best_metric, after)
        loop.finished = True
        final_checkpoint = save(after)
        final = checkpoint.save_final(run)
        closing = {"step": steps, "eval": after, "final": True, "wall_s": loop.wall_s, "train_s": loop.train_s}
        write(metrics_path, closing)
        trackers.log(closing)
    best = run.run_dir / "best"
    result = {"before": loop.before, "after": after, "teacher": loop.teacher, "wall_s": loop.wall_s,
              "train_s": loop.train_s, "checkpoint": str(final_checkpoint), "final": str(final),
              "best_checkpoint": str(best.resolve()) if best.exists() else None,
              "best": {"metric": config.checkpoint.best_metric, "step": loop.best_step, "value": loop.best_value},
              "method": run.method.name, "steps": steps}
    view.summary(result, run.evaluator.last_samples)
    return result
