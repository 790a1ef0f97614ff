"""A teacher with its own context (``teacher.prompt``) and the self-teacher (``teacher: {kind: self}``)."""

import copy
import random
import re

import pytest
import torch
import yaml

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.data import left_pad, render_prompt
from opdkit.errors import OPDError
from opdkit.teachers import LocalTeacher
from opdkit.train import collect, lr_lambda, setup, train_step, trainable_parameters

# the tiny tokenizer knows digits, "+", "=", "c", space and newline only
PRIVILEGED = {"system": "1+1=2", "template": "{prompt}\n= {answer}"}


def _run(tiny_config, teacher: dict, **changes):
    tiny_config = copy.deepcopy(tiny_config)
    tiny_config.update(precision="fp32", teacher=teacher, **changes)
    tiny_config["data"].pop("eval")  # no evaluation: these tests read single steps
    return setup(load_config(base=tiny_config))


def _step(run) -> dict:
    optimizer = torch.optim.AdamW(trainable_parameters(run), lr=run.config.optim.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.config))
    return train_step(run, optimizer, scheduler, random.Random(0))


def test_a_privileged_context_changes_the_teachers_logprobs_of_the_same_tokens_and_only_the_teachers(tiny, tiny_config):
    run = _run(tiny_config, {"path": str(tiny / "teacher"), "prompt": PRIVILEGED})
    batch = collect(run, random.Random(0), 0)
    prompt_ids, completion_ids = batch.prompt_ids.clone(), batch.completion_ids.clone()
    student_before = batch.token_logprobs(run.student).detach()

    plain = LocalTeacher(run.teacher.model, run.tokenizer).score(batch).token_logprobs
    privileged = run.teacher.score(batch).token_logprobs
    mask = batch.completion_mask.bool()
    assert plain.shape == privileged.shape == batch.completion_ids.shape  # aligned with the student's positions
    assert (plain[mask] - privileged[mask]).abs().max() > 1e-3
    # the student's batch, and so its log-probs, are untouched
    assert torch.equal(batch.prompt_ids, prompt_ids) and torch.equal(batch.completion_ids, completion_ids)
    assert torch.equal(batch.token_logprobs(run.student).detach(), student_before)

    view = run.teacher.context.view(batch)
    text = run.tokenizer.decode(view.prompt_ids[0][view.prompt_mask[0].bool()])
    example = batch.examples[0]
    assert text.startswith("<|user|>1+1=2<|user|>") and f"{example.messages[-1]['content']}\n= {example.answer}" in text
    assert torch.equal(view.completion_ids, batch.completion_ids)

    # teacher-written answers (guidance, evaluation) are written in its view and handed back after the student's prompt
    answers = run.teacher.sample(batch.examples[:2], 4, temperature=0.0)
    student_ids, _ = left_pad([render_prompt(run.tokenizer, e.messages) for e in batch.examples[:2]],
                              run.tokenizer.pad_token_id)
    assert torch.equal(answers.prompt_ids, student_ids) and answers.examples == batch.examples[:2]


def test_self_teacher_at_step_zero_gives_zero_loss_and_gradient_without_a_context_and_not_with_one(tiny_config):
    plain = _step(_run(tiny_config, {"kind": "self"}))
    assert plain["loss"] == 0.0 and plain["grad_norm"] == 0.0
    privileged = _step(_run(tiny_config, {"kind": "self", "prompt": PRIVILEGED}))
    assert privileged["loss"] != 0.0 and privileged["grad_norm"] > 0.0


@pytest.mark.parametrize("ema", [None, 0.75])
def test_an_ema_self_teacher_follows_the_student_and_a_frozen_one_stays(tiny_config, ema):
    run = _run(tiny_config, {"kind": "self", "ema": ema, "prompt": PRIVILEGED})
    start = {k: v.clone() for k, v in run.teacher.model.state_dict().items()}
    _step(run)
    student, teacher = run.student.state_dict(), run.teacher.model.state_dict()
    assert any(not torch.equal(student[k], start[k]) for k in start)  # the student moved
    for name, before in start.items():
        expected = before if ema is None else ema * before + (1 - ema) * student[name]
        torch.testing.assert_close(teacher[name], expected)


def test_bad_teacher_contexts_are_refused_before_any_model_loads(tiny, tiny_config, monkeypatch):
    teacher = {"path": str(tiny / "teacher")}
    for template, needle in (("{0} {prompt}", "placeholder {0}"), ("{prompt!r}", "placeholder {prompt!r}"),
                             ("{prompt", "not a template")):
        with pytest.raises(OPDError, match=r"teacher\.prompt\.template.*" + re.escape(needle)):
            load_config(base={**tiny_config, "teacher": {**teacher, "prompt": {"template": template}}})
    with pytest.raises(OPDError, match="changes nothing"):
        load_config(base={**tiny_config, "teacher": {**teacher, "prompt": {}}})

    import opdkit.train as train_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the teacher context was checked")

    monkeypatch.setattr(train_module, "load_model", must_not_load)
    monkeypatch.setattr(train_module, "load_student", must_not_load)
    config = load_config(base={**tiny_config, "teacher": {**teacher, "prompt": {"template": "{prompt} {solution}"}}})
    with pytest.raises(OPDError, match=r"record 1: teacher\.prompt\.template uses \['solution'\].*add the column"):
        setup(config)


