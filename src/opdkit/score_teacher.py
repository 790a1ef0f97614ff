"""``opd score-teacher``: the teacher's signal on a training set's off-policy states, scored once into a store
(``teachers.stored``) that ``data.teacher_signals`` then reads instead of running the teacher.

The states are the dataset's completions (``--source dataset``) or one sample of the teacher per prompt
(``--source teacher``, for ``seqkd``), in ``data.train`` order and in batches of ``rollout.batch_size``, scored at
temperature 1 exactly as the training loop would score them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import version
from .config import Config
from .errors import OPDError
from .methods import build_method
from .models import pick_device, resolve_model_path, resolve_precision, set_threads
from .rollout import from_dataset
from .teachers import build_teacher
from .teachers.stored import StoreWriter, expected_manifest, needed_top_k


def score_teacher(config: Config, out: str | Path, source: str | None = None, top_k: int | None = None,
                  force: bool = False, console: Console | None = None) -> dict:
    """Write the store to ``out`` (through ``out.tmp``, renamed when complete) and return its manifest with the
    seconds it took and its size on disk."""
    from transformers import AutoConfig

    from .train import check_data

    if config.teachers is not None:
        raise OPDError("opd score-teacher stores one teacher's signals, and this config names several (teachers:): "
                       "score with teacher: set to one of them")
    started = time.perf_counter()
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise OPDError(f"{out_dir} exists and is not empty: choose another --out, or pass --force to replace it")
    source = source or ("teacher" if config.objective.states == "teacher" else "dataset")
    set_threads(config.threads)
    device = pick_device()
    amp_dtype = resolve_precision(config.precision, device)
    method = build_method(config.objective)
    data = check_data(config)
    if source == "dataset" and any(e.completion is None for e in data.train):
        raise OPDError(f"--source dataset scores the dataset's completions, and {config.data.train!r} has records "
                       "without one: add a 'completion' field, or score the teacher's own samples with --source teacher")
    needed, _ = needed_top_k(config, method)
    k = top_k or needed or 1
    if k < needed:
        raise OPDError(f"--top-k {k} is fewer than the {needed} log-probs per position this config reads (objective "
                       f"top-k, diagnostics.top_k): pass --top-k {needed} or more")
    manifest = expected_manifest(config, data.tokenizer, data.train, amp_dtype, source)  # refuses a chat teacher
    student_config = AutoConfig.from_pretrained(resolve_model_path(config.student.path))
    teacher = build_teacher(config.teacher, data.tokenizer, student_config, device, amp_dtype,
                            config.data.chat_template, k)
    entropy = config.teacher.kind == "local"

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = StoreWriter(tmp, k, entropy)
    rollout, examples = config.rollout, data.train
    torch.manual_seed(config.seed)
    columns = (TextColumn("scoring {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(), transient=True) as progress:
        task = progress.add_task(f"{source} states", total=len(examples))
        for start in range(0, len(examples), rollout.batch_size):
            batch = examples[start : start + rollout.batch_size]
            states = (from_dataset(data.tokenizer, batch, rollout.max_completion_length) if source == "dataset" else
                      teacher.sample(batch, rollout.max_completion_length, rollout.temperature, rollout.top_p))
            writer.add(states, teacher.score(states, "topk", k, entropy=entropy))
            progress.advance(task, len(batch))
    manifest = writer.close({**manifest, "teacher_path": getattr(config.teacher, "path", None),
                             "data_path": config.data.train, "seed": config.seed,
                             "opdkit": version()})
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    tmp.rename(out_dir)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return {**manifest, "seconds": time.perf_counter() - started, "bytes": size, "folder": str(out_dir)}
