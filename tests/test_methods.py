"""Every named method runs in the real loop on tiny models and logs what it is about."""

import math
import statistics

import pytest
import torch

from opdkit.config import load_config
from opdkit.data import load_examples, render_prompt
from opdkit.methods import METHODS, preset
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import sample
from opdkit.train import setup, train

FORMULA_METHODS = [m for m in METHODS if preset(m).get("reward") != "teacher"]  # chunk_opd needs a chat teacher
EXPECTED_LOGS = {"tropd": ["trust_frac", "guidance_fraction", "reverse_kl_k1"],
                 "eopd": ["entropy_gate_rate", "teacher_entropy", "reverse_kl_k1"], "opd": ["advantage", "reverse_kl_k1"],
                 "gae_opd": ["advantage"], "vopd": ["advantage"], "opd_plus": ["advantage", "log_ratio_clamp_rate"],
                 "gkd": ["reverse_kl_full"], "skew_kl": ["reverse_kl_full"], "near_future": ["advantage"],
                 "cr_opd": ["cr_routed_share", "cr_unroutable_share", "cr_set_size", "cr_teacher_mass"]}


@pytest.mark.parametrize("method", FORMULA_METHODS)
def test_method_runs_and_logs(tiny_config, method):
    tiny_config["objective"] = {"method": method}
    tiny_config["optim"] = {"steps": 3, "learning_rate": 1e-3}
    run = setup(load_config(base=tiny_config))
    initial = [p.detach().clone() for p in run.student.parameters()]
    result = train(run)
    for record in run.history:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        for key in EXPECTED_LOGS.get(method, []):
            assert key in record, (method, key)
    assert any(not torch.equal(a, b) for a, b in zip(initial, run.student.parameters()))  # it trained
    assert result["after"]["reverse_kl"] != result["before"]["reverse_kl"]


def test_learned_value_head_trains_with_the_student(tiny_config):
    tiny_config["objective"] = {"method": "gae_opd", "credit": {"value": "learned", "gamma": 1.0, "lam": 0.9}}
    tiny_config["optim"] = {"steps": 4, "learning_rate": 1e-2}
    run = setup(load_config(base=tiny_config))
    head = run.method.value_head
    assert head is not None and float(head.weight.detach().abs().sum()) == 0
    train(run)
    assert float(head.weight.detach().abs().sum()) > 0
    assert {"value_explained_variance", "value_loss", "value_grad_norm"} <= set(run.history[-1])


def _learned_batch(tiny, lam=0.9):
    """The tiny student and a value-learned GAE objective, a batch of its samples and the teacher's scores."""
    from opdkit.config import ObjectiveConfig
    from opdkit.teachers import LocalTeacher

    student, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    teacher = LocalTeacher(load_model(str(tiny / "teacher")), tokenizer)
    torch.manual_seed(0)
    batch = sample(student, tokenizer, load_examples(str(tiny / "train.jsonl"))[:8], max_completion_length=10)
    objective = ObjectiveConfig(method="gae_opd", credit={"value": "learned", "gamma": 1.0, "lam": lam})
    return student, batch, teacher.score(batch, "token"), objective


def test_learned_value_loss_trains_the_head_alone_the_student_sees_a_fixed_baseline(tiny):
    """The student's gradient with ``value: learned`` (policy loss plus the head's regression loss, as the loop
    backpropagates them) is exactly the one with the head's output as a fixed baseline: nothing reaches the trunk
    from the value loss."""
    from opdkit.methods.formula import Formula

    student, batch, signal, objective = _learned_batch(tiny)
    mask = batch.completion_mask
    learned = Formula(objective)
    learned.attach(student)
    torch.manual_seed(1)  # a head away from zero, so the baseline and its loss are not trivial
    torch.nn.init.normal_(learned.value_head.weight, std=0.5)
    torch.nn.init.constant_(learned.value_head.bias, -1.0)
    student.zero_grad()
    logits, hidden = batch.completion_logits(student, return_hidden=True)
    out = learned.token_loss(logits, batch, signal, hidden=hidden)
    assert out.value_loss is not None and float((out.value_loss * mask).sum()) > 0
    ((out.loss + out.value_loss) * mask).sum().backward()
    with_head = [p.grad.clone() for p in student.parameters()]
    assert all(float(p.grad.abs().sum()) > 0 for p in learned.parameters())  # the head is trained

    baseline = learned.value_head(hidden.detach()).squeeze(-1).detach()
    fixed = Formula(objective)  # no head: GAE over the same values, held fixed
    fixed._values = lambda *args: baseline
    student.zero_grad()
    logits, hidden = batch.completion_logits(student, return_hidden=True)
    plain = fixed.token_loss(logits, batch, signal, hidden=hidden)
    assert plain.value_loss is None
    (plain.loss * mask).sum().backward()
    assert torch.equal(plain.loss, out.loss)
    for a, b in zip(with_head, [p.grad for p in student.parameters()]):
        assert torch.equal(a, b)


