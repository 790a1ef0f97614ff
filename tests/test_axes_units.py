"""Unit tests of the axes of the OPD formula that nothing else pins: TrOPD outliers, the guidance schedule and
prefix term, EOPD's entropy gate, vOPD's analytic baseline, the regularizers, log-ratio clipping, position decay,
the importance ratio at a rollout temperature, step-wide advantage normalisation, and id pairing on a top-k support.

Every expected value is computed here by hand or by an independent float64 formula in probability space, never by
calling the library function under test. Tensors are tiny (V of 4 or 5, a few positions).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from opdkit.config import ObjectiveConfig
from opdkit.methods.formula import Formula
from opdkit.objectives import credit, gates
from opdkit.objectives.support import restrict, student_topk
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal

# ---- helpers ------------------------------------------------------------------------------------------------


def _rollouts(ids, mask=None, *, sampler=None, guidance=None, reference=None) -> Rollouts:
    ids = torch.as_tensor(ids)
    B, C = ids.shape
    mask = torch.ones(B, C) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    return Rollouts(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), ids, mask,
                    torch.zeros(B, dtype=torch.bool), [], "student", sampler_logprobs=sampler,
                    guidance_mask=guidance, reference_logprobs=reference)


def _gather(table: torch.Tensor, ids) -> torch.Tensor:
    return table.gather(-1, torch.as_tensor(ids).unsqueeze(-1)).squeeze(-1)


def _full_signal(teacher_logits: torch.Tensor, ids, entropy=None) -> TeacherSignal:
    lp = teacher_logits.float().log_softmax(-1)
    return TeacherSignal(token_logprobs=_gather(lp, ids), logprobs=lp, entropy=entropy)


def _p64(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities in float64, written without log_softmax: exp(z - max) / sum."""
    z = logits.detach().double()
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _onehot(y: int, V: int) -> torch.Tensor:
    out = torch.zeros(V, dtype=torch.float64)
    out[y] = 1.0
    return out


def _fkl_topk64(p_student: torch.Tensor, p_teacher: torch.Tensor, k: int, floor: float = -30.0):
    """float64 ``sum_{v in top-k(T)} q(v) (log q(v) - max(log p_S(v), floor))`` with q the teacher renormalised
    on its top-k, and its gradient w.r.t. the student's logits ``-sum_{v unfloored} q(v) (e_v - p_S)``."""
    ids = sorted(range(len(p_teacher)), key=lambda v: -float(p_teacher[v]))[:k]
    mass = sum(float(p_teacher[v]) for v in ids)
    value, grad = 0.0, torch.zeros_like(p_student)
    for v in ids:
        q = float(p_teacher[v]) / mass
        log_s = math.log(float(p_student[v])) if float(p_student[v]) > 0 else -math.inf
        value += q * (math.log(q) - max(log_s, floor))
        if log_s > floor:
            grad -= q * (_onehot(v, len(p_student)) - p_student)
    return value, grad


