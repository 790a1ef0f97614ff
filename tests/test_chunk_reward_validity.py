"""``bench/chunk_reward_validity.py``: a chat teacher's chunk rewards beside its own log-probs of the same chunks."""

import json
import sys

import numpy as np
import pytest
import yaml
from conftest import load_bench

bench = load_bench("chunk_reward_validity")


def test_ranks_share_ties_and_spearman_reads_order_only():
    assert bench.ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert bench.spearman(x, np.exp(5 * x)) == pytest.approx(1.0)
    assert bench.spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert np.isnan(bench.spearman(x, np.ones(5)))  # a constant has no order
    # with ties: the Pearson correlation of the mean ranks
    a, b = np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert bench.spearman(a, b) == pytest.approx(np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])
    value, low, high = bench.with_interval(x, x + np.array([0.0, 0.3, -0.2, 0.1, 0.0]))
    assert low <= value <= high


def test_the_bench_measures_a_chat_teachers_chunks_against_its_log_probs(tiny, tmp_path, monkeypatch, capsys):
    config = {"seed": 0, "output_dir": str(tmp_path / "run"), "precision": "fp32",
              "student": {"path": str(tiny / "student")},
              "teacher": {"kind": "chat", "base_url": "http://127.0.0.1:1/v1", "model": "unused", "chunk_length": 3,
                          "samples_per_fork": 2, "max_forks": 2, "prefix_probe": 0},
              "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl")},
              "rollout": {"max_completion_length": 12, "batch_size": 8},
              "objective": {"method": "chunk_opd"}}
    path = tmp_path / "chunk.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["chunk_reward_validity", str(path), str(tiny / "teacher"), "--prompts", "6",
                                      "--similarities", "char", "token_f1"])
    bench.main()
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < found["chunks"] <= 2 * 6 and found["samples_per_fork"] == 2 and found["chunk_length"] == 3
    for kind in ("char", "token_f1"):  # both on the same continuations
        assert 0 <= found[kind]["mean_similarity"] <= 1 and found[kind]["lowest_p"] and found[kind]["highest_p"]
    # the tiny teacher's words rarely match the student's (token_f1 is 0 for nearly every chunk); its characters do
    for key in ("log_ratio", "teacher_mean_logprob"):
        value, low, high = found["char"]["validity"][key]
        assert -1 <= low <= high <= 1 and -1 <= value <= 1
    assert set(found["char"]["reliability"]) == {"one_draw", "pooled"}  # two independent draws at temperature 1
    assert bench.with_interval(np.arange(5.0), np.ones(5)) is None  # a constant has no order to correlate


def test_a_teacher_on_another_tokenizer_is_refused_before_any_sampling(tiny, tmp_path, monkeypatch):
    from opdkit.errors import OPDError
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "teacher"))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    (other / "config.json").write_text((tiny / "teacher" / "config.json").read_text())
    config = {"student": {"path": str(tiny / "student")},
              "teacher": {"kind": "chat", "base_url": "http://127.0.0.1:1/v1", "model": "unused"},
              "data": {"train": str(tiny / "train.jsonl")}, "objective": {"method": "chunk_opd"}}
    path = tmp_path / "chunk.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["chunk_reward_validity", str(path), str(other)])
    with pytest.raises(OPDError, match="tokenizers differ"):
        bench.main()
