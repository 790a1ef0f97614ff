"""Proofs by exact enumeration: the estimators the library composes, against exact gradients.

A tiny autoregressive model: vocabulary V=3, horizon H=3, one table of logits per prefix (13 states) for
the student (the parameters) and for the teacher. Every one of the 27 sequences is enumerated, so the
sequence-level objective and its gradient are exact. Each estimator is the library's own ``Formula``
(the loss the training loop backpropagates), fed the tensors a rollout would give it. Two checks:

- exact expectation: ``sum_y P_S(y) grad loss(y)`` (no sampling noise: bias shows exactly);
- Monte Carlo over N sampled rollouts (fixed seed): unbiased estimators agree with the exact gradient
  within ``Z`` standard errors in every coordinate; biased ones are rejected by more than that.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from opdkit.config import ObjectiveConfig
from opdkit.methods.formula import Formula
from opdkit.objectives import credit, gates
from opdkit.objectives.divergence import distributional, kl, phi, phi_prime
from opdkit.objectives.support import chunked_full
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

V, H = 3, 3
Z = 5.0  # standard errors allowed (39 coordinates; P(|z| > 5) ~ 6e-7 each)
N = 40_000
PREFIXES = [p for n in range(H) for p in itertools.product(range(V), repeat=n)]
STATE = {p: i for i, p in enumerate(PREFIXES)}
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=H)))
F_DIVERGENCES = ["forward_kl", "jsd", "tv", "hellinger", "alpha"]


def state_ids(tokens: torch.Tensor) -> torch.Tensor:
    """``[N, H]`` index of the state (prefix) before each token."""
    return torch.tensor([[STATE[tuple(row[:t])] for t in range(H)] for row in tokens.tolist()])


ENUM_STATES = state_ids(SEQUENCES)


def tables(seed: int, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(len(PREFIXES), V, generator=g) * scale).requires_grad_()
    teacher = torch.randn(len(PREFIXES), V, generator=g) * scale
    return student, teacher


def sequence_logprob(table: torch.Tensor, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return table.log_softmax(-1)[states].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, H]


def exact_gradient(student, teacher, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """``grad_theta E_{y ~ P_S}[sum_t phi(l_t)]`` by enumeration; for reverse KL this is the sequence KL."""
    s = sequence_logprob(student, SEQUENCES, ENUM_STATES)
    t = sequence_logprob(teacher, SEQUENCES, ENUM_STATES)
    name = "js" if divergence == "jsd" else divergence
    objective = (s.sum(1).exp() * phi(name, s - t, alpha).sum(1)).sum()
    return torch.autograd.grad(objective, student)[0]


def per_sample_gradients(objective: ObjectiveConfig, student, teacher, tokens: torch.Tensor) -> torch.Tensor:
    """``[N, 13 * V]``: the gradient of the library's loss (summed over tokens) for each rollout alone."""
    states = state_ids(tokens) if tokens is not SEQUENCES else ENUM_STATES
    copies = student.detach().expand(len(tokens), *student.shape).clone().requires_grad_()
    logits = copies[torch.arange(len(tokens)).unsqueeze(1), states]  # [N, H, V]
    teacher_logprobs = teacher.log_softmax(-1)[states]
    token = lambda lp: lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    mask = torch.ones(len(tokens), H)
    rollouts = Rollouts(torch.zeros(len(tokens), 1, dtype=torch.long), torch.ones(len(tokens), 1, dtype=torch.long),
                        tokens, mask, torch.zeros(len(tokens), dtype=torch.bool), [], "student",
                        sampler_logprobs=token(logits.detach().log_softmax(-1)))
    signal = TeacherSignal(token(teacher_logprobs), logprobs=teacher_logprobs)
    loss = Formula(objective).token_loss(logits, rollouts, signal).loss
    (loss * mask).sum().backward()
    return copies.grad.reshape(len(tokens), -1)


