"""``opd sweep``: the same budget for several methods and seeds, one table and one plot.

Every run starts from the config's student with the config's steps, batch size and learning rate; only
``objective.method`` and ``seed`` change. Each method runs as its preset defines it: a preset's values replace
the config's ``objective`` keys (the config's other keys still apply), and ``--set`` overrides win over both.
Written to ``<output_dir>/sweep.md`` (mean, standard deviation and the 95% interval of the mean over seeds (Student's
t) of the held-out metrics the runs measured:
accuracy with a task, else token agreement, and the reverse KL the teacher allows; tokens/s, the extra teacher
tokens of near-future bridges, and a link to each run's ``opd report``), ``<output_dir>/sweep.json`` and, with
matplotlib, ``<output_dir>/sweep.png`` (the plotted metric against steps) and every run's ``report.html``, written
when the run ends (a finished run reused gets a fresh one), so that the table never links a page that is not there.

Every config is validated, and every run folder checked, before the first run. Run again, a sweep reuses the
runs that finished (read back from their ``metrics.jsonl``) with the same config but for ``REUSABLE_DESPITE``, and
refuses those trained with another; ``resume`` also continues those that stopped part-way, which are otherwise
refused before anything trains.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import yaml
from rich.console import Console

from .checkpoint import checkpoints, check_folder
from .config import Config, deep_merge, load_config
from .data import read_jsonl
from .errors import OPDError
from .evaluate import METRICS
from .methods import preset
from .report import write_report
from .trackers import check_installed
from .train import check_data, setup, train

KL_KEYS = ("reverse_kl", "reverse_kl_k1")


def plotted_metric(measured: dict) -> str:
    """The first metric of ``METRICS`` that ``measured`` (an eval result) holds."""
    return next(key for key in METRICS if measured.get(key) is not None)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"credit": {"gamma": 1}}`` -> ``{"credit.gamma": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _preset_over(tree: dict, method: str, overrides: list[str], console: Console) -> dict:
    """The raw config ``tree`` with ``method``'s preset over its ``objective`` keys; says which keys the preset
    replaced, and which ``overrides`` (applied after it) replace the preset's values."""
    objective = tree.get("objective") or {}
    if objective.get("method", "opd") == method:  # the config is this method's own tuning: it stands
        return tree
    fixed = preset(method)
    yours, theirs = _flatten(objective), _flatten(fixed)
    for key, value in theirs.items():
        if key in yours and yours[key] != value:
            console.print(f"{method}: its preset sets objective.{key} ({value}), replacing the config's {yours[key]}",
                          markup=False)
    for item in overrides:
        key, raw = (part.strip() for part in item.split("=", 1))
        name = key.removeprefix("objective.")
        if key.startswith("objective.") and name in theirs and yaml.safe_load(raw) != theirs[name]:
            console.print(f"{method}: --set {key}={raw} overrides its preset's {theirs[name]}", markup=False)
    return {**tree, "objective": deep_merge(objective, fixed)}


def sweep_configs(tree: dict, methods: list[str], seeds: list[int], overrides: list[str], root: Path,
                  console: Console) -> dict[str, list[Config]]:
    """Every run's validated config, from the raw YAML ``tree``: the method's preset over the tree's ``objective``
    keys, then ``overrides``, then the method, seed and output folder."""
    configs = {}
    for method in methods:
        method_tree = _preset_over(tree, method, overrides, console)
        configs[method] = [load_config(None, [*overrides, f"objective.method={method}", f"seed={seed}",
                                              f"output_dir={root / method / f'seed{seed}'}"],
                                       base=copy.deepcopy(method_tree))  # load_config sets overrides in place
                           for seed in seeds]
    return configs


def _plot_available(console: Console) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("matplotlib is not installed: this sweep writes sweep.md and sweep.json but no plot and no "
                      "run reports. For sweep.png and report.html: pip install 'opdkit[plot]'", style="yellow",
                      markup=False)
        return False
    return True


def _evals(result: dict, history: list[dict]) -> list[tuple[int, dict]]:
    """Every evaluation of a run: ``(step, metrics)`` from before training to after."""
    return [(0, result["before"]), *((r["step"], r["eval"]) for r in history if "eval" in r),
            (result["steps"], result["after"])]


