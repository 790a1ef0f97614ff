"""Experiment tracking the ecosystem's way: the run's records sent to TensorBoard, Weights & Biases or Trackio
(``logging.report_to``), each through its own library.

``metrics.jsonl`` stays the run's record; a tracker receives every numeric value of each record at the record's
step (``scalars``: nested keys joined by ``/``), the held-out measurement before training (step 0) and after
(the final record) included. None of the libraries is required: a tracker named but not installed stops the
run before any model loads (``check_installed``), with the command that installs it.

Resuming: TensorBoard writes into the same ``<output_dir>/tensorboard`` folder and purges what a stopped process
logged after the checkpoint (``purge_step``), so no step appears twice; wandb and trackio start a new run of
their own, which gets the whole history first.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .config import Config
from .errors import OPDError

INSTALL = {"tensorboard": "pip install tensorboard (or pip install 'opdkit[track]')", "wandb": "pip install wandb",
           "trackio": "pip install trackio"}


def check_installed(names: list[str]) -> None:
    """Each tracker in ``names`` can be imported; else an OPDError naming the install command."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise OPDError(f"logging.report_to names {name}, which is not installed: {INSTALL[name]}, or remove "
                           f"{name} from logging.report_to") from None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric values of a record, flat: ``{"eval": {"accuracy": a}}`` gives ``eval/accuracy``, a list of
    numbers ``by_position/signal_mean/0``, ... (``null`` entries left out); strings, booleans, lists of strings
    (``sources``) and lists of records (``alerts``) are not scalars and are skipped, as is the step itself."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or (not prefix and key == "step"):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, list) and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                             for v in value):
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value) if v is not None})
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, history: list[dict], resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        kept = resumed and any(folder.glob("events.out.tfevents.*"))
        last = history[-1]["step"] if history else 0
        # a fresh run purges any events a run without checkpoints left there; a resumed one what came after
        # its checkpoint, whose records the loop writes again
        self.writer = SummaryWriter(str(folder), purge_step=last + 1 if kept else 0)
        for record in [] if kept else history:
            self.log(record)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class _RunLibrary:
    """wandb or trackio, which share one API (trackio copies wandb's): ``init`` a run with the project and the
    resolved config (wandb is also told the run folder and its name), ``log`` each record at its step, ``finish``."""

    def __init__(self, name: str, config: Config, history: list[dict]):
        self.library = importlib.import_module(name)
        where = {"name": Path(config.output_dir).name, "dir": config.output_dir} if name == "wandb" else {}
        self.library.init(project=config.logging.project, config=config.model_dump(mode="json"), **where)
        for record in history:
            self.log(record)

    def log(self, record: dict) -> None:
        self.library.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.library.finish()


class Trackers:
    """The trackers of ``config.logging.report_to``, opened on a run's records so far (``history``: step 0 and the
    steps a resumed run restored); ``log`` each record as it is written; closed when leaving a ``with`` block,
    whether the run ended or failed."""

    def __init__(self, config: Config, history: list[dict], resumed: bool, active: bool = True):
        check_installed(config.logging.report_to)
        self.open: list = []
        try:
            for name in config.logging.report_to if active else ():  # inactive: a process other than the first
                if name == "tensorboard":
                    self.open.append(_TensorBoard(Path(config.output_dir), history, resumed))
                else:
                    self.open.append(_RunLibrary(name, config, history))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        for tracker in self.open:
            tracker.log(record)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
