"""The embedded build lands its student in the same regime on any processor: its warm-up stops on the validation
cross-entropy, which falls smoothly through the plateau's sudden jump, instead of on an accuracy checked now and
then (which landed at 25%, 29% and 37.5% held-out on three processors). The band below holds for the builds
measured across seeds and thread counts (docs/results.md, "The embedded default"); a build outside it would put
the demo in another regime, so it fails here."""

import json

import pytest

from opdkit.config import load_config
from opdkit.demo import shipped_config
from opdkit.scenarios import arith
from opdkit.train import setup

pytestmark = pytest.mark.slow

ACCURACY_BAND = (0.15, 0.35)  # held-out greedy accuracy of the built student
REVERSE_KL_BAND = (0.30, 0.65)  # its exact per-token reverse KL to the teacher on its own samples


def test_the_built_student_lands_in_the_demo_regime(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    config = load_config(shipped_config("arith-opd.yaml"), ["threads=2", f"output_dir={tmp_path / 'run'}"])
    run = setup(config)  # builds the scenario into tmp_path first
    build = json.loads((tmp_path / arith.FOLDER / "build.json").read_text())
    assert build["teacher_validation_accuracy"] >= arith.TEACHER_TARGET
    # the warm-up stopped at the first step its validation cross-entropy reached the target
    assert build["student_validation_ce"] <= arith.STUDENT_CE
    measured = run.evaluator(run.student)
    assert ACCURACY_BAND[0] <= measured["accuracy"] <= ACCURACY_BAND[1], measured
    assert REVERSE_KL_BAND[0] <= measured["reverse_kl"] <= REVERSE_KL_BAND[1], measured
    assert run.evaluator.teacher_metrics()["accuracy"] >= 0.97