# Two-sided 95% quantiles of Student's t by degrees of freedom (the last one stands for every larger count).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def interval95(values: list[float]) -> tuple[float, float]:
    """The 95% confidence interval of the mean of ``values`` (two or more), from Student's t: seeds are few."""
    df = len(values) - 1
    t = _T975[max(k for k in _T975 if k <= df)]  # between tabulated counts the smaller one: a slightly wider interval
    mean, half = statistics.fmean(values), t * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def paired(rows: list[dict], base: list[dict], key: str, scale: float = 1.0) -> tuple[int, float, float, float] | None:
    """``scale * (row[key] - base_row[key])`` over the seeds both hold (rows with a ``seed``): ``(pairs, mean, low,
    high)`` with the 95% interval of the mean; None under two pairs."""
    base_by_seed = {b["seed"]: b[key] for b in base}
    differences = [scale * (r[key] - base_by_seed[r["seed"]]) for r in rows if r["seed"] in base_by_seed]
    if len(differences) < 2:
        return None
    return (len(differences), statistics.fmean(differences), *interval95(differences))


def spread(values: list[float], fmt: str, interval: bool = False) -> str:
    """``mean ± sd`` of ``values``, with their 95% interval of the mean in brackets when asked."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    text = f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"
    if interval:
        lo, hi = interval95(values)
        text += f" [{format(lo, fmt)}, {format(hi, fmt)}]"
    return text


def _values(measured: list[dict], key: str | None) -> list[float]:
    return [m[key] for m in measured if m.get(key) is not None]


def finished_run(run_dir: Path) -> tuple[dict, list[dict]] | None:
    """``(result, history)`` of a run folder whose run finished, read from its ``metrics.jsonl``; else None."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    records = read_jsonl(log, "the run's log is damaged: restore it, or move the run folder aside to train it again")
    if not records or not records[-1].get("final"):
        return None
    first, last = records[0], records[-1]
    result = {"before": first["eval"], "after": last["eval"], "wall_s": last["wall_s"], "steps": last["step"]}
    return result, [r for r in records[1:-1] if "loss" in r]


# Config sections a finished run may differ in and still be reused: where it ran and what it logged and kept.
REUSABLE_DESPITE = ("output_dir", "threads", "logging", "checkpoint")


def changed_keys(folder: Path, config: Config) -> list[str]:
    """The keys, set in both, whose value in the ``config.yaml`` a run in ``folder`` was trained with differs from
    ``config``'s (keys one of them lacks, from another opdkit version, are not compared)."""
    saved = _flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    now = _flatten(config.model_dump(mode="json"))
    return sorted(key for key in saved.keys() & now.keys()
                  if key.split(".")[0] not in REUSABLE_DESPITE and saved[key] != now[key])


def _plan(configs: dict[str, list[Config]], resume: bool) -> dict[Path, str]:
    """Each run folder's fate: ``new``, ``done`` (reused) or ``resume``. Refused here, before anything trains: a
    finished run trained with another config (a sweep reuses only the runs it would have run), a stopped run without
    ``resume``, data that does not fit a method (a TrOPD prefix beyond the context), and a tracker in
    ``logging.report_to`` that is not installed."""
    plan = {}
    for config in (c for cs in configs.values() for c in cs):
        check_data(config)
        check_installed(config.logging.report_to)
        folder = Path(config.output_dir)
        if finished_run(folder) is not None:
            if changed := changed_keys(folder, config):
                raise OPDError(f"{folder} holds a finished run trained with another {', '.join(changed)} than this "
                               "sweep's: give the sweep another --output-dir, or delete the folder to run it again")
            plan[folder] = "done"
        elif checkpoints(folder):
            if not resume:
                raise OPDError(f"{folder} holds a run that stopped part-way: continue it with opd sweep ... --resume, "
                               "or delete the folder to run it again")
            check_folder(folder, True, config.optim.steps, config)
            plan[folder] = "resume"
        else:
            plan[folder] = "new"
    return plan


