"""The ``opd`` command: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402

from .errors import Interrupted, OPDError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="distil a student into a teacher from a YAML config")
    p.add_argument("config", nargs="?", help="the YAML config (omit with --resume)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint, exactly")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config leaf, e.g. --set optim.steps=50 (repeatable)")

    p = commands.add_parser("eval", help="measure a checkpoint the way the demo does")
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True, help="a folder written by opd train (or any HF model folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = commands.add_parser("demo", help="the main job on the embedded default: OPD vs SeqKD, before and after")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", default="runs/demo")

    p = commands.add_parser("sweep", help="the same budget for several methods and seeds: a markdown table and a plot")
    p.add_argument("config")
    p.add_argument("--methods", default="opd,gkd,opd_plus,tropd,gae_opd", help="comma-separated method names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--output-dir", default=None, help="default: <output_dir>-sweep")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = commands.add_parser("build", help="build a built-in scenario's models and data into the cache now")
    p.add_argument("scenario", choices=["arith", "smollm2"])

    p = commands.add_parser("serve-teacher", help="serve a local HF causal LM as an OpenAI-compatible teacher server")
    p.add_argument("model", help="a local model folder or builtin:<scenario>/<name>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OPD_SERVE_API_KEY"),
                   help="refuse requests without 'Authorization: Bearer KEY' (default: $OPD_SERVE_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: the MODEL argument)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences per batched forward across callers")
    p.add_argument("--max-pending", type=int, default=256,
                   help="requests in flight before new ones get 503 with Retry-After (bounds memory under load)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; 1 is far faster on a CPU shared with training)")
    return parser


def _print_eval(console: Console, title: str, measured: dict) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in measured.items():
        table.add_row(key, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "train":
            from .checkpoint import resume_config
            from .config import load_config
            from .train import setup, train

            if (args.config is None) == (args.resume is None):
                raise OPDError("give either a config (opd train CONFIG.yaml) or a run to continue (opd train --resume RUN_DIR)")
            config = resume_config(args.resume, args.overrides) if args.resume else load_config(args.config, args.overrides)
            result = train(setup(config), console, resume=args.resume is not None)
            _print_eval(console, "before", result["before"])
            _print_eval(console, f"after {result['steps']} steps of {result['method']}", result["after"])
            console.print(f"checkpoint: {result['checkpoint']}  (wall time {result['wall_s']:.0f} s)")
        elif args.command == "eval":
            from .config import load_config
            from .train import setup

            config = load_config(args.config, args.overrides)
            run = setup(config, student_path=args.checkpoint)
            measured = run.evaluator(run.student)
            measured["teacher_accuracy"] = run.evaluator.teacher_metrics()["accuracy"]
            _print_eval(console, f"{args.checkpoint}", measured)
            print(json.dumps(measured))
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.overrides, args.output_dir, console)
        elif args.command == "sweep":
            from .sweep import run_sweep

            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            run_sweep(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], seeds,
                      args.overrides, args.output_dir, console)
        elif args.command == "build":
            from .scenarios import resolve_builtin

            console.print(resolve_builtin(f"builtin:{args.scenario}/teacher").parent)
        elif args.command == "serve-teacher":
            from .serve import serve

            serve(args.model, args.host, args.port, args.api_key, args.served_model_name, args.max_batch_size,
                  args.max_pending, args.threads)
    except OPDError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        return 2
    except Interrupted as exc:
        console.print(f"[bold yellow]{exc}[/]", markup=True, highlight=False)
        return 128 + exc.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
