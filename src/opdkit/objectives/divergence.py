"""Divergences between the teacher's and the student's next-token distributions.

Two forms of the same family:

1. Distributional (route A, over a support): ``D(pi_T, pi_S)`` from two log-prob vectors over the last
   dimension (the full vocabulary, or a support renormalised or with a tail bucket).
2. Sampled-token (route B): with ``l = log pi_S(y) - log pi_T(y)`` for ``y ~ pi_S``, every f-divergence
   ``D_f(pi_S || pi_T) = E_{pi_T}[f(pi_S/pi_T)] = E_{y~pi_S}[phi(l)]`` with ``phi(l) = f(e^l) e^{-l}``
   (OPD+ note, section 2). ``phi'(l) = f'(e^l) - phi(l)``; OPD+ corrects the stop-gradient advantage
   with it.

Sampled-token estimators of ``KL(pi_S || pi_T)`` (Schulman), with ``r = log pi_T(y) - log pi_S(y)``:
``k1 = -r``, ``k2 = r^2 / 2``, ``k3 = (e^r - 1) - r``.
"""

from __future__ import annotations

import math

import torch

DISTRIBUTIONAL = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "alpha", "skew_kl", "skew_rkl")
SAMPLED = ("reverse_kl", "forward_kl", "js", "tv", "hellinger", "alpha")
ESTIMATORS = ("k1", "k2", "k3")


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` over the last dimension; 0 * log 0 = 0."""
    p = p_logprobs.exp()
    return torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p)).sum(-1)


def _mix(a_logprobs: torch.Tensor, b_logprobs: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w a + (1 - w) b)``."""
    if weight_a <= 0:
        return b_logprobs
    if weight_a >= 1:
        return a_logprobs
    return torch.logaddexp(a_logprobs + math.log(weight_a), b_logprobs + math.log(1 - weight_a))


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL defines ``beta``:

        M = beta * pi_T + (1 - beta) * pi_S
        JSD_beta = beta * KL(pi_T || M) + (1 - beta) * KL(pi_S || M)

    The formula tends to 0 at both ends, so the endpoints are explicit branches by convention:
    ``beta = 0`` is forward KL ``KL(pi_T || pi_S)``, ``beta = 1`` is reverse KL ``KL(pi_S || pi_T)``.
    """
    if beta == 0.0:
        return kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return kl(student_logprobs, teacher_logprobs)
    mixture = _mix(teacher_logprobs, student_logprobs, beta)
    return beta * kl(teacher_logprobs, mixture) + (1 - beta) * kl(student_logprobs, mixture)


def distributional(name: str, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, *,
                   beta: float = 0.5, alpha: float = 0.5) -> torch.Tensor:
    """``D(pi_T, pi_S)`` per position over the last dimension.

    - ``reverse_kl``: ``KL(pi_S || pi_T)``; ``forward_kl``: ``KL(pi_T || pi_S)``; ``jsd``: generalized JSD(beta);
    - ``tv``: ``1/2 sum |pi_S - pi_T|``; ``hellinger``: ``sum (sqrt pi_S - sqrt pi_T)^2`` (squared, no 1/2);
    - ``alpha`` (Amari): ``(1 - sum pi_S^a pi_T^(1-a)) / (a (1 - a))``, the f-divergence of the OPD+ table;
    - ``skew_kl`` (DistiLLM): ``KL(pi_T || a pi_T + (1-a) pi_S)``; ``skew_rkl``: ``KL(pi_S || (1-a) pi_T + a pi_S)``.
    """
    s, t = student_logprobs, teacher_logprobs
    if name == "reverse_kl":
        return kl(s, t)
    if name == "forward_kl":
        return kl(t, s)
    if name == "jsd":
        return generalized_jsd(s, t, beta)
    if name == "tv":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    if name == "hellinger":
        return ((0.5 * s).exp() - (0.5 * t).exp()).pow(2).sum(-1)
    if name == "alpha":
        if alpha in (0.0, 1.0):
            return kl(t, s) if alpha == 0.0 else kl(s, t)
        return (1 - torch.logsumexp(alpha * s + (1 - alpha) * t, dim=-1).exp()) / (alpha * (1 - alpha))
    if name == "skew_kl":
        return kl(t, _mix(t, s, alpha))
    if name == "skew_rkl":
        return kl(s, _mix(s, t, alpha))
    raise ValueError(f"unknown divergence {name!r}; known: {DISTRIBUTIONAL}")


def kl_direction(name: str, beta: float = 0.5, alpha: float = 0.5) -> str | None:
    """``"reverse"`` or ``"forward"`` where ``distributional(name, ...)`` is exactly that KL, else None."""
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0) or (name == "alpha" and alpha == 1.0):
        return "reverse"
    if name == "forward_kl" or (name == "jsd" and beta == 0.0) or (name == "alpha" and alpha == 0.0):
        return "forward"
    return None


def _alpha_endpoint(name: str, alpha: float) -> str | None:
    """Amari's alpha-divergence is KL at its ends: ``alpha -> 1`` reverse, ``alpha -> 0`` forward."""
    if name != "alpha" or 0.0 < alpha < 1.0:
        return None
    return "alpha1" if alpha == 1.0 else "alpha0"


def phi(name: str, l: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Sampled-token cost ``phi(l) = f(e^l) e^{-l}`` with ``l = log pi_S(y) - log pi_T(y)``, ``y ~ pi_S``.

    For ``alpha`` at 0 or 1, the limit of its ``f`` (``-log u + u - 1``, ``u log u - u + 1``): the forward and
    reverse KL with a zero-mean term, so that the cost is continuous in ``alpha``."""
    name = _alpha_endpoint(name, alpha) or name
    if name == "reverse_kl":
        return l
    if name == "forward_kl":
        return -l * torch.exp(-l)
    if name == "js":  # f(u) = 1/2 [u log u - (1+u) log((1+u)/2)]
        return 0.5 * (l - (1 + torch.exp(-l)) * (torch.logaddexp(torch.zeros_like(l), l) - math.log(2)))
    if name == "tv":
        return 0.5 * (1 - torch.exp(-l)).abs()
    if name == "hellinger":
        return (1 - torch.exp(-0.5 * l)).pow(2)
    if name == "alpha":
        return (torch.exp((alpha - 1) * l) - alpha - (1 - alpha) * torch.exp(-l)) / (alpha * (alpha - 1))
    if name == "alpha1":
        return l - 1 + torch.exp(-l)
    if name == "alpha0":
        return 1 - (1 + l) * torch.exp(-l)
    raise ValueError(f"unknown sampled-token divergence {name!r}; known: {SAMPLED}")


def phi_prime(name: str, l: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``d phi / d l = f'(e^l) - phi(l)``: the OPD+ correction term."""
    name = _alpha_endpoint(name, alpha) or name
    if name == "reverse_kl":
        f_prime = l + 1
    elif name == "forward_kl":
        f_prime = -torch.exp(-l)
    elif name == "js":
        f_prime = 0.5 * (l - torch.logaddexp(torch.zeros_like(l), l) + math.log(2))
    elif name == "tv":
        f_prime = 0.5 * torch.sign(l)
    elif name == "hellinger":
        f_prime = 1 - torch.exp(-0.5 * l)
    elif name == "alpha":
        f_prime = (torch.exp((alpha - 1) * l) - 1) / (alpha - 1)
    elif name == "alpha1":  # f(u) = u log u - u + 1
        f_prime = l
    elif name == "alpha0":  # f(u) = -log u + u - 1
        f_prime = 1 - torch.exp(-l)
    else:
        raise ValueError(f"unknown sampled-token divergence {name!r}; known: {SAMPLED}")
    return f_prime - phi(name, l, alpha)


def estimator(name: str, log_ratio: torch.Tensor) -> torch.Tensor:
    """Sampled-token estimate of ``KL(pi_S || pi_T)`` from ``r = log pi_T(y) - log pi_S(y)``.

    k1 and k3 are unbiased for the value; their *gradients* differ by path: ``sg(k1)`` as a PG cost, ``sg(k3)``
    with its OPD+ correction, and ``k2`` backpropagated directly give the reverse-KL gradient; ``k3``
    backpropagated directly gives the forward-KL gradient; ``k1`` backpropagated has expected gradient 0 and
    ``sg(k2)`` as a PG cost that of ``E[l^2/2]`` (``ObjectiveConfig`` refuses both).
    """
    if name == "k1":
        return -log_ratio
    if name == "k2":
        return 0.5 * log_ratio.pow(2)
    if name == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown estimator {name!r}; known: {ESTIMATORS}")


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_v p(v) log p(v)`` over the last dimension."""
    return -(logprobs.exp() * logprobs).sum(-1)
