"""Experiment tracking (``logging.report_to``, ``opdkit.trackers``).

- TensorBoard: the event file a short real run writes holds the logged scalars, read back with TensorBoard's own
  reader, and a resumed run adds its steps without logging any twice;
- wandb and trackio, which are not installed here: the calls each library documents (init with the project and
  the resolved config, log at the record's step, finish), through stand-in modules; a tracker named but not
  installed stops ``opd train`` before any model loads, with the install command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.trackers import Trackers, scalars


def test_scalars_flatten_numbers_and_skip_the_rest():
    record = {"step": 3, "loss": 0.5, "lr": 1e-3, "sources": ["student"], "nonfinite": "loss", "final": True,
              "eval": {"accuracy": 0.25, "reverse_kl": 1.5}, "alerts": [{"detector": "x", "value": 1.0}],
              "by_position": {"edges": [0, 8, 16], "signal_mean": [0.1, None]}}
    assert scalars(record) == {"loss": 0.5, "lr": 1e-3, "eval/accuracy": 0.25, "eval/reverse_kl": 1.5,
                               "by_position/edges/0": 0.0, "by_position/edges/1": 8.0, "by_position/edges/2": 16.0,
                               "by_position/signal_mean/0": 0.1}


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_runs_scalars_and_a_resume_logs_no_step_twice(tiny_config, tmp_path):
    tiny_config["optim"]["steps"] = 2
    tiny_config["logging"] = {"report_to": ["tensorboard"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path)]) == 0
    run_dir = Path(tiny_config["output_dir"])
    records = _records(run_dir)
    events = _events(run_dir)
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    assert [step for step, _ in loss] == [1, 2]
    before, after = records[0]["eval"]["accuracy"], records[-1]["eval"]["accuracy"]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(0, pytest.approx(before)),
                                                                         (2, pytest.approx(after))]
    assert {"grad_norm", "lr", "time_rollout", "teacher/accuracy", "wall_s"} <= set(events.Tags()["scalars"])

    assert main(["train", "--resume", str(run_dir), "--set", "optim.steps=3"]) == 0
    records = _records(run_dir)
    steps = [e.step for e in _events(run_dir).Scalars("loss")]
    assert steps == [1, 2, 3]
    assert [e.value for e in _events(run_dir).Scalars("loss")] == [pytest.approx(r["loss"]) for r in records
                                                                   if "loss" in r]


class _Recorder(ModuleType):
    """A stand-in for wandb or trackio that records the calls it gets."""

    def __init__(self, name: str):
        super().__init__(name)
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_get_the_documented_calls(name, tiny_config, monkeypatch):
    module = _Recorder(name)
    monkeypatch.setitem(sys.modules, name, module)
    tiny_config["logging"] = {"report_to": [name], "project": "p"}
    config = load_config(base=tiny_config)
    history = [{"step": 0, "eval": {"accuracy": 0.5}, "teacher": {"accuracy": 0.75}}]
    with Trackers(config, history, resumed=False) as trackers:
        trackers.log({"step": 1, "loss": 0.25, "sources": ["student"]})
    (kind, init), *logs, finish = module.calls
    assert kind == "init" and init["project"] == "p" and init["config"] == config.model_dump(mode="json")
    if name == "wandb":
        assert init["dir"] == config.output_dir and init["name"] == Path(config.output_dir).name
    assert logs == [("log", {"eval/accuracy": 0.5, "teacher/accuracy": 0.75}, 0), ("log", {"loss": 0.25}, 1)]
    assert finish == ("finish",)


def test_a_tracker_named_but_not_installed_stops_before_any_model_loads(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it fails, installed or not

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the trackers were checked")

    import opdkit.train as train_module

    monkeypatch.setattr(train_module, "load_model", must_not_load)
    monkeypatch.setattr(train_module, "load_student", must_not_load)
    monkeypatch.setattr(train_module, "load_tokenizer", must_not_load)
    tiny_config["logging"] = {"report_to": ["tensorboard", "wandb"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path)]) == 2
    out = capsys.readouterr().out
    assert "logging.report_to names wandb, which is not installed: pip install wandb" in out
