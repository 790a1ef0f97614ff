"""Checkpoints: the whole trainer state, written atomically, resumed exactly.

A checkpoint is a folder ``checkpoint-<step>`` in the run folder. It holds the student as
``save_pretrained`` writes it (so ``opd eval --checkpoint`` reads it; a LoRA student's adapter alone, as peft
writes it) and its tokenizer, plus
``trainer_state.pt``: optimizer, scheduler, the method's own parameters, the data position, every random
generator (Python, NumPy, torch, the loop's ``random.Random``), the log so far and the best measurement so
far. ``trainer_state.json`` repeats the step, its metrics, the best, whether the run finished and the teacher set
(``teacher_set``; a resume under other teachers is refused), for people and for checks that must not load a
model. ``best`` is a link to the checkpoint with the best
``checkpoint.best_metric``; ``final`` is the finished student alone, as ``save_pretrained`` writes it (a LoRA
student merged, its adapter in ``final/adapter``).

Writing goes to ``.tmp-checkpoint-<step>``; every file and the folder are fsynced, the folder is renamed into
place and the run folder fsynced. Only then are old checkpoints retired (renamed to ``.trash-*``, then
deleted). A process killed at any moment therefore leaves every earlier complete checkpoint loadable. A write that
fails for want of disk space removes its partial folder and stops the run with what to free and how to resume.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import lora
from .config import Config, load_config
from .errors import OPDError
from .models import load_model

STATE = "trainer_state.pt"
LOWER_IS_BETTER = {"reverse_kl", "reverse_kl_k1"}
_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class LoopState:
    """What the loop carries from step to step besides weights, optimizer and scheduler."""

    step: int = 0
    before: dict = field(default_factory=dict)  # eval of the initial student
    teacher: dict = field(default_factory=dict)  # eval of the teacher
    nonfinite_streak: int = 0  # skipped steps in a row
    best_step: int | None = None
    best_value: float | None = None
    wall_s: float = 0.0  # the run's time up to this state (loading, evaluation and saving included), over processes
    train_s: float = 0.0  # of which in training steps
    finished: bool = False  # the final evaluation ran
    machine: dict = field(default_factory=dict)  # where the run started: {"machine", "opdkit"} (its version)

    def track_best(self, metric: str | None, measured: dict) -> bool:
        """Record ``measured[metric]`` at this step if it beats the best so far; whether it did."""
        value = measured.get(metric) if metric else None
        if value is None:
            return False
        lower = metric in LOWER_IS_BETTER
        if self.best_value is not None and (value >= self.best_value if lower else value <= self.best_value):
            return False
        self.best_step, self.best_value = self.step, value
        return True


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if _NAME.fullmatch(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise OPDError(f"{run_dir} holds no complete checkpoint to resume from (the run stopped before its first "
                       "save): start it again with opd train CONFIG, and set checkpoint.every to save more often")
    return found[-1]


def teacher_set(config: Config) -> dict[str, dict]:
    """Who teaches, as a checkpoint records it: each teacher's name (``teacher`` for the one ``teacher:``) -> its
    kind and what it is (a local folder, a served model and its address, a self teacher's EMA)."""
    out = {}
    for spec in config.teacher_specs():
        what = {"local": ("path",), "server": ("model", "base_url"), "chat": ("model", "base_url"), "self": ("ema",)}
        out[spec.name or "teacher"] = {"kind": spec.kind, **{key: getattr(spec, key) for key in what[spec.kind]}}
    return out


def _check_teachers(run_dir: Path, saved: dict | None, config: Config) -> None:
    """A resumed run keeps its teachers: the signal it trained on would otherwise change under the same names."""
    if saved is None:  # a checkpoint written before teacher sets were recorded
        return
    now = teacher_set(config)
    for name in sorted(set(saved) & set(now)):
        if saved[name] != now[name]:
            raise OPDError(f"teacher {name!r} of the run in {run_dir} was {saved[name]} and the config now gives "
                           f"{now[name]}: resume with the same teacher (restore its entry in {run_dir}/config.yaml), "
                           "or start a new run in another output_dir")
    if set(saved) != set(now):
        raise OPDError(f"the run in {run_dir} was trained by teachers {sorted(saved)} and the config now names "
                       f"{sorted(now)}: resume with the same teachers, or start a new run in another output_dir")


def check_folder(run_dir: Path, resume: bool, steps: int, config: Config | None = None) -> None:
    """The run folder suits the command, checked before any model loads: a new run's holds no checkpoint; a
    resumed run's holds one, a finished run continues only when ``steps`` extends it or its ``final/`` folder is
    missing (its last write failed: the resume writes it), and (given ``config``) with the teachers its checkpoint
    records."""
    if not resume:
        return check_fresh(run_dir)
    state = json.loads((latest(run_dir) / "trainer_state.json").read_text())
    if config is not None:
        _check_teachers(run_dir, state.get("teachers"), config)
    if state.get("finished") and steps <= state["step"] and (run_dir / "final" / "config.json").is_file():
        raise OPDError(f"the run in {run_dir} already finished its {state['step']} steps: to train further, extend "
                       f"it with opd train --resume {run_dir} --set optim.steps=M (M > {state['step']}); the "
                       "optimizer and schedule state carry on")
    if steps < state["step"]:
        raise OPDError(f"optim.steps {steps} is below the step the run in {run_dir} reached ({state['step']}): "
                       f"set optim.steps to at least {state['step']}")


def check_fresh(run_dir: Path) -> None:
    """A new run must not mix its checkpoints with an earlier run's."""
    found = checkpoints(run_dir)
    if found:
        raise OPDError(f"{run_dir} already holds checkpoints of a run (latest {found[-1].name}): continue it with "
                       f"opd train --resume {run_dir}, or set output_dir to a new folder (or delete this one)")


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """The config a run folder was trained with (``config.yaml``), overrides applied, ``output_dir`` = the folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise OPDError(f"{str(run_dir)!r} is not a run folder (no config.yaml): pass the output_dir of an earlier opd train")
    config = load_config(run_dir / "config.yaml", overrides, run_folder=True)
    return config.model_copy(update={"output_dir": str(run_dir)})


def save(run, optimizer: torch.optim.Optimizer, scheduler, rng: random.Random, loop: LoopState,
         metrics: dict | None = None) -> Path:
    """Write ``checkpoint-<loop.step>`` atomically, then keep the newest ``keep`` and the best. Every process calls
    it (a sharded student is gathered whole first); the first process writes, the others wait until it has."""
    run_dir = run.run_dir
    final = run_dir / f"checkpoint-{loop.step}"
    model_state = run.processes.model_state(run.student)  # gathered whole from a sharded student
    optimizer_state = run.processes.optimizer_state(run.student, optimizer)
    rngs = run.processes.gather(_rng_state())  # every process's generators: each resumes its own
    if run.processes.main:
        _write(run, final, model_state, optimizer_state, scheduler, rng, rngs, loop, metrics)
    run.processes.barrier()
    return final


def _write(run, final: Path, model_state: dict | None, optimizer_state: dict, scheduler, rng: random.Random,
           rngs: list[dict], loop: LoopState, metrics: dict | None) -> None:
    run_dir = run.run_dir
    _clear_leftovers(run_dir)
    if final.exists():  # the same step again (the final save after a stop at the last step): same weights
        _write_state(final, run, optimizer_state, scheduler, rng, rngs, loop, metrics)
    else:
        tmp = run_dir / f".tmp-{final.name}"
        tmp.mkdir(parents=True)
        with _room_for(tmp, final.name):
            run.student.save_pretrained(tmp, state_dict=model_state)
            run.tokenizer.save_pretrained(tmp)
            _write_state(tmp, run, optimizer_state, scheduler, rng, rngs, loop, metrics)
            _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync(run_dir)
    if loop.best_step == loop.step:
        _link(run_dir / "best", final.name)
    steps = [int(_NAME.fullmatch(p.name).group(1)) for p in checkpoints(run_dir)]
    keep = set(steps[-run.config.checkpoint.keep:]) | {loop.best_step}
    for step in steps:
        if step not in keep:
            _retire(run_dir / f"checkpoint-{step}")


def _write_state(folder: Path, run, optimizer_state: dict, scheduler, rng: random.Random, rngs: list[dict],
                 loop: LoopState, metrics: dict | None) -> None:
    """``trainer_state.pt`` and ``trainer_state.json``, each replaced atomically."""
    state = {
        "loop": asdict(loop),
        "history": run.history,
        "optimizer": optimizer_state,  # under FSDP keyed by parameter name, else by index (torch's state_dict)
        "scheduler": scheduler.state_dict(),
        "method": [p.detach().cpu() for p in run.method.parameters()],
        # a self-teacher that follows the student (ema) has weights of its own to resume; a frozen one is the start
        **({"teacher": run.teacher.model.state_dict()} if getattr(run.teacher, "ema", None) is not None else {}),
        "sampler_position": run.prompts.position,
        "loop_rng": rng.getstate(),
        "rng": rngs[0],
        **({"process_rngs": rngs} if len(rngs) > 1 else {}),
    }
    best = {"metric": run.config.checkpoint.best_metric, "step": loop.best_step, "value": loop.best_value}
    summary = json.dumps({"step": loop.step, "finished": loop.finished, "metrics": metrics, "best": best,
                          "teachers": teacher_set(run.config)}, indent=2)
    _replace(folder / STATE, lambda f: torch.save(state, f))
    _replace(folder / "trainer_state.json", lambda f: f.write(summary.encode()))


def restore(run, optimizer: torch.optim.Optimizer, scheduler, rng: random.Random, path: Path) -> LoopState:
    """Load a checkpoint into a freshly set-up run, its optimizer, scheduler and loop generator."""
    check_folder(run.run_dir, True, run.config.optim.steps, run.config)
    state = torch.load(path / STATE, weights_only=True)
    loop = LoopState(**state["loop"])
    by_name = all(isinstance(key, str) for key in state["optimizer"]["state"])
    sharded = run.processes.strategy == "fsdp"
    if state["optimizer"]["state"] and by_name != sharded:
        raise OPDError(f"{path} was written by a run {'with' if by_name else 'without'} FSDP and this one runs "
                       f"{'with' if sharded else 'without'} it: resume with the run's distributed.strategy "
                       f"({'fsdp' if by_name else 'ddp, or one process'})")
    groups = state["optimizer"].get("param_groups")
    if groups is not None and len(groups) != len(optimizer.param_groups):
        raise OPDError(f"{path} was written with {len(groups)} optimizer group(s) and this "
                       f"run has {len(optimizer.param_groups)}: an opdkit before the learned value head had its own "
                       "group (credit.value_learning_rate) trained it with the student; start the run again")
    if run.config.student.lora is not None:  # the adapter alone; the base weights are student.path's
        lora.load_weights(run.student, path)
        optimizer.load_state_dict(state["optimizer"])
    else:
        weights = load_model(str(path), run.device, next(run.student.parameters()).dtype).state_dict()  # as loaded
        run.processes.load_state_dicts(run.student, optimizer, weights, state["optimizer"])
    with torch.no_grad():
        for param, saved in zip(run.method.parameters(), state["method"], strict=True):
            param.copy_(saved)
        if "teacher" in state:
            run.teacher.model.load_state_dict(state["teacher"])
    scheduler.load_state_dict(state["scheduler"])
    run.prompts.position = state["sampler_position"]
    run.history[:] = state["history"]
    if loop.finished and run.history and "eval" not in run.history[-1]:  # its final evaluation becomes a mid-run one
        run.history[-1]["eval"] = json.loads((path / "trainer_state.json").read_text())["metrics"]
    rng.setstate(state["loop_rng"])
    rngs = state.get("process_rngs", [state["rng"]])  # a run resumed on as many processes as saved it: its own
    _set_rng_state(rngs[run.processes.rank] if len(rngs) == run.processes.world else state["rng"])
    return loop


def save_final(run) -> Path:
    """``final/``: the student and its tokenizer alone (no trainer state), replaced atomically; a LoRA student
    merged into its base weights, with the adapter in ``final/adapter``. Every process calls it (a sharded student
    is gathered whole first); the first process writes, the others wait."""
    final = run.run_dir / "final"
    model_state = run.processes.model_state(run.student)
    if run.processes.main:
        _write_final(run, final, model_state)
    run.processes.barrier()
    return final


def _write_final(run, final: Path, model_state: dict | None) -> None:
    tmp, trash = run.run_dir / ".tmp-final", run.run_dir / ".trash-final"
    for leftover in (tmp, trash):
        shutil.rmtree(leftover, ignore_errors=True)
    with _room_for(tmp, final.name):
        if run.config.student.lora is not None:
            lora.save_merged(run.student, tmp)
        else:
            run.student.save_pretrained(tmp, state_dict=model_state)
        run.tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync(run.run_dir)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _room_for(tmp: Path, name: str):
    """Writing ``tmp`` (to become ``name``): where the disk fills up, remove the partial folder (the space it took is
    given back; every complete checkpoint stays) and stop with what to do. Other failures pass through unchanged."""
    try:
        yield
    except Exception as exc:  # safetensors and torch.save report a full disk in their own exception types
        full = getattr(exc, "errno", None) == errno.ENOSPC or any(
            text in str(exc) for text in ("No space left", f"os error {errno.ENOSPC}"))
        if not full:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        run_dir = tmp.parent
        done = checkpoints(run_dir)
        resume = (f"the last complete checkpoint is {done[-1].name}: free space, then opd train --resume {run_dir} "
                  "continues from it exactly" if done else "no checkpoint is complete yet: free space and start again")
        raise OPDError(f"the disk holding {run_dir} is full ({shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free): "
                       f"{name} could not be written and its partial folder was removed; {resume}. Each checkpoint "
                       "holds the student and its optimizer state: checkpoint.keep sets how many stay, and "
                       "checkpoint.every: 0 saves only on a new best and at the end") from exc


def write_log(path: Path, records: list[dict]) -> None:
    """Replace ``metrics.jsonl`` atomically (on resume: the records up to the checkpoint)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    _replace(path, lambda f: f.write(text.encode()))


def _replace(path: Path, write) -> None:
    """Write through a temporary file, fsync it, rename it over ``path``."""
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        _fsync(path)
    _fsync(folder)


def _retire(path: Path) -> None:
    """Rename out of the ``checkpoint-*`` namespace first, so a half-deleted folder is never taken for one."""
    trash = path.with_name(f".trash-{path.name}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def _clear_leftovers(run_dir: Path) -> None:
    for leftover in [*run_dir.glob(".tmp-checkpoint-*"), *run_dir.glob(".trash-checkpoint-*")]:
        shutil.rmtree(leftover)


def _link(link: Path, target: str) -> None:
    tmp = link.with_name(f".tmp-{link.name}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)
