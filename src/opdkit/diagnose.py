"""``opd diagnose``: the token-level table of a student against its teacher, on held-out prompts.

Samples one completion per prompt from the student (the config's rollout temperature, top-p and length, its
seed), scores every token with the teacher (a local teacher's full distribution; a server's top-k at
``teacher.top_k``), and writes to the output folder:

- ``tokens.jsonl``: one line ``{"step", "high_loss_fraction", "rollouts": [...]}`` in the run folder's format
  (``opdkit.token_table.records``), so that what reads a run's ``tokens.jsonl`` reads this one;
- ``tokens.csv``: the same, one row per token, for a spreadsheet;
- ``summary.json``: what ``summarize`` returns, printed as a table.

The default output folder is ``<checkpoint>/../diagnose/<checkpoint name>/`` for ``--checkpoint``, else
``<output_dir>/diagnose/untouched/``: beside the run that made the weights, one folder per model looked at.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .config import Config, load_config
from .diagnostics import NEAR_FUTURE_DEFINITION, near_future_share
from .errors import OPDError
from .models import autocast, load_student, pick_device, resolve_precision, set_threads
from .objectives.support import sampled
from .rollout import sample
from .teachers import build_teacher
from .token_table import BEYOND_TOPK, TokenStats, prompt_texts, records, token_stats

TABLE_FRACTION = 0.1  # q of the table's high_loss flags
SHARE_FRACTIONS = (0.05, 0.1, 0.2)  # q of the near-future shares in the summary
SHOWN = 5  # highest-loss tokens shown in context
CSV_COLUMNS = ("rollout", "position", "token", "log_ratio", "divergence", "student_entropy", "teacher_entropy",
               "teacher_rank", "overlap", "high_loss", "low_divergence")


@dataclass
class Scored:
    """The pooled token statistics of every sampled prompt, and what is needed to write them out."""

    stats: TokenStats
    prompts: list[str]
    tokenizer: object
    student: str
    teacher: str


def check_inputs(config: Config, checkpoint: str | None, prompts: int) -> None:
    """Refuse what cannot be diagnosed before any model loads."""
    if prompts < 1:
        raise OPDError(f"--prompts {prompts}: give the number of prompts to sample, at least 1")
    if config.teachers is not None:
        raise OPDError("opd diagnose tabulates one teacher's signal, and this config names several (teachers:): "
                       "diagnose each with teacher: set to it")
    if config.teacher.kind == "chat":
        raise OPDError("teacher.kind chat returns text only, no log-probs, so there is no per-token signal to "
                       "tabulate: diagnose with a local teacher or a server teacher (opd serve-teacher MODEL)")
    if checkpoint is not None:
        folder = Path(checkpoint)
        if not folder.is_dir():
            raise OPDError(f"--checkpoint {checkpoint!r} is not a folder: pass a checkpoint-<step>, best or final "
                           "folder of a run (or any model folder save_pretrained wrote)")
        if not (folder / "config.json").is_file():
            raise OPDError(f"--checkpoint {checkpoint!r} holds no config.json, so it is not a saved model: pass a "
                           "checkpoint-<step>, best or final folder of a run")


def default_out(config: Config, checkpoint: str | None) -> Path:
    """``<checkpoint>/../diagnose/<checkpoint name>`` or ``<output_dir>/diagnose/untouched`` (module docstring)."""
    if checkpoint is None:
        return Path(config.output_dir) / "diagnose" / "untouched"
    folder = Path(checkpoint).absolute()
    return folder.parent / "diagnose" / folder.name


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The training step of a run's checkpoint (``trainer_state.json``), 0 for the untouched student, None for a
    model folder that does not say."""
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


