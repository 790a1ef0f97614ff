"""``opd sweep``: the same budget for several methods and seeds, one table and one plot.

Every run starts from the config's student with the config's steps, batch size and learning rate; only
``objective.method`` and ``seed`` change. Written to ``<output_dir>/sweep.md`` (mean and spread over seeds
of held-out accuracy and reverse KL, tokens/s) and ``<output_dir>/sweep.png`` (accuracy against steps).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console

from .config import load_config
from .train import setup, train


def _curve(result: dict, history: list[dict], metric: str) -> list[tuple[int, float]]:
    points = [(0, result["before"].get(metric))]
    points += [(r["step"], r["eval"].get(metric)) for r in history if "eval" in r]
    points.append((result["steps"], result["after"].get(metric)))
    return [(s, v) for s, v in points if v is not None]


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def run_sweep(config_path: str, methods: list[str], seeds: list[int], overrides: list[str] = (),
              output_dir: str | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    base = load_config(config_path, overrides)
    root = Path(output_dir or f"{base.output_dir}-sweep")
    root.mkdir(parents=True, exist_ok=True)
    metric = "accuracy" if base.data.task else "reverse_kl"
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for method in methods:
        for seed in seeds:
            config = load_config(config_path, [*overrides, f"objective.method={method}", f"seed={seed}",
                                               f"output_dir={root / method / f'seed{seed}'}"])
            console.rule(f"[bold]{method}[/] seed {seed}: {config.optim.steps} steps")
            run = setup(config)
            result = train(run, console)
            tokens_per_s = statistics.fmean(r["tokens_per_s"] for r in run.history if "tokens_per_s" in r)
            runs[method].append({"seed": seed, "before": result["before"], "after": result["after"],
                                 "wall_s": result["wall_s"], "tokens_per_s": tokens_per_s,
                                 "curve": _curve(result, run.history, metric)})
    (root / "sweep.json").write_text(json.dumps(runs, indent=2))
    table = markdown_table(runs, base, config_path, methods, seeds, overrides)
    (root / "sweep.md").write_text(table)
    plot(runs, metric, root / "sweep.png")
    console.print(table)
    console.print(f"written: {root / 'sweep.md'}, {root / 'sweep.png'}, {root / 'sweep.json'}")
    return runs


def markdown_table(runs: dict, base, config_path: str, methods, seeds, overrides) -> str:
    before = next(iter(runs.values()))[0]["before"]
    command = f"opd sweep {config_path} --methods {','.join(methods)} --seeds {','.join(map(str, seeds))}"
    command += "".join(f" --set {o}" for o in overrides)
    lines = [f"Command: `{command}`", "",
             f"Budget per run: {base.optim.steps} steps x {base.rollout.batch_size} prompts, learning rate "
             f"{base.optim.learning_rate}, {len(seeds)} seeds; mean ± standard deviation over seeds.", "",
             "| method | held-out accuracy | reverse KL to teacher (nats/token) | tokens/s | wall time (s) |",
             "|---|---|---|---|---|",
             f"| student before | {_spread([before['accuracy']], '.1%') if before.get('accuracy') is not None else '-'} "
             f"| {before['reverse_kl']:.4f} | - | - |"]
    for method, results in runs.items():
        accuracy = [r["after"]["accuracy"] for r in results if r["after"].get("accuracy") is not None]
        lines.append(f"| {method} | {_spread(accuracy, '.1%')} | {_spread([r['after']['reverse_kl'] for r in results], '.4f')} "
                     f"| {_spread([r['tokens_per_s'] for r in results], '.0f')} | {_spread([r['wall_s'] for r in results], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, results in runs.items():
        steps = [s for s, _ in results[0]["curve"]]
        values = [[v for _, v in r["curve"]] for r in results]
        mean = [statistics.fmean(col) for col in zip(*values)]
        line, = ax.plot(steps, mean, marker="o", label=method)
        if len(values) > 1:
            ax.fill_between(steps, [min(col) for col in zip(*values)], [max(col) for col in zip(*values)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out accuracy" if metric == "accuracy" else "held-out reverse KL")
    ax.set_title("Same budget per method (mean over seeds; band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
