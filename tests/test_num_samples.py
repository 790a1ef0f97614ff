"""Several samples per prompt (``rollout.num_samples``): the layout, the per-prompt baseline's algebra, the logs.

The baseline's effect on the expected gradient (leave-one-out unbiased, group mean scaled by ``(n-1)/n``) is
proved by exact enumeration in ``test_proofs.py``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from opdkit.config import ObjectiveConfig, load_config
from opdkit.errors import OPDError
from opdkit.methods.formula import Formula
from opdkit.objectives import credit, groups
from opdkit.rollout import Rollouts, grouped
from opdkit.teachers import TeacherSignal
from opdkit.train import collect, setup, train

PG_BASELINE = {"method": "opd", "credit": {"gamma": 1.0, "baseline": "leave_one_out"}}


# ---- layout ----------------------------------------------------------------------------------------------

def test_grouped_repeats_each_prompt_in_adjacent_rows():
    examples, group = grouped(["a", "b", "c"], 2)
    assert examples == ["a", "a", "b", "b", "c", "c"]
    assert group.tolist() == [0, 0, 1, 1, 2, 2]


def test_collect_draws_num_samples_per_prompt(tiny_config):
    tiny_config["rollout"].update(batch_size=3, num_samples=4)
    run = setup(load_config(base=tiny_config))
    torch.manual_seed(0)
    batch = collect(run, random.Random(0), 0)
    assert batch.completion_ids.shape[0] == 12 and batch.prompt_ids.shape[0] == 12
    assert batch.group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for g in range(3):  # one prompt per group, the samples of it different (temperature 1)
        rows = [i for i in range(12) if batch.group[i] == g]
        assert len({json.dumps(batch.examples[i].messages) for i in rows}) == 1
        assert len({tuple(batch.prompt_ids[i].tolist()) for i in rows}) == 1
    completions = [tuple(row) for row in batch.completion_ids.tolist()]
    assert any(len(set(completions[4 * g: 4 * g + 4])) > 1 for g in range(3))
    assert len({json.dumps(batch.examples[4 * g].messages) for g in range(3)}) == 3  # three prompts


def test_one_sample_per_prompt_carries_no_groups(tiny_config):
    run = setup(load_config(base=tiny_config))
    batch = collect(run, random.Random(0), 0)
    assert batch.group is None and batch.completion_ids.shape[0] == tiny_config["rollout"]["batch_size"]


# ---- the baseline's algebra on hand-built tensors ---------------------------------------------------------

def test_group_mean_and_leave_one_out_values():
    returns = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, -1.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assert torch.allclose(groups.baseline(returns, group, "group_mean"),
                          torch.tensor([2.0, 2.0, 2.0, 2.0, 4 / 3, 4 / 3, 4 / 3]))
    assert torch.allclose(groups.baseline(returns, group, "leave_one_out"),
                          torch.tensor([3.0, 1.0, 2.0, 2.0, -0.5, 2.5, 2.0]))
    # R_i - b_i^mean = (n-1)/n (R_i - b_i^loo), row by row
    n = torch.tensor([2.0, 2, 2, 2, 3, 3, 3])
    assert torch.allclose(returns - groups.baseline(returns, group, "group_mean"),
                          (n - 1) / n * (returns - groups.baseline(returns, group, "leave_one_out")))


def test_group_ids_need_not_be_sorted_or_contiguous():
    returns = torch.tensor([1.0, 4.0, 3.0, 8.0])
    group = torch.tensor([7, 2, 7, 2])
    assert groups.baseline(returns, group, "leave_one_out").tolist() == [3.0, 8.0, 1.0, 4.0]
    assert groups.baseline(returns, group, "group_mean").tolist() == [2.0, 6.0, 2.0, 6.0]


@pytest.mark.parametrize("kind", ["group_mean", "leave_one_out"])
def test_equal_returns_in_a_group_give_zero_advantage(kind):
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    returns = torch.tensor([0.75, 0.75, 0.75, -2.0, -2.0, -2.0])  # exact in binary: exactly zero
    assert torch.equal(returns - groups.baseline(returns, group, kind), torch.zeros(6))
    returns = torch.tensor([0.7, 0.7, 0.7, -2.1, -2.1, -2.1])  # otherwise zero up to rounding
    assert torch.allclose(returns - groups.baseline(returns, group, kind), torch.zeros(6), atol=1e-6)


def test_spread_is_the_mean_over_prompts_of_the_sample_std():
    values = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 3.0, 6.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    expected = (torch.tensor([1.0, 3.0]).std() + 0.0 + torch.tensor([0.0, 3.0, 6.0]).std()) / 3
    assert groups.spread(values, group) == pytest.approx(float(expected))
    assert groups.spread(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 0.0  # no prompt with two samples


def hand_built(baseline: str, group: torch.Tensor | None):
    """Four rows of three tokens (the last row two), student logits and teacher log-probs from a seed."""
    g = torch.Generator().manual_seed(0)
    B, C, V = 4, 3, 5
    logits = torch.randn(B, C, V, generator=g)
    teacher = torch.randn(B, C, V, generator=g).log_softmax(-1)
    ids = torch.randint(0, V, (B, C), generator=g)
    mask = torch.ones(B, C)
    mask[3, 2] = 0
    token = lambda lp: lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    rollouts = Rollouts(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), ids, mask,
                        torch.zeros(B, dtype=torch.bool), [], "student",
                        sampler_logprobs=token(logits.log_softmax(-1)) * mask, group=group)
    objective = ObjectiveConfig(method="opd", credit={"gamma": 1.0, "baseline": baseline})
    out = Formula(objective).token_loss(logits, rollouts, TeacherSignal(token(teacher), logprobs=teacher))
    reward = -(token(logits.log_softmax(-1)) - token(teacher)) * mask  # classic OPD: r_t = -l_t
    return out, reward, mask


@pytest.mark.parametrize("kind", ["group_mean", "leave_one_out"])
def test_formula_subtracts_the_baseline_from_every_token(kind):
    group = torch.tensor([0, 0, 1, 1])
    out, reward, mask = hand_built(kind, group)
    returns = reward.sum(1)
    expected = (credit.returns_to_go(reward, mask, 1.0) - groups.baseline(returns, group, kind)[:, None]) * mask
    assert torch.allclose(out.stats["advantage"], expected, atol=1e-6)
    assert out.scalars["group_return_std"] == pytest.approx(groups.spread(returns, group), rel=1e-5)


def test_formula_without_baseline_leaves_the_advantage_alone():
    plain, reward, mask = hand_built("none", None)
    with_groups, _, _ = hand_built("none", torch.tensor([0, 0, 1, 1]))
    assert torch.equal(plain.stats["advantage"], with_groups.stats["advantage"])
    assert torch.equal(plain.loss, with_groups.loss)
    assert "group_return_std" in with_groups.scalars and "group_return_std" not in plain.scalars


def test_a_baseline_without_groups_is_refused():
    with pytest.raises(OPDError, match="num_samples"):
        hand_built("leave_one_out", None)


# ---- config ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective, rollout, match", [
    (PG_BASELINE, {}, "num_samples >= 2"),
    ({"method": "opd", "credit": {"baseline": "group_mean"}}, {"num_samples": 2}, "credit.gamma: 1"),
    ({"method": "opd", "credit": {"gamma": 1.0, "value": "zero", "baseline": "group_mean"}}, {"num_samples": 2},
     "credit.value: none"),
    ({"method": "gkd", "beta": 1.0, "support": "teacher_topk", "top_k": 4, "credit": {"baseline": "group_mean"}},
     {"num_samples": 2}, "policy-gradient"),
])
def test_incoherent_baselines_are_refused(tiny_config, objective, rollout, match):
    tiny_config["objective"] = objective
    tiny_config["rollout"].update(rollout)
    with pytest.raises(OPDError, match=match):
        load_config(base=tiny_config)


# ---- the loop ----------------------------------------------------------------------------------------------

def losses(config: dict) -> list[dict]:
    train(setup(load_config(base=config)))
    with open(f"{config['output_dir']}/metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_two_steps_with_samples_and_baseline_log_the_spread(tiny_config):
    tiny_config["objective"] = PG_BASELINE
    tiny_config["rollout"].update(batch_size=4, num_samples=2)
    tiny_config["optim"]["steps"] = 2
    tiny_config["data"].pop("eval")
    tiny_config["data"].pop("task")
    records = losses(tiny_config)
    assert len(records) == 2
    for r in records:
        assert r["group_return_std"] > 0 and r["group_length_std"] >= 0
        assert all(map(lambda v: v == v, (r["loss"], r["grad_norm"])))  # finite, not NaN


def test_one_sample_per_prompt_is_todays_run(tiny_config, tmp_path):
    tiny_config["optim"]["steps"] = 2
    tiny_config["data"].pop("eval")
    tiny_config["data"].pop("task")
    default = losses(tiny_config)
    explicit = dict(tiny_config, output_dir=str(tmp_path / "explicit"), rollout={**tiny_config["rollout"], "num_samples": 1})
    again = losses(explicit)
    assert [r["loss"] for r in default] == [r["loss"] for r in again]
    assert not any(k.startswith("group_") for r in default + again for k in r)