def score_prompts(config: Config, student_path: str, count: int, batch_size: int,
                  console: Console | None = None) -> Scored:
    """Sample one completion from the student for each of the first ``count`` held-out prompts (``data.eval``,
    else ``data.train``), ``batch_size`` at a time, and score every token with the teacher."""
    from .train import check_data

    set_threads(config.threads)
    data = check_data(config, student_path)  # data, tokenizer and lengths, before any weights load
    examples = (data.eval or data.train)[:count]
    device = pick_device()
    amp_dtype = resolve_precision(config.precision, device)
    student = load_student(config.student, student_path, device)
    teacher = build_teacher(config.teacher, data.tokenizer, student.config, device, amp_dtype, config.data.chat_template,
                            student=student)
    local = config.teacher.kind in ("local", "self")
    torch.manual_seed(config.seed)  # after loading, which may draw from the generator: the same samples, any teacher
    parts, prompts = [], []
    rollout = config.rollout
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(), transient=True) as progress:
        task = progress.add_task("scoring", total=len(examples))
        for i in range(0, len(examples), batch_size):
            with autocast(device, amp_dtype):
                rollouts = sample(student, data.tokenizer, examples[i:i + batch_size],
                                  max_completion_length=rollout.max_completion_length, temperature=rollout.temperature,
                                  top_p=rollout.top_p)
            with torch.no_grad():
                with autocast(device, amp_dtype):
                    logits = rollouts.completion_logits(student)
                student_logprobs = logits.float().log_softmax(-1)
                signal = (teacher.score(rollouts, "full", entropy=True) if local
                          else teacher.score(rollouts, "topk", top_k=config.teacher.top_k))
                parts.append(token_stats(rollouts, student_logprobs, sampled(student_logprobs, rollouts.completion_ids),
                                         signal))
            prompts += prompt_texts(rollouts, data.tokenizer)
            progress.advance(task, len(rollouts.examples))
    described = ("the student's own weights" if config.teacher.kind == "self" else config.teacher.path if local
                 else f"{config.teacher.model} at {config.teacher.base_url}")
    return Scored(TokenStats.cat(parts), prompts, data.tokenizer, student_path, f"{config.teacher.kind} {described}")


def _mean(values: torch.Tensor | None, mask: torch.Tensor) -> float | None:
    if values is None or not mask.any():
        return None
    return float(values[mask].float().mean())


def _context(scored: Scored, row: int, position: int, before: int = 8, after: int = 4) -> str:
    """The token at ``position`` of rollout ``row`` in brackets, with a few tokens either side."""
    keep = scored.stats.mask[row].bool()
    ids = scored.stats.ids[row][keep].tolist()
    decode = scored.tokenizer.decode
    start, end = max(0, position - before), min(len(ids), position + 1 + after)
    return (("..." if start else "") + decode(ids[start:position]) + "[" + decode(ids[position:position + 1]) + "]"
            + decode(ids[position + 1:end]) + ("..." if end < len(ids) else ""))


