"""``bench/small_student.py``: paired differences to SeqKD are taken within one build and one run seed."""

import json

from conftest import load_bench

bench = load_bench("small_student")


def test_paired_differences_pair_the_same_build_and_seed():
    after = {("GKD", 0, 0): 0.10, ("GKD", 0, 1): 0.12, ("SeqKD", 0, 0): 0.07, ("SeqKD", 0, 1): 0.13,
             ("GKD", 1, 0): 0.50, ("SeqKD", 1, 0): 0.20}  # build 1 differs: it must not leak into build 0
    results = {"runs": {f"{label} / build {b} / seed {s}": {"after": {"accuracy": a}}
                        for (label, b, s), a in after.items()}}
    got = bench.paired(results, "GKD", "SeqKD", 0, [0, 1], "accuracy")
    assert [round(d, 6) for d in got] == [0.03, -0.01]
    assert [round(d, 6) for d in bench.paired(results, "GKD", "SeqKD", 1, [0], "accuracy")] == [0.3]


def test_a_build_warms_a_one_layer_student_and_records_it(tmp_path):
    record = bench.warm_student(tmp_path, steps=2, seed=3)
    assert record["shape"]["num_hidden_layers"] == 1 and (record["warm_steps"], record["seed"]) == (2, 3)
    assert record["validation_ce"] > 0 and 0 <= record["validation_accuracy"] <= 1
    assert (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "build.json").read_text()) == record  # what a rerun reads instead of warming again