def test_the_run_log_shows_the_students_and_the_teachers_rendering(tiny_config, tmp_path, capsys):
    tiny_config.update(teacher={"kind": "self", "ema": 0.9, "prompt": PRIVILEGED}, optim={"steps": 1, "learning_rate": 1e-3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # the banner's table wraps long rows
    assert "self: the student's own weights, an exponential moving average of it (decay 0.9)" in flat
    assert "before training:" in out and "exact reverse KL to teacher" in flat  # measured in the teacher's view
    student_view, teacher_view = out.split("first prompt")[1].split("the teacher's view of it")
    assert "1+1=2" not in student_view and "=" not in student_view
    assert "'<|user|>1+1=2<|user|>" in teacher_view and "\\n= " in teacher_view


def test_an_ema_teacher_resumes_from_its_checkpoint(tiny_config):
    from opdkit import checkpoint

    teacher = {"kind": "self", "ema": 0.5, "prompt": PRIVILEGED}
    run = _run(tiny_config, teacher)
    optimizer = torch.optim.AdamW(trainable_parameters(run), lr=run.config.optim.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.config))
    train_step(run, optimizer, scheduler, random.Random(0))
    run.run_dir.mkdir(parents=True)
    saved = checkpoint.save(run, optimizer, scheduler, random.Random(0), checkpoint.LoopState(step=1))

    fresh = _run(tiny_config, teacher)  # set up again: the teacher is the initial student
    moved = run.teacher.model.state_dict()
    assert any(not torch.equal(v, moved[k]) for k, v in fresh.teacher.model.state_dict().items())
    optimizer = torch.optim.AdamW(trainable_parameters(fresh), lr=fresh.config.optim.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(fresh.config))
    checkpoint.restore(fresh, optimizer, scheduler, random.Random(0), saved)
    assert all(torch.equal(v, moved[k]) for k, v in fresh.teacher.model.state_dict().items())


def test_a_served_teacher_scores_in_its_own_view_as_the_local_one_does(tiny, tiny_config):
    """The same privileged context over HTTP: the server gets the teacher's prompt with the student's completion ids,
    and its log-probs equal the local teacher's in that view; its answers come back after the student's prompt."""
    from opdkit.models import load_model, load_tokenizer
    from opdkit.serve import create_app, serve_in_thread

    local = _run(tiny_config, {"path": str(tiny / "teacher"), "prompt": PRIVILEGED})
    batch = collect(local, random.Random(0), 0)
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        served = _run(tiny_config, {"kind": "server", "base_url": url, "model": "t", "prompt": PRIVILEGED})
        mask = batch.completion_mask.bool()
        expected = local.teacher.score(batch).token_logprobs[mask]
        assert torch.allclose(served.teacher.score(batch).token_logprobs[mask], expected, atol=1e-4)
        answers = served.teacher.sample(batch.examples[:2], 4, temperature=0.0)
    student_ids, _ = left_pad([render_prompt(served.tokenizer, e.messages) for e in batch.examples[:2]],
                              served.tokenizer.pad_token_id)
    assert torch.equal(answers.prompt_ids, student_ids)
    assert answers.texts(served.tokenizer) == local.teacher.sample(batch.examples[:2], 4, temperature=0.0).texts(local.tokenizer)


def test_a_chat_teacher_is_asked_in_its_own_view(tiny_config):
    """A text-only teacher's requests carry the teacher's conversation (its system message and template), while the
    rollouts it returns keep the student's prompt."""
    from opdkit.config import ChatTeacherSpec
    from opdkit.data import Example
    from opdkit.models import load_tokenizer
    from opdkit.teachers.chat import ChatTeacher
    from opdkit.teachers.context import TeacherContext

    tokenizer = load_tokenizer(tiny_config["student"]["path"])
    spec = ChatTeacherSpec(kind="chat", base_url="http://127.0.0.1:9/v1", model="m", prompt=PRIVILEGED)
    teacher = ChatTeacher(spec, tokenizer, TeacherContext(spec.prompt, tokenizer))
    sent = []
    teacher.client.map = lambda path, payloads, check: (sent.extend(payloads), [
        {"choices": [{"message": {"content": "12"}, "finish_reason": "stop"}]} for _ in payloads])[1]
    example = Example([{"role": "user", "content": "5+7"}], answer="12", columns={"answer": "12"})
    rollouts = teacher.sample([example], 4)
    assert sent[0]["messages"] == [{"role": "system", "content": "1+1=2"}, {"role": "user", "content": "5+7\n= 12"}]
    assert tokenizer.decode(rollouts.prompt_ids[0][rollouts.prompt_mask[0].bool()]) == \
        tokenizer.decode(render_prompt(tokenizer, example.messages))