def expected_gradient(objective, student, teacher) -> torch.Tensor:
    """``sum_y P_S(y) grad loss(y)`` over all 27 sequences."""
    weights = sequence_logprob(student, SEQUENCES, ENUM_STATES).sum(1).exp().detach()
    return (weights.unsqueeze(1) * per_sample_gradients(objective, student, teacher, SEQUENCES)).sum(0)


def sample_rollouts(student, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, H, dtype=torch.long)
    probs = student.detach().softmax(-1)
    for t in range(H):
        states = torch.tensor([STATE[tuple(row[:t])] for row in tokens[:, :t].tolist()])
        tokens[:, t] = torch.multinomial(probs[states], 1, generator=g).squeeze(1)
    return tokens


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
    stop_gradient = ObjectiveConfig(method="opd_plus", divergence=divergence, correction=False, credit={"gamma": 1.0})
    assert torch.allclose(expected_gradient(corrected, student, teacher), exact, atol=1e-5)
    bias = (expected_gradient(stop_gradient, student, teacher) - exact).abs().max()
    assert bias > 1e-2, f"stop-gradient {divergence} should be biased (max bias {bias})"
    assert z_scores(corrected, student, teacher, exact).max() < Z
    assert z_scores(stop_gradient, student, teacher, exact).max() > Z


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
    visit = torch.zeros(len(PREFIXES))
    for prefix, i in STATE.items():
        states = [STATE[prefix[:t]] for t in range(len(prefix))]
        visit[i] = sequence_logprob(student, torch.tensor([list(prefix)]), torch.tensor([states])).sum().exp().detach() \
            if prefix else 1.0
    forward = kl(teacher.log_softmax(-1), student.log_softmax(-1))
    (exact,) = torch.autograd.grad((visit * forward).sum(), student)
    objective = opd(estimator="k3", grad_path="direct")
    assert torch.allclose(expected_gradient(objective, student, teacher), exact.reshape(-1), atol=1e-5)
    assert z_scores(objective, student, teacher, exact).max() < Z


# ---- full-vocabulary divergences against an independent float64 reference -----------------------------

def reference(name: str, p_s: torch.Tensor, p_t: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """Written from the textbook definitions in probability space, float64."""
    KL = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    if name == "reverse_kl":
        return KL(p_s, p_t)
    if name == "forward_kl":
        return KL(p_t, p_s)
    if name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * KL(p_t, m) + (1 - beta) * KL(p_s, m)
    if name == "tv":
        return 0.5 * (p_s - p_t).abs().sum(-1)
    if name == "hellinger":
        return ((p_s.sqrt() - p_t.sqrt()) ** 2).sum(-1)
    if name == "alpha":
        return (1 - (p_s**alpha * p_t ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))
    if name == "skew_kl":
        return KL(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_rkl":
        return KL(p_s, (1 - alpha) * p_t + alpha * p_s)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "alpha", "skew_kl", "skew_rkl"])
def test_full_vocabulary_divergences_match_float64_reference(name):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(5, 4, 50, generator=g) * 2).log_softmax(-1)
    t = (torch.randn(5, 4, 50, generator=g) * 2).log_softmax(-1)
    got = distributional(name, s, t, beta=0.3, alpha=0.2)
    expected = reference(name, s.double().exp(), t.double().exp(), 0.3, 0.2)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-4)
    assert (got >= -1e-6).all() and distributional(name, t, t, beta=0.3, alpha=0.2).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_kl"])
def test_chunked_full_vocabulary_equals_unchunked(name):
    g = torch.Generator().manual_seed(8)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    teacher = (torch.randn(37, 300, generator=g) * 2).log_softmax(-1)
    fn = lambda s, t: distributional(name, s, t, beta=0.5, alpha=0.1)  # noqa: E731
    plain = fn(head(hidden).log_softmax(-1), teacher)
    grads_plain = torch.autograd.grad(plain.sum(), [hidden, head.weight])
    chunked = chunked_full(hidden, head, teacher, fn, chunk_size=8)
    grads_chunked = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    assert torch.allclose(plain, chunked, atol=1e-6)
    for a, b in zip(grads_plain, grads_chunked):
        assert torch.allclose(a, b, atol=1e-6)


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
