"""The OPD formula: one per-token loss for every point on the axes of ``ObjectiveConfig``.

    Route A (direct):  loss_t = D_Omega(pi_T(.|s_t), pi_S(.|s_t))                       support: topk | full
                       loss_t = k(log pi_T(y_t) - log pi_S(y_t)), backpropagated        support: sampled, direct
    Route B (PG):      loss_t = -(pi_S/mu)(y_t) * sg[A_t]                              support: sampled, pg
                       A_t = Credit(r)_t - [correction] phi'(l_t),  r_t = -cost(l_t) after the gates
    plus:              + entropy-gated top-k FKL + ref_kl_coef * k3(pi_ref) + entropy_coef * (-H(pi_S))
    times:             position weights; prefix (guidance) tokens get beta * (-log pi_S(y_t)) instead.

States that the student did not sample (teacher samples, dataset completions) get the direct form of the
chosen support; on the sampled token that is cross-entropy, forward KL's gradient (``ObjectiveConfig``
accepts it only with ``divergence: forward_kl``). Which points are accepted, and the gradient each trains
on, is proved by enumeration in ``tests/test_axes_grid.py``.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from ..errors import OPDError
from ..objectives import credit, gates, regularizers
from ..objectives.divergence import distributional, entropy, estimator, kl, phi, phi_prime
from ..objectives.policy_gradient import policy_gradient_loss
from ..objectives.reduce import token_mean
from ..objectives.support import chunked_full, restrict, sampled, student_topk
from ..rollout import Rollouts
from ..teachers import TeacherSignal
from . import Method, StateSource, TokenLoss


def _sampled_name(objective) -> str:
    """The sampled-token form's name (the symmetric JSD is ``js`` there)."""
    return "js" if objective.divergence == "jsd" else objective.divergence


def _cost_derivative(objective, l: torch.Tensor) -> torch.Tensor:
    """``d cost / d l`` for the sampled-token cost: ``phi'`` for f-divergences, the estimator's for reverse KL."""
    if objective.divergence != "reverse_kl":
        return phi_prime(_sampled_name(objective), l, objective.alpha)
    return {"k1": torch.ones_like(l), "k3": 1 - torch.exp(-l)}[objective.estimator]


def _sampled_cost(objective, l: torch.Tensor) -> torch.Tensor:
    """The per-token cost whose expectation under the student is the divergence."""
    if objective.divergence == "reverse_kl":
        return estimator(objective.estimator, -l)
    return phi(_sampled_name(objective), l, objective.alpha)