def _entropy64(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def _tropd(**trust_region) -> Formula:
    return Formula(ObjectiveConfig(method="tropd", prefix_guidance={"enabled": False},
                                   trust_region={"enabled": True, **trust_region}))


# ---- 1. TrOPD outliers ------------------------------------------------------------------------------------------

STUDENT_TR = torch.tensor([[[1.0, 0.5, -0.3, 0.2, -1.0], [0.3, -0.2, 0.8, 0.0, 0.1]],
                           [[0.4, -1e4, 0.6, -0.2, 0.9], [-0.5, 0.7, 0.1, 0.3, 0.0]]])
# position 0: the sampled token 0 has teacher log-prob ~ -42, so log u < log pi_T - log pi_S never holds (rejected);
# position 1: the teacher puts more mass on the sampled token than the student (always accepted).
TEACHER_TR = torch.tensor([[[-40.0, 2.0, 1.0, 0.5, -0.5], [0.0, 0.0, 5.0, 0.0, 0.0]],
                           [[-40.0, 2.0, 1.5, 0.5, -0.5], [0.0, 6.0, 0.0, 0.0, 0.0]]])
IDS_TR = [[0, 2], [0, 1]]


def test_tropd_fkl_advantage_rejected_token_trains_only_its_log_prob_with_minus_fkl():
    torch.manual_seed(0)
    logits = STUDENT_TR[:1].clone().requires_grad_()
    ids = IDS_TR[:1]
    out = _tropd(outliers="fkl", top_k=3, fkl_mode="advantage").token_loss(
        logits, _rollouts(ids), _full_signal(TEACHER_TR[:1], ids))
    out.loss.sum().backward()

    p, pt = _p64(logits[0]), _p64(TEACHER_TR[0])
    fkl, _ = _fkl_topk64(p[0], pt[0], k=3)
    accepted_adv = math.log(pt[1, 2]) - math.log(p[1, 2])
    assert out.scalars["trust_frac"] == pytest.approx(0.5)
    assert out.stats["advantage"][0].tolist() == pytest.approx([-fkl, accepted_adv], rel=1e-5)
    assert out.loss[0].tolist() == pytest.approx([fkl, -accepted_adv], rel=1e-5)  # -ratio * A, ratio 1
    # rejected: d/dz [-(pi/sg pi)(y) * sg(-FKL)] = FKL * (e_y - p); nothing through the other top-k logits
    expected = torch.stack([fkl * (_onehot(0, 5) - p[0]), -accepted_adv * (_onehot(2, 5) - p[1])])
    assert torch.allclose(logits.grad[0].double(), expected, atol=1e-6)


def test_tropd_fkl_direct_backpropagates_the_topk_fkl_with_zero_reward_and_stays_finite():
    torch.manual_seed(0)
    logits = STUDENT_TR.clone().requires_grad_()
    out = _tropd(outliers="fkl", top_k=3, fkl_mode="direct").token_loss(
        logits, _rollouts(IDS_TR), _full_signal(TEACHER_TR, IDS_TR))
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(logits.grad).all()
    assert out.scalars["trust_frac"] == pytest.approx(0.5)

    for b in range(2):
        p, pt = _p64(logits[b]), _p64(TEACHER_TR[b])
        fkl, fkl_grad = _fkl_topk64(p[0], pt[0], k=3)
        y1 = IDS_TR[b][1]
        adv1 = math.log(pt[1, y1]) - math.log(p[1, y1])
        # rejected: PG reward 0, loss = FKL over the teacher's top-3 (ids 1, 2, 3), gradient through those logits
        assert out.stats["advantage"][b, 0].item() == 0.0
        assert out.loss[b, 0].item() == pytest.approx(fkl, rel=1e-5)
        assert torch.allclose(logits.grad[b, 0].double(), fkl_grad, atol=1e-6)
        assert out.stats["advantage"][b, 1].item() == pytest.approx(adv1, rel=1e-5)
        assert torch.allclose(logits.grad[b, 1].double(), -adv1 * (_onehot(y1, 5) - p[1]), atol=1e-6)
    # row 1: the student's logit of teacher top-k token 1 is -1e4: its log-prob is floored at -30, no gradient
    assert out.loss[1, 0].item() < 50  # unfloored, q(1) ~ 0.55 times 1e4 would be in it
    assert logits.grad[1, 0, 1].item() == pytest.approx(0.0, abs=1e-12)


def _controlled_uniforms(monkeypatch, u: torch.Tensor):
    """The gate's only randomness is ``torch.rand_like(reward)``: hand it fixed uniforms."""
    monkeypatch.setattr(torch, "rand_like", lambda t, *a, **k: u.to(t.dtype).reshape(t.shape).clone())


U = torch.tensor([[0.1, 0.1, 0.9, 0.5]])
LOG_RATIO = [math.log(0.1) + 0.2, math.log(0.1) - 0.2, math.log(0.9) - 0.05, 0.3]  # log pi_T(y) - log pi_S(y)
ACCEPTED = [True, False, False, True]  # log u < log-ratio


def _gate_case():
    logits = torch.tensor([[[0.2, -0.1, 0.5], [1.0, 0.0, -1.0], [0.3, 0.3, -0.4], [-0.2, 0.6, 0.1]]]).requires_grad_()
    ids = [[1, 0, 2, 1]]
    student_token = _gather(logits.detach().log_softmax(-1), ids)
    signal = TeacherSignal(token_logprobs=student_token + torch.tensor([LOG_RATIO]))
    return logits, ids, signal


def test_tropd_clip_floors_only_rejected_rewards(monkeypatch):
    assert [math.log(u) < r for u, r in zip(U[0].tolist(), LOG_RATIO)] == ACCEPTED
    _controlled_uniforms(monkeypatch, U)
    logits, ids, signal = _gate_case()
    out = _tropd(outliers="clip", clip_floor=-1.0).token_loss(logits, _rollouts(ids), signal)
    # accepted -2.10 stays below the floor; rejected -2.50 -> -1.0; rejected -0.155 is above it, unchanged
    expected = [LOG_RATIO[0], -1.0, LOG_RATIO[2], LOG_RATIO[3]]
    assert out.stats["advantage"][0].tolist() == pytest.approx(expected, abs=1e-5)
    assert out.loss[0].tolist() == pytest.approx([-a for a in expected], abs=1e-5)
    assert out.scalars["trust_frac"] == pytest.approx(0.5)


def test_tropd_mask_zeroes_rejected_rewards(monkeypatch):
    _controlled_uniforms(monkeypatch, U)
    logits, ids, signal = _gate_case()
    out = _tropd(outliers="mask").token_loss(logits, _rollouts(ids), signal)
    out.loss.sum().backward()
    expected = [r if a else 0.0 for r, a in zip(LOG_RATIO, ACCEPTED)]
    assert out.stats["advantage"][0].tolist() == pytest.approx(expected, abs=1e-5)
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[0, 2].abs().max() == 0
    p = _p64(logits[0, 0])
    assert torch.allclose(logits.grad[0, 0].double(), -LOG_RATIO[0] * (_onehot(1, 3) - p), atol=1e-6)


# ---- 2. guidance schedule and the prefix term -------------------------------------------------------------------

def test_guidance_fraction_is_a_half_cosine():
    T = 10
    assert gates.guidance_fraction(0, T) == pytest.approx(1.0)
    assert gates.guidance_fraction(5, T) == pytest.approx(0.5)
    assert gates.guidance_fraction(2, T) == pytest.approx((1 + math.cos(math.pi * 0.2)) / 2)  # 0.9045
    assert gates.guidance_fraction(T, T) == pytest.approx(0.0, abs=1e-12)
    assert gates.guidance_fraction(2 * T, T) == pytest.approx(0.0, abs=1e-12)


def test_teacher_prefixes_take_floor_of_fraction_times_the_answer():
    from opdkit.data import Example
    from opdkit.train import teacher_prefixes

    examples = [Example(messages=[{"role": "user", "content": "a"}]),
                Example(messages=[{"role": "user", "content": "b"}])]
    answers = {json.dumps(examples[0].messages, sort_keys=True): [5, 6, 7, 8, 9],
               json.dumps(examples[1].messages, sort_keys=True): [3, 4, 1]}
    objective = ObjectiveConfig(method="tropd", prefix_guidance={"anneal_steps": 8})
    run = SimpleNamespace(config=SimpleNamespace(objective=objective, optim=SimpleNamespace(steps=100),
                                                 rollout=SimpleNamespace(max_completion_length=8)),
                          tokenizer=SimpleNamespace(eos_token_id=0), guidance_answers=answers, teacher=None)
    assert teacher_prefixes(run, examples, 0) == [[5, 6, 7, 8, 9], [3, 4, 1]]
    assert teacher_prefixes(run, examples, 4) == [[5, 6], [3]]  # floor(2.5), floor(1.5)
    assert teacher_prefixes(run, examples, 8) == [[], []]  # anneal_steps, not optim.steps, is the horizon
    assert teacher_prefixes(run, examples, 50) == [[], []]
    unseen = [Example(messages=[{"role": "user", "content": "c"}])]  # run.teacher is None: asking would fail
    assert teacher_prefixes(run, unseen, 8) == [[]]  # after the anneal no answer is asked for


def test_prefix_tokens_get_beta_times_cross_entropy_whatever_the_other_terms():
    beta = 0.25
    objective = ObjectiveConfig(method="tropd", trust_region={"top_k": 3},
                                prefix_guidance={"beta": beta}, entropy_coef=0.3, ref_kl_coef=0.2,
                                position_decay=0.5)
    logits = torch.tensor([[[0.5, -0.2, 0.1, 0.9], [1.2, 0.0, -0.7, 0.3],
                            [0.1, 0.4, -0.3, 0.2], [-0.6, 0.2, 0.8, 0.0]]]).requires_grad_()
    ids = [[1, 2, 3, 2]]
    teacher = torch.tensor([[[0.0, -40.0, 1.0, 0.5], [0.0, 0.2, -40.0, 0.5],  # prefix tokens: the gate would reject
                             [0.0, 0.0, 0.0, 6.0], [0.0, 0.0, 6.0, 0.0]]])  # own tokens: accepted
    guidance = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    lp = logits.detach().log_softmax(-1)
    rollouts = _rollouts(ids, guidance=guidance, sampler=_gather(lp, ids) * (1 - guidance),
                         reference=_gather(lp, ids) - 0.3)
    torch.manual_seed(0)
    out = Formula(objective).token_loss(logits, rollouts, _full_signal(teacher, ids))
    out.loss.sum().backward()

    p = _p64(logits[0])
    for t in (0, 1):
        y = ids[0][t]
        assert out.loss[0, t].item() == pytest.approx(-beta * math.log(p[t, y]), rel=1e-5)
        grad = beta * (p[t] - _onehot(y, 4))  # descent raises z_y: log pi_S(y) goes up
        assert torch.allclose(logits.grad[0, t].double(), grad, atol=1e-6)
        assert logits.grad[0, t, y] < 0
    for t in (2, 3):  # the student's own tokens keep the objective's other terms
        assert out.loss[0, t].item() != pytest.approx(-beta * math.log(p[t, ids[0][t]]), rel=1e-3)
    assert out.scalars["guidance_fraction"] == pytest.approx(0.5)
    assert out.scalars["trust_frac"] == pytest.approx(1.0)  # counted over the own tokens only


# ---- 3. EOPD's entropy gate -------------------------------------------------------------------------------------

EOPD_TEACHER = torch.tensor([[[0.6, 0.12, 0.1, 0.09, 0.09],  # full H 1.22 > 0.8, top-3 renormalised H 0.77 < 0.8
                              [0.4, 0.3, 0.27, 0.02, 0.01],  # both above
                              [0.9, 0.04, 0.03, 0.02, 0.01],  # both below
                              [0.3, 0.25, 0.2, 0.15, 0.1]]], dtype=torch.float64)  # above, but masked out
EOPD_IDS = [[1, 0, 3, 2]]
EOPD_MASK = [[1.0, 1.0, 1.0, 0.0]]


def _eopd_case(full: bool):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 5, generator=g).requires_grad_()
    pt = EOPD_TEACHER
    token = _gather(pt.log(), EOPD_IDS).float()
    if full:
        signal = TeacherSignal(token, logprobs=pt.log().float(), entropy=_entropy64(pt).float())
    else:  # a server's top-4 (sorted, normalised over the vocabulary), more than the gate's top_k of 3
        values, topk_ids = pt.log().topk(4, dim=-1)
        signal = TeacherSignal(token, topk_ids=topk_ids, topk_logprobs=values.float())
    method = Formula(ObjectiveConfig(method="eopd", entropy_gate={"top_k": 3, "coef": 0.5}))
    return method.token_loss(logits, _rollouts(EOPD_IDS, EOPD_MASK), signal)


