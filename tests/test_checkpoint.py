"""Checkpoints: atomic, complete, the newest N plus the best kept; a crash inside a save loses nothing."""

import json

import pytest
import torch

from opdkit import checkpoint
from opdkit.cli import main
from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.train import setup, train


def short_run(config: dict, **sections) -> dict:
    config["rollout"] = {"max_completion_length": 8, "batch_size": 4}
    config["data"]["eval_size"] = 8
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_hold_the_whole_state_and_keep_the_newest_and_the_best(tiny_config, tmp_path):
    config = short_run(tiny_config, optim={"steps": 4}, eval={"every": 1}, checkpoint={"every": 1, "keep": 1})
    result = train(setup(load_config(base=config)))
    run_dir = tmp_path / "run"

    evals = {r["step"]: r["eval"]["reverse_kl"] for r in records(run_dir) if r["step"] > 0 and "eval" in r}
    best_step = min(evals, key=evals.get)
    kept = {p.name for p in checkpoint.checkpoints(run_dir)}
    assert kept == {"checkpoint-4", f"checkpoint-{best_step}"}
    assert (run_dir / "best").resolve().name == f"checkpoint-{best_step}" == result["best_checkpoint"].split("/")[-1]
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".trash-*"))

    state = torch.load(run_dir / "checkpoint-4" / checkpoint.STATE, weights_only=True)
    assert state["loop"]["step"] == 4 and state["loop"]["finished"]
    assert state["sampler_position"] == 4 * 4
    assert [r["step"] for r in state["history"]] == [1, 2, 3, 4]
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 4
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    summary = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert summary["best"] == {"metric": "reverse_kl", "step": best_step, "value": evals[best_step]}


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint_loadable(tiny_config, tmp_path, monkeypatch):
    config = short_run(tiny_config, optim={"steps": 4}, checkpoint={"every": 1, "keep": 2})
    written = []

    def crash_on_third(folder):
        written.append(folder.name)
        if len(written) == 3:
            raise RuntimeError("power cut")
        real_fsync_tree(folder)

    real_fsync_tree = checkpoint._fsync_tree
    monkeypatch.setattr(checkpoint, "_fsync_tree", crash_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        train(setup(load_config(base=config)))
    run_dir = tmp_path / "run"
    assert written == [".tmp-checkpoint-1", ".tmp-checkpoint-2", ".tmp-checkpoint-3"]
    assert (run_dir / ".tmp-checkpoint-3").is_dir()  # the half-written save is left out of the checkpoints
    assert checkpoint.latest(run_dir).name == "checkpoint-2"

    monkeypatch.setattr(checkpoint, "_fsync_tree", real_fsync_tree)
    result = train(setup(load_config(base=config)), resume=True)
    assert result["checkpoint"].endswith("checkpoint-4")
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert not (run_dir / ".tmp-checkpoint-3").exists()


def test_a_full_disk_removes_the_partial_save_and_says_how_to_resume(tiny_config, tmp_path, monkeypatch):
    config = short_run(tiny_config, optim={"steps": 3}, checkpoint={"every": 1, "keep": 2})
    real_fsync_tree = checkpoint._fsync_tree
    full = {".tmp-checkpoint-3": OSError(28, "No space left on device"),
            # safetensors' own exception type, with the operating system's words inside
            ".tmp-final": RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")}

    def fill_up(folder):
        if folder.name in full:
            raise full.pop(folder.name)
        real_fsync_tree(folder)

    monkeypatch.setattr(checkpoint, "_fsync_tree", fill_up)
    run_dir = tmp_path / "run"
    with pytest.raises(OPDError, match=r"disk holding .*full.*checkpoint-3.*checkpoint-2.*opd train --resume"):
        train(setup(load_config(base=config)))
    assert not list(run_dir.glob(".tmp-*"))  # the partial folder gave its space back
    assert checkpoint.latest(run_dir).name == "checkpoint-2"
    with pytest.raises(OPDError, match=r"final could not be written.*checkpoint-3"):
        train(setup(load_config(base=config)), resume=True)
    assert not (run_dir / ".tmp-final").exists()
    result = train(setup(load_config(base=config)), resume=True)  # space freed: the final folder follows
    assert (run_dir / "final" / "config.json").is_file() and result["checkpoint"].endswith("checkpoint-3")
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3] and records(run_dir)[-1]["final"]


def test_a_crash_while_deleting_an_old_checkpoint_never_leaves_a_partial_one(tiny_config, tmp_path, monkeypatch):
    config = short_run(tiny_config, optim={"steps": 3}, checkpoint={"every": 1, "keep": 1, "best_metric": None})

    def crash(path):
        raise RuntimeError("killed mid-delete")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash)
    with pytest.raises(RuntimeError, match="mid-delete"):
        train(setup(load_config(base=config)))
    run_dir = tmp_path / "run"
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["checkpoint-2"]
    assert (run_dir / ".trash-checkpoint-1").is_dir() and not (run_dir / "checkpoint-1").exists()


def test_a_new_run_refuses_a_folder_with_checkpoints(tiny_config, tmp_path):
    config = short_run(tiny_config, optim={"steps": 1})
    train(setup(load_config(base=config)))
    with pytest.raises(OPDError, match=r"already holds checkpoints .* opd train --resume"):
        train(setup(load_config(base=config)))


def test_resume_refuses_a_finished_run_and_folders_without_checkpoints(tiny_config, tmp_path, capsys):
    config = short_run(tiny_config, optim={"steps": 1})
    train(setup(load_config(base=config)))
    run_dir = tmp_path / "run"

    def error_of(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return " ".join(capsys.readouterr().out.split())  # unwrap the console's line breaks

    assert "already finished" in error_of(["train", "--resume", str(run_dir)])
    assert "is not a run folder" in error_of(["train", "--resume", str(tmp_path / "nowhere")])
    for path in checkpoint.checkpoints(run_dir):
        checkpoint._retire(path)
    assert "no complete checkpoint" in error_of(["train", "--resume", str(run_dir)])
    assert "give either a config" in error_of(["train"])
