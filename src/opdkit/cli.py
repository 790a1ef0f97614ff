"""The ``opd`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own loading bars would break up the run's display

from rich.console import Console  # noqa: E402

from . import version  # noqa: E402
from .errors import Interrupted, OPDError, Stopped  # noqa: E402
from .scenarios import SCENARIOS  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    parser.add_argument("--version", action="version", version=f"opdkit {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = dict(dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set optim.steps=50 (repeatable; opd config --defaults lists keys)")

    p = commands.add_parser("train", help="distil a student into a teacher from a YAML config")
    p.add_argument("config", nargs="?", help="the YAML config (omit with --resume)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint, "
                   "exactly; with --set optim.steps=M, extend a finished run to M steps")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("eval", help="measure a run's student, a checkpoint, or an untouched student")
    p.add_argument("target", metavar="RUN_DIR|CONFIG",
                   help="a run folder (its best checkpoint, else its latest, else final/) or a YAML config (its student)")
    p.add_argument("--checkpoint", metavar="DIR", help="measure this folder instead (a checkpoint or any HF model folder)")
    p.add_argument("--untouched", action="store_true", help="measure the config's student.path, before any training")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("diagnose", help="the token-level table of a student against its teacher on held-out "
                            "prompts: log-ratios, KL, entropies, teacher ranks, near-future share")
    p.add_argument("config", help="the YAML config (its student, teacher, data and rollout settings)")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="diagnose this checkpoint folder of a run instead of the config's student")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to sample (data.eval, else data.train; default 64)")
    p.add_argument("--out", metavar="DIR", default=None, help="where tokens.jsonl, tokens.csv and summary.json go "
                   "(default: <checkpoint>/../diagnose/<checkpoint name>, else <output_dir>/diagnose/untouched)")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("score-teacher", help="score the training set's dataset completions (or the teacher's "
                            "own samples) with the teacher once, into a folder that data.teacher_signals reads")
    p.add_argument("config", help="the YAML config of the runs that will read the signals (teacher, data, rollout)")
    p.add_argument("--out", metavar="DIR", required=True, help="the folder to write (manifest.json and memmapped arrays)")
    p.add_argument("--source", choices=["dataset", "teacher"], default=None,
                   help="the states to score: the dataset's completions, or one teacher sample per prompt "
                   "(default: teacher when objective.states is teacher, else dataset)")
    p.add_argument("--top-k", type=int, default=None, help="log-probs per position to keep (default: what the config "
                   "reads, objective top-k and diagnostics.top_k for a local teacher)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("methods", help="list the methods: one-line definition and preset values")

    p = commands.add_parser("config", help="every config key with default and help, or a config as it resolves")
    p.add_argument("config", nargs="?", help="print this YAML config resolved (presets and defaults filled in)")
    p.add_argument("--defaults", action="store_true", help="print every key with its default, type and help")
    p.add_argument("--markdown", action="store_true", help="with --defaults: as docs/config.md is written")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("demo", help="the main job on the embedded default: OPD vs SeqKD, before and after",
                            formatter_class=defaults)
    p.add_argument("--set", **overrides)
    p.add_argument("--output-dir", default="runs/demo", help="where the three runs are written")

    p = commands.add_parser("sweep", help="the same budget for several methods and seeds: a markdown table and a plot",
                            formatter_class=defaults)
    p.add_argument("config", help="the YAML config every run starts from")
    p.add_argument("--methods", default="opd,gkd,opd_plus,tropd,gae_opd", help="comma-separated method names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--output-dir", default=None, help="default: <output_dir>-sweep")
    p.add_argument("--resume", action="store_true", help="continue runs that stopped part-way (finished runs are "
                   "always reused)")
    p.add_argument("--set", **overrides)

    p = commands.add_parser("report", help="one self-contained HTML page of a run: curves, diagnostics, rollouts, "
                            "detectors and the reporting checklist")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (the output_dir of opd train)")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")

    p = commands.add_parser("build", help="build a built-in scenario's models and data into the cache now")
    p.add_argument("scenario", choices=list(SCENARIOS), help="which scenario")

    p = commands.add_parser("serve-teacher", help="serve a local HF causal LM as an OpenAI-compatible teacher server",
                            formatter_class=defaults)
    p.add_argument("model", help="a local model folder, a Hub id in the local cache, or builtin:<scenario>/<name>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=os.environ.get("OPD_SERVE_API_KEY"),
                   help="refuse requests without 'Authorization: Bearer KEY' (default: $OPD_SERVE_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the MODEL argument)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences per batched forward across callers")
    p.add_argument("--max-pending", type=int, default=256,
                   help="requests in flight before new ones get 503 with Retry-After (bounds memory under load)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; 1 is far faster on a CPU shared with training)")
    p.add_argument("--log-requests", choices=["each", "rate", "off"], default="each",
                   help="one line per request, a line of request and token rates every 10 s, or nothing")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="the most log-probs per position a request may ask for (more is refused with 400, as vLLM does)")
    return parser


def _print_eval(console: Console, title: str, measured: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in measured.items():
        table.add_row(key, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _train(args, console: Console) -> None:
    from .checkpoint import check_folder, resume_config
    from .config import load_config
    from .trackers import check_installed
    from .train import setup, train

    if (args.config is None) == (args.resume is None):
        raise OPDError("give either a config (opd train CONFIG.yaml) or a run to continue (opd train --resume RUN_DIR)")
    config = resume_config(args.resume, args.overrides) if args.resume else load_config(args.config, args.overrides)
    check_folder(Path(config.output_dir), args.resume is not None, config.optim.steps, config)  # before any model loads
    check_installed(config.logging.report_to)
    if os.environ.get("RANK", "0") == "0":  # several processes (accelerate launch, torchrun): the first speaks
        console.print(f"loading the models for {config.output_dir} ...", style="dim", highlight=False)
    try:
        run = setup(config)
    except KeyboardInterrupt:
        raise Stopped("interrupted while loading, before training started: nothing was written") from None
    try:
        train(run, console, resume=args.resume is not None)
    except KeyboardInterrupt:
        from .checkpoint import checkpoints

        kept = checkpoints(run.run_dir)
        where = (f"the latest complete checkpoint is {kept[-1]}: continue with opd train --resume {run.run_dir}"
                 if kept else "no checkpoint had been saved yet: start the run again")
        raise Stopped(f"stopped at once by a second Ctrl-C; the step in progress is lost, {where}") from None
    finally:
        run.processes.close()


def _eval(args, console: Console) -> None:
    from .checkpoint import checkpoints, resume_config
    from .config import load_config
    from .train import setup

    target = Path(args.target)
    if target.is_dir():
        config = resume_config(target, args.overrides)
        found = checkpoints(target)
        default = (target / "best" if (target / "best").exists() else found[-1] if found
                   else target / "final" if (target / "final").is_dir() else None)
    else:
        config, default = load_config(args.target, args.overrides), None
    if args.untouched and args.checkpoint:
        raise OPDError("give --checkpoint DIR or --untouched, not both")
    if args.untouched:
        student = config.student.path
    elif args.checkpoint:
        student = args.checkpoint
    elif target.is_dir():
        if default is None:
            raise OPDError(f"{target} holds no checkpoint and no final/ model yet: pass --untouched to measure the "
                           "student before training, or --checkpoint DIR")
        student = str(default.resolve())
    else:
        student = config.student.path
        console.print(f"no --checkpoint: measuring the config's student, untouched ({student})", highlight=False)
    run = setup(config, student_path=student)
    measured = run.evaluator(run.student)
    measured["teacher_accuracy"] = run.evaluator.teacher_metrics()["accuracy"]
    _print_eval(console, student, measured)
    print(json.dumps(measured))


def _methods(console: Console) -> None:
    from rich.table import Table

    from .catalog import methods_table

    table = Table(title="methods (objective.method); a config's own objective keys override a preset's",
                  show_lines=True)
    for column in ("method", "definition", "preset"):
        table.add_column(column, overflow="fold")
    for row in methods_table():
        table.add_row(*row)
    console.print(table, markup=False, highlight=False)


def _config(args, console: Console) -> None:
    from . import catalog

    if args.defaults == (args.config is not None):
        raise OPDError("give --defaults (every key) or a CONFIG.yaml to resolve, one of them")
    if args.markdown and not args.defaults:
        raise OPDError("--markdown goes with --defaults")
    if args.defaults:
        sys.stdout.write(catalog.config_markdown() if args.markdown else catalog.defaults_yaml())
        return
    import yaml

    from .config import load_config

    config = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(soft_wrap=not sys.stdout.isatty())  # a log file gets whole lines, a terminal fitted ones
    try:
        if args.command == "train":
            _train(args, console)
        elif args.command == "eval":
            _eval(args, console)
        elif args.command == "diagnose":
            from .diagnose import run_diagnose

            run_diagnose(args.config, args.overrides, args.checkpoint, args.prompts, args.out, console)
        elif args.command == "score-teacher":
            from .config import load_config
            from .score_teacher import score_teacher

            config = load_config(args.config, args.overrides)
            stored = score_teacher(config, args.out, args.source, args.top_k, args.force, console)
            console.print(f"scored {stored['examples']} {stored['source']['kind']} examples ({stored['tokens']} tokens, "
                          f"top-{stored['k']}) into {stored['folder']}: {stored['bytes'] / 2**20:.1f} MiB in "
                          f"{stored['seconds']:.1f} s", highlight=False)
        elif args.command == "methods":
            _methods(console)
        elif args.command == "config":
            _config(args, console)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.overrides, args.output_dir, console)
        elif args.command == "sweep":
            from .sweep import run_sweep

            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            run_sweep(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], seeds,
                      args.overrides, args.output_dir, console, resume=args.resume)
        elif args.command == "report":
            from .report import write_report

            print(write_report(args.run_dir, args.out))
        elif args.command == "build":
            from .scenarios import resolve_builtin

            console.print(resolve_builtin(f"builtin:{args.scenario}/teacher").parent)
        elif args.command == "serve-teacher":
            from .serve import serve

            serve(args.model, args.host, args.port, args.api_key, args.served_model_name, args.max_batch_size,
                  args.max_pending, args.threads, args.log_requests, args.max_logprobs)
    except OPDError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return 2
    except Interrupted as exc:
        console.print(f"[bold yellow]{exc}[/]", markup=True, highlight=False)
        return 128 + exc.signum
    except Stopped as exc:
        console.print(f"[bold yellow]{exc}[/]", markup=True, highlight=False)
        return 130
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/]", markup=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
