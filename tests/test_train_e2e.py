"""A few real distillation steps on tiny models: the reverse KL to the teacher on a fixed batch falls."""

import json

import pytest
import torch

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.evaluate import loops, looping
from opdkit.objectives.divergence import kl
from opdkit.rollout import sample
from opdkit.train import setup, train


def fixed_batch_reverse_kl(run, rollouts) -> float:
    with torch.no_grad():
        s = rollouts.completion_logits(run.student).log_softmax(-1)
        t = rollouts.completion_logits(run.teacher.model).log_softmax(-1)
    return float((kl(s, t) * rollouts.completion_mask).sum() / rollouts.completion_mask.sum())


@pytest.mark.parametrize("objective", [{"method": "opd"}, {"method": "gkd", "beta": 0.5, "lmbda": 0.5},
                                       {"method": "gkd", "beta": 1.0, "lmbda": 1.0, "support": "teacher_topk", "top_k": 8}])
def test_distillation_lowers_reverse_kl_on_a_fixed_batch(tiny_config, objective):
    tiny_config["objective"] = objective
    tiny_config["optim"] = {"steps": 25, "learning_rate": 3e-3}
    run = setup(load_config(base=tiny_config))
    torch.manual_seed(123)
    fixed = sample(run.student, run.tokenizer, run.prompts.examples[:16], max_completion_length=12)
    before = fixed_batch_reverse_kl(run, fixed)
    result = train(run)
    after = fixed_batch_reverse_kl(run, fixed)
    assert after < 0.9 * before, (before, after)
    assert result["after"]["reverse_kl"] < result["before"]["reverse_kl"]


def test_an_answer_loops_when_four_tokens_recur_three_times(tiny_config):
    garden = [5, 6, 7, 5, 8]  # "a garden is a garden,"
    assert loops(garden * 3) and not loops(garden * 2) and not loops(list(range(40))) and not loops([])
    assert not loops([1, 2, 3] * 3)  # three tokens three times: too short to count
    run = setup(load_config(base=tiny_config))
    rollouts = sample(run.student, run.tokenizer, run.prompts.examples[:4], max_completion_length=12, temperature=0.0)
    rows = rollouts.completions()
    assert [len(r) for r in rows] == rollouts.lengths().tolist()
    assert looping([rollouts]) == sum(map(loops, rows)) / 4


def test_opd_train_cli_writes_logs_config_and_checkpoint(tiny_config, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--set", "optim.steps=2", "--set", "optim.gradient_accumulation_steps=2"]) == 0
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "advantage", "reverse_kl_k1", "student_entropy", "completion_length", "truncation_rate", "tokens_per_s",
                "peak_memory_mib", "time_rollout", "time_teacher", "time_forward_backward", "time_optimizer"):
        assert key in steps[0], key
    assert load_config(run_dir / "config.yaml").optim.steps == 2
    start = records[0]
    assert 0 <= start["eval"]["looping"] <= 1 and 0 <= start["teacher"]["looping"] <= 1
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer_config.json").is_file()
    assert main(["eval", str(path), "--checkpoint", str(checkpoint)]) == 0


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("student: {path: s}\nteacher: {path: t}\ndata: {train: d}\nrolout: {}\n")
    assert main(["train", str(path)]) == 2
    assert "did you mean 'rollout'" in capsys.readouterr().out
