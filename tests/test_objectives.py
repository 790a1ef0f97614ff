"""The two issue-2 objectives against hand-computed values and independent float64 references."""

import math

import pytest
import torch

from opdkit.config import ObjectiveConfig
from opdkit.methods.formula import Formula
from opdkit.objectives.divergence import entropy, generalized_jsd, kl
from opdkit.objectives.policy_gradient import policy_gradient_loss
from opdkit.objectives.reduce import token_mean, token_sum
from opdkit.objectives.support import restrict


def OPD():
    return Formula(ObjectiveConfig(method="opd"))


def GKD(**knobs):
    return Formula(ObjectiveConfig(method="gkd", lmbda=1.0, **knobs))
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

LN2 = math.log(2)


def test_opd_advantage_and_loss_by_hand():
    student = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    teacher = torch.log(torch.tensor([[0.25, 0.5]]))
    advantage = teacher - student.detach()  # classic OPD's reward on the sampled token, -k1
    assert torch.allclose(advantage, torch.tensor([[-LN2, LN2]]))

    loss = policy_gradient_loss(student, student.detach(), advantage)  # synchronous: ratio exactly 1
    assert torch.allclose(loss, torch.tensor([[LN2, -LN2]]))
    assert token_mean(loss, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(LN2)
    token_mean(loss, torch.ones(1, 2)).backward()
    # d/ds of -(pi/mu) * A at pi = mu is -A, divided by the two tokens of the mean
    assert torch.allclose(student.grad, torch.tensor([[LN2, -LN2]]) / 2)


def test_importance_ratio_against_a_stale_sampler():
    student = torch.log(torch.tensor([[0.5]]))
    sampler = torch.log(torch.tensor([[0.25]]))  # the sampled token was half as likely under mu
    loss = policy_gradient_loss(student, sampler, torch.tensor([[1.0]]))
    assert loss.item() == pytest.approx(-2.0)


def _rollouts(completion_ids, mask):
    B, C = completion_ids.shape
    return Rollouts(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), completion_ids,
                    mask, torch.zeros(B, dtype=torch.bool), [], "student", sampler_logprobs=None)


def test_opd_method_on_logits_by_hand():
    # vocabulary of 3; one sequence of two tokens; student logits give probs [.5,.25,.25] and [1/3]*3
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])).requires_grad_()
    rollouts = _rollouts(torch.tensor([[0, 2]]), torch.ones(1, 2))
    rollouts.sampler_logprobs = torch.log(torch.tensor([[0.5, 1 / 3]]))
    teacher = TeacherSignal(token_logprobs=torch.log(torch.tensor([[0.25, 2 / 3]])))
    out = OPD().token_loss(logits, rollouts, teacher)
    assert torch.allclose(out.stats["advantage"], torch.tensor([[-LN2, LN2]]), atol=1e-6)
    assert torch.allclose(out.loss, torch.tensor([[LN2, -LN2]]), atol=1e-6)
    out.loss.sum().backward()
    # grad of -A * log softmax(z)[y] w.r.t. z is -A * (onehot(y) - p)
    p0, p1 = torch.tensor([0.5, 0.25, 0.25]), torch.full((3,), 1 / 3)
    expected = torch.stack([LN2 * (torch.tensor([1.0, 0, 0]) - p0), -LN2 * (torch.tensor([0, 0, 1.0]) - p1)])
    assert torch.allclose(logits.grad[0], expected, atol=1e-6)


def test_kl_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    assert kl(p.log(), q.log()).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5), abs=1e-6)
    assert kl(p.log(), q.log()).item() == pytest.approx(0.5108256, abs=1e-6)
    assert entropy(p.log()).item() == pytest.approx(LN2)