def test_learned_value_head_moves_toward_the_returns_at_its_own_learning_rate(tiny):
    """On one toy batch, Adam steps of the head alone at ``credit.value_learning_rate`` (its default) raise the
    explained variance of the returns from 0 (the zero head) toward the 0.76 that least squares reaches on this
    batch, and cut the regression loss by more than two thirds."""
    from opdkit.methods.formula import Formula

    student, batch, signal, objective = _learned_batch(tiny, lam=1.0)  # lam 1: the targets are the returns
    method = Formula(objective)
    method.attach(student)
    assert method.own_learning_rate == objective.credit.value_learning_rate == 0.1
    optimizer = torch.optim.AdamW(method.parameters(), lr=method.own_learning_rate)
    with torch.no_grad():
        logits, hidden = batch.completion_logits(student, return_hidden=True)
    explained, losses = [], []
    for _ in range(60):
        out = method.token_loss(logits, batch, signal, hidden=hidden)
        explained.append(out.scalars["value_explained_variance"])
        loss = (out.value_loss * batch.completion_mask).sum() / batch.completion_mask.sum()
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert explained[0] == 0.0 and explained[-1] > 0.25
    assert statistics.mean(explained[-20:]) > statistics.mean(explained[:20]) + 0.15
    assert losses[-1] < 0.3 * losses[0]


def test_value_learning_rate_is_refused_without_a_learned_value_and_value_coef_is_retired():
    from opdkit.errors import OPDError

    for value in ("none", "zero", "analytic"):
        gae = {"gamma": 1.0, "lam": 0.95} if value != "none" else {}
        with pytest.raises(OPDError, match="credit.value_learning_rate is the learning rate of a learned value head"):
            load_config(base={"objective": {"method": "opd",
                                            "credit": {"value": value, "value_learning_rate": 1e-3, **gae}}})
    with pytest.raises(OPDError, match="greater than 0"):
        load_config(base={"objective": {"method": "gae_opd", "credit": {"value": "learned", "value_learning_rate": 0}}})
    from opdkit.config import ObjectiveConfig

    accepted = ObjectiveConfig(method="gae_opd", credit={"value": "learned", "value_learning_rate": 3e-3})
    assert accepted.credit.value_learning_rate == 3e-3
    with pytest.raises(OPDError, match="value_coef is no longer a key.*value_learning_rate"):
        load_config(base={"objective": {"method": "gae_opd", "credit": {"value": "learned", "value_coef": 0.5}}})


def test_a_learned_value_run_resumes_onto_the_uninterrupted_run(tiny_config, tmp_path):
    """The head's weights and its own optimizer group (learning rate, Adam moments) come back from a checkpoint: a
    run resumed from step 2 ends where the uninterrupted one did. An older run folder's config.yaml, which holds the
    retired value_coef at its default, still loads."""
    import shutil

    import yaml

    from opdkit import checkpoint

    tiny_config["objective"] = {"method": "gae_opd", "credit": {"value": "learned", "value_learning_rate": 3e-2}}
    tiny_config["optim"] = {"steps": 4, "learning_rate": 1e-3}
    tiny_config["checkpoint"] = {"every": 2, "keep": 2, "best_metric": None}
    run = setup(load_config(base=tiny_config))
    train(run)
    whole = [p.detach().clone() for p in run.method.parameters()]
    losses = [r["value_loss"] for r in run.history]
    run_dir = tmp_path / "run"
    state = torch.load(run_dir / "checkpoint-4" / checkpoint.STATE, weights_only=True)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 3e-2]

    shutil.rmtree(run_dir / "checkpoint-4")
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["objective"]["credit"]["value_coef"] = 0.5  # as every config.yaml before value_coef was retired
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    resumed = setup(checkpoint.resume_config(run_dir))
    train(resumed, resume=True)
    assert [r["value_loss"] for r in resumed.history] == pytest.approx(losses)
    for a, b in zip(whole, resumed.method.parameters()):
        assert torch.allclose(a, b)


def test_ref_kl_regularizer_loads_a_frozen_reference(tiny_config):
    tiny_config["objective"] = {"method": "opd", "ref_kl_coef": 0.1}
    run = setup(load_config(base=tiny_config))
    assert run.reference is not None and not any(p.requires_grad for p in run.reference.parameters())
    train(run)


