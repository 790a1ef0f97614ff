"""Several processes on the CPU (gloo), launched as users launch them (``accelerate launch -m opdkit.cli train``):
two processes of 2 prompts each train as one process of 4 (the same losses, the same final weights within float
tolerance), under DDP and under FSDP2; an FSDP2 run killed mid-way resumes onto the uninterrupted curve, and only
sharded; bf16 weights stay equal on every DDP replica."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opdkit import checkpoint
from opdkit.cli import main
from opdkit.errors import OPDError
from opdkit.models import load_model
from opdkit.train import setup, train

KILLER = """
import os, signal, sys
from opdkit import train as train_module
from opdkit.cli import main

write, at = train_module._write_jsonl, int(sys.argv[2])

def write_then_die(path, record):
    write(path, record)
    if record["step"] == at and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)  # the first process, after logging the step: the launcher ends the other

train_module._write_jsonl = write_then_die
sys.exit(main(["train", sys.argv[1]]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str, fsdp: bool = False) -> subprocess.CompletedProcess:
    """``accelerate launch`` of two processes on this CPU; ``args``: a script or ``-m opdkit.cli train ...``."""
    sharding = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *sharding, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def write_config(tiny_config, tmp_path):
    """``write(name, batch_size, **optim) -> (config path, run folder)``: the tiny run, 4 steps of 2 micro-batches,
    one torch thread per process, an evaluation and a checkpoint every 2 steps."""
    def write(name: str, batch_size: int, **optim) -> tuple:
        config = {**tiny_config, "output_dir": str(tmp_path / name), "threads": 1,
                  "data": {**tiny_config["data"], "eval_size": 8},
                  "rollout": {"max_completion_length": 8, "batch_size": batch_size},
                  "optim": {"steps": 4, "learning_rate": 3e-3, "gradient_accumulation_steps": 2, **optim},
                  "eval": {"batch_size": 8, "every": 2}, "checkpoint": {"every": 2, "keep": 3}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path, tmp_path / name
    return write


def steps(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(run_dir, expected_dir) -> None:
    ran, expected = steps(run_dir), steps(expected_dir)
    assert [r["step"] for r in ran] == [r["step"] for r in expected]
    for key in ("loss", "grad_norm", "completion_length", "signal_mean"):
        assert [r[key] for r in ran] == pytest.approx([r[key] for r in expected], rel=1e-5, abs=1e-6), key
    weights, reference = load_file(run_dir / "final" / "model.safetensors"), load_file(expected_dir / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5)


def test_two_processes_train_as_one_with_their_global_batch_ddp_and_fsdp_and_fsdp_resumes(write_config, tmp_path):
    one_path, one_dir = write_config("one", batch_size=4)
    assert main(["train", str(one_path)]) == 0

    ddp_path, ddp_dir = write_config("ddp", batch_size=2)
    done = launch("-m", "opdkit.cli", "train", str(ddp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((ddp_dir / "metrics.jsonl").read_text().splitlines()[0])["strategy"] == "ddp"
    assert_same_run(ddp_dir, one_dir)

    fsdp_path, fsdp_dir = write_config("fsdp", batch_size=2)
    done = launch("-m", "opdkit.cli", "train", str(fsdp_path), fsdp=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((fsdp_dir / "metrics.jsonl").read_text().splitlines()[0])["strategy"] == "fsdp"
    assert_same_run(fsdp_dir, one_dir)
    # its optimizer state is keyed by parameter name: one process (or DDP) is refused, plainly
    with pytest.raises(OPDError, match="written by a run with FSDP"):
        train(setup(checkpoint.resume_config(fsdp_dir, ["optim.steps=5"])), resume=True)

    killed_path, killed_dir = write_config("killed", batch_size=2)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    killed = launch(str(script), str(killed_path), "3", fsdp=True)
    assert killed.returncode != 0
    assert [r["step"] for r in steps(killed_dir)] == [1, 2, 3]
    assert checkpoint.latest(killed_dir).name == "checkpoint-2"
    resumed = launch("-m", "opdkit.cli", "train", "--resume", str(killed_dir), fsdp=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(killed_dir, fsdp_dir)



def test_what_fsdp_cannot_shard_is_refused_before_any_model_loads(tiny_config):
    from opdkit.config import load_config

    tiny_config["distributed"] = {"strategy": "fsdp"}
    tiny_config["student"]["lora"] = {"r": 4}
    with pytest.raises(OPDError, match="student.lora cannot be sharded yet: use distributed.strategy: ddp"):
        load_config(base=tiny_config)
    del tiny_config["student"]["lora"]
    tiny_config["objective"] = {"method": "gae_opd", "credit": {"value": "learned"}}
    with pytest.raises(OPDError, match="learned value head"):
        load_config(base=tiny_config)


REPLICAS = """
import sys, torch
from opdkit.config import load_config
from opdkit.train import setup, train

run = setup(load_config(sys.argv[1]))
train(run)
torch.save({n: p.detach() for n, p in run.student.named_parameters()}, f"{sys.argv[2]}-{run.processes.rank}.pt")
"""


@pytest.mark.parametrize("precision", ["bf16", "fp32"], ids=["bf16 arithmetic", "float32 arithmetic"])
def test_bf16_weights_stay_the_same_on_every_ddp_replica(write_config, tmp_path, precision):
    """DDP averages the gradients, and every process draws the same stochastic-rounding noise (seed, step, parameter,
    element; not the rank): the replicas, which DDP never compares after the start, end bit for bit equal. In a
    float32 run too, where the bf16 weights are computed on in float32 (``products.float32_arithmetic``)."""
    path, _ = write_config("bf16", batch_size=2)
    config = yaml.safe_load(path.read_text())
    config["precision"], config["student"]["dtype"] = precision, "bf16"
    path.write_text(yaml.safe_dump(config))
    script = tmp_path / "replicas.py"
    script.write_text(REPLICAS)
    done = launch(str(script), str(path), str(tmp_path / "replica"))
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"replica-{rank}.pt") for rank in (0, 1))
    assert {t.dtype for t in first.values()} == {torch.bfloat16}
    assert all(torch.equal(first[name], second[name]) for name in first)
    initial = dict(load_model(config["student"]["path"], dtype=torch.bfloat16).named_parameters())
    assert any(not torch.equal(initial[name].detach(), first[name]) for name in first)  # they trained
