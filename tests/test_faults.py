"""Non-finite steps are skipped, explained and saved; a streak of them stops the run with the cause."""

import math

import pytest
import torch

from opdkit import checkpoint
from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.faults import diagnose
from opdkit.train import setup, train


def make_run(config: dict, **optim):
    config["rollout"] = {"max_completion_length": 8, "batch_size": 4}
    config["data"]["eval_size"] = 8
    config["optim"] = {**config["optim"], **optim}
    return setup(load_config(base=config))


def poison_teacher(run, steps: set[int]) -> None:
    """The teacher returns NaN for the first sampled token on the given steps (training calls only:
    evaluation scores through the same teacher, under no_grad)."""
    score, calls = run.teacher.score, [0]

    def scored(batch, *args, **kwargs):
        training = torch.is_grad_enabled()
        calls[0] += training
        signal = score(batch, *args, **kwargs)
        if training and calls[0] in steps:
            signal.token_logprobs[0, 0] = math.nan
        return signal

    run.teacher.score = scored


def poison_gradient(run, steps: set[int]) -> None:
    """The loss stays finite, one gradient becomes infinite on the given steps."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * math.inf if calls[0] in steps else grad

    run.student.get_input_embeddings().weight.register_hook(hook)


@pytest.mark.parametrize("poison, cause", [(poison_teacher, "the teacher returned NaN"),
                                           (poison_gradient, "backward overflowed")])
def test_nonfinite_steps_are_skipped_explained_and_their_batch_saved(tiny_config, tmp_path, poison, cause):
    run = make_run(tiny_config, steps=4)
    poison(run, {2, 3})
    train(run)

    skipped = {r["step"]: r for r in run.history if "nonfinite" in r}
    assert sorted(skipped) == [2, 3]
    assert all(cause in r["nonfinite"] for r in skipped.values())
    dump = torch.load(skipped[2]["nonfinite_batch"], weights_only=True)
    assert cause in dump["reason"]
    micro = dump["micro_batches"][0]
    assert len(micro["completions"]) == 4 and micro["prompts"][0][0]["role"] == "user"
    assert {"completion_ids", "completion_mask"} <= set(micro["rollouts"]) and "token_logprobs" in micro["teacher"]
    state = torch.load(checkpoint.latest(tmp_path / "run") / checkpoint.STATE, weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {2.0}  # 4 steps, 2 skipped: the weights moved twice


def test_a_streak_of_nonfinite_steps_stops_with_the_cause_and_can_resume(tiny_config, tmp_path):
    run = make_run(tiny_config, steps=4, max_nonfinite_steps=2)
    poison_teacher(run, {1, 2, 3, 4})
    with pytest.raises(OPDError, match=r"(?s)2 steps in a row .* the teacher returned NaN .* opd train --resume"):
        train(run)
    assert checkpoint.latest(tmp_path / "run").name == "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "run" / "nonfinite").iterdir()) == ["step-1.pt", "step-2.pt"]

    resumed = make_run(tiny_config, steps=4, max_nonfinite_steps=2)  # the cause fixed: a healthy teacher
    train(resumed, resume=True)
    assert [("nonfinite" in r) for r in resumed.history] == [True, True, False, False]


@pytest.fixture
def scored_batch(tiny_config):
    from opdkit.rollout import sample

    run = make_run(tiny_config)
    torch.manual_seed(0)
    batch = sample(run.student, run.tokenizer, run.prompts.examples[:4], max_completion_length=8)
    return run, batch, run.teacher.score(batch)


def test_diagnosis_blames_a_teacher_minus_infinity_on_a_sampled_token(scored_batch):
    run, batch, signal = scored_batch
    signal.token_logprobs[1, 2] = -math.inf
    token = int(batch.completion_ids[1, 2])
    reason = diagnose(run.student, [batch], [signal], math.inf, math.nan)
    assert f"-inf on a sampled token (micro-batch 0, row 1, position 2, token id {token})" in reason


def test_diagnosis_ignores_padding_and_finds_the_student(scored_batch):
    run, batch, signal = scored_batch
    padded = (batch.completion_mask == 0).nonzero()
    if len(padded):
        signal.token_logprobs[tuple(padded[0])] = -math.inf  # not a counted token: not the cause
    assert "objective overflowed" in diagnose(run.student, [batch], [signal], math.nan, math.nan)
    assert "backward overflowed" in diagnose(run.student, [batch], [signal], 1.5, math.inf)
    with torch.no_grad():
        run.student.get_input_embeddings().weight[3, 0] = math.inf
    assert "student's weights are not finite" in diagnose(run.student, [batch], [signal], math.nan, math.nan)
