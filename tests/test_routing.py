"""Counterfactual routing (``routing: cr``, the ``cr_opd`` preset) on hand-built distributions.

One position, a vocabulary of 6. The student's mode is token 0 (0.5); it sampled token 1 (0.3), which the teacher
gives 0.05: negative feedback. The teacher puts its mass on tokens 2 and 3 (0.5, 0.35), which the student can reach
(0.1, 0.06). Token 5 is the teacher's too, but out of the student's reach (0.00005 < eps_S).
Expected values are written here from the note's formulas in probability space, not from the library.
"""

from __future__ import annotations

import pytest
import torch

from opdkit.config import ObjectiveConfig, load_config
from opdkit.errors import OPDError
from opdkit.methods.formula import Formula
from opdkit.objectives.routing import counterfactual_target, nucleus, route_loss, routing_share
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

STUDENT = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.03995, 0.00005])
TEACHER = torch.tensor([0.03, 0.05, 0.5, 0.35, 0.02, 0.05])
SAMPLED = 1
ROUTED = [2, 3]  # student nucleus at 0.95: {0, 1, 2, 3}; teacher nucleus at 0.9: {2, 3, 1 or 5 ...}: see below
SUPPORTED = torch.tensor([False, False, True, True, False, True])  # the teacher's nucleus at 0.9


def _signal(teacher: torch.Tensor, topk: int | None) -> TeacherSignal:
    logprobs = teacher.log().view(1, 1, -1)
    token = logprobs[..., SAMPLED]
    if topk is None:  # a local teacher: the whole distribution
        return TeacherSignal(token, logprobs=logprobs)
    values, ids = logprobs.topk(topk, dim=-1)  # a server: the top-k only
    return TeacherSignal(token, topk_ids=ids, topk_logprobs=values)


def _loss(method: str, logits: torch.Tensor, teacher_topk: int | None = None, teacher: torch.Tensor = TEACHER,
          **axes):
    objective = ObjectiveConfig(method=method, **axes)
    rollouts = Rollouts(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                        torch.tensor([[SAMPLED]]), torch.ones(1, 1), torch.zeros(1, dtype=torch.bool), [], "student",
                        sampler_logprobs=logits.detach().log_softmax(-1)[..., SAMPLED])
    return Formula(objective).token_loss(logits.view(1, 1, -1), rollouts, _signal(teacher, teacher_topk))


def test_the_nuclei_and_the_routed_set():
    assert nucleus(STUDENT.view(1, -1), 0.95, 20, 1e-4).view(-1).tolist() == [True, True, True, True, False, False]
    assert torch.equal(nucleus(TEACHER.view(1, -1), 0.9).view(-1), SUPPORTED)
    assert nucleus(STUDENT.view(1, -1), 0.95, 2).view(-1).tolist() == [True, True, False, False, False, False]
    route = counterfactual_target(STUDENT.view(1, -1), TEACHER.view(1, -1), torch.tensor([SAMPLED]),
                                  TEACHER[SAMPLED].view(1), student_top_p=0.95, student_top_k=20,
                                  student_min_prob=1e-4, teacher_top_p=0.9, eta=1.0)
    target = route.target_NV.view(-1)
    delta = 0.3 - 0.05  # pi_S(y) - pi_T(y)
    want = STUDENT.clone()
    want[SAMPLED] -= delta
    want[2] += delta * 0.5 / 0.85
    want[3] += delta * 0.35 / 0.85
    torch.testing.assert_close(target, want)
    assert (target >= 0).all() and abs(float(target.sum()) - 1) < 1e-6  # a distribution
    assert route.routed_N.item() and route.set_size_N.item() == 2
    assert abs(route.teacher_mass_N.item() - 0.85) < 1e-6


@pytest.mark.parametrize("loss", ["kl", "mass_exact"])
def test_the_route_gradient_touches_only_the_sampled_token_and_the_routed_set(loss):
    logits = STUDENT.log().clone().requires_grad_()
    out = _loss("cr_opd", logits, cr={"loss": loss})
    out.loss.sum().backward()
    touched = (logits.grad.abs() > 1e-9).nonzero().view(-1).tolist()
    assert touched == [SAMPLED] + ROUTED
    assert logits.grad[SAMPLED] > 0 and (logits.grad[ROUTED] < 0).all()  # down on y, up on the routed set
    assert out.scalars["cr_routed_share"] == 1.0 and out.scalars["cr_unroutable_share"] == 0.0
    assert out.scalars["cr_set_size"] == 2.0 and abs(out.scalars["cr_teacher_mass"] - 0.85) < 1e-6
    # vanilla OPD's gradient touches every token
    plain = STUDENT.log().clone().requires_grad_()
    _loss("opd", plain).loss.sum().backward()
    assert (plain.grad.abs() > 1e-9).all()