def run_sweep(config_path: str, methods: list[str], seeds: list[int], overrides: list[str] = (),
              output_dir: str | None = None, console: Console | None = None, resume: bool = False) -> dict:
    console = console or Console()
    base = load_config(config_path, overrides)  # the file's and the overrides' errors, before any run
    tree = yaml.safe_load(Path(config_path).read_text())
    root = Path(output_dir or f"{base.output_dir}-sweep")
    configs = sweep_configs(tree, methods, seeds, overrides, root, console)  # all checked before the first run
    plan = _plan(configs, resume)
    plots = _plot_available(console)
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for method, method_configs in configs.items():
        for config in method_configs:
            folder = Path(config.output_dir)
            if plan[folder] == "done":
                console.print(f"{method} seed {config.seed}: finished earlier, reusing {folder}", highlight=False)
                result, history = finished_run(folder)
            else:
                console.rule(f"[bold]{method}[/] seed {config.seed}: {config.optim.steps} steps")
                run = setup(config)
                result, history = train(run, console, resume=plan[folder] == "resume"), run.history
            tokens_per_s = statistics.fmean(r["tokens_per_s"] for r in history if "tokens_per_s" in r)
            # teacher tokens beyond scoring: near-future bridges, TrOPD's guidance answers
            extra = sum(r.get("teacher_bridge_tokens", 0.0) + r.get("teacher_guidance_tokens", 0.0) for r in history)
            runs[method].append({"seed": config.seed, "before": result["before"], "after": result["after"],
                                 "wall_s": result["wall_s"], "tokens_per_s": tokens_per_s, "extra_teacher_tokens": extra,
                                 "evals": _evals(result, history)})
            if plots:  # the run's own page, linked from the table
                runs[method][-1]["report"] = write_report(folder).relative_to(root).as_posix()
    (root / "sweep.json").write_text(json.dumps(runs, indent=2))
    table = markdown_table(runs, base, config_path, methods, seeds, overrides)
    (root / "sweep.md").write_text(table)
    written = ["sweep.md", "sweep.json"]
    if plots:
        plot(runs, plotted_metric(next(iter(runs.values()))[0]["before"]), root / "sweep.png")
        written += ["sweep.png", "report.html in each run folder (opd report)"]
    console.print(table, markup=False, highlight=False, soft_wrap=True)  # markdown, as written: [..] is no markup
    console.print(f"written to {root}: {', '.join(written)}")
    return runs


def table_metrics(before: dict) -> list[str]:
    """The columns a sweep's table shows: accuracy where a task measured it, else token agreement; then the
    reverse KL the teacher allowed (none from a text-only teacher)."""
    first = "accuracy" if before.get("accuracy") is not None else "token_agreement"
    return [first, *(key for key in KL_KEYS if before.get(key) is not None)][:2]


def _row(name: str, measured: list[dict], metrics: list[str], results: list[dict] = ()) -> str:
    cells = [spread(_values(measured, key), METRICS[key][1], interval=True) for key in metrics]
    cells += [spread([r[key] for r in results], ".0f") for key in ("tokens_per_s", "wall_s", "extra_teacher_tokens")]
    cells.append(" ".join(f"[seed {r['seed']}]({r['report']})" for r in results if "report" in r) or "-")
    return f"| {name} | {' | '.join(cells)} |"


def markdown_table(runs: dict, base: Config, config_path: str, methods, seeds, overrides) -> str:
    before = next(iter(runs.values()))[0]["before"]
    metrics = table_metrics(before)
    command = f"opd sweep {config_path} --methods {','.join(methods)} --seeds {','.join(map(str, seeds))}"
    command += "".join(f" --set {o}" for o in overrides)
    header = " | ".join(METRICS[key][0] for key in metrics)
    lines = [f"Command: `{command}`", "",
             f"Budget per run: {base.optim.steps} steps x {base.rollout.batch_size} prompts, learning rate "
             f"{base.optim.learning_rate}, {len(seeds)} seeds; mean ± standard deviation over seeds, "
             "and for the held-out metrics [the 95% interval of the mean] (Student's t).", "",
             f"| method | {header} | tokens/s | wall time (s) | extra teacher tokens | reports |",
             "|---|" + "---|" * (len(metrics) + 4),
             _row("student before", [before], metrics),
             *(_row(method, [r["after"] for r in results], metrics, results) for method, results in runs.items())]
    return "\n".join(lines) + "\n"


def plot(runs: dict, metric: str, path: Path,
         title: str = "Same budget per method (mean over seeds; band: min to max)") -> None:
    """``metric`` over the steps of each arm of ``runs`` (label -> results with their ``evals``), into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, results in runs.items():
        steps = [s for s, _ in results[0]["evals"]]
        values = [[m[metric] for _, m in r["evals"]] for r in results]
        mean = [statistics.fmean(col) for col in zip(*values)]
        line, = ax.plot(steps, mean, marker="o", label=method)
        if len(values) > 1:
            ax.fill_between(steps, [min(col) for col in zip(*values)], [max(col) for col in zip(*values)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(METRICS[metric][0])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