def test_presets_are_valid_and_each_names_a_different_point():
    from opdkit.config import ObjectiveConfig

    points = [ObjectiveConfig(method=name).model_dump(exclude={"method"}) for name in FORMULA_METHODS]
    assert all(a != b for i, a in enumerate(points) for b in points[i + 1:])


def test_teacher_prefix_rollouts_start_with_the_prefix(tiny):
    model, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    examples = load_examples(str(tiny / "train.jsonl"))[:3]
    prefixes = [[7, 17], [], [9]]
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, examples, max_completion_length=5, prefixes=prefixes)
    for row, prefix in enumerate(prefixes):
        n = len(prefix)
        assert rollouts.completion_ids[row, :n].tolist() == prefix
        assert rollouts.guidance_mask[row, :n].tolist() == [1.0] * n
        assert rollouts.guidance_mask[row, n:].sum() == 0
    assert rollouts.prompt_ids.shape[1] == max(len(render_prompt(tokenizer, e.messages)) for e in examples)


def test_sweep_writes_a_table_and_a_plot(tiny_config, tmp_path, capsys):
    import yaml

    from opdkit.cli import main

    path = tmp_path / "c.yaml"
    tiny_config["optim"] = {"steps": 2, "learning_rate": 1e-3}
    tiny_config["eval"] = {"every": 1, "batch_size": 16}
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["sweep", str(path), "--methods", "opd,vopd", "--seeds", "0,1", "--output-dir", str(tmp_path / "s")]) == 0
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert "| opd |" in table and "| vopd |" in table and "±" in table and "95% interval" in table
    printed = capsys.readouterr().out
    assert "[seed 0](opd/seed0/report.html)" in printed and "[the 95% interval of the mean]" in printed  # no markup
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 10_000


def test_interval95_is_students_t_interval_of_the_mean():
    from opdkit.sweep import interval95

    lo, hi = interval95([1.0, 2.0, 3.0, 4.0, 5.0])  # t(0.975, 4) = 2.776, sd = 1.5811, n = 5
    assert (lo, hi) == pytest.approx((3 - 2.776 * 1.5811 / 5 ** 0.5, 3 + 2.776 * 1.5811 / 5 ** 0.5), abs=1e-3)
    assert interval95([2.0, 2.0]) == (2.0, 2.0)
    lo11, hi11 = interval95([float(i) for i in range(12)])  # df 11 is not tabulated: df 10's t, the wider one
    assert hi11 - lo11 == pytest.approx(2 * 2.228 * statistics.stdev(range(12)) / 12 ** 0.5)


def test_vocab_chunked_training_loss_equals_the_plain_one(tiny):
    from opdkit.config import ObjectiveConfig
    from opdkit.methods.formula import Formula
    from opdkit.teachers import LocalTeacher

    student, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    teacher = LocalTeacher(load_model(str(tiny / "teacher")), tokenizer)
    torch.manual_seed(0)
    batch = sample(student, tokenizer, load_examples(str(tiny / "train.jsonl"))[:6], max_completion_length=10)
    signal = teacher.score(batch, "full")
    from opdkit.objectives.divergence import distributional

    objective = ObjectiveConfig(method="gkd", lmbda=1.0, temperature=1.5)
    student.zero_grad()  # the whole computation, by hand: both [B, C, V] distributions at T = 1.5
    student_lp = (batch.completion_logits(student) / 1.5).log_softmax(-1)
    teacher_lp = (signal.full_logprobs() / 1.5).log_softmax(-1)
    plain = (distributional(objective.divergence, student_lp, teacher_lp, beta=objective.beta) * batch.completion_mask).sum()
    plain.backward()
    plain_grads = [p.grad.clone() for p in student.parameters()]
    assert signal.logprobs is None and signal.hidden is not None  # the teacher handed over hidden states
    for chunk in (7, None):  # a given block size, and one chosen from chunk_memory_mib
        method = Formula(objective.model_copy(update={"vocab_chunk_size": chunk}))
        assert method.hidden_only
        method.attach(student)
        student.zero_grad()
        _, hidden = batch.completion_logits(student, return_hidden=True, logits=False)
        chunked = (method.token_loss(None, batch, signal, hidden=hidden).loss * batch.completion_mask).sum()
        chunked.backward()
        assert torch.allclose(plain, chunked, atol=1e-5)
        for a, b in zip(plain_grads, [p.grad for p in student.parameters()]):
            assert torch.allclose(a, b, atol=1e-5)
