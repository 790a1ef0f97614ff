"""A run SIGKILLed at step k and resumed with ``opd train --resume`` has the uninterrupted run's curve.

The killed run is a real subprocess that kills itself with SIGKILL at a chosen point: after a step was
logged but before its checkpoint (the resume must discard the logged step and redo it), or in the middle of
writing a checkpoint (the half-written folder must be ignored). SIGINT and SIGTERM must save and stop.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from opdkit import checkpoint, train as train_module
from opdkit.cli import main

# Runs `opd train CONFIG` and SIGKILLs itself at one point: `after-log K` (step K's record is in
# metrics.jsonl, nothing else of step K happened) or `in-save K` (checkpoint K's weights are written, its
# trainer state is not).
KILLER = '''
import os, signal, sys
import torch
torch.use_deterministic_algorithms(True)
from opdkit import checkpoint, train
from opdkit.cli import main

config, where, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
if where == "after-log":
    write = train._write_jsonl
    def write_then_die(path, record):
        write(path, record)
        if record["step"] == step and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)
    train._write_jsonl = write_then_die
else:
    def die(folder, *args):
        if folder.name == f".tmp-checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        write_state(folder, *args)
    write_state, checkpoint._write_state = checkpoint._write_state, die
sys.exit(main(["train", config]))
'''

# What the curve is made of: everything a step logs except wall-clock timings, throughput and memory.
CLOCK = {"tokens_per_s", "peak_memory_mib", "wall_s", "train_s"}


def curve(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCK and not k.startswith("time_")} for line in lines]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint.latest(run_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def write_config(tiny, tmp_path_factory):
    """``write(name) -> (config path, run folder)``: 6 steps, eval every 3, a checkpoint every 2."""
    root = tmp_path_factory.mktemp("resume")

    def write(name: str) -> tuple:
        config = {
            "seed": 0, "output_dir": str(root / name), "threads": 2,
            "student": {"path": str(tiny / "student")}, "teacher": {"path": str(tiny / "teacher")},
            "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl"), "task": "arithmetic",
                     "eval_size": 8},
            "rollout": {"max_completion_length": 8, "batch_size": 4},
            "optim": {"steps": 6, "learning_rate": 3e-3, "warmup_steps": 2},
            "eval": {"batch_size": 8, "every": 3},
            "checkpoint": {"every": 2, "keep": 2},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path, root / name
    return write


@pytest.fixture(scope="module")
def reference(write_config, deterministic):
    path, run_dir = write_config("reference")
    assert main(["train", str(path)]) == 0
    return curve(run_dir), final_weights(run_dir)


@pytest.mark.parametrize("where, step, resumes_after", [("after-log", 5, 4), ("in-save", 4, 3)])
def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(write_config, reference, deterministic,
                                                                 tmp_path, where, step, resumes_after):
    path, run_dir = write_config(f"killed-{where}")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, str(script), str(path), where, str(step)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    logged = [r["step"] for r in curve(run_dir) if "loss" in r]
    assert logged == list(range(1, step + 1))  # it died at the chosen point, not earlier or later
    assert checkpoint.latest(run_dir).name == f"checkpoint-{resumes_after}"

    assert main(["train", "--resume", str(run_dir)]) == 0
    expected_curve, expected_weights = reference
    assert curve(run_dir) == expected_curve
    weights = final_weights(run_dir)
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(write_config, reference, deterministic,
                                                               monkeypatch, capsys, signum):
    path, run_dir = write_config(signal.Signals(signum).name)
    write = train_module._write_jsonl

    def write_then_signal(path, record):
        write(path, record)
        if record["step"] == 3 and "loss" in record:
            os.kill(os.getpid(), signum)  # arrives mid-step: the step ends, then the loop saves and stops

    monkeypatch.setattr(train_module, "_write_jsonl", write_then_signal)
    handler = signal.getsignal(signum)
    assert main(["train", str(path)]) == 128 + signum
    out = " ".join(capsys.readouterr().out.split())
    assert f"stopped by {signal.Signals(signum).name} after step 3" in out and "opd train --resume" in out
    assert checkpoint.latest(run_dir).name == "checkpoint-3"
    assert signal.getsignal(signum) is handler  # the loop's handler is gone

    monkeypatch.setattr(train_module, "_write_jsonl", write)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert curve(run_dir) == reference[0]
