"""What the loop hands the objective: dropout, TrOPD guidance answers, step-wide advantage normalisation."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from opdkit.config import load_config
from opdkit.data import render_prompt
from opdkit.errors import OPDError
from opdkit.rollout import from_dataset
from opdkit.objectives import credit
from opdkit.scenarios.arith import build_tokenizer
from opdkit.train import collect, setup, train_step


def optimizer_for(run):
    optimizer = torch.optim.AdamW(run.student.parameters(), lr=1e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def record_token_loss(run):
    """Wrap the method's token_loss to keep what the loss pass saw (and the moments set at that time)."""
    seen = []
    token_loss = run.method.token_loss

    def recording(logits, batch, signal, hidden=None):
        out = token_loss(logits, batch, signal, hidden=hidden)
        if torch.is_grad_enabled():  # the loss pass, not a no-grad pre-pass
            seen.append((logits.detach(), batch, out, run.method.advantage_moments))
        return out

    run.method.token_loss = recording
    return seen


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_the_loss_pass_sees_the_policy_that_sampled(tiny_config, tmp_path, disable_dropout):
    """With attention dropout 0.5, the importance ratio pi/mu is 1 only when the loss pass runs without dropout."""
    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer, 1, init=0.3)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "dropout")
    tokenizer.save_pretrained(tmp_path / "dropout")
    tiny_config["student"] = {"path": str(tmp_path / "dropout"), "disable_dropout": disable_dropout}
    run = setup(load_config(base=tiny_config))
    assert run.student.model.layers[0].self_attn.attention_dropout == 0.5
    seen = record_token_loss(run)
    torch.manual_seed(0)
    train_step(run, *optimizer_for(run), random.Random(0))
    logits, batch, _, _ = seen[0]
    own = logits.float().log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    gap = ((own - batch.sampler_logprobs).abs() * batch.completion_mask).max()
    if disable_dropout:
        assert gap < 1e-4
    else:
        assert gap > 1e-2


def tropd_config(tiny_config, **guidance):
    tiny_config["objective"] = {"method": "tropd", "prefix_guidance": {"enabled": True, "anneal_steps": 4, **guidance}}
    tiny_config["rollout"] = {"max_completion_length": 12, "batch_size": 4}
    return load_config(base=tiny_config)


def test_guidance_asks_the_teacher_once_per_prompt_and_uses_its_answer(tiny_config):
    run = setup(tropd_config(tiny_config))
    asked = []
    sample = run.teacher.sample

    decoded = []

    def counting(examples, *args, **kwargs):
        asked.extend(str(e.messages) for e in examples)
        answers = sample(examples, *args, **kwargs)
        decoded.append(float(answers.completion_mask.sum()))
        return answers

    run.teacher.sample = counting
    rng = random.Random(0)
    batches = [collect(run, rng, step) for step in range(20)]  # 20 x 4 prompts out of 64: some come twice
    assert len(asked) == len(set(asked)) and len(asked) == len(run.guidance_answers) < 80
    assert run.guidance_tokens == sum(decoded) > 0  # what the step's record logs as teacher_guidance_tokens
    teacher_answer = sample(batches[0].examples, 12, temperature=0.0)  # the teacher's own greedy answer
    eos = run.tokenizer.eos_token_id
    for row in range(4):
        answer = [t for t, m in zip(teacher_answer.completion_ids[row].tolist(), teacher_answer.completion_mask[row].tolist())
                  if m and t != eos]
        prefix = batches[0].completion_ids[row][batches[0].guidance_mask[row].bool()].tolist()
        assert prefix == answer  # step 0: the whole answer
        assert batches[0].own_mask[row].sum() == batches[0].completion_mask[row].sum() - len(answer)


def test_a_step_logs_the_teacher_tokens_decoded_for_its_guidance_answers(tiny_config):
    run = setup(tropd_config(tiny_config))
    record = train_step(run, *optimizer_for(run), random.Random(0))
    answers = sum(len(a) for a in run.guidance_answers.values())  # without end tokens; decoded with them
    assert answers <= record["teacher_guidance_tokens"] <= answers + len(run.guidance_answers)
    assert run.guidance_tokens == 0.0  # counted once, in the step that asked
    dataset = setup(tropd_config(tiny_config, answer="dataset"))
    assert "teacher_guidance_tokens" not in train_step(dataset, *optimizer_for(dataset), random.Random(0))


def test_guidance_from_the_dataset_only_when_asked(tiny_config):
    run = setup(tropd_config(tiny_config, answer="dataset"))
    run.teacher.sample = lambda *a, **k: pytest.fail("the teacher was asked for a guidance answer")
    batch = collect(run, random.Random(0), 0)
    dataset = from_dataset(run.tokenizer, batch.examples, 12)
    for row in range(4):
        completion = dataset.completion_ids[row][dataset.completion_mask[row].bool()].tolist()
        expected = [t for t in completion if t != run.tokenizer.eos_token_id]
        assert batch.completion_ids[row][batch.guidance_mask[row].bool()].tolist() == expected and expected


def test_guidance_prefix_plus_budget_must_fit_the_context(tiny_config):
    prompt = max(len(render_prompt(build_tokenizer(), [{"role": "user", "content": "1234+5678="}])), 1)
    budget = (64 - prompt) // 2 + 4  # the prompt and the budget fit in 64; prompt, prefix and budget do not
    config = tropd_config(tiny_config)
    config.rollout.max_completion_length = budget
    with pytest.raises(OPDError, match=r"guidance prefix of up to .* exceeds the model context of 64"):
        setup(config)
    config.objective.prefix_guidance.enabled = False
    setup(config)  # fine without guidance


def test_advantages_are_standardised_over_the_whole_step(tiny_config):
    """With accumulation, every micro-batch uses the step's moments, computed on the same gate draws."""
    tiny_config["objective"] = {"method": "tropd", "prefix_guidance": {"enabled": False},
                                "credit": {"normalize": True}}
    tiny_config["optim"] = {"steps": 2, "learning_rate": 1e-3, "gradient_accumulation_steps": 3}
    tiny_config["rollout"] = {"max_completion_length": 12, "batch_size": 4}
    run = setup(load_config(base=tiny_config))
    seen = record_token_loss(run)
    torch.manual_seed(0)
    train_step(run, *optimizer_for(run), random.Random(0))
    assert len(seen) == 3 and run.method.advantage_moments is None  # cleared after the step
    step = credit.step_moments([(out.stats["advantage"], batch.own_mask) for _, batch, out, _ in seen])
    for _, _, _, moments in seen:
        assert moments == pytest.approx(step, rel=1e-6)
    per_batch = credit.step_moments([(seen[0][2].stats["advantage"], seen[0][1].own_mask)])
    assert abs(per_batch[0] - step[0]) > 1e-4  # the step's moments are not the first micro-batch's
