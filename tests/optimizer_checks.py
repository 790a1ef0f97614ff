"""Checks shared by the optimizer tests (``test_optimizer``, ``test_optimizer_8bit``): two optimizers stepped alike
end with the same weights and state, and a run resumed from its middle checkpoint ends as the uninterrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from opdkit import checkpoint
from opdkit.train import setup, train


def step_alike(a, b, first: list, second: list, gradients, steps: int = 3) -> None:
    """``steps`` steps of ``a`` over ``first`` and ``b`` over ``second`` with the same ``gradients(params, step)``;
    then every weight and state tensor equal to the bit (dtype and device too)."""
    for step in range(steps):
        gradients(first, step), gradients(second, step)
        a.step(), b.step()
    for x, y in zip(first, second):
        assert torch.equal(x, y)
        assert a.state[x].keys() == b.state[y].keys()
        for key, value in a.state[x].items():
            other = b.state[y][key]
            assert value.dtype == other.dtype and value.device == other.device and torch.equal(value, other), key


def resumes_exactly(run, run_dir: Path, last: int) -> None:
    """Resume ``run`` (finished at step ``last``) from its checkpoint before the last: the same losses and weights."""
    shutil.rmtree(run_dir / f"checkpoint-{last}")
    shutil.rmtree(run_dir / "final")
    resumed = setup(checkpoint.resume_config(run_dir))
    train(resumed, resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in run.history]
    assert all(torch.equal(a, b) for a, b in zip(run.student.parameters(), resumed.student.parameters()))
