"""``opd report RUN_DIR``: one HTML file that shows what a run did and where it may have gone wrong.

Everything comes from the run folder (``config.yaml``, ``metrics.jsonl``, and where the run wrote them
``tokens.jsonl`` and ``samples.jsonl``); nothing is recomputed and no model is loaded. The page is self-contained:
plots are inline SVG drawn by matplotlib, styles are inline, there is no script and no link outside the file, so
it opens the same on a machine with no network and can be mailed or archived with the run.

Runs written before a diagnostic existed lack its keys and files: each part of the page then says "not logged by
this run" instead of failing, and the reporting checklist (``/work/shared/methods/taxonomy.md`` section 9) marks
what the run cannot know as such, so a reader never takes a missing number for a measured one.
"""

from __future__ import annotations

import html
import io
import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import version
from .config import Config, load_config
from .console import duration, routing_text, teacher_text
from .data import read_jsonl
from .diagnostics import NEAR_FUTURE_DEFINITION
from .errors import OPDError
from .evaluate import METRICS
from .methods import build_method

# The section headings, in page order (tests look for each).
SECTIONS = ("Summary", "Training curves", "Diagnostics", "Rollouts", "Detectors", "Reporting checklist", "Run")

# Per-step diagnostics of the signal r_t = log pi_T(y_t) - log pi_S(y_t) and its context (notes section 8), in the
# order the small multiples show them: key -> (panel title, values are shares in [0, 1]).
SIGNALS = {
    "signal_mean": ("mean signal r_t", False),
    "signal_negative_share": ("share of tokens with r_t < 0", True),
    "signal_skew": ("skew of r_t", False),
    "log_ratio_abs_p999": ("p99.9 of |r_t|", False),
    "entropy_gap": ("entropy gap (teacher - student)", False),
    "topk_overlap": ("top-k overlap (student, teacher)", True),
    "student_topk_mass": ("student mass on teacher top-k", True),
    "teacher_topk_mass": ("teacher mass on its top-k", True),
    "repeated_ngram_share": ("repeated n-gram share", True),
    "ratio_mean": ("importance ratio, mean", False),
    "ratio_max": ("importance ratio, max", False),
    "ratio_clip_share": ("importance ratio, clipped share", True),
}
LOSS_SHARES = ("loss_share_first30", "loss_share_last30")

# Step keys the training curves draw themselves; any other number a step logs (a method's own rates) gets a
# small panel of its own under "other per-step values".
CURVE_KEYS = {"step", "loss", "grad_norm", "lr", "completion_length", "truncation_rate", "tokens_per_s",
              "peak_memory_mib", "student_entropy", "teacher_entropy", "teacher_entropy_topk", *SIGNALS, *LOSS_SHARES}

ABSENT = "not logged by this run"
ROLLOUTS_PER_STEP = 3


class Unknown(str):
    """A checklist fact the run cannot know (or did not measure): shown marked, never as a measured value."""


@dataclass
class ChecklistItem:
    topic: str
    facts: list[str]  # plain strings are known from the config or the logs; ``Unknown`` ones are not