@pytest.mark.parametrize("teacher_topk", [None, 4])
def test_one_step_routes_mass_to_the_teacher_not_to_the_student_mode(teacher_topk):
    """One small SGD step on the logits. Routing share: of the mass gained by tokens other than the sampled one, the
    part that lands on the teacher's nucleus. Works from the whole teacher distribution and from a server's top-4.
    Vanilla OPD hands the freed mass to the student's mode (token 0). The note's KL route sends about half to the
    routed set, the rest leaking through the softmax's normaliser (the mode gets a fifteenth of vanilla's);
    ``cr.loss: mass_exact`` sends all of it."""
    shares, mode_gain = {}, {}
    for name, method, axes in (("opd", "opd", {}), ("kl", "cr_opd", {}), ("exact", "cr_opd", {"cr": {"loss": "mass_exact"}})):
        logits = STUDENT.log().clone().requires_grad_()
        _loss(method, logits, teacher_topk, **axes).loss.sum().backward()
        after = (logits - 0.01 * logits.grad).softmax(-1).detach()
        shares[name] = routing_share(STUDENT, after, SAMPLED, SUPPORTED)
        mode_gain[name] = float(after[0] - STUDENT[0])
        assert after[SAMPLED] < STUDENT[SAMPLED]  # each pushes the sampled token down
    assert shares["opd"] < 0.05 and shares["kl"] > 0.45 and shares["exact"] > 0.995, shares
    assert mode_gain["opd"] > 0.003 and mode_gain["kl"] < mode_gain["opd"] / 10, mode_gain
    assert abs(mode_gain["exact"]) < mode_gain["opd"] / 100, mode_gain  # second order only


def test_an_unroutable_token_keeps_plain_suppression():
    """The teacher's mass sits on token 5, out of the student's reach: no routed set, the PG term stays."""
    teacher = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.01, 0.95])
    routed, plain = STUDENT.log().clone().requires_grad_(), STUDENT.log().clone().requires_grad_()
    out = _loss("cr_opd", routed, teacher=teacher)
    out.loss.sum().backward()
    _loss("opd", plain, teacher=teacher).loss.sum().backward()
    assert out.scalars["cr_unroutable_share"] == 1.0 and out.scalars["cr_routed_share"] == 0.0
    torch.testing.assert_close(routed.grad, plain.grad)


def test_positive_feedback_is_not_routed():
    teacher = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.05, 0.05])  # the teacher likes the sampled token more
    routed, plain = STUDENT.log().clone().requires_grad_(), STUDENT.log().clone().requires_grad_()
    out = _loss("cr_opd", routed, teacher=teacher)
    out.loss.sum().backward()
    _loss("opd", plain, teacher=teacher).loss.sum().backward()
    assert out.scalars["cr_negative_share"] == 0.0
    torch.testing.assert_close(routed.grad, plain.grad)


def test_route_loss_gradient_is_pi_minus_target():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.rand(3, 7, generator=torch.Generator().manual_seed(1))
    target = target / target.sum(-1, keepdim=True)
    moved = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    route_loss(logits, target, moved).sum().backward()
    torch.testing.assert_close(logits.grad, logits.detach().softmax(-1) - target)


BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train": "d.jsonl"}}


@pytest.mark.parametrize("objective, message", [
    ({"method": "opd", "cr": {"eta": 0.5}}, "routing is none"),
    ({"method": "gkd", "routing": "cr"}, "already route"),
    ({"method": "opd_plus", "routing": "cr"}, "reverse_kl"),
    ({"method": "cr_opd", "cr": {"teacher_top_pp": 0.9}}, "did you mean 'teacher_top_p'"),
])
def test_routing_refuses_what_it_cannot_mean(objective, message):
    with pytest.raises(OPDError, match=message):
        load_config(base={**BASE, "objective": objective})


def test_a_server_teacher_must_return_the_top_k_the_route_reads():
    server = {"kind": "server", "base_url": "http://127.0.0.1:9/v1", "model": "t", "top_k": 5}
    with pytest.raises(OPDError, match="top 20 log-probs"):
        load_config(base={**BASE, "teacher": server, "objective": {"method": "cr_opd"}})
    config = load_config(base={**BASE, "teacher": server, "objective": {"method": "cr_opd", "cr": {"teacher_top_k": 5}}})
    assert config.objective.routing == "cr"
