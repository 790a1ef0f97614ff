"""Vocabulary routing: where the mass goes when negative feedback pushes a sampled token down.

Vanilla sampled-token OPD (a policy gradient with ``A_t < 0`` on token ``y``) moves each other token's
probability by ``d pi_v ∝ |A| pi_v (pi_v + pi_y - sum_u pi_u^2)`` to first order: the freed mass follows the
student's own preferences, rich-get-richer, whatever the teacher prefers.

Counterfactual routing (CR-OPD, survey arXiv 2606.22793). The survey states only "route probability mass toward
alternatives that are teacher-supported and student-reachable"; the sets, the target and the loss below are OUR
RECONSTRUCTION (``/work/shared/methods/taxonomy.md`` section 5.1), to be replaced by the survey's definition when
it is known. For a token with negative feedback:

    R_t = student nucleus: the smallest set of most likely tokens with sum pi_S^sg >= p_S (at most k_S), pi_S >= eps_S
    S_t = teacher nucleus: the same at p_T over the teacher's top-k (the whole top-k when it holds less than p_T)
    C_t = (R_t ∩ S_t) minus {y_t}                                  empty: unroutable, plain suppression instead
    Delta_t = eta * (pi_S^sg(y_t) - pi_T(y_t))_+                     the mass taken from y_t
    p*_t = pi_S^sg, with p*(y_t) -= Delta_t and p*(v) += Delta_t q_t(v) on C_t,  q_t ∝ pi_T on C_t
    loss_t = KL(p*_t || pi_S(.|s_t))                                 backpropagated; d loss / d logits = pi_S - p*

``p*`` equals ``pi_S^sg`` off ``{y_t} ∪ C_t``, so the gradient with respect to the logits is zero there. The
softmax's normaliser still hands part of the freed mass to the other tokens; ``route_loss(kind="mass_exact")``
(ours, ``cr.loss``) takes the step that moves the probabilities by exactly ``p* - pi_S`` to first order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nucleus(probs_NV: torch.Tensor, top_p: float, top_k: int | None = None, min_prob: float = 0.0) -> torch.Tensor:
    """``[N, V]`` bool: the smallest set of most likely entries whose mass reaches ``top_p`` (at least one; at most
    ``top_k``, and only the ``top_k`` largest are ever sorted), keeping only entries with probability
    ``>= min_prob``. Entries of probability 0 (outside a top-k scattered into zeros) are never members."""
    k = probs_NV.shape[-1] if top_k is None else min(top_k, probs_NV.shape[-1])
    sorted_probs, order = probs_NV.topk(k, dim=-1)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the entries ranked above
    keep = (before < top_p) & (sorted_probs >= min_prob) & (sorted_probs > 0)
    return torch.zeros_like(probs_NV, dtype=torch.bool).scatter(-1, order, keep)


@dataclass
class Route:
    target_NV: torch.Tensor  # p*: a distribution per row (the student's own where the row is unroutable)
    routed_N: torch.Tensor  # bool: C_t is not empty
    moved_NV: torch.Tensor  # bool: {y_t} ∪ C_t on routed rows, where p* differs from the student
    set_size_N: torch.Tensor  # |C_t|
    teacher_mass_N: torch.Tensor  # sum of pi_T over C_t


def counterfactual_target(student_probs_NV: torch.Tensor, teacher_probs_NV: torch.Tensor, sampled_N: torch.Tensor,
                          teacher_sampled_N: torch.Tensor, *, student_top_p: float, student_top_k: int,
                          student_min_prob: float, teacher_top_p: float, teacher_top_k: int | None = None,
                          eta: float) -> Route:
    """The counterfactual target ``p*`` of the module docstring for rows with negative feedback, without gradient.

    ``student_probs_NV`` is the student's distribution (detached); ``teacher_probs_NV`` the teacher's, either whole
    or its top-k scattered into zeros (then only the top-k can be teacher-supported); ``teacher_sampled_N`` is
    ``pi_T(y_t)``, known even when ``y_t`` is outside the teacher's top-k."""
    student = student_probs_NV.detach()
    sampled = sampled_N.unsqueeze(-1)
    reachable = nucleus(student, student_top_p, student_top_k, student_min_prob)
    supported = nucleus(teacher_probs_NV, teacher_top_p, teacher_top_k)
    candidates = (reachable & supported).scatter(-1, sampled, False)
    teacher_on = torch.where(candidates, teacher_probs_NV, torch.zeros_like(teacher_probs_NV))
    mass = teacher_on.sum(-1)
    routed = mass > 0
    q = teacher_on / mass.clamp(min=1e-30).unsqueeze(-1)
    delta = eta * (student.gather(-1, sampled).squeeze(-1) - teacher_sampled_N).clamp(min=0) * routed
    target = (student + delta.unsqueeze(-1) * q).scatter_add(-1, sampled, -delta.unsqueeze(-1))
    moved = (candidates | torch.zeros_like(candidates).scatter(-1, sampled, True)) & routed.unsqueeze(-1)
    return Route(target, routed, moved, candidates.sum(-1), mass)


def route_loss(student_logits_NV: torch.Tensor, target_NV: torch.Tensor, moved_NV: torch.Tensor,
               kind: str = "kl") -> torch.Tensor:
    """``KL(p* || pi_S)`` per row, ``[N]``, from the student's logits, with the gradient ``kind`` names:

    - ``kl`` (the note's): the KL's own, ``pi_S - p*`` with respect to the logits. It is zero off ``{y} ∪ C``, yet a
      step on it still moves mass to every other token through the softmax's normaliser (about half of the freed
      mass, mostly to the student's mode, in ``tests/test_routing.py``);
    - ``mass_exact`` (ours): ``(pi_S - p*) / pi_S`` on ``{y} ∪ C`` and zero elsewhere, the step under which the
      probabilities move by exactly ``p* - pi_S`` to first order (the sum of ``pi_S`` times it is zero, so the
      normaliser does not move): nothing reaches the tokens outside ``C``."""
    logits = student_logits_NV.float()
    logprobs = logits.log_softmax(-1)
    target = target_NV
    value = (torch.xlogy(target, target) - target * logprobs).sum(-1)
    if kind == "kl":
        return value
    probs = logprobs.detach().exp()
    step = torch.where(moved_NV, (probs - target) / probs.clamp(min=1e-30), torch.zeros_like(probs))
    return value.detach() + (step * (logits - logits.detach())).sum(-1)


def routing_share(probs_before_V: torch.Tensor, probs_after_V: torch.Tensor, sampled: int,
                  supported_V: torch.Tensor) -> float:
    """Teacher-aligned routing share over one step (taxonomy section 8): of the mass gained by tokens other than
    the sampled one, the part that lands on the ``supported`` set (bool ``[V]``),
    ``sum_{v in S, v != y} (d pi_v)_+ / sum_{v != y} (d pi_v)_+``."""
    gained = (probs_after_V - probs_before_V).clamp(min=0)
    gained[sampled] = 0
    return float(gained[supported_V].sum() / gained.sum().clamp(min=1e-30))