class Formula(Method):
    def __init__(self, objective):
        self.objective = objective
        self.name = objective.method
        self.teacher_support, self.top_k = self._teacher_needs()
        self.needs_teacher_entropy = objective.entropy_gate.enabled
        self.normalizes_advantages = objective.credit.normalize
        self.advantage_moments: tuple[float, float] | None = None  # the step's (mean, std), set by the loop
        self.value_head: torch.nn.Linear | None = None
        self.head: torch.nn.Module | None = None

    # ---- what the method needs from the loop ---------------------------------------------------------
    def _teacher_needs(self):
        o = self.objective
        if o.support in ("full", "student_topk") or o.credit.value == "analytic":
            return "full", None
        ks = [o.top_k] if o.support == "teacher_topk" else []
        if o.trust_region.enabled and o.trust_region.outliers == "fkl":
            ks.append(o.trust_region.top_k)
        if o.entropy_gate.enabled:
            ks.append(o.entropy_gate.top_k)
        return ("topk", max(ks)) if ks else ("token", None)

    def state_source(self, rng: random.Random) -> StateSource:
        if self.objective.lmbda < 1.0 and rng.random() >= self.objective.lmbda:
            return "dataset"
        return self.objective.states

    def needs_completions(self) -> bool:
        guidance = self.objective.prefix_guidance
        return self.objective.lmbda < 1.0 or (guidance.enabled and guidance.answer == "dataset")

    @property
    def needs_hidden(self) -> bool:
        return self.objective.credit.value == "learned"

    @property
    def hidden_only(self) -> bool:
        """The loop hands over hidden states only; the LM heads are applied block by block here."""
        return self.objective.chunked

    def attach(self, student: torch.nn.Module) -> None:
        """Keep what the method needs of the student: its LM head (chunked path) or a new value head."""
        self.head = student.get_output_embeddings()
        if self.needs_hidden:
            self.value_head = torch.nn.Linear(student.config.hidden_size, 1).to(next(student.parameters()).device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.value_head.parameters()) if self.value_head is not None else []

    # ---- the loss ------------------------------------------------------------------------------------
    def token_loss(self, student_logits: torch.Tensor, rollouts: Rollouts, teacher: TeacherSignal,
                   hidden: torch.Tensor | None = None) -> TokenLoss:
        o = self.objective
        mask = rollouts.completion_mask
        if self.hidden_only and student_logits is None:  # the loop's path; given logits, the whole computation
            loss, stats = self._chunked(hidden, rollouts, teacher)
            return TokenLoss(self._position_weighted(loss, mask), stats)
        if teacher.logprobs is None and teacher.hidden is not None:  # this call's unchunked terms need it whole
            teacher = dataclasses.replace(teacher, logprobs=teacher.full_logprobs())
        logprobs = student_logits.float().log_softmax(-1)
        token_logprobs = sampled(logprobs, rollouts.completion_ids)
        stats: dict[str, torch.Tensor] = {"student_entropy": entropy(logprobs.detach())}
        scalars: dict[str, float] = {}

        if o.support != "sampled":
            loss = self._distributional(student_logits, logprobs, teacher, stats)
        elif rollouts.source != "student":
            loss = -token_logprobs  # teacher samples (or dataset completions): cross-entropy, forward KL's gradient
        elif o.grad_path == "direct":  # k2: reverse KL's gradient; k3: forward KL's (ObjectiveConfig pairs them)
            loss = estimator(o.estimator, teacher.token_logprobs - token_logprobs)
            stats["reverse_kl_k1"] = (token_logprobs - teacher.token_logprobs).detach()
        else:
            loss = self._policy_gradient(logprobs, token_logprobs, rollouts, teacher, hidden, stats, scalars)

        if o.entropy_gate.enabled:
            ids, top = self._teacher_topk(teacher, o.entropy_gate.top_k)
            if teacher.entropy is not None:
                teacher_entropy = stats["teacher_entropy"] = teacher.entropy
            else:  # a teacher that gives only its top-k: the entropy of the top-k, renormalised
                teacher_entropy = stats["teacher_entropy_topk"] = entropy(top.log_softmax(-1))
            gate = gates.entropy_gate(teacher_entropy, o.entropy_gate.threshold)
            loss = loss + o.entropy_gate.coef * gate * self._topk_forward_kl(logprobs, ids, top)
            scalars["entropy_gate_rate"] = float(token_mean(gate, rollouts.own_mask))
        if o.ref_kl_coef:
            loss = loss + o.ref_kl_coef * regularizers.reference_kl(token_logprobs, rollouts.reference_logprobs)
        if o.entropy_coef:
            loss = loss + o.entropy_coef * regularizers.entropy_bonus(logprobs)
        loss = self._position_weighted(loss, mask)
        if rollouts.guidance_mask is not None:
            guided = rollouts.guidance_mask
            loss = torch.where(guided > 0, o.prefix_guidance.beta * -token_logprobs, loss)
            scalars["guidance_fraction"] = float(token_mean(guided, mask))
        return TokenLoss(loss, stats, scalars)

    def _position_weighted(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decay = self.objective.position_decay
        return loss if decay == 1.0 else loss * gates.position_weights(mask, decay)

    def _chunked(self, hidden, rollouts: Rollouts, teacher: TeacherSignal) -> tuple[torch.Tensor, dict]:
        """Full-vocabulary divergence from the student's hidden states and the teacher's (or its log-probs),
        both LM heads applied ``vocab_chunk_size`` positions at a time; ``[B, C]`` losses and stats."""
        o, mask = self.objective, rollouts.completion_mask
        keep = mask.bool()
        if teacher.hidden is not None:
            teacher_hidden, teacher_head = teacher.hidden[keep], teacher.head
            teacher_logits = lambda i, j: teacher_head(teacher_hidden[i:j])  # noqa: E731
        else:
            teacher_rows = teacher.logprobs[keep]
            teacher_logits = lambda i, j: teacher_rows[i:j].clone()  # noqa: E731 (chunked_full overwrites it)
        per_token, student_entropy, reverse_kl = chunked_full(
            hidden[keep], self.head, teacher_logits, o.divergence, beta=o.beta, alpha=o.alpha,
            temperature=o.temperature, chunk_size=o.vocab_chunk_size, memory_mib=o.chunk_memory_mib)
        scatter = lambda values: torch.zeros_like(mask, dtype=values.dtype).masked_scatter(keep, values)  # noqa: E731
        return scatter(per_token), {"student_entropy": scatter(student_entropy), "reverse_kl_full": scatter(reverse_kl)}

    def _distributional(self, student_logits, logprobs, teacher: TeacherSignal, stats) -> torch.Tensor:
        """``D(pi_T, pi_S)`` over the support, both sides at ``objective.temperature`` (no tail then: config)."""
        o = self.objective
        temperature = o.temperature
        student = logprobs if temperature == 1.0 else (student_logits.float() / temperature).log_softmax(-1)
        if o.support == "teacher_topk":  # renormalising p^(1/T) over the top-k is the tempered teacher there
            ids, teacher_lp = self._teacher_topk(teacher, o.top_k)
            s, t = restrict(student, teacher_lp / temperature, ids, o.tail)
        else:
            full = teacher.logprobs if temperature == 1.0 else (teacher.logprobs / temperature).log_softmax(-1)
            s, t = (student, full) if o.support == "full" else student_topk(student, full, o.top_k, o.tail)
        stats["reverse_kl_full" if o.support == "full" else "reverse_kl_topk"] = kl(s.detach(), t)
        return distributional(o.divergence, s, t, beta=o.beta, alpha=o.alpha)

    def _policy_gradient(self, logprobs, token_logprobs, rollouts, teacher, hidden, stats, scalars) -> torch.Tensor:
        o, mask, own = self.objective, rollouts.completion_mask, rollouts.own_mask
        if o.reward == "teacher":  # a text-only teacher's own per-token reward (chunk_opd): no log-ratio
            if teacher.token_advantages is None:
                raise OPDError("objective.reward teacher (chunk_opd) needs per-chunk rewards from a text-only "
                               "teacher: set teacher.kind: chat")
            reward = teacher.token_advantages.detach()
            stats["audited"] = (reward != 0).float()
        else:
            raw = (token_logprobs - teacher.token_logprobs).detach()  # l = log pi_S - log pi_T
            l = raw.clamp(-o.log_ratio_clip, o.log_ratio_clip)
            scalars["log_ratio_clamp_rate"] = float(token_mean((raw != l).float(), own))
            reward = -_sampled_cost(o, l)
            stats["reverse_kl_k1"] = raw
        extra = torch.zeros_like(reward)

        if o.trust_region.enabled:
            tr = o.trust_region
            accepted = gates.trust_region(teacher.token_logprobs, token_logprobs, torch.rand_like(reward))
            scalars["trust_frac"] = float(token_mean(accepted.float(), own))
            if tr.outliers == "mask":
                reward = torch.where(accepted, reward, torch.zeros_like(reward))
            elif tr.outliers == "clip":
                reward = torch.where(accepted, reward, reward.clamp(min=tr.clip_floor))
            else:
                fkl = self._topk_forward_kl(logprobs, *self._teacher_topk(teacher, tr.top_k))
                if tr.fkl_mode == "advantage":
                    reward = torch.where(accepted, reward, -fkl.detach())
                else:
                    reward = torch.where(accepted, reward, torch.zeros_like(reward))
                    extra = torch.where(accepted, extra, fkl)

        values = self._values(logprobs, teacher, hidden, reward)
        if values is None:
            advantage = credit.returns_to_go(reward, mask, o.credit.gamma)
        else:
            advantage = credit.gae(reward, values.detach(), mask, o.credit.gamma, o.credit.lam)
            if self.value_head is not None:
                target = (advantage + values).detach()
                extra = extra + o.credit.value_coef * 0.5 * (values - target).pow(2)
                scalars["value_explained_variance"] = credit.explained_variance(values.detach(), target, mask)
        if o.correction:
            advantage = advantage - _cost_derivative(o, l)
        stats["advantage"] = advantage
        if o.credit.normalize:
            mean, std = self.advantage_moments or credit.step_moments([(advantage, own)])
            advantage = (advantage - mean) / (std + 1e-8) * mask
        sampler = rollouts.sampler_logprobs if rollouts.sampler_logprobs is not None else token_logprobs.detach()
        return policy_gradient_loss(token_logprobs, sampler, advantage) + extra

    def _values(self, logprobs, teacher: TeacherSignal, hidden, reward) -> torch.Tensor | None:
        """``V(s_t)`` for GAE, or None for plain discounted returns."""
        source = self.objective.credit.value
        if source == "none":
            return None
        if source == "zero":
            return torch.zeros_like(reward)
        if source == "analytic":  # expected immediate reward at s_t: -KL(pi_S || pi_T)
            return -kl(logprobs.detach(), teacher.logprobs)
        return self.value_head(hidden.float()).squeeze(-1)

    @staticmethod
    def _teacher_topk(teacher: TeacherSignal, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, log-probs)`` of the teacher's k most likely tokens, from the full distribution or its top-k."""
        if teacher.logprobs is not None:
            values, ids = teacher.logprobs.topk(min(k, teacher.logprobs.shape[-1]), dim=-1)
            return ids, values
        return teacher.topk_ids[..., :k], teacher.topk_logprobs[..., :k]

    @staticmethod
    def _topk_forward_kl(student_logprobs, ids, teacher_topk_logprobs, floor: float = -30.0) -> torch.Tensor:
        """``sum_{v in top-k} q_T(v) (log q_T(v) - log pi_S(v))``, teacher renormalised on its top-k, student
        not (so it stays >= 0), with ``log pi_S`` floored to keep it finite when the student has no mass there."""
        q = teacher_topk_logprobs.log_softmax(-1)
        student = student_logprobs.gather(-1, ids).clamp(min=floor)
        return (q.exp() * (q - student)).sum(-1)
