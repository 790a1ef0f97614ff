"""The OPD formula: one per-token loss for every point on the axes of ``ObjectiveConfig``.

    Route A (direct):  loss_t = D_Omega(pi_T(.|s_t), pi_S(.|s_t))                       support: topk | full
                       loss_t = k(log pi_T(y_t) - log pi_S(y_t)), backpropagated        support: sampled, direct
    Route B (PG):      loss_t = -(pi_S/mu)(y_t) * sg[A_t]                              support: sampled, pg
                       A_t = Credit(r)_t - [baseline] b_i - [correction] phi'(l_t),  r_t = -cost(l_t) after the gates
                       b_i = mean sequence return of row i's prompt's (other) samples    credit.baseline
                       A_t = windowed return over the next W rewards              near_future: lookahead
                       -> coef * KL(p*_t || pi_S) where A_t < -delta and C_t is not empty    routing: cr
    plus:              + entropy-gated top-k FKL + ref_kl_coef * k3(pi_ref) + entropy_coef * (-H(pi_S))
    times:             position weights; prefix (guidance) tokens get beta * (-log pi_S(y_t)) instead;
    plus, at bridge origins t:  + bridge_weight * sum_k -log pi_S(b_k | x, y_<t, b_<k)    near_future: teacher_bridge
    target:            pi_T = softmax(z_T - penalty * [v repeats an n-gram of y_<t])          repeat_penalty

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
from ..models import autocast
from ..objectives import bridge, credit, gates, groups, regularizers, repeats, routing
from ..objectives.divergence import distributional, entropy, estimator, kl, phi, phi_prime
from ..objectives.policy_gradient import policy_gradient_loss
from ..objectives.reduce import token_mean
from ..objectives.support import chunked_full, restrict, sampled_from_logits, student_topk
from ..products import through
from ..rollout import Rollouts, from_prefixes
from ..teachers import Bridge, TeacherSignal
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
        self.own_learning_rate = objective.credit.value_learning_rate if objective.credit.value == "learned" else None
        self.head: torch.nn.Module | None = None
        self.student: torch.nn.Module | None = None  # kept for the bridge's forward pass (near_future teacher_bridge)

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
        if o.routing == "cr":
            ks.append(o.cr.teacher_top_k)
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
        """Keep what the method needs of the student: its LM head (chunked path), a new value head, or the student
        itself for the forward pass over teacher bridges."""
        self.head = student.get_output_embeddings()
        if self.objective.teacher_bridge:
            self.student = student
        if self.needs_hidden:
            self.value_head = torch.nn.Linear(student.config.hidden_size, 1).to(next(student.parameters()).device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The learned value head's, trained at ``credit.value_learning_rate`` (``own_learning_rate``)."""
        return list(self.value_head.parameters()) if self.value_head is not None else []

    # ---- near-future bridges: teacher continuations from the student's states, asked after scoring ----
    def guide(self, rollouts: Rollouts, teacher_signal: TeacherSignal, teacher) -> None:
        """``near_future.mode: teacher_bridge``: pick the batch's high-loss tokens (``objectives.bridge``), ask the
        teacher to continue from the student's prefix before each, and set ``teacher_signal.bridge``; the calls and
        tokens go into ``teacher_signal.usage`` (``bridge_calls``, ``bridge_tokens``, and a server's own counters).
        ``k1`` is read from the sampler's log-probs, the student's own at rollout temperature 1 (the loss pass has
        not run yet). Batches the student did not sample (dataset or teacher states) get no bridge."""
        nf = self.objective.near_future
        if not self.objective.teacher_bridge or rollouts.sampler_logprobs is None:
            return
        k1 = rollouts.sampler_logprobs - teacher_signal.token_logprobs
        chosen = bridge.pick_positions(k1, rollouts.own_mask, nf.high_loss_fraction, nf.max_positions, nf.window)
        origins = [(b, t) for b, positions in enumerate(chosen) for t in positions]
        usage = teacher_signal.usage
        usage["bridge_calls"] = usage.get("bridge_calls", 0.0) + len(origins)
        usage.setdefault("bridge_tokens", 0.0)
        if not origins:
            return
        prompts = [ids[m.bool()].tolist() for ids, m in zip(rollouts.prompt_ids, rollouts.prompt_mask)]
        completions = rollouts.completion_ids.tolist()
        prefixes = [prompts[b] + completions[b][:t] for b, t in origins]
        continuations = teacher.continue_ids(prefixes, nf.window, nf.temperature)
        for key, value in teacher.take_usage().items():
            usage[key] = usage.get(key, 0.0) + value
        usage["bridge_tokens"] += sum(map(len, continuations))
        tokenizer, device = teacher.tokenizer, rollouts.completion_ids.device
        rows, positions = (torch.tensor(column, device=device) for column in zip(*origins))
        teacher_signal.bridge = Bridge(from_prefixes(prefixes, continuations, tokenizer.pad_token_id,
                                                     tokenizer.eos_token_id, "teacher", device), rows, positions)

    def _with_bridge(self, result: TokenLoss, teacher: TeacherSignal, mask: torch.Tensor,
                     main_pass: torch.Tensor) -> TokenLoss:
        """Add ``bridge_weight`` times each bridge's cross-entropy at its origin; the student's forward over the
        bridges runs at the main pass's precision (bf16 logits came from autocast)."""
        if teacher.bridge is None:
            return result
        b = teacher.bridge.rollouts
        with autocast(main_pass.device, main_pass.dtype):
            logits = b.completion_logits(self.student)
        token_logprobs = sampled_from_logits(logits, b.completion_ids)[0]
        term = self.objective.near_future.bridge_weight * bridge.bridge_cross_entropy(
            token_logprobs, b.completion_mask, teacher.bridge.rows, teacher.bridge.positions, tuple(mask.shape))
        base = float((result.loss.detach().abs() * mask).sum())
        added = float((term.detach() * mask).sum())
        result.scalars["bridge_loss"] = added / max(1.0, float(mask.sum()))
        result.scalars["bridge_share"] = added / max(1e-12, base + added)
        return dataclasses.replace(result, loss=result.loss + term)

    # ---- the loss ------------------------------------------------------------------------------------
    def token_loss(self, student_logits: torch.Tensor, rollouts: Rollouts, teacher: TeacherSignal,
                   hidden: torch.Tensor | None = None) -> TokenLoss:
        o = self.objective
        mask = rollouts.completion_mask
        if self.hidden_only and student_logits is None:  # the loop's path; given logits, the whole computation
            loss, stats = self._chunked(hidden, rollouts, teacher)
            return self._with_bridge(TokenLoss(self._position_weighted(loss, mask), stats), teacher, mask, hidden)
        if teacher.logprobs is None and teacher.hidden is not None:  # this call's unchunked terms need it whole
            teacher = dataclasses.replace(teacher, logprobs=teacher.full_logprobs())
        logprobs = student_logits.float().log_softmax(-1)
        # as a local teacher computes its own (teachers.local): the same logits give a log-ratio of exactly 0
        token_logprobs = sampled_from_logits(student_logits, rollouts.completion_ids)[0]
        stats: dict[str, torch.Tensor] = {"student_entropy": entropy(logprobs.detach())}
        if o.repeat_penalty.enabled:  # the target without its repeats, every position at once
            every = torch.ones_like(mask, dtype=torch.bool)
            full = teacher.logprobs.float().reshape(-1, teacher.logprobs.shape[-1]).clone()
            penalized = self._without_repeats(lambda i, j: full[i:j], rollouts, every, stats)(0, full.shape[0])
            teacher = dataclasses.replace(teacher, logprobs=penalized.log_softmax(-1).view_as(teacher.logprobs))
        scalars: dict[str, float] = {}
        value_loss = None

        if o.support != "sampled":
            loss = self._distributional(student_logits, logprobs, teacher, stats)
        elif rollouts.source != "student":
            loss = -token_logprobs  # teacher samples (or dataset completions): cross-entropy, forward KL's gradient
        elif o.grad_path == "direct":  # k2: reverse KL's gradient; k3: forward KL's (ObjectiveConfig pairs them)
            loss = estimator(o.estimator, teacher.token_logprobs - token_logprobs)
            stats["reverse_kl_k1"] = (token_logprobs - teacher.token_logprobs).detach()
        else:
            loss, value_loss = self._policy_gradient(student_logits, logprobs, token_logprobs, rollouts, teacher,
                                                     hidden, stats, scalars)

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
        return self._with_bridge(TokenLoss(loss, stats, scalars, token_logprobs.detach(), value_loss), teacher, mask,
                                 student_logits)

    def _position_weighted(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decay = self.objective.position_decay
        return loss if decay == 1.0 else loss * gates.position_weights(mask, decay)

    def _chunked(self, hidden, rollouts: Rollouts, teacher: TeacherSignal) -> tuple[torch.Tensor, dict]:
        """Full-vocabulary divergence from the student's hidden states and the teacher's (or its log-probs),
        both LM heads applied ``vocab_chunk_size`` positions at a time; ``[B, C]`` losses and stats."""
        o, mask = self.objective, rollouts.completion_mask
        keep, normalised = mask.bool(), False
        if teacher.hidden is not None:
            teacher_hidden, teacher_head, stats = teacher.hidden[keep], teacher.head, teacher.pending
            teacher_logits = lambda i, j: through(teacher_head, teacher_hidden[i:j])  # noqa: E731
            if stats is not None:  # a local teacher's statistics, from these blocks as they pass (teachers.local)
                positions, project = keep.reshape(-1).nonzero().squeeze(-1), teacher_logits
                teacher_logits = lambda i, j: stats.observe(positions[i:j], project(i, j))  # noqa: E731
                normalised = True  # observe hands over log-probs: the blocks skip their logsumexp
        else:
            teacher_rows = teacher.logprobs[keep]
            teacher_logits = lambda i, j: teacher_rows[i:j].clone()  # noqa: E731 (chunked_full overwrites it)
        logged: dict[str, torch.Tensor] = {}
        if o.repeat_penalty.enabled:  # lowered logits are normalised again by the blocks
            teacher_logits, normalised = self._without_repeats(teacher_logits, rollouts, keep, logged), False
        per_token, student_entropy, reverse_kl = chunked_full(
            hidden[keep], self.head, teacher_logits, o.divergence, beta=o.beta, alpha=o.alpha,
            temperature=o.temperature, chunk_size=o.vocab_chunk_size, memory_mib=o.chunk_memory_mib,
            teacher_logprobs=normalised)
        scatter = lambda values: torch.zeros_like(mask, dtype=values.dtype).masked_scatter(keep, values)  # noqa: E731
        logged.update(student_entropy=scatter(student_entropy), reverse_kl_full=scatter(reverse_kl))
        return scatter(per_token), logged

    def _without_repeats(self, teacher_logits, rollouts: Rollouts, keep: torch.Tensor, stats: dict):
        """``teacher_logits(i, j)`` (rows ``i:j`` of the ``keep`` positions, in order) as float32 with
        ``repeat_penalty`` applied (``objectives.repeats``). Adds two ``[B, C]`` stats, filled as the blocks pass:
        ``repeat_positions`` (1 where some token would repeat) and ``teacher_repeat_mass`` (the teacher's own
        probability of those tokens, before the penalty)."""
        rp = self.objective.repeat_penalty
        positions, tokens = repeats.repeat_targets(rollouts.completion_ids, rollouts.completion_mask, rp.ngram_size)
        rows, tokens = repeats.as_rows(positions, tokens, keep)
        kept = keep.reshape(-1).nonzero().squeeze(-1)  # row -> flat position
        repeating = torch.zeros(keep.shape, device=keep.device)
        repeating.view(-1)[kept[rows]] = 1.0
        mass = stats["teacher_repeat_mass"] = torch.zeros(keep.shape, device=keep.device)
        stats["repeat_positions"] = repeating

        def lowered(i: int, j: int) -> torch.Tensor:
            logits = teacher_logits(i, j).float()
            block_rows, block_tokens = repeats.in_block(rows, tokens, i, j)
            if block_rows.numel():  # assigned, not added: a backward that recomputes a block asks for it again
                p = (logits[block_rows, block_tokens] - logits[block_rows].logsumexp(-1)).exp()
                mass.view(-1)[kept[i:j]] = logits.new_zeros(j - i).index_add_(0, block_rows, p)
            return repeats.penalize(logits, block_rows, block_tokens, rp.penalty)

        return lowered

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

    def _policy_gradient(self, logits, logprobs, token_logprobs, rollouts, teacher, hidden, stats,
                         scalars) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The PG loss, and the learned value head's regression loss (None without one)."""
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
        extra, value_loss = torch.zeros_like(reward), None

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
        if o.lookahead:
            advantage = credit.windowed_return(reward, mask, o.near_future.gamma, o.near_future.window)
        elif values is None:
            advantage = credit.returns_to_go(reward, mask, o.credit.gamma)
        else:
            advantage = credit.gae(reward, values.detach(), mask, o.credit.gamma, o.credit.lam)
            if self.value_head is not None:  # regressed on the lambda-return; reads detached states (_values)
                target = (advantage + values).detach()
                value_loss = 0.5 * (values - target).pow(2)
                scalars["value_explained_variance"] = credit.explained_variance(values.detach(), target, mask)
        advantage = self._group_baseline(advantage, reward, rollouts, scalars)
        if o.correction:
            advantage = advantage - _cost_derivative(o, l)
        stats["advantage"] = feedback = advantage
        if o.credit.normalize:
            mean, std = self.advantage_moments or credit.step_moments([(advantage, own)])
            advantage = (advantage - mean) / (std + 1e-8) * mask
        sampler = rollouts.sampler_logprobs if rollouts.sampler_logprobs is not None else token_logprobs.detach()
        loss = policy_gradient_loss(token_logprobs, sampler, advantage)
        if o.routing == "cr":
            loss = self._route(logits, logprobs, loss, feedback, rollouts, teacher, scalars)
        return loss + extra, value_loss

    def _group_baseline(self, advantage: torch.Tensor, reward: torch.Tensor, rollouts: Rollouts,
                        scalars) -> torch.Tensor:
        """With several samples per prompt: log the spread of their sequence returns ``R_i = sum_t r_{i,t}``
        (``group_return_std``) and subtract ``credit.baseline``'s per-prompt ``b_i`` from every token's advantage
        (``objectives.groups``; ``ObjectiveConfig`` accepts it only on the undiscounted return-to-go)."""
        kind = self.objective.credit.baseline
        if rollouts.group is None:
            if kind != "none":
                raise OPDError(f"credit.baseline {kind} needs several samples per prompt, and these rollouts carry no "
                               "groups: set rollout.num_samples >= 2 (or Rollouts.group), or remove credit.baseline")
            return advantage
        returns = (reward * rollouts.own_mask).sum(1)
        scalars["group_return_std"] = groups.spread(returns, rollouts.group)
        if kind == "none":
            return advantage
        return (advantage - groups.baseline(returns, rollouts.group, kind).unsqueeze(1)) * rollouts.completion_mask

    def _route(self, logits, logprobs, loss, feedback, rollouts: Rollouts, teacher: TeacherSignal,
               scalars) -> torch.Tensor:
        """CR-OPD: on own tokens with ``feedback < -delta`` (the advantage before any normalisation) and a non-empty
        routed set, the PG term is replaced by ``coef * KL(p* || pi_S)`` (``objectives.routing``)."""
        cr, own = self.objective.cr, rollouts.own_mask.bool()
        where = ((feedback < -cr.delta) & own).nonzero(as_tuple=True)
        n_negative = where[0].numel()
        scalars["cr_negative_share"] = n_negative / max(1, int(own.sum()))
        if n_negative == 0:
            scalars.update(cr_routed_share=0.0, cr_unroutable_share=0.0, cr_set_size=0.0, cr_teacher_mass=0.0)
            return loss
        ids, top = self._teacher_topk(teacher, cr.teacher_top_k)
        student = logprobs[where]  # [N, V]
        teacher_probs = torch.zeros_like(student).scatter(-1, ids[where], top[where].float().exp())
        route = routing.counterfactual_target(
            student.detach().exp(), teacher_probs, rollouts.completion_ids[where], teacher.token_logprobs[where].exp(),
            student_top_p=cr.student_top_p, student_top_k=cr.student_top_k, student_min_prob=cr.student_min_prob,
            teacher_top_p=cr.teacher_top_p, teacher_top_k=cr.teacher_top_k, eta=cr.eta)
        routed = route.routed_N
        n_routed = int(routed.sum())
        scalars["cr_routed_share"] = n_routed / max(1, int(own.sum()))
        scalars["cr_unroutable_share"] = 1 - n_routed / n_negative
        scalars["cr_set_size"] = float(route.set_size_N[routed].float().mean()) if n_routed else 0.0
        scalars["cr_teacher_mass"] = float(route.teacher_mass_N[routed].mean()) if n_routed else 0.0
        if n_routed == 0:
            return loss
        routed_loss = cr.coef * routing.route_loss(logits[where][routed], route.target_NV[routed],
                                                   route.moved_NV[routed], cr.loss)
        return loss.index_put((where[0][routed], where[1][routed]), routed_loss)

    def _values(self, logprobs, teacher: TeacherSignal, hidden, reward) -> torch.Tensor | None:
        """``V(s_t)`` for GAE, or None for plain discounted returns."""
        source = self.objective.credit.value
        if source == "none":
            return None
        if source == "zero":
            return torch.zeros_like(reward)
        if source == "analytic":  # expected immediate reward at s_t: -KL(pi_S || pi_T)
            return -kl(logprobs.detach(), teacher.logprobs)
        # a critic apart from the policy: its loss must not train the student's trunk (detached input), so the
        # student's gradient is exactly the one with the head's output as a fixed baseline
        return self.value_head(hidden.detach().float()).squeeze(-1)

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
