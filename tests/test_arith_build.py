"""The embedded scenario's teacher and student: the pair shipped with the package, the same bits on every
processor, and the recipe that trains one from a seed (``bench/demo_seeds.py``).

The recipe alone did not land the demo in one regime: the same seed gave students at 23.6% to 43.2% held-out
accuracy on three processors, and the demo's verdict differed on one of them (docs/results.md, "The embedded
default"). So the demo starts from the shipped pair; the recipe is checked for what it promises on any processor."""

import json

import pytest

from opdkit.config import load_config
from opdkit.demo import shipped_config
from opdkit.scenarios import arith
from opdkit.train import setup


@pytest.mark.slow
def test_the_demo_starts_from_the_shipped_pair_and_its_recorded_regime(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    config = load_config(shipped_config("arith-opd.yaml"), ["threads=2", f"output_dir={tmp_path / 'run'}"])
    run = setup(config)  # unpacks the scenario into tmp_path first
    folder = tmp_path / arith.FOLDER
    for name in ("teacher", "student"):
        assert (folder / name / "model.safetensors").read_bytes() == \
            (arith.SHIPPED / name / "model.safetensors").read_bytes()
    assert json.loads((folder / "build.json").read_text())["seed"] == 0
    measured = run.evaluator(run.student)
    # docs/results.md's figures for this pair: 43.2% and 0.477 on the AMD EPYC that made it; greedy decoding of
    # the same weights can flip a near-tie on another processor, hence the small tolerance
    assert measured["accuracy"] == pytest.approx(0.432, abs=0.02), measured
    assert measured["reverse_kl"] == pytest.approx(0.477, abs=0.02), measured
    assert run.evaluator.teacher_metrics()["accuracy"] >= arith.TEACHER_TARGET


@pytest.mark.slow
def test_the_recipe_trains_a_pair_that_meets_its_stops_from_any_seed(tmp_path, monkeypatch):
    arith.build(tmp_path, seed=0)
    build = json.loads((tmp_path / "build.json").read_text())
    assert build["teacher_validation_accuracy"] >= arith.TEACHER_TARGET
    # the warm-up stopped at the first step its validation cross-entropy reached the target
    assert build["student_validation_ce"] <= arith.STUDENT_CE
    # a weak student that knows the format (the 11 pairs in docs/results.md: 16% to 43% held-out accuracy)
    assert 0.10 <= build["student_validation_accuracy"] <= 0.60, build