@pytest.mark.parametrize("full", [True, False], ids=["full_entropy", "topk_entropy"])
def test_eopd_gate_uses_the_entropy_it_has_and_adds_coef_gate_fkl(full):
    out = _eopd_case(full)
    pt = EOPD_TEACHER[0]
    top3 = pt.sort(-1, descending=True).values[:, :3]
    h_full, h_top = _entropy64(pt), _entropy64(top3 / top3.sum(-1, keepdim=True))
    assert (h_full > 0.8).tolist() == [True, True, False, True]  # the case is what it claims
    assert (h_top > 0.8).tolist() == [False, True, False, True]
    used = h_full if full else h_top
    key, other = ("teacher_entropy", "teacher_entropy_topk") if full else ("teacher_entropy_topk", "teacher_entropy")
    assert key in out.stats and other not in out.stats
    assert torch.allclose(out.stats[key][0].double(), used, atol=1e-5)
    gate = (used > 0.8).double()
    assert out.scalars["entropy_gate_rate"] == pytest.approx(2 / 3 if full else 1 / 3)  # masked position excluded

    g = torch.Generator().manual_seed(3)
    p = _p64(torch.randn(1, 4, 5, generator=g)[0])
    for t in range(4):
        y = EOPD_IDS[0][t]
        pg = math.log(p[t, y]) - math.log(pt[t, y])  # -A with A = log pi_T(y) - log pi_S(y), ratio 1
        fkl, _ = _fkl_topk64(p[t], pt[t], k=3)
        expected = (pg if EOPD_MASK[0][t] else 0.0) + 0.5 * gate[t].item() * fkl
        assert out.loss[0, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---- 4. vOPD ----------------------------------------------------------------------------------------------------

def test_vopd_advantage_is_log_ratio_plus_the_state_kl():
    logits = torch.tensor([[[0.3, -0.4, 1.1, 0.0], [0.9, 0.2, -0.5, 0.4], [0.0, 0.0, 0.0, 2.0]]]).requires_grad_()
    teacher = torch.tensor([[[1.0, 0.0, -1.0, 0.5], [-0.3, 1.4, 0.2, 0.0], [0.5, 0.5, 0.5, 0.5]]])
    ids, mask = [[2, 1, 3]], [[1.0, 1.0, 0.0]]
    out = Formula(ObjectiveConfig(method="vopd")).token_loss(logits, _rollouts(ids, mask), _full_signal(teacher, ids))
    (out.loss * torch.tensor(mask)).sum().backward()
    p, pt = _p64(logits[0]), _p64(teacher[0])
    for t in range(3):
        y = ids[0][t]
        r = math.log(pt[t, y]) - math.log(p[t, y])
        kl = float((p[t] * (p[t].log() - pt[t].log())).sum())  # b = -KL(pi_S || pi_T)
        a = (r + kl) * mask[0][t]
        assert out.stats["advantage"][0, t].item() == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert out.loss[0, t].item() == pytest.approx(-a, rel=1e-5, abs=1e-6)
        assert torch.allclose(logits.grad[0, t].double(), -a * (_onehot(y, 4) - p[t]), atol=1e-6)


# ---- 5. reference KL --------------------------------------------------------------------------------------------

def test_reference_kl_is_k3_with_gradient_coef_one_minus_ref_over_student():
    coef = 0.3
    logits = torch.tensor([[[0.4, -0.3, 1.0], [0.0, 0.7, -0.2]]]).requires_grad_()
    ids = [[0, 2]]
    lp = logits.detach().log_softmax(-1)
    student_token = _gather(lp, ids)
    ratios = torch.tensor([[0.5, 2.0]])  # pi_ref(y) / pi_S(y)
    rollouts = _rollouts(ids, reference=student_token + ratios.log())
    signal = TeacherSignal(token_logprobs=student_token.clone())  # the OPD reward is 0: only the k3 term is left
    out = Formula(ObjectiveConfig(method="opd", ref_kl_coef=coef)).token_loss(logits, rollouts, signal)
    out.loss.sum().backward()
    p = _p64(logits[0])
    for t, rho in enumerate(ratios[0].tolist()):
        assert out.loss[0, t].item() == pytest.approx(coef * ((rho - 1) - math.log(rho)), rel=1e-5)
        grad = coef * (1 - rho) * (_onehot(ids[0][t], 3) - p[t])
        assert torch.allclose(logits.grad[0, t].double(), grad, atol=1e-6)


# ---- 6. log-ratio clipping --------------------------------------------------------------------------------------

def test_log_ratio_clip_clamps_the_reward_and_reports_the_rate():
    probs = torch.tensor([[[0.5, 0.25, 0.25], [math.exp(-4), 0.5, 0.5 - math.exp(-4)], [0.25, 0.25, 0.5],
                           [0.2, 0.3, 0.5]]])
    logits = probs.log().requires_grad_()
    ids, mask = [[0, 0, 1, 2]], [[1.0, 1.0, 1.0, 0.0]]
    l = torch.tensor([[3.5, -3.0, 1.0, 10.0]])  # log pi_S(y) - log pi_T(y); the last is masked
    signal = TeacherSignal(token_logprobs=_gather(probs.log(), ids) - l)
    out = Formula(ObjectiveConfig(method="opd", log_ratio_clip=2.0)).token_loss(logits, _rollouts(ids, mask), signal)
    assert out.stats["advantage"][0].tolist() == pytest.approx([-2.0, 2.0, -1.0, 0.0], abs=1e-5)
    assert out.stats["reverse_kl_k1"][0].tolist() == pytest.approx([3.5, -3.0, 1.0, 10.0], abs=1e-5)
    assert out.scalars["log_ratio_clamp_rate"] == pytest.approx(2 / 3)


# ---- 7. entropy bonus -------------------------------------------------------------------------------------------

def test_entropy_coef_adds_minus_entropy_and_its_gradient_raises_entropy():
    coef = 0.2
    logits = torch.tensor([[[1.5, 0.2, -0.8, 0.1], [0.0, 2.5, 0.3, -1.0]]]).requires_grad_()
    ids = [[0, 3]]
    signal = TeacherSignal(token_logprobs=_gather(logits.detach().log_softmax(-1), ids))  # OPD reward 0
    out = Formula(ObjectiveConfig(method="opd", entropy_coef=coef)).token_loss(logits, _rollouts(ids), signal)
    out.loss.sum().backward()
    p = _p64(logits[0])
    h = _entropy64(p)
    assert out.loss[0].tolist() == pytest.approx((-coef * h).tolist(), rel=1e-5)
    z64 = logits.detach()[0].double().requires_grad_()
    (-coef * _entropy64(torch.softmax(z64, -1))).sum().backward()  # independent float64 autograd
    assert torch.allclose(logits.grad[0].double(), z64.grad, atol=1e-6)
    assert torch.allclose(z64.grad, coef * p * (p.log() + h.unsqueeze(-1)), atol=1e-12)  # closed form
    stepped = _entropy64(torch.softmax(logits.detach()[0].double() - 0.1 * logits.grad[0].double(), -1))
    assert (stepped > h).all()


# ---- 8. position decay ------------------------------------------------------------------------------------------

def test_position_decay_on_the_policy_gradient_route():
    logits = torch.tensor([[[0.3, -0.4, 1.1], [0.9, 0.2, -0.5], [0.0, 0.4, 0.1], [0.2, 0.2, 0.2]],
                           [[1.0, 0.0, 0.0], [0.1, -0.1, 0.6], [0.3, 0.3, 0.0], [0.0, 0.5, 0.0]]]).requires_grad_()
    teacher = torch.tensor([[[1.0, 0.0, -1.0], [-0.3, 1.4, 0.2], [0.5, 0.1, 0.5], [0.0, 0.0, 0.0]],
                            [[0.0, 1.0, 0.0], [0.2, 0.2, 0.9], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    ids, mask = [[2, 1, 0, 1], [0, 2, 1, 0]], [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    out = Formula(ObjectiveConfig(method="opd", position_decay=0.5)).token_loss(
        logits, _rollouts(ids, mask), _full_signal(teacher, ids))
    p, pt = _p64(logits), _p64(teacher)
    for b in range(2):
        for t in range(4):
            y = ids[b][t]
            expected = 0.5**t * mask[b][t] * (math.log(p[b, t, y]) - math.log(pt[b, t, y]))
            assert out.loss[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


class _TinyHead(torch.nn.Module):
    def __init__(self, d: int, V: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(d, V, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def _jsd64(ps: torch.Tensor, pt: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)


def test_position_decay_on_the_vocabulary_chunked_full_support():
    torch.manual_seed(0)
    B, C, d, V, decay = 2, 3, 4, 5, 0.7
    head = _TinyHead(d, V)
    hidden = torch.randn(B, C, d)
    teacher = (torch.randn(B, C, V) * 1.5).log_softmax(-1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    method = Formula(ObjectiveConfig(method="gkd", lmbda=1.0, vocab_chunk_size=2, position_decay=decay))
    method.attach(head)
    out = method.token_loss(None, _rollouts(torch.zeros(B, C, dtype=torch.long), mask),
                            TeacherSignal(torch.zeros(B, C), logprobs=teacher), hidden=hidden)
    (out.loss * mask).sum().backward()

    w64 = head.lm_head.weight.detach().double().requires_grad_()
    ps = torch.softmax(hidden.double() @ w64.T, -1)
    weights = torch.tensor([decay**t for t in range(C)], dtype=torch.float64) * mask.double()
    expected = _jsd64(ps, teacher.double().exp(), 0.5) * weights
    assert torch.allclose(out.loss.double(), expected, atol=1e-6)
    expected.sum().backward()
    assert torch.allclose(head.lm_head.weight.grad.double(), w64.grad, atol=1e-6)


# ---- 9. importance ratio at a rollout temperature ---------------------------------------------------------------

def test_importance_ratio_at_rollout_temperature_gives_the_on_policy_gradient_in_expectation():
    T, V = 1.7, 4
    z = torch.tensor([0.8, -0.3, 0.2, 1.1])
    teacher = torch.tensor([0.1, 1.0, -0.5, 0.4])
    logits = z.expand(V, 1, V).clone().requires_grad_()  # one row per sampled token y = 0..3
    ids = torch.arange(V).unsqueeze(1)
    mu = _p64(z / T)
    rollouts = _rollouts(ids, sampler=mu.log().float().unsqueeze(1))
    signal = _full_signal(teacher.expand(V, 1, V), ids)
    out = Formula(ObjectiveConfig(method="opd")).token_loss(logits, rollouts, signal)
    out.loss.sum().backward()

    p, pt = _p64(z), _p64(teacher)
    adv = pt.log() - p.log()
    assert out.loss[:, 0].double().tolist() == pytest.approx((-(p / mu) * adv).tolist(), rel=1e-5)
    expected_mu = (mu.unsqueeze(1) * logits.grad[:, 0].double()).sum(0)  # E_{y ~ mu} of the loss's gradient
    on_policy = sum(p[y] * -adv[y] * (_onehot(y, V) - p) for y in range(V))  # E_{y ~ pi_S} of -A grad log pi_S
    assert torch.allclose(expected_mu, on_policy, atol=1e-6)
    z64 = z.double().requires_grad_()  # which is the reverse KL's gradient
    lp = torch.log_softmax(z64, -1)
    (lp.exp() * (lp - pt.log())).sum().backward()
    assert torch.allclose(on_policy, z64.grad, atol=1e-10)
    # without the ratio (sampler ignored) the expectation under mu would be another vector: T matters here
    no_ratio = sum(mu[y] * -adv[y] * (_onehot(y, V) - p) for y in range(V))
    assert (no_ratio - on_policy).abs().max() > 1e-2


# ---- 10. step-wide advantage normalisation ----------------------------------------------------------------------

def test_normalize_is_the_same_whatever_the_split_of_a_step():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 3, 5, generator=g)
    teacher = torch.randn(4, 3, 5, generator=g)
    ids = torch.randint(0, 5, (4, 3), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    p, pt = _p64(logits), _p64(teacher)
    adv = (_gather(pt.log(), ids) - _gather(p.log(), ids)) * mask.double()
    values = adv[mask.bool()]
    mean, std = values.mean().item(), values.std(unbiased=True).item()
    expected = -((adv - mean) / (std + 1e-8)) * mask.double()

    def method():
        return Formula(ObjectiveConfig(method="opd", credit={"normalize": True}))

    signal = lambda sl: _full_signal(teacher[sl], ids[sl])  # noqa: E731
    whole = method().token_loss(logits, _rollouts(ids, mask), signal(slice(None))).loss
    parts = []
    halves = (slice(0, 2), slice(2, 4))
    advantages = [(method().token_loss(logits[s], _rollouts(ids[s], mask[s]), signal(s)).stats["advantage"], mask[s])
                  for s in halves]
    moments = credit.step_moments(advantages)
    assert moments == pytest.approx((mean, std), rel=1e-5)
    for s in halves:
        m = method()
        m.advantage_moments = moments
        parts.append(m.token_loss(logits[s], _rollouts(ids[s], mask[s]), signal(s)).loss)
    split = torch.cat(parts)
    assert torch.allclose(whole.double(), expected, atol=1e-5)
    assert torch.allclose(split.double(), expected, atol=1e-5)
    alone = method().token_loss(logits[:2], _rollouts(ids[:2], mask[:2]), signal(slice(0, 2))).loss
    assert not torch.allclose(alone.double(), expected[:2], atol=1e-3)  # per-micro-batch moments would differ


# ---- support: pairing by id -------------------------------------------------------------------------------------

def test_student_topk_with_k_equal_to_the_vocabulary_pairs_entries_by_id():
    ps = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # student order: ids 1, 3, 2, 0
    pt = torch.tensor([[0.25, 0.05, 0.6, 0.1]])
    s, t = student_topk(ps.log(), pt.log(), k=4)
    assert s.exp()[0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=1e-6)
    assert t.exp()[0].tolist() == pytest.approx([0.05, 0.1, 0.6, 0.25], abs=1e-6)
    ids = torch.tensor([[2, 0, 3, 1]])
    s, t = restrict(ps.log(), pt.log().gather(-1, ids), ids)
    assert s.exp()[0].tolist() == pytest.approx([0.2, 0.1, 0.3, 0.4], abs=1e-6)
    assert t.exp()[0].tolist() == pytest.approx([0.6, 0.25, 0.1, 0.05], abs=1e-6)

    # through the method: student_topk with top_k = V is the full-vocabulary forward KL
    logits = ps.log().reshape(1, 1, 4)
    method = Formula(ObjectiveConfig(method="gkd", lmbda=1.0, beta=0.0, support="student_topk", top_k=4))
    signal = TeacherSignal(torch.zeros(1, 1), logprobs=pt.log().reshape(1, 1, 4))
    out = method.token_loss(logits, _rollouts([[0]]), signal)
    fkl = float((pt.double() * (pt.double() / ps.double()).log()).sum())
    assert out.loss.item() == pytest.approx(fkl, rel=1e-5)
