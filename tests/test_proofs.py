"""Proofs by exact enumeration: the estimators the library composes, against exact gradients.

The tiny autoregressive model and the independent targets are in ``enumeration.py``. Two checks:

- exact expectation: ``sum_y P_S(y) grad loss(y)`` (no sampling noise: bias shows exactly);
- Monte Carlo over N sampled rollouts (fixed seed): unbiased estimators agree with the exact gradient
  within ``Z`` standard errors in every coordinate; biased ones are rejected by more than that.

``test_axes_grid.py`` walks every point on the axes the same way; this file keeps the named claims.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from enumeration import (ENUM_STATES, H, SEQUENCES, STATE, expected_gradient, per_sample_gradients, reach_probability,
                         reference_divergence, sample_rollouts, sequence_logprob, tables)
from opdkit.config import ObjectiveConfig
from opdkit.methods.formula import Formula
from opdkit.objectives import credit, gates
from opdkit.objectives.divergence import distributional, kl, phi, phi_prime
from opdkit.objectives.support import chunked_full
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

Z = 5.0  # standard errors allowed (39 coordinates; P(|z| > 5) ~ 6e-7 each)
N = 40_000
F_DIVERGENCES = ["forward_kl", "jsd", "tv", "hellinger", "alpha"]


def exact_gradient(student, teacher, divergence: str, alpha: float = 0.5, sequence: bool = True) -> torch.Tensor:
    """``grad sum_s P_S(s) D(pi_S(.|s), pi_T(.|s))`` over every prefix ``s``: the sequence-level divergence
    (``sequence``: the state distribution is differentiated) or the per-token one at the visited states."""
    reach = reach_probability(student)
    divergence_per_state = reference_divergence(divergence, student.softmax(-1), teacher.softmax(-1), alpha=alpha)
    weights = reach if sequence else reach.detach()
    return torch.autograd.grad((weights * divergence_per_state).sum(), student)[0]


def z_scores(objective, student, teacher, exact: torch.Tensor, seed: int = 0) -> torch.Tensor:
    grads = per_sample_gradients(objective, student, teacher, sample_rollouts(student, N, seed))
    standard_error = grads.std(0) / N**0.5
    # the 1e-6 floor covers coordinates where every sample gives the same gradient up to float rounding
    return (grads.mean(0) - exact.reshape(-1)).abs() / (standard_error + 1e-6)


def opd(**axes) -> ObjectiveConfig:
    return ObjectiveConfig(method="opd", **axes)


# ---- classic OPD: return-to-go is unbiased for the sequence-level reverse KL; immediate is not ----------

def test_return_to_go_opd_is_unbiased_for_sequence_reverse_kl():
    student, teacher = tables(0)
    exact = exact_gradient(student, teacher, "reverse_kl")
    objective = opd(credit={"gamma": 1.0})
    assert torch.allclose(expected_gradient(objective, student, teacher), exact.reshape(-1), atol=1e-5)
    assert z_scores(objective, student, teacher, exact).max() < Z


def test_immediate_opd_is_biased_when_a_first_token_changes_what_follows():
    """Student and teacher agree at the root; after token 0 the teacher disagrees sharply, after 1 and 2 it
    agrees. The exact gradient pushes the root away from token 0; the immediate (gamma = 0) estimator sees no
    reward difference at the root and leaves it alone."""
    student, teacher = tables(1)
    with torch.no_grad():
        teacher.copy_(student.detach())
        for prefix, i in STATE.items():
            if prefix[:1] == (0,):
                teacher[i] = student[i].detach().flip(-1) * 3
    exact = exact_gradient(student, teacher, "reverse_kl")
    immediate = expected_gradient(opd(credit={"gamma": 0.0}), student, teacher)
    root = STATE[()]
    assert exact[root].abs().max() > 0.05
    assert immediate.reshape(exact.shape)[root].abs().max() < 1e-6
    assert z_scores(opd(credit={"gamma": 0.0}), student, teacher, exact).max() > 2 * Z
    assert z_scores(opd(credit={"gamma": 1.0}), student, teacher, exact).max() < Z


# ---- OPD+: the stop-gradient f-divergence advantage is biased; the corrected one is not ---------------

@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_opd_plus_corrected_advantage_is_unbiased_and_stop_gradient_is_not(divergence):
    student, teacher = tables(2)
    exact = exact_gradient(student, teacher, divergence).reshape(-1)
    corrected = ObjectiveConfig(method="opd_plus", divergence=divergence, credit={"gamma": 1.0})
    with pytest.raises(ValueError, match="stop-gradient advantage"):  # so the config refuses it ...
        ObjectiveConfig(method="opd_plus", divergence=divergence, correction=False, credit={"gamma": 1.0})
    # ... unless asked for as the ablation, and here is why
    stop_gradient = ObjectiveConfig(method="opd_plus", divergence=divergence, correction=False,
                                    ablate_correction=True, credit={"gamma": 1.0})
    assert torch.allclose(expected_gradient(corrected, student, teacher), exact, atol=1e-5)
    bias = (expected_gradient(stop_gradient, student, teacher) - exact).abs().max()
    assert bias > 1e-2, f"stop-gradient {divergence} should be biased (max bias {bias})"
    assert z_scores(corrected, student, teacher, exact).max() < Z
    assert z_scores(stop_gradient, student, teacher, exact).max() > Z


@pytest.mark.parametrize("objective", [{"method": "opd_plus", "ablate_correction": True},  # corrected already
                                       {"method": "opd", "ablate_correction": True},  # reverse KL: unbiased as is
                                       {"method": "gkd", "ablate_correction": True}])  # no policy gradient
def test_ablate_correction_is_refused_where_there_is_no_biased_advantage_to_keep(objective):
    with pytest.raises(ValueError, match="ablate_correction keeps the biased"):
        ObjectiveConfig(**objective)


def test_reverse_kl_needs_no_correction():
    student, teacher = tables(3)
    exact = exact_gradient(student, teacher, "reverse_kl").reshape(-1)
    for correction in (False, True):
        objective = ObjectiveConfig(method="opd_plus", divergence="reverse_kl", correction=correction, credit={"gamma": 1.0})
        assert torch.allclose(expected_gradient(objective, student, teacher), exact, atol=1e-5)


@pytest.mark.parametrize("divergence", ["reverse_kl"] + F_DIVERGENCES)
def test_phi_prime_is_the_derivative_of_phi(divergence):
    name = "js" if divergence == "jsd" else divergence
    l = torch.linspace(-4, 4, 41, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(phi(name, l, 0.3).sum(), l)
    assert torch.allclose(phi_prime(name, l.detach(), 0.3), grad, atol=1e-10)


# ---- estimators and gradient paths -----------------------------------------------------------------------

def test_k2_direct_equals_k1_policy_gradient_sample_by_sample():
    student, teacher = tables(4)
    tokens = sample_rollouts(student, 64, seed=1)
    k1_pg = per_sample_gradients(opd(estimator="k1"), student, teacher, tokens)
    k2_direct = per_sample_gradients(opd(estimator="k2", grad_path="direct"), student, teacher, tokens)
    assert torch.allclose(k1_pg, k2_direct, atol=1e-6)


def test_k3_direct_is_unbiased_for_the_forward_kl_gradient():
    """Pathwise k3 at the visited states: ``E[sum_t grad k3_t] = sum_s d_S(s) grad KL(pi_T(.|s) || pi_S(.|s))``."""
    student, teacher = tables(5, scale=0.7)  # bounded pi_T/pi_S: k3's weight is heavy-tailed otherwise
    exact = exact_gradient(student, teacher, "forward_kl", sequence=False)
    objective = opd(divergence="forward_kl", grad_path="direct")
    assert objective.estimator == "k3"
    assert torch.allclose(expected_gradient(objective, student, teacher), exact.reshape(-1), atol=1e-5)
    assert z_scores(objective, student, teacher, exact).max() < Z


def test_k3_policy_gradient_needs_its_correction():
    """``sg(k3)`` as a PG cost has expected gradient grad RKL - grad FKL; with the term ``1 - e^-l`` it is grad RKL."""
    student, teacher = tables(6)
    rkl = exact_gradient(student, teacher, "reverse_kl", sequence=False).reshape(-1)
    fkl = exact_gradient(student, teacher, "forward_kl", sequence=False).reshape(-1)
    corrected = opd(estimator="k3", correction=True)
    assert torch.allclose(expected_gradient(corrected, student, teacher), rkl, atol=1e-5)
    uncorrected = corrected.model_copy(update={"correction": False})  # refused by the config
    assert torch.allclose(expected_gradient(uncorrected, student, teacher), rkl - fkl, atol=1e-5)
    assert fkl.abs().max() > 1e-2  # the two targets differ


def test_k1_backpropagated_has_zero_expected_gradient():
    student, teacher = tables(7)
    k1_direct = opd(estimator="k2", grad_path="direct").model_copy(update={"estimator": "k1"})  # refused by the config
    assert expected_gradient(k1_direct, student, teacher).abs().max() < 1e-6
    assert per_sample_gradients(k1_direct, student, teacher, sample_rollouts(student, 8, 0)).abs().max() > 1e-2


@pytest.mark.parametrize("divergence,alpha", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("tv", 0.5),
                                              ("hellinger", 0.5), ("alpha", 0.3), ("alpha", 0.0), ("alpha", 1.0)])
def test_expected_sampled_cost_is_the_f_divergence(divergence, alpha):
    """``E_{y ~ pi_S}[phi(l)] = D_f(pi_S || pi_T)`` against the textbook divergence, at 13 states."""
    student, teacher = tables(8)
    p_s, p_t = student.detach().double().softmax(-1), teacher.double().softmax(-1)
    l = p_s.log() - p_t.log()
    name = "js" if divergence == "jsd" else divergence
    expected_cost = (p_s * phi(name, l, alpha)).sum(-1)
    assert torch.isfinite(expected_cost).all()
    assert torch.allclose(expected_cost, reference_divergence(divergence, p_s, p_t, alpha=alpha), atol=1e-10)


def test_alpha_divergence_is_continuous_at_its_ends():
    l = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for end, near in ((0.0, 1e-7), (1.0, 1 - 1e-7)):
        assert torch.allclose(phi("alpha", l, end), phi("alpha", l, near), atol=1e-5)
        assert torch.allclose(phi_prime("alpha", l, end), phi_prime("alpha", l, near), atol=1e-5)


# ---- full-vocabulary divergences against an independent float64 reference -----------------------------

@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "alpha", "skew_kl", "skew_rkl"])
def test_full_vocabulary_divergences_match_float64_reference(name):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(5, 4, 50, generator=g) * 2).log_softmax(-1)
    t = (torch.randn(5, 4, 50, generator=g) * 2).log_softmax(-1)
    got = distributional(name, s, t, beta=0.3, alpha=0.2)
    expected = reference_divergence(name, s.double().exp(), t.double().exp(), 0.3, 0.2)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)
    assert (got > 1e-3).all()  # distinct distributions are apart ...
    assert distributional(name, t, t, beta=0.3, alpha=0.2).abs().max() < 1e-5  # ... and equal ones are not


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "skew_kl"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ["same", "weighted"])
@pytest.mark.parametrize("T", [1.0, 1.5])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["several blocks", "one block"])
def test_chunked_full_vocabulary_equals_unchunked(name, bias, rows, T, chunk_size):
    """Both heads block by block, the gradient taken in forward (in closed form for the KLs, by autograd for the
    rest) with a uniform upstream gradient or recomputed with row weights: the same losses, gradients and
    stats as the whole computation. One block of fewer rows than the head's width keeps its logits' gradient for
    backward to take the head's from, the others sum the head's gradient as they go."""
    g = torch.Generator().manual_seed(8)
    head, teacher_head = torch.nn.Linear(64, 300, bias=bias), torch.nn.Linear(24, 300)
    hidden = torch.randn(37, 64, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(37, 24, generator=g)
    upstream = torch.full((37,), 0.3) if rows == "same" else torch.rand(37, generator=g)
    fn = lambda s, t: distributional(name, s, t, beta=0.5, alpha=0.1)  # noqa: E731
    student, teacher = (head(hidden) / T).log_softmax(-1), (teacher_head(teacher_hidden) / T).log_softmax(-1)
    plain = fn(student, teacher)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    grads_plain = torch.autograd.grad((plain * upstream).sum(), params)
    chunked, entropy, reverse_kl = chunked_full(hidden, head, lambda i, j: teacher_head(teacher_hidden[i:j]), name,
                                                beta=0.5, alpha=0.1, temperature=T, chunk_size=chunk_size)
    grads_chunked = torch.autograd.grad((chunked * upstream).sum(), params)
    assert torch.allclose(plain, chunked, atol=1e-5)
    for a, b in zip(grads_plain, grads_chunked):
        assert torch.allclose(a, b, atol=1e-5)
    untempered = head(hidden).log_softmax(-1).detach()
    assert torch.allclose(entropy, -(untempered.exp() * untempered).sum(-1), atol=1e-5)
    assert torch.allclose(reverse_kl, kl(student.detach(), teacher.detach()), atol=1e-5)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("rows", ["same", "weighted"])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["several blocks", "one block"])
def test_chunked_full_vocabulary_of_a_bf16_head_takes_its_gradients_as_a_bf16_linear_would(name, rows, chunk_size):
    """bf16 hidden states through a bf16 head: the logits' gradient meets the head in bf16 products, as autograd
    takes a plain bf16 linear's backward; losses and gradients within bf16's rounding of the whole computation's,
    the gradients in the dtypes of what they are the gradients of."""
    g = torch.Generator().manual_seed(8)
    head, teacher_head = torch.nn.Linear(64, 300, bias=True).bfloat16(), torch.nn.Linear(24, 300)
    hidden = torch.randn(37, 64, generator=g).bfloat16().requires_grad_()
    teacher_hidden = torch.randn(37, 24, generator=g)
    upstream = torch.full((37,), 0.3) if rows == "same" else torch.rand(37, generator=g)
    fn = lambda s, t: distributional(name, s, t, beta=0.5, alpha=0.1)  # noqa: E731
    student, teacher = head(hidden).float().log_softmax(-1), teacher_head(teacher_hidden).log_softmax(-1)
    plain = fn(student, teacher)
    params = [hidden, head.weight, head.bias]
    grads_plain = torch.autograd.grad((plain * upstream).sum(), params)
    chunked, _, _ = chunked_full(hidden, head, lambda i, j: teacher_head(teacher_hidden[i:j]), name,
                                 beta=0.5, alpha=0.1, chunk_size=chunk_size)
    grads_chunked = torch.autograd.grad((chunked * upstream).sum(), params)
    assert torch.allclose(plain, chunked, atol=1e-5)
    for a, b in zip(grads_plain, grads_chunked):
        assert b.dtype == a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * a.float().abs().max().item())


# ---- credit and gates --------------------------------------------------------------------------------

def test_gae_special_cases():
    g = torch.Generator().manual_seed(9)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    # V = 0: a discounted return at gamma * lam
    assert torch.allclose(credit.gae(rewards, torch.zeros_like(values), mask, 0.9, 0.5),
                          credit.returns_to_go(rewards, mask, 0.45), atol=1e-6)
    # gamma = 0: r - V (vOPD with V = -KL); bootstrap is 0 after each sequence's last token
    assert torch.allclose(credit.gae(rewards, values, mask, 0.0, 0.95), (rewards - values) * mask, atol=1e-6)
    last = credit.gae(rewards, values, mask, 1.0, 1.0)[1, 3]
    assert last.item() == pytest.approx((rewards[1, 3] - values[1, 3]).item(), abs=1e-6)


def test_trust_region_accepts_with_probability_min_one_ratio():
    teacher = torch.log(torch.tensor([0.05, 0.3, 0.9]))
    student = torch.log(torch.tensor([0.5, 0.3, 0.1]))
    g = torch.Generator().manual_seed(10)
    uniforms = torch.rand(200_000, 3, generator=g)
    rate = gates.trust_region(teacher.expand(200_000, 3), student.expand(200_000, 3), uniforms).float().mean(0)
    assert torch.allclose(rate, torch.tensor([0.1, 1.0, 1.0]), atol=0.005)


# ---- several samples per prompt: the group baselines ----------------------------------------------------

def group_expected_gradient(objective, student, teacher, n: int) -> torch.Tensor:
    """``E[(1/n) sum_i grad loss(y_i)]`` over every ``n``-tuple of sequences drawn independently from the
    student, all ``n`` rows one prompt's group (``Rollouts.group``), the library's ``Formula`` giving the loss."""
    tuples = torch.tensor(list(itertools.product(range(len(SEQUENCES)), repeat=n)))  # [27^n, n]
    tokens, states = SEQUENCES[tuples.reshape(-1)], ENUM_STATES[tuples.reshape(-1)]
    rows = len(tokens)
    sequence_p = sequence_logprob(student, SEQUENCES, ENUM_STATES).sum(1).exp().detach()
    weight = sequence_p[tuples].prod(1).repeat_interleave(n) / n  # P(tuple) / n on each of its rows
    logits = student[states]
    teacher_logprobs = teacher.log_softmax(-1)[states]
    token = lambda lp: lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    mask = torch.ones(rows, H)
    rollouts = Rollouts(torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1, dtype=torch.long), tokens, mask,
                        torch.zeros(rows, dtype=torch.bool), [], "student",
                        sampler_logprobs=token(logits.detach().log_softmax(-1)),
                        group=torch.arange(len(tuples)).repeat_interleave(n))
    loss = Formula(objective).token_loss(logits, rollouts, TeacherSignal(token(teacher_logprobs), logprobs=teacher_logprobs)).loss
    return torch.autograd.grad((weight.unsqueeze(1) * loss * mask).sum(), student)[0].reshape(-1)


@pytest.mark.parametrize("n", [2, 3])
def test_leave_one_out_baseline_is_unbiased_and_group_mean_scales_by_n_minus_one_over_n(n):
    """Subtracting the mean sequence return of a prompt's other samples keeps the return-to-go gradient exact;
    the plain group mean (which holds the row's own return) gives exactly ``(n-1)/n`` of it."""
    student, teacher = tables(5)
    exact = exact_gradient(student, teacher, "reverse_kl").reshape(-1)
    loo = group_expected_gradient(opd(credit={"gamma": 1.0, "baseline": "leave_one_out"}), student, teacher, n)
    mean = group_expected_gradient(opd(credit={"gamma": 1.0, "baseline": "group_mean"}), student, teacher, n)
    plain = group_expected_gradient(opd(credit={"gamma": 1.0}), student, teacher, n)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731 (float32 sums over 27^n tuples)
    assert close(plain, exact)
    assert close(loo, exact)
    assert close(mean, (n - 1) / n * exact)
    assert (mean - exact).abs().max() > 0.01  # the scaling is visible, not lost in rounding