def _reference_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float64, probabilities in, written independently of the library."""
    p, q = p.double(), q.double()
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def distributions():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(4, 6, 11, generator=g) * 2).log_softmax(-1)
    teacher = (torch.randn(4, 6, 11, generator=g) * 2).log_softmax(-1)
    return student, teacher


def test_gkd_endpoints_are_forward_and_reverse_kl(distributions):
    s, t = distributions
    forward = _reference_kl(t.exp(), s.exp())
    reverse = _reference_kl(s.exp(), t.exp())
    assert torch.allclose(generalized_jsd(s, t, beta=0.0).double(), forward, atol=1e-5)
    assert torch.allclose(generalized_jsd(s, t, beta=1.0).double(), reverse, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_gkd_interior_matches_float64_mixture(distributions, beta):
    s, t = distributions
    ps, pt = s.exp().double(), t.exp().double()
    m = beta * pt + (1 - beta) * ps
    expected = beta * _reference_kl(pt, m) + (1 - beta) * _reference_kl(ps, m)
    got = generalized_jsd(s, t, beta)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert (got > 1e-3).all()  # distinct distributions are apart
    assert torch.allclose(generalized_jsd(t, t, beta), torch.zeros_like(got), atol=1e-6)


def test_teacher_topk_support_renormalises_both_sides():
    teacher = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    student = torch.log(torch.tensor([[[0.2, 0.2, 0.6]]]))
    values, ids = teacher.topk(2, dim=-1)
    s, t = restrict(student, values, ids)
    assert torch.allclose(t.exp(), torch.tensor([[[0.625, 0.375]]]))
    assert torch.allclose(s.exp(), torch.tensor([[[0.5, 0.5]]]))


def test_gkd_method_applies_temperature_to_both_sides(distributions):
    s_logits, t_logprobs = distributions[0] * 3, distributions[1]
    rollouts = _rollouts(torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6))
    teacher = TeacherSignal(token_logprobs=torch.zeros(4, 6), logprobs=t_logprobs)
    out = GKD(beta=0.5, temperature=2.0).token_loss(s_logits, rollouts, teacher)
    expected = generalized_jsd((s_logits / 2).log_softmax(-1), (t_logprobs / 2).log_softmax(-1), 0.5)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(distributions):
    _, t = distributions
    for beta in (0.0, 0.5, 1.0):
        logits = t.clone().requires_grad_()
        rollouts = _rollouts(torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6))
        out = GKD(beta=beta).token_loss(logits, rollouts, TeacherSignal(torch.zeros(4, 6), logprobs=t))
        out.loss.sum().backward()
        assert out.loss.abs().max() < 1e-5 and logits.grad.abs().max() < 1e-5


def test_token_sum_over_micro_batches_equals_one_token_mean():
    g = torch.Generator().manual_seed(1)
    values, mask = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float()
    total = mask.sum()
    split = token_sum(values[:2], mask[:2]) / total + token_sum(values[2:], mask[2:]) / total
    assert split.item() == pytest.approx(token_mean(values, mask).item(), abs=1e-6)


def test_tail_bucket_keeps_the_mass_outside_the_support():
    student = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    teacher = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    ids = torch.tensor([[1, 2]])
    s, t = restrict(student, teacher.gather(-1, ids), ids, tail=True)
    assert torch.allclose(s.exp(), torch.tensor([[0.3, 0.2, 0.5]]), atol=1e-5)
    assert torch.allclose(t.exp(), torch.tensor([[0.6, 0.3, 0.1]]), atol=1e-5)


def test_student_topk_support_follows_the_student_and_passes_no_gradient_through_the_choice():
    from opdkit.objectives.support import student_topk

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]], requires_grad=True)
    teacher = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    s, t = student_topk(logits.log_softmax(-1), teacher, k=2)
    assert torch.allclose(t.exp(), torch.tensor([[0.25, 0.75]]))  # teacher on the student's ids {0, 2}
    assert torch.allclose(s.exp(), torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_sequence_mean_gives_each_sequence_equal_weight():
    from opdkit.objectives.reduce import aggregation_weights

    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0]])
    weights = aggregation_weights(mask, "sequence_mean")
    assert (values * weights).sum() / weights.sum() == pytest.approx(3.0)  # mean of the per-sequence means 1 and 5
    token = aggregation_weights(mask, "token_mean")
    assert (values * token).sum() / token.sum() == pytest.approx(9.0 / 5)


def test_position_weights_decay_geometrically():
    from opdkit.objectives.gates import position_weights

    assert torch.allclose(position_weights(torch.ones(1, 4), 0.5), torch.tensor([[1.0, 0.5, 0.25, 0.125]]))
