"""Exact enumeration of a tiny autoregressive model, shared by the proofs (``test_proofs``, ``test_axes_grid``).

Vocabulary V=3, horizon H=3, one table of logits per prefix (13 states) for the student (the parameters) and
for the teacher. Every one of the 27 sequences is enumerated, so an objective over them and its gradient are
exact. The estimators are the library's own ``Formula`` (the loss the training loop backpropagates), fed the
tensors a rollout would give it; the targets are written here from textbook definitions in probability space,
independently of the library's divergence code.
"""

from __future__ import annotations

import itertools

import torch

from opdkit.methods.formula import Formula
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

V, H = 3, 3
PREFIXES = [p for n in range(H) for p in itertools.product(range(V), repeat=n)]
STATE = {p: i for i, p in enumerate(PREFIXES)}
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=H)))


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


def reach_probability(table: torch.Tensor) -> torch.Tensor:
    """``[13]`` probability that the model's sampling reaches each prefix (differentiable in ``table``)."""
    probs = table.softmax(-1)
    out = []
    for prefix in PREFIXES:
        p = torch.ones((), dtype=probs.dtype)
        for t, token in enumerate(prefix):
            p = p * probs[STATE[prefix[:t]], token]
        out.append(p)
    return torch.stack(out)


# ---- divergences from textbook definitions, probability space --------------------------------------------

def xlogy_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum p log(p / q)`` with ``0 log 0 = 0``."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def reference_divergence(name: str, p_s: torch.Tensor, p_t: torch.Tensor, beta: float = 0.5,
                         alpha: float = 0.5) -> torch.Tensor:
    KL = xlogy_ratio
    if name == "reverse_kl":
        return KL(p_s, p_t)
    if name == "forward_kl":
        return KL(p_t, p_s)
    if name == "jsd":
        if beta in (0.0, 1.0):  # GKD's convention at the ends
            return KL(p_t, p_s) if beta == 0.0 else KL(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * KL(p_t, m) + (1 - beta) * KL(p_s, m)
    if name == "tv":
        return 0.5 * (p_s - p_t).abs().sum(-1)
    if name == "hellinger":
        return ((p_s.sqrt() - p_t.sqrt()) ** 2).sum(-1)
    if name == "alpha":
        if alpha in (0.0, 1.0):  # the limits of Amari's family
            return KL(p_t, p_s) if alpha == 0.0 else KL(p_s, p_t)
        return (1 - (p_s**alpha * p_t ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))
    if name == "skew_kl":
        return KL(p_t, alpha * p_t + (1 - alpha) * p_s)
    if name == "skew_rkl":
        return KL(p_s, (1 - alpha) * p_t + alpha * p_s)
    raise AssertionError(name)


def on_support(p_s: torch.Tensor, p_t: torch.Tensor, ids: torch.Tensor, tail: bool):
    """Both distributions on the columns ``ids``: renormalised, or with the rest of each as one more column."""
    s, t = p_s.gather(-1, ids), p_t.gather(-1, ids)
    if tail:
        return (torch.cat([s, (1 - s.sum(-1, keepdim=True)).clamp(min=0)], -1),
                torch.cat([t, (1 - t.sum(-1, keepdim=True)).clamp(min=0)], -1))
    return s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)


# ---- the library's estimator, per sampled sequence -----------------------------------------------------

def per_sample_gradients(objective, student, teacher, tokens: torch.Tensor, source: str = "student") -> torch.Tensor:
    """``[N, 13 * V]``: the gradient of the library's loss (summed over tokens) for each sequence alone."""
    states = state_ids(tokens) if tokens is not SEQUENCES else ENUM_STATES
    copies = student.detach().expand(len(tokens), *student.shape).clone().requires_grad_()
    logits = copies[torch.arange(len(tokens)).unsqueeze(1), states]  # [N, H, V]
    teacher_logprobs = teacher.log_softmax(-1)[states]
    token = lambda lp: lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    mask = torch.ones(len(tokens), H)
    sampler = token(logits.detach().log_softmax(-1)) if source == "student" else None
    rollouts = Rollouts(torch.zeros(len(tokens), 1, dtype=torch.long), torch.ones(len(tokens), 1, dtype=torch.long),
                        tokens, mask, torch.zeros(len(tokens), dtype=torch.bool), [], source, sampler_logprobs=sampler)
    signal = TeacherSignal(token(teacher_logprobs), logprobs=teacher_logprobs)
    method = Formula(objective)
    loss = method.token_loss(logits, rollouts, signal).loss
    (loss * mask).sum().backward()
    return copies.grad.reshape(len(tokens), -1)


def expected_gradient(objective, student, teacher, source: str = "student") -> torch.Tensor:
    """``sum_y P(y) grad loss(y)`` over all 27 sequences, ``P`` the student's (or the teacher's) distribution."""
    sampler = student if source == "student" else teacher
    weights = sequence_logprob(sampler, SEQUENCES, ENUM_STATES).sum(1).exp().detach()
    return (weights.unsqueeze(1) * per_sample_gradients(objective, student, teacher, SEQUENCES, source)).sum(0)


def sample_rollouts(table, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, H, dtype=torch.long)
    probs = table.detach().softmax(-1)
    for t in range(H):
        states = torch.tensor([STATE[tuple(row[:t])] for row in tokens[:, :t].tolist()])
        tokens[:, t] = torch.multinomial(probs[states], 1, generator=g).squeeze(1)
    return tokens