@dataclass
class RunLog:
    """A run folder, read: the resolved config and every log record, split by kind."""

    run_dir: Path
    config: Config
    config_text: str
    before: dict  # held-out metrics before training ({} without data.eval)
    teacher: dict  # the teacher's held-out metrics
    steps: list[dict]  # one record per optimizer step
    final: dict | None  # the closing record; None while the run has not finished
    tokens: list[dict] | None  # tokens.jsonl records; None where the run wrote none
    samples: list[dict]
    start: dict  # the step-0 record: also the machine and the opdkit version that trained the run, where logged

    @property
    def evals(self) -> list[tuple[int, dict]]:
        """Every held-out measurement ``(step, metrics)``, from before training to after."""
        found = [(0, self.before)] if self.before else []
        found += [(r["step"], r["eval"]) for r in self.steps if r.get("eval")]
        if self.final and self.final.get("eval"):
            found.append((self.final["step"], self.final["eval"]))
        return found

    @property
    def alerts(self) -> list[dict]:
        return [{"step": r["step"], **a} for r in self.steps for a in r.get("alerts", ())]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a per-step number, skipping steps that did not log it."""
        pairs = [(r["step"], r[key]) for r in self.steps if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.steps)

    @property
    def teacher_seconds(self) -> list[float]:
        """Per step, the seconds the teacher worked: the rollout stage for SeqKD, whose teacher writes the
        completions, else the teacher stage (scoring the student's)."""
        key = "time_rollout" if self.config.objective.method == "seqkd" else "time_teacher"
        return [r[key] for r in self.steps]


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _read_jsonl(path: Path) -> list[dict]:
    return read_jsonl(path, "the file is damaged: restore it, or delete that line to report on the rest")


def read_run(run_dir: str | Path) -> RunLog:
    """Read a run folder; a folder that is not one is refused with what to do instead."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OPDError(f"{run_dir} is not a folder: pass a run folder (the output_dir of opd train CONFIG)")
    missing = [name for name in ("config.yaml", "metrics.jsonl") if not (run_dir / name).is_file()]
    if missing:
        raise OPDError(f"{run_dir} is not a run folder: it has no {' and no '.join(missing)}. Train first with "
                       "opd train CONFIG (its output_dir is the run folder), or pass that folder")
    config = load_config(run_dir / "config.yaml", run_folder=True)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    start = records[0] if records and records[0].get("step") == 0 and "loss" not in records[0] else {}
    final = next((r for r in records if r.get("final")), None)
    tokens_path, samples_path = run_dir / "tokens.jsonl", run_dir / "samples.jsonl"
    return RunLog(run_dir, config, (run_dir / "config.yaml").read_text(), start.get("eval") or {},
                  start.get("teacher") or {}, [r for r in records if "loss" in r], final,
                  _read_jsonl(tokens_path) if tokens_path.is_file() else None,
                  _read_jsonl(samples_path) if samples_path.is_file() else [], start)


def read_arm(spec: str) -> tuple[str, list[RunLog]]:
    """``"LABEL=GLOB[,GLOB...]"`` (an arm of a comparison, as the bench tables take it) -> the label and the
    finished runs among the folders the globs match, by seed: several globs gather one arm's seeds from wherever
    they ran. The label may hold "=", the globs neither "=" nor ",". Two runs of one seed are an error (a paired
    comparison would not know which to take)."""
    import glob

    label, patterns = spec.rsplit("=", 1)
    folders = [Path(f) for pattern in patterns.split(",") for f in sorted(glob.glob(pattern))
               if (Path(f) / "config.yaml").is_file() and (Path(f) / "metrics.jsonl").is_file()]
    runs = sorted((log for log in map(read_run, dict.fromkeys(folders)) if log.final is not None),
                  key=lambda log: log.config.seed)
    seeds = [log.config.seed for log in runs]
    if repeated := sorted({seed for seed in seeds if seeds.count(seed) > 1}):
        raise OPDError(f"arm {label!r}: several finished runs of seed {repeated[0]} among {patterns!r}: "
                       "narrow the globs to one run per seed")
    return label, runs


# ---- plots --------------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise OPDError("opd report draws its plots with matplotlib, which is not installed: "
                       "pip install 'opdkit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # text as <text> elements: small files, and no glyph definitions whose ids would repeat across the page's SVGs
    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.grid": True,
                         "grid.alpha": 0.3})
    return plt


Draw = Callable[[object], None]  # draws one panel on a matplotlib Axes


def _svg(panels: list[tuple[str, Draw]], columns: int = 3, height: float = 2.6) -> str:
    """Small multiples: one inline ``<svg>`` with a panel per ``(title, draw)``."""
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, height * rows), squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels):
        ax.set_title(title)
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buffer.getvalue()
    return f'<div class="plot">{text[text.index("<svg"):]}</div>'


def _whole_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _lines(series: list[tuple[str, list, list]], alerts: list[dict] = (), percent: bool = False,
           xlabel: str = "step") -> Draw:
    def draw(ax):
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        for alert in alerts:  # when a detector fired
            ax.axvline(alert["step"], color="#b2182b", linestyle="--", linewidth=0.8)
        if percent:
            _percent(ax)
        else:  # values such as 0.99999 as they are, not as an offset above the axis
            ax.ticklabel_format(axis="y", useOffset=False)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel(xlabel)
        _whole_steps(ax)
    return draw


def _absent(what: str) -> str:
    return f'<p class="absent">{html.escape(what)}: {ABSENT}.</p>'


# ---- sections -----------------------------------------------------------------------------------------------

def _format(key: str, value) -> str:
    return "-" if value is None else format(value, METRICS[key][1])


def _teacher_text(config: Config) -> str:
    if config.teacher is None:
        return "; ".join(f"{spec.name}: {teacher_text(spec)}" for spec in config.teachers) + \
            f"; routed {routing_text(config.teacher_routing)}"
    return teacher_text(config.teacher)


def _context_text(same_weights: bool, prompt) -> str:
    """The checklist's line on the teacher's context: its own weights or a separate model, and its own view
    (``teacher.prompt``) or the student's prompt."""
    who = "the student's own weights" if same_weights else "a separate model"
    if prompt is None:
        return f"self-teacher context: none; the teacher is {who} given the same prompt (no privileged context)"
    parts = (["its own system prompt"] if prompt.system is not None else []) + \
        ([f"its own template {prompt.template!r}"] if prompt.template is not None else [])
    return f"teacher context: the teacher is {who}, scoring the student's completions after {' and '.join(parts)}"


def _step_seconds(record: dict) -> float:
    return sum(v for k, v in record.items() if k.startswith("time_"))


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table of cells already escaped (or built from escaped parts); no header row for ``None``."""
    head = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def summary(log: RunLog) -> str:
    config, e = log.config, html.escape
    done = f"{log.final['step']} steps, finished" if log.final else \
        f"{len(log.steps)} of {config.optim.steps} steps logged: the run has not finished (or was stopped)"
    wall = (f"{duration(log.final['wall_s'])} (training steps {duration(log.final['train_s'])})" if log.final
            else f"{duration(sum(map(_step_seconds, log.steps)))} in the logged steps")
    alerts = log.alerts
    facts = [("method", config.objective.method), ("student", config.student.path), ("teacher", _teacher_text(config)),
             ("steps", done), ("wall time", wall),
             ("detectors fired", ", ".join(f"{a['detector']} (step {a['step']})" for a in alerts) or "none")]
    out = _table(None, [[e(k), e(str(v))] for k, v in facts])
    after = log.final.get("eval", {}) if log.final else {}
    keys = [k for k in METRICS if any(m.get(k) is not None for m in (log.before, after, log.teacher))]
    if keys:
        rows = [[e(METRICS[k][0]), _format(k, log.before.get(k)), _format(k, after.get(k)),
                 _format(k, log.teacher.get(k))] for k in keys]
        out += "<h3>Held-out measurements</h3>" + _table(["metric", "before", "after", "teacher"], rows)
    else:
        out += _absent("held-out measurements (data.eval)")
    return out


def training_curves(log: RunLog) -> str:
    if not log.steps:
        return _absent("training steps (metrics.jsonl holds no step record yet)")
    alerts, panels = log.alerts, []
    panels.append(("loss", _lines([("loss", *log.series("loss"))], alerts)))
    kl_keys = [k for k in sorted({k for r in log.steps for k in r}) if "kl" in k and log.series(k)[0]]
    if kl_keys:
        panels.append(("KL measured on training rollouts", _lines([(k, *log.series(k)) for k in kl_keys], alerts)))
    for key in METRICS:
        points = [(s, m[key]) for s, m in log.evals if m.get(key) is not None]
        if points:
            label = METRICS[key][0]
            panels.append((label if label.startswith("held-out") else f"held-out {label}",
                           _lines([(key, [s for s, _ in points], [v for _, v in points])], alerts, "%" in METRICS[key][1])))
    panels.append(("completion length (tokens)", _lines([("length", *log.series("completion_length"))], alerts)))
    panels.append(("truncation rate", _lines([("truncated", *log.series("truncation_rate"))], alerts, percent=True)))
    entropies = [(k, *log.series(k)) for k in ("student_entropy", "teacher_entropy", "teacher_entropy_topk") if log.has(k)]
    if entropies:
        panels.append(("entropy (nats/token)", _lines(entropies, alerts)))
    panels.append(("gradient norm (before clipping)", _lines([("grad norm", *log.series("grad_norm"))], alerts)))
    panels.append(("time per step (s)", _time_split(log)))
    out = _svg(panels)
    if not entropies:
        out += _absent("entropy")
    others = [k for k in sorted({k for r in log.steps for k in r} - CURVE_KEYS)
              if not k.startswith("time_") and "kl" not in k and log.series(k)[0]]
    if others:
        out += "<h3>Other per-step values</h3>" + _svg([(k, _lines([(k, *log.series(k))], alerts)) for k in others], 4, 2.2)
    if alerts:
        out += '<p class="note">Dashed red lines: steps where a detector fired (see Detectors).</p>'
    return out


def _time_split(log: RunLog) -> Draw:
    parts = sorted({k for r in log.steps for k in r if k.startswith("time_")})

    def draw(ax):
        steps = [r["step"] for r in log.steps]
        bottom = [0.0] * len(steps)
        for key in parts:
            values = [r.get(key, 0.0) for r in log.steps]
            ax.bar(steps, values, bottom=bottom, label=key.removeprefix("time_"), width=0.9)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.legend(fontsize=6, ncols=2, loc="lower left")
        ax.set_xlabel("step")
        _whole_steps(ax)
    return draw


def _scatter_panel(record: dict) -> tuple[str, Draw] | None:
    """High-loss tokens against the local divergence at their state, for one kept step; None without divergences."""
    xs, ys, high = [], [], []
    kinds = set()
    for rollout in record.get("rollouts") or []:
        if rollout.get("divergence") is None:
            continue
        kinds.add(rollout.get("divergence_kind") or "unknown")
        for d, r, h in zip(rollout["divergence"], rollout.get("log_ratio") or [], rollout.get("high_loss") or []):
            if d is not None and r is not None:
                xs.append(d)
                ys.append(-r)
                high.append(bool(h))
    if not xs:
        return None
    kind = "/".join(sorted(kinds))
    label = {"full": "exact KL(student || teacher) at the state", "topk": "top-k KL at the state (top-k only)"}.get(
        kind, f"divergence at the state ({kind})")

    def draw(ax):
        ax.scatter([x for x, h in zip(xs, high) if not h], [y for y, h in zip(ys, high) if not h], s=6,
                   color="#999999", alpha=0.5, label="other tokens", rasterized=True)
        ax.scatter([x for x, h in zip(xs, high) if h], [y for y, h in zip(ys, high) if h], s=10,
                   color="#b2182b", label=f"high-loss (top {record.get('high_loss_fraction', 0):.0%} by k1)",
                   rasterized=True)
        ax.set_xlabel(label)
        ax.set_ylabel("k1 = log pi_S(y) - log pi_T(y)")
        ax.legend(fontsize=7)
    return f"step {record['step']}: {len(xs)} tokens", draw


def _near_future_share(record: dict) -> str | None:
    """The share of high-loss tokens in a low-divergence region, where the token table marks both."""
    high = low = 0
    for rollout in record.get("rollouts") or []:
        if rollout.get("low_divergence") is None:
            continue
        for h, lo in zip(rollout.get("high_loss") or [], rollout["low_divergence"]):
            high += bool(h)
            low += bool(h) and bool(lo)
    return f"step {record['step']}: {low / high:.1%} of {high} high-loss tokens" if high else None


def _kept_steps(log: RunLog) -> list[dict]:
    """The first and the last kept step of tokens.jsonl (one when they are the same)."""
    if not log.tokens:
        return []
    return [log.tokens[0]] if len(log.tokens) == 1 else [log.tokens[0], log.tokens[-1]]


def _bucket_labels(edges: list[int], count: int) -> list[str]:
    labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
    if count > len(labels):  # the last bucket is open-ended
        labels.append(f"{edges[-1]}+")
    return labels[:count]


def _by_position(log: RunLog) -> str:
    logged = [r for r in log.steps if isinstance(r.get("by_position"), dict)]
    if not logged:
        return _absent("signal by position (by_position)")
    first, last = logged[0], logged[-1]
    keys = [k for k in first["by_position"] if k not in ("edges", "tokens") and isinstance(first["by_position"][k], list)]

    def panel(key: str) -> Draw:
        def draw(ax):
            for record in ([first, last] if last is not first else [first]):
                values = [_number(v) for v in record["by_position"].get(key) or []]
                labels = _bucket_labels(record["by_position"]["edges"], len(values))
                ax.plot(range(len(values)), values, marker="o", markersize=3, label=f"step {record['step']}")
                ax.set_xticks(range(len(values)), labels, rotation=30, fontsize=7)
            ax.set_xlabel("completion position")
            ax.legend(fontsize=7)
        return draw

    panels = [(key.replace("_", " "), panel(key)) for key in keys]
    if "signal_mean" in keys and len(logged) > 1:
        panels.append(("mean signal r_t by position over steps", _heat_map(logged, "signal_mean")))
    return _svg(panels) if panels else _absent("signal by position (by_position)")


def _heat_map(logged: list[dict], key: str) -> Draw:
    def draw(ax):
        width = max(len(r["by_position"].get(key) or []) for r in logged)
        grid = [[_number(v) for v in (r["by_position"].get(key) or [])] + [math.nan] * width for r in logged]
        grid = [row[:width] for row in grid]
        finite = [abs(v) for row in grid for v in row if not math.isnan(v)] or [1.0]
        scale = max(finite) or 1.0
        image = ax.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="RdBu", vmin=-scale,
                          vmax=scale, extent=(logged[0]["step"] - 0.5, logged[-1]["step"] + 0.5, -0.5, width - 0.5))
        ax.figure.colorbar(image, ax=ax)
        ax.set_yticks(range(width), _bucket_labels(logged[-1]["by_position"]["edges"], width), fontsize=7)
        ax.set_xlabel("step")
        ax.grid(False)
    return draw


def diagnostics(log: RunLog) -> str:
    out = "<h3>High-loss tokens versus divergence at their state</h3>"
    kept = _kept_steps(log)
    panels = [p for p in map(_scatter_panel, kept) if p]
    if log.tokens is None:
        out += _absent("token tables (tokens.jsonl)")
    elif not panels:
        out += ('<p class="absent">The token tables hold no per-position divergence (the teacher gave neither '
                "top-k nor full log-probs).</p>")
    else:
        out += ('<p class="note">Each point is a completion token of a training rollout: its k1 (the per-token '
                "loss of classic OPD) against the divergence between student and teacher at its state. High-loss "
                "tokens at low divergence are the near-future case: the token looks bad, the state does not.</p>")
        out += _svg(panels, 2, 3.4)
        shares = [s for s in map(_near_future_share, kept) if s]
        if shares:
            out += (f"<p>Near-future share: {html.escape('; '.join(shares))}.</p>"
                    f'<p class="note">{html.escape(NEAR_FUTURE_DEFINITION)}</p>')
    out += "<h3>Signal by position</h3>" + _by_position(log)
    out += "<h3>Per-step signals</h3>"
    panels = [(title, _lines([(key, *log.series(key))], log.alerts, share))
              for key, (title, share) in SIGNALS.items() if log.series(key)[0]]
    shares = [(k.removeprefix("loss_share_").replace("first", "first ").replace("last", "last ") + "%",
               *log.series(k)) for k in LOSS_SHARES if log.series(k)[0]]
    if shares:
        panels.append(("share of |loss| by part of the completion", _lines(shares, log.alerts, percent=True)))
    out += _svg(panels, 4, 2.3) if panels else _absent("per-step signals (signal_mean, topk_overlap, ...)")
    missing = [k for k in (*SIGNALS, *LOSS_SHARES) if not log.series(k)[0]]
    if panels and missing:
        out += f'<p class="note">Not logged by this run: {html.escape(", ".join(missing))}.</p>'
    return out


# ---- rollouts -----------------------------------------------------------------------------------------------

def _colour(value: float, scale: float) -> str:
    """Background of a token: red where the teacher likes it less than the student (r_t < 0), blue where more."""
    if value is None or math.isnan(value):
        return "transparent"
    strength = min(1.0, abs(value) / scale)
    rgb = "178,24,43" if value < 0 else "33,102,172"
    return f"rgba({rgb},{0.85 * strength:.2f})"


def _at(rollout: dict, key: str, i: int):
    """Token ``i``'s value in a token table's list ``key``; None where the list is null, absent or short."""
    values = rollout.get(key)
    return values[i] if values is not None and i < len(values) else None


def _token_title(rollout: dict, i: int) -> str:
    def at(key):
        return _at(rollout, key, i)

    r = at("log_ratio")
    lines = [f"r_t = log pi_T - log pi_S = {r:+.3f}" if r is not None else "r_t: not logged"]
    for key, label in (("divergence", f"divergence ({rollout.get('divergence_kind') or '?'})"),
                       ("loss", "loss"), ("student_entropy", "student entropy"),
                       ("teacher_entropy", "teacher entropy"), ("overlap", "top-k overlap")):
        if at(key) is not None:
            lines.append(f"{label} = {at(key):.3f}")
    if rollout.get("teacher_rank") is not None:
        rank = at("teacher_rank")
        lines.append(f"teacher rank {rank}" if rank is not None else "teacher rank: beyond the known top-k")
    if at("high_loss"):
        lines.append("high-loss token")
    return "\n".join(lines)


def _rollout_html(rollout: dict, scale: float) -> str:
    spans = []
    for i, token in enumerate(rollout.get("tokens") or []):
        style = f"background:{_colour(_at(rollout, 'log_ratio', i), scale)}"
        if _at(rollout, "high_loss", i):
            style += ";outline:1px solid #67001f"
        spans.append(f'<span class="tok" style="{style}" title="{html.escape(_token_title(rollout, i))}">'
                     f"{html.escape(token)}</span>")
    return (f'<div class="rollout"><div class="prompt">{html.escape(str(rollout.get("prompt", "")))}</div>'
            f'<div class="completion">{"".join(spans)}</div></div>')


def rollouts(log: RunLog) -> str:
    out = ""
    kept = _kept_steps(log)
    if not kept:
        out += _absent("token tables of training rollouts (tokens.jsonl)")
    else:
        shown = [(record, (record.get("rollouts") or [])[:ROLLOUTS_PER_STEP]) for record in kept]
        ratios = sorted(abs(v) for _, rs in shown for r in rs for v in (r.get("log_ratio") or []) if v is not None)
        scale = max(0.5, ratios[int(0.95 * (len(ratios) - 1))] if ratios else 0.5)
        out += ('<p class="note">Each token of the student\'s completion is coloured by its signal r_t = log pi_T(y_t) '
                "- log pi_S(y_t): red where the teacher likes it less than the student, blue where more; outlined: "
                "high-loss tokens. Hover a token for its numbers.</p>"
                f'<div class="legend"><span>r_t = -{scale:.2f}</span><span class="bar"></span>'
                f"<span>+{scale:.2f}</span></div>")
        for record, chosen in shown:
            out += f"<h3>Training step {record['step']}</h3>"
            out += "".join(_rollout_html(r, scale) for r in chosen) or "<p>No rollout kept at this step.</p>"
    if log.samples:
        last = log.samples[-1]
        rows = [[html.escape(str(s.get(k, ""))) for k in ("prompt", "student", "teacher")] for s in last["samples"]]
        out += (f"<h3>Held-out greedy answers at step {last['step']}</h3>"
                + _table(["prompt", "student", "teacher"], rows))
    return out


# ---- detectors, checklist, run ------------------------------------------------------------------------------

# Keys only runs with the diagnostics write: their absence means no detector can have run.
DIAGNOSTIC_KEYS = ("signal_mean", "topk_overlap", "repeated_ngram_share", "by_position", "loss_share_first30")


def detectors(log: RunLog) -> str:
    alerts = log.alerts
    if alerts:
        rows = [[str(a["step"]), html.escape(str(a.get("detector", ""))), html.escape(str(a.get("message", ""))),
                 html.escape(str(a.get("cause", ""))), html.escape(str(a.get("try", ""))),
                 html.escape(_value_text(a))] for a in alerts]
        return _table(["step", "detector", "message", "likely cause", "what to try", "value / threshold"], rows)
    if log.tokens is not None or any(log.has(k) for k in DIAGNOSTIC_KEYS):
        return "<p>No detector fired.</p>"
    return ('<p class="absent">No detector fired, or none ran: this run logged none of the diagnostics the detectors '
            "read (runs from opdkit versions before them did not).</p>")


def _value_text(alert: dict) -> str:
    value, threshold = alert.get("value"), alert.get("threshold")
    return " / ".join("-" if v is None else f"{v:.4g}" for v in (value, threshold))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else None


def checklist(log: RunLog) -> list[ChecklistItem]:
    """The reporting checklist (taxonomy notes, section 9), one item per axis, filled from the config and logs."""
    config, o = log.config, log.config.objective
    method = build_method(o)
    rollout = config.rollout
    last = log.steps[-1] if log.steps else {}
    after = (log.final or {}).get("eval") or {}

    # 1. models and teacher access (several teachers: one entry each, by name)
    def each(line) -> str:
        if config.teacher is not None:
            return line(config.teacher)
        return "; ".join(f"{spec.name}: {line(spec)}" for spec in config.teachers)

    access = each(lambda teacher: {
        "local": "full-vocabulary log-probs (logits)", "self": "full-vocabulary log-probs (logits)",
        "server": f"sampled-token log-probs and its top {getattr(teacher, 'top_k', 0)} per position",
        "chat": "text only (no log-probs)"}[teacher.kind])
    reads = {"token": "the sampled tokens' log-probs only", "topk": f"the teacher's top {method.top_k}",
             "full": "the full distribution"}[method.teacher_support]
    if o.reward == "teacher":
        reads = "text continuations, compared with the student's chunks"
    tokenizer = each(lambda teacher: {
        "local": f"one tokenizer: the teacher's was checked to match the student's ({config.student.path}); the "
                 "teacher scores the student's token ids",
        "server": f"the student's ({config.student.path}); the server is sent its token ids (prompt_as: "
                  f"{getattr(teacher, 'prompt_as', '')}) and every echoed token is checked against them",
        "chat": f"the student's ({config.student.path}); the teacher's text is compared as text",
        "self": "the student's own: the teacher is the student's weights",
    }[teacher.kind])
    context = each(lambda teacher: _context_text(
        teacher.kind == "self" or teacher.kind == "local" and teacher.path == config.student.path,
        getattr(teacher, "prompt", None)))
    items = [ChecklistItem("Teacher and student, tokenizers, teacher access", [
        f"student: {config.student.path}", f"teacher: {_teacher_text(config)}", f"tokenizer: {tokenizer}",
        f"teacher access: {access}; this method reads {reads}", context])]

    # 2. state source
    states = [f"states: {o.states} samples" + (f" in {o.lmbda:.0%} of batches, dataset completions in the rest"
                                               if o.lmbda < 1 else "")]
    sources = {}
    for record in log.steps:
        for source in record.get("sources", ()):
            sources[source] = sources.get(source, 0) + 1
    if sources:
        states.append("steps with each source: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    if o.prefix_guidance.enabled:
        g = o.prefix_guidance
        states.append(f"prefix guidance: the {g.answer}'s answer as a prefix, annealed over "
                      f"{g.anneal_steps or config.optim.steps} steps")
    states += [f"rollout temperature {rollout.temperature:g}, top-p {rollout.top_p:g}, at most "
               f"{rollout.max_completion_length} new tokens, {rollout.batch_size} prompts x "
               f"{config.optim.gradient_accumulation_steps} micro-batches per step",
               "staleness: none; synchronous, each batch is sampled by the current weights and used for one "
               "optimizer step",
               Unknown("cold start: not known to this run whether student.path was fine-tuned (a warm-up) before; "
                       "the run itself starts from it with no SFT phase")]
    items.append(ChecklistItem("State source", states))

    # 3. support
    support = {"sampled": "sampled (the student's sampled token only)", "teacher_topk": "the teacher's top-K",
               "student_topk": "the student's top-K", "full": "the full vocabulary"}[o.support]
    facts = [f"support: {support}"]
    if o.support in ("teacher_topk", "student_topk"):
        facts += [f"K = {o.top_k}", "the mass outside the top-K kept as a tail bucket" if o.tail
                  else "renormalised over the top-K (no tail bucket)"]
    else:
        facts.append("K and renormalisation: not applicable to this support")
    if o.temperature != 1:
        facts.append(f"both distributions softened at temperature {o.temperature:g}")
    items.append(ChecklistItem("Support", facts))

    # 4. divergence, estimator, gradient path
    divergence = o.divergence + {"jsd": f" (beta {o.beta:g})", "alpha": f" (alpha {o.alpha:g})",
                                 "skew_kl": f" (alpha {o.alpha:g})", "skew_rkl": f" (alpha {o.alpha:g})"}.get(o.divergence, "")
    facts = [f"divergence: {divergence}",
             f"estimator: {o.estimator}" if o.estimator else "estimator: none (the exact divergence over the support)"
             if o.reward == "log_ratio" else "estimator: none (the chat teacher's chunk reward)",
             "gradient path: policy gradient with a detached advantage" if o.grad_path == "pg"
             else "gradient path: the divergence backpropagated directly",
             f"OPD+ correction: {'on' if o.correction else 'off'}"]
    items.append(ChecklistItem("Divergence, estimator and gradient path", facts))

    # 5. temporal credit
    truncation = _mean(log.series("truncation_rate")[1])
    truncated = ("truncated rollouts (no end token within the budget) are scored like complete ones up to the cut, "
                 "with no value bootstrap there" + (f"; {truncation:.1%} of rollouts were truncated on average"
                                                     if truncation is not None else ""))
    if o.policy_gradient:
        c = o.credit
        value = {"none": "none (the discounted return-to-go)", "zero": "zero (GAE)",
                 "analytic": "analytic, -KL(student || teacher) at the state (GAE)",
                 "learned": f"a learned value head on the detached hidden states (GAE, learning rate "
                            f"{c.value_learning_rate:g})"}[c.value]
        facts = [f"gamma {c.gamma:g}", f"lambda {c.lam:g}" if c.value != "none" else "lambda: not used (no value)",
                 f"baseline / value: {value}", f"advantages standardised per step: {'yes' if c.normalize else 'no'}"]
        if o.lookahead:
            facts.append(f"near-future lookahead: a return over {o.near_future.window} tokens at gamma "
                         f"{o.near_future.gamma:g}")
        facts.append(truncated)
    else:
        facts = ["not applicable: the divergence is trained at each visited state (no returns, no baseline)", truncated]
    items.append(ChecklistItem("Temporal credit", facts))

    # 6. routing
    if o.routing == "cr":
        cr = o.cr
        facts = [f"counterfactual routing (CR-OPD) on tokens with advantage < -{cr.delta:g}",
                 f"student set: top-p {cr.student_top_p:g}, at most {cr.student_top_k}, probability >= "
                 f"{cr.student_min_prob:g}; teacher set: top-p {cr.teacher_top_p:g} of its top {cr.teacher_top_k}",
                 f"eta {cr.eta:g}, weight {cr.coef:g}, loss {cr.loss}"]
    elif o.policy_gradient:
        facts = ["none: the mass a negative reward takes from the sampled token goes where the policy gradient "
                 "sends it (implicit)"]
    else:
        facts = [f"implicit: the divergence over the {o.support} support sets the target of every token"]
    items.append(ChecklistItem("Routing", facts))

    # 7. gates and weights
    facts = []
    tr, eg, nf = o.trust_region, o.entropy_gate, o.near_future
    facts.append(f"trust region: accept with min(1, pi_T/pi_S), outliers: {tr.outliers}" if tr.enabled
                 else "trust region: off")
    facts.append(f"entropy gate: top-{eg.top_k} forward KL x {eg.coef:g} where the teacher's entropy > {eg.threshold:g}"
                 if eg.enabled else "entropy gate: off")
    facts.append(f"position weights: decay {o.position_decay:g} per position" if o.position_decay != 1
                 else "position weights: none (every token alike)")
    if o.teacher_bridge:
        facts.append(f"near-future teacher bridges: at most {nf.max_positions} per rollout at the top "
                     f"{nf.high_loss_fraction:.0%} of tokens by k1, {nf.window} teacher tokens each, weight "
                     f"{nf.bridge_weight:g}")
    if o.policy_gradient and o.reward == "log_ratio":
        facts.append(f"reward clip: |log-ratio| <= {o.log_ratio_clip:g}")
    facts.append("verifier gates: none (opdkit gates no token on a verifier)")
    items.append(ChecklistItem("Gates and weights", facts))

    # 8. regularizers
    facts = [f"reference KL (k3 to the initial student): {o.ref_kl_coef:g}", f"entropy bonus: {o.entropy_coef:g}",
             "task-RL co-objective: none (opdkit has no task-reward term)"]
    if o.prefix_guidance.enabled:
        facts.append(f"SFT term on guidance prefixes: {o.prefix_guidance.beta:g}")
    items.append(ChecklistItem("Regularizers", facts))

    # 9. aggregation and masks
    aggregation = {"token_mean": "token mean over the whole optimizer step (every micro-batch)",
                   "sequence_mean": "mean per sequence, then over the step's sequences"}[o.aggregation]
    items.append(ChecklistItem("Loss aggregation and masks", [
        f"aggregation: {aggregation}",
        "masks: completion tokens through the first end token count (the end token included); the prompt (system "
        "and user turns) and padding never do; other special tokens are not masked"]))

    # 10. compute
    facts = []
    for key, label in (("teacher_calls", "teacher calls"), ("teacher_tokens", "teacher tokens"),
                       ("teacher_bridge_tokens", "teacher bridge tokens"),
                       ("teacher_guidance_tokens", "teacher tokens decoded for guidance answers")):
        if log.has(key):
            facts.append(f"{label}: {sum(r.get(key, 0) for r in log.steps):,.0f}")
    for name in (spec.name for spec in config.teacher_specs() if config.teachers is not None):  # several teachers
        counts = [f"{sum(r.get(f'teacher_{name}_{key}', 0) for r in log.steps):,.{digits}f} {label}"
                  for key, label, digits in (("calls", "scoring calls", 0), ("tokens", "tokens", 0),
                                             ("time_s", "s scoring", 2)) if log.has(f"teacher_{name}_{key}")]
        if counts:
            facts.append(f"teacher {name}: {', '.join(counts)}")
    if not log.has("teacher_calls") and config.teacher is not None:
        facts.append("teacher calls: one scoring pass per micro-batch, "
                     f"{len(log.steps) * config.optim.gradient_accumulation_steps} in all"
                     if config.teacher.kind in ("local", "self") else Unknown("teacher calls: not logged by this run"))
    scored = sum(r["tokens_per_s"] * _step_seconds(r) for r in log.steps if "tokens_per_s" in r)
    facts.append(f"completion tokens sampled and scored in training: about {scored:,.0f}" if log.has("tokens_per_s")
                 else Unknown(f"tokens scored: {ABSENT}"))
    if log.final:
        facts.append(f"wall-clock: {duration(log.final['wall_s'])} (training steps {duration(log.final['train_s'])})")
    else:
        facts.append(f"wall-clock: {duration(sum(map(_step_seconds, log.steps)))} in the logged steps (unfinished run)")
    split = {k.removeprefix("time_"): sum(r.get(k, 0.0) for r in log.steps)
             for k in sorted({k for r in log.steps for k in r if k.startswith("time_")})}
    if split:
        facts.append("time split: " + ", ".join(f"{k} {v:.1f}s" for k, v in split.items()))
    memory = [r["peak_memory_mib"] for r in log.steps if "peak_memory_mib" in r]
    facts.append(f"peak memory: {max(memory):,.0f} MiB (CUDA: allocated; CPU: the process's resident set)" if memory
                 else Unknown(f"memory: {ABSENT}"))
    facts.append(f"hardware: {log.start['machine']}" if "machine" in log.start
                 else Unknown("hardware: not logged by this run (the console banner names the machine)"))
    items.append(ChecklistItem("Compute", facts))

    # 11. diagnostics over training, seeds
    logged = [k for k in ("loss", "grad_norm", "completion_length", "truncation_rate", "student_entropy",
                          "teacher_entropy", *SIGNALS, *LOSS_SHARES, "by_position") if log.has(k)]
    facts = [f"logged every step: {', '.join(logged) or 'nothing'}"]
    missing = [k for k in ("teacher_entropy", "signal_negative_share", "log_ratio_abs_p999", "topk_overlap",
                           "repeated_ngram_share", "loss_share_first30", "by_position") if not log.has(k)]
    if missing:
        facts.append(Unknown(f"{ABSENT}: {', '.join(missing)}"))
    facts.append(f"token tables (tokens.jsonl) at steps {', '.join(str(r['step']) for r in log.tokens)}"
                 if log.tokens else Unknown(f"token tables (tokens.jsonl): {ABSENT}"))
    facts.append(f"held-out evaluation every {config.eval.every} steps, and before and after" if config.eval.every
                 else "held-out evaluation before and after training only")
    facts.append(f"detectors fired: {len(log.alerts)}")
    facts += [f"seed: {config.seed}", Unknown("variance over seeds: not known to one run (opd sweep --seeds runs "
                                              "several and reports mean and spread)")]
    items.append(ChecklistItem("Diagnostics over training, seeds and variance", facts))

    # 12. evaluation
    if not config.data.eval:
        facts = [Unknown("not measured: the run has no held-out data (data.eval)")]
    else:
        facts = [(f"pass@1: held-out greedy accuracy {_format('accuracy', log.before.get('accuracy'))} before, "
                  f"{_format('accuracy', after.get('accuracy'))} after (task {config.data.task}, at most "
                  f"{config.data.eval_size} prompts of {config.data.eval})") if log.before.get("accuracy") is not None
                 else Unknown("pass@1: not measured: no verifier (data.task) for the held-out answers"),
                 Unknown("pass@k: not measured: the evaluation is greedy pass@1")]
        if log.before.get("mean_length") is not None:
            facts.append(f"response length: {log.before['mean_length']:.1f} tokens before, "
                         + (f"{after['mean_length']:.1f} after (greedy, held-out)" if after.get("mean_length")
                            is not None else "not measured after (the run has not finished)"))
        facts.append(f"truncation rate: {last['truncation_rate']:.1%} of training rollouts at the last step"
                     if "truncation_rate" in last else Unknown(f"truncation rate: {ABSENT}"))
        facts.append(Unknown("truncation rate of held-out answers: not measured"))
        facts.append(_ceiling(log.teacher.get("accuracy"), after.get("accuracy")))
    items.append(ChecklistItem("Evaluation", facts))
    return items


def _ceiling(teacher: float | None, student: float | None) -> str:
    if teacher is None:
        return Unknown("teacher as the ceiling: not known (no held-out accuracy of the teacher: no data.task)")
    if student is None:
        return f"teacher's held-out accuracy {teacher:.1%}; the student's after training: not measured yet"
    relation = "the student passed the teacher" if student > teacher else \
        "the student reached the teacher" if student == teacher else "the teacher is above the student"
    return f"teacher's held-out accuracy {teacher:.1%} against the student's {student:.1%} after: {relation}"


def checklist_html(items: list[ChecklistItem]) -> str:
    def fact(text: str) -> str:
        return f'<li class="unknown">{html.escape(text)}</li>' if isinstance(text, Unknown) else \
            f"<li>{html.escape(text)}</li>"

    rows = [[str(n), html.escape(item.topic), "<ul>" + "".join(map(fact, item.facts)) + "</ul>"]
            for n, item in enumerate(items, 1)]
    return ('<p class="note">One item per axis of the taxonomy (notes, section 9). Items in <span class="unknown">'
            "italic orange</span> are what this run cannot know or did not measure.</p>"
            + _table(["#", "item", "this run"], rows).replace("<table>", '<table class="checklist">', 1))


def run_section(log: RunLog, out: Path) -> str:
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in log.run_dir.iterdir())
    facts = [("run folder", str(log.run_dir.resolve())), ("this report", str(out.resolve())),
             ("files", ", ".join(files)), ("written by", f"opdkit {version()}, "
                                           f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"),
             ("opdkit version that trained the run", log.start.get("opdkit", ABSENT))]
    return (_table(None, [[html.escape(k), html.escape(v)] for k, v in facts])
            + f"<h3>config.yaml (resolved)</h3><pre>{html.escape(log.config_text)}</pre>")


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1380px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 2px solid #ddd; margin-top: 2em; } h3 { margin-bottom: .3em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  vertical-align: top; text-align: left; } th { background: #f4f4f4; }
.checklist ul { margin: 0; padding-left: 1.2em; }
.unknown { color: #b35806; font-style: italic; }
.absent { color: #777; font-style: italic; } .note { color: #555; font-size: 12px; }
.plot svg { max-width: 100%; height: auto; }
.rollout { border: 1px solid #ddd; margin: .5em 0; padding: .4em; }
.prompt { color: #555; white-space: pre-wrap; font-size: 12px; border-bottom: 1px dashed #ddd; margin-bottom: .3em; }
.completion { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; }
.legend { display: flex; align-items: center; gap: .5em; font-size: 12px; }
.legend .bar { width: 200px; height: 12px;
  background: linear-gradient(to right, rgba(178,24,43,.85), #fff, rgba(33,102,172,.85)); border: 1px solid #ccc; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 12px; }
"""


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def build_report(run_dir: str | Path, out: Path | None = None) -> str:
    """The report of a run folder as one HTML document (see the module's docstring)."""
    log = read_run(run_dir)
    out = out or log.run_dir / "report.html"
    bodies = {"Summary": summary(log), "Training curves": training_curves(log), "Diagnostics": diagnostics(log),
              "Rollouts": rollouts(log), "Detectors": detectors(log),
              "Reporting checklist": checklist_html(checklist(log)), "Run": run_section(log, out)}
    nav = "".join(f'<a href="#{_anchor(t)}">{t}</a>' for t in SECTIONS)
    sections = "".join(f'<section id="{_anchor(t)}"><h2>{t}</h2>{bodies[t]}</section>' for t in SECTIONS)
    title = html.escape(f"opd report: {log.config.objective.method}, {log.run_dir.name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1><nav>{nav}</nav>{sections}</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report (default ``RUN_DIR/report.html``) and return its path."""
    path = Path(out) if out else Path(run_dir) / "report.html"
    text = build_report(run_dir, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