def summarize(scored: Scored) -> dict:
    """The table's headline numbers: signal size and sign, divergence, entropies, where the sampled tokens stand in
    the teacher's ranking, top-k overlap, the near-future share at each q of ``SHARE_FRACTIONS`` with its bootstrap
    interval, and the ``SHOWN`` highest-loss tokens (largest k1) in context."""
    stats = scored.stats
    mask = stats.mask.bool()
    ratio = stats.log_ratio[mask]
    summary: dict = {"student": scored.student, "teacher": scored.teacher, "prompts": len(scored.prompts),
                     "tokens": int(mask.sum()), "high_loss_fraction": TABLE_FRACTION,
                     "divergence_kind": stats.divergence_kind, "top_k": stats.top_k}
    if not mask.any():
        return summary
    summary.update({
        "log_ratio_abs_mean": float(ratio.abs().mean()),
        "log_ratio_abs_p999": float(ratio.abs().quantile(0.999)),
        "signal_mean": float(ratio.mean()),
        "signal_negative_share": float((ratio < 0).float().mean()),
        "divergence_mean": _mean(stats.divergence, mask),
        "student_entropy_mean": _mean(stats.student_entropy, mask),
        "teacher_entropy_mean": _mean(stats.teacher_entropy, mask),
        "overlap_mean": _mean(stats.overlap, mask),
    })
    if stats.teacher_rank is not None:
        rank = stats.teacher_rank[mask]
        known = rank != BEYOND_TOPK
        # rank is known everywhere from a full distribution; from a top-k, only within it
        summary["teacher_rank_mean"] = float(rank[known].float().mean()) if known.any() else None
        summary["outside_teacher_topk_share"] = float((~known | (rank > stats.top_k)).float().mean())
    if stats.divergence is not None:
        shares = [near_future_share(stats.k1, stats.divergence, stats.mask, fraction=q) for q in SHARE_FRACTIONS]
        summary["near_future"] = [{"fraction": s.fraction, "share": s.share, "low": s.low, "high": s.high,
                                   "high_loss_tokens": s.high_loss_tokens} for s in shares]
        summary["near_future_definition"] = NEAR_FUTURE_DEFINITION
    k1 = stats.k1.masked_fill(~mask, float("-inf")).flatten()
    top = k1.topk(min(SHOWN, int(mask.sum()))).indices.tolist()
    width = stats.ids.shape[1]
    summary["highest_loss"] = [{"rollout": i // width, "position": i % width, "k1": float(k1[i]),
                                "context": _context(scored, i // width, i % width)} for i in top]
    return summary


def write(out: Path, scored: Scored, summary: dict, step: int | None) -> None:
    """``tokens.jsonl``, ``tokens.csv`` and ``summary.json`` in ``out`` (replaced if there)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = records(scored.stats, scored.prompts, scored.tokenizer, TABLE_FRACTION)
    with (out / "tokens.jsonl").open("w") as f:
        f.write(json.dumps({"step": step, "high_loss_fraction": TABLE_FRACTION, "rollouts": rows}) + "\n")
    with (out / "tokens.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for index, row in enumerate(rows):
            for t, token in enumerate(row["tokens"]):
                writer.writerow([index, t, token, *(None if row[c] is None else row[c][t] for c in CSV_COLUMNS[3:])])
    (out / "summary.json").write_text(json.dumps({"step": step, **summary}, indent=2) + "\n")


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def show(console: Console, summary: dict, out: Path) -> None:
    """The summary as a table, the near-future shares with their definition, and the highest-loss tokens."""
    table = Table(title=f"{summary['student']} against {summary['teacher']}: {summary['tokens']} tokens of "
                  f"{summary['prompts']} rollouts")
    table.add_column("per token", overflow="fold")
    table.add_column("value", justify="right")
    k, kind = summary["top_k"], summary["divergence_kind"]
    rows = [
        ("mean |log-ratio| (log pi_T - log pi_S)", _fmt(summary.get("log_ratio_abs_mean"))),
        ("p99.9 |log-ratio|", _fmt(summary.get("log_ratio_abs_p999"))),
        ("negative-signal share (teacher likes the token less)", _fmt(summary.get("signal_negative_share"), ".1%")),
        (f"mean KL(pi_S || pi_T) ({'full vocabulary' if kind == 'full' else f'top-{k} + tail'})",
         _fmt(summary.get("divergence_mean"))),
        ("mean student entropy (nats)", _fmt(summary.get("student_entropy_mean"))),
        ("mean teacher entropy (nats)", _fmt(summary.get("teacher_entropy_mean"))),
        ("mean teacher rank of the sampled token" + ("" if kind == "full" else f" (within its top-{k})"),
         _fmt(summary.get("teacher_rank_mean"), ".2f")),
        (f"sampled tokens outside the teacher's top-{k}", _fmt(summary.get("outside_teacher_topk_share"), ".1%")),
        (f"top-{k} overlap |S ∩ T| / k", _fmt(summary.get("overlap_mean"), ".3f")),
    ]
    for share in summary.get("near_future", []):
        rows.append((f"near-future share, q = {share['fraction']:g} ({share['high_loss_tokens']} high-loss tokens)",
                     f"{_fmt(share['share'], '.1%')} [{_fmt(share['low'], '.1%')}, {_fmt(share['high'], '.1%')}]"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    if "near_future_definition" in summary:
        console.print(f"near-future share: {summary['near_future_definition']}", style="dim", highlight=False)
    if summary.get("highest_loss"):
        console.print("highest-loss tokens (k1 = log pi_S - log pi_T), in context:")
        for item in summary["highest_loss"]:
            console.print(f"  k1 {item['k1']:+.3f}  rollout {item['rollout']}, token {item['position']}:  "
                          f"{escape(repr(item['context']))}", highlight=False)
    console.print(f"wrote {out / 'tokens.jsonl'}, tokens.csv and summary.json", highlight=False)


def run_diagnose(config_path: str, overrides: list[str], checkpoint: str | None, prompts: int, out: str | None,
                 console: Console) -> dict:
    """``opd diagnose``: check the inputs, score ``prompts`` held-out prompts, write and show the table; returns
    the summary."""
    config = load_config(config_path, overrides)
    check_inputs(config, checkpoint, prompts)
    folder = Path(out) if out else default_out(config, checkpoint)
    student = checkpoint or config.student.path
    console.print(f"loading {student} and the teacher ...", style="dim", highlight=False)
    scored = score_prompts(config, student, prompts, config.rollout.batch_size, console)
    if len(scored.prompts) < prompts:
        source = "data.eval (at most data.eval_size)" if config.data.eval else "data.train"
        console.print(f"{source} holds {len(scored.prompts)} prompts, fewer than --prompts {prompts}: all were used",
                      style="yellow", highlight=False)
    summary = summarize(scored)
    write(folder, scored, summary, checkpoint_step(checkpoint))
    show(console, summary, folder)
    return summary
