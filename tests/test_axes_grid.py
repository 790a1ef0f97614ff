"""The whole space of the formula's axes, proved by exact enumeration.

For every combination of states (student, teacher), support (sampled, teacher or student top-k with and
without a tail, top-k as large as the vocabulary), divergence (with its ``beta``/``alpha`` ends), estimator,
gradient path, correction, discount (0 and 1) and value (none, zero, analytic):

- the truth table below, written from the maths and not from the library, says whether the point names an
  objective and which: a per-token divergence at the visited states (``per_token``: the states' distribution is
  held fixed) or the sequence-level one (``sequence``: ``gamma = 1`` on the student's own samples, the state
  distribution differentiated too);
- every named point loads, and the expected gradient of the library's loss over all 27 sequences equals the
  autograd gradient of ``sum_s P(s) D(pi_S(.|s), pi_T(.|s))`` built from textbook divergences;
- every other point is refused at config load with an ``OPDError``;
- on student states, a near-future lookahead and counterfactual routing (``routing: cr``) are added to every point
  and either train on the windowed or routed gradient written at the end of this file, or are refused.

Not here, because they name no single target: the gates and clips (TrOPD's trust region, EOPD's entropy gate,
``log_ratio_clip``), ``0 < gamma < 1`` and ``lam < 1`` (bias traded for variance), ``position_decay`` and the
regularizers. ``test_axes_units.py`` pins each of them to values computed by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from enumeration import H, PREFIXES, SEQUENCES, STATE, V, expected_gradient, on_support, reach_probability, reference_divergence, tables
from opdkit.config import load_config
from opdkit.errors import OPDError

BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train": "d.jsonl"}}
SUPPORTS = [("sampled", None, False), ("teacher_topk", 2, False), ("teacher_topk", 2, True), ("student_topk", 2, False),
            ("student_topk", 2, True), ("student_topk", 3, False), ("teacher_topk", 3, False), ("full", None, False),
            ("full", None, True)]
DIVERGENCES = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.3}),
               ("jsd", {"beta": 0.0}), ("tv", {}), ("hellinger", {}), ("alpha", {"alpha": 0.3}),
               ("alpha", {"alpha": 0.0}), ("alpha", {"alpha": 1.0}), ("skew_kl", {"alpha": 0.1}),
               ("skew_rkl", {"alpha": 0.1})]
ESTIMATORS = [None, "k1", "k2", "k3"]
CREDIT = [(gamma, value) for gamma in (0.0, 1.0) for value in ("none", "zero", "analytic")]


def named_target(states, support, tail, divergence, params, estimator, grad_path, correction, gamma, value):
    """``"per_token"``, ``"sequence"``, or None where the point names no objective (or a wrong one)."""
    topk = support.endswith("topk")
    plain_credit = gamma == 0.0 and value == "none"
    if tail and not topk:
        return None  # nothing outside the support for a tail
    if support != "sampled":  # a distributional loss, backpropagated
        ok = grad_path == "direct" and estimator is None and not correction and plain_credit
        return "per_token" if ok else None
    if divergence.startswith("skew") or (divergence == "jsd" and params["beta"] != 0.5):
        return None  # no sampled-token form
    if states == "teacher":  # cross-entropy on teacher samples: forward KL's gradient
        ok = grad_path == "direct" and divergence == "forward_kl" and estimator is None and not correction and plain_credit
        return "per_token" if ok else None
    if grad_path == "direct":  # pathwise: k2 gives reverse KL's gradient, k3 forward KL's
        natural = {"reverse_kl": "k2", "forward_kl": "k3"}.get(divergence)
        ok = natural is not None and estimator in (None, natural) and not correction and plain_credit
        return "per_token" if ok else None
    if divergence == "reverse_kl":  # policy gradient: sg(k1), or sg(k3) with its correction
        if (estimator or "k1") == "k2" or (estimator == "k3" and not correction):
            return None
    elif estimator is not None or not correction:  # f-divergences: phi, unbiased only with OPD+'s term
        return None
    return "sequence" if gamma == 1.0 else "per_token"


def target_gradient(kind, states, support, top_k, tail, divergence, params, student, teacher) -> torch.Tensor:
    """``grad sum_s P(s) D_support(pi_S(.|s), pi_T(.|s))``, independent of the library's loss code."""
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    if support == "teacher_topk":
        p_s, p_t = on_support(p_s, p_t, p_t.detach().topk(top_k, -1).indices, tail)
    elif support == "student_topk":
        p_s, p_t = on_support(p_s, p_t, p_s.detach().topk(top_k, -1).indices, tail)
    per_state = reference_divergence(divergence, p_s, p_t, **params)
    reach = reach_probability(student if states == "student" else teacher)
    weights = reach if kind == "sequence" else reach.detach()
    return torch.autograd.grad((weights * per_state).sum(), student)[0].reshape(-1)


def points():
    for states, (support, top_k, tail), (divergence, params), estimator, grad_path, correction, (gamma, value) in \
            itertools.product(("student", "teacher"), SUPPORTS, DIVERGENCES, ESTIMATORS, ("pg", "direct"),
                              (False, True), CREDIT):
        yield states, support, top_k, tail, divergence, params, estimator, grad_path, correction, gamma, value


def load(states, support, top_k, tail, divergence, params, estimator, grad_path, correction, gamma, value):
    objective = {"method": "opd", "states": states, "support": support, "tail": tail, "divergence": divergence,
                 "grad_path": grad_path, "correction": correction, "credit": {"gamma": gamma, "value": value}, **params}
    if top_k is not None:
        objective["top_k"] = top_k
    if estimator is not None:
        objective["estimator"] = estimator
    return load_config(base={**BASE, "objective": objective}).objective


@pytest.mark.parametrize("states", ["student", "teacher"])
def test_every_point_trains_on_the_gradient_it_names_or_is_refused(states):
    student, teacher = tables(11, scale=1.0)
    named = refused = 0
    for point in points():
        if point[0] != states:
            continue
        states_, support, top_k, tail, divergence, params, estimator, grad_path, correction, gamma, value = point
        kind = named_target(states_, support, tail, divergence, params, estimator, grad_path, correction, gamma, value)
        if kind is None:
            with pytest.raises(OPDError):
                load(*point)
                pytest.fail(f"accepted a point that names no objective: {point}")
            refused += 1
            continue
        try:
            objective = load(*point)
        except OPDError as exc:
            pytest.fail(f"refused a point that names {kind} {divergence}: {point}\n{exc}")
        got = expected_gradient(objective, student, teacher, source=states)
        want = target_gradient(kind, states, support, top_k, tail, divergence, params, student, teacher)
        assert want.abs().max() > 1e-3, point  # a target that is not trivially zero
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (point, (got - want).abs().max())
        named += 1
    # the grid reaches every route: distributional supports on both state sources, and on student states the
    # sampled token backpropagated and as a policy gradient at both discounts
    assert named >= (120 if states == "student" else 60) and refused > named, (named, refused)


# ---- beyond the single token: near-future lookahead and counterfactual routing, over the same grid ------------
#
# On student states, every point above gains two more coordinates. ``near_future.window: 2`` (a lookahead) names the
# windowed target below on the policy-gradient points with plain credit, and is refused everywhere else. ``routing:
# cr`` names the routed gradient below on classic OPD's policy-gradient points (reverse KL, k1), and is refused
# everywhere else. Both targets are written here from the notes' definitions in probability space.

WINDOW = 2


def per_action_terms(name: str, p_s: torch.Tensor, p_t: torch.Tensor, params: dict) -> torch.Tensor:
    """Per-token summands of the textbook divergence, ``D = sum_a terms[a]`` (``[..., V]``)."""
    xlogy = lambda p, q: torch.xlogy(p, p) - torch.xlogy(p, q)  # noqa: E731
    if name == "reverse_kl" or (name == "alpha" and params.get("alpha") == 1.0):
        return xlogy(p_s, p_t)
    if name == "forward_kl" or (name == "alpha" and params.get("alpha") == 0.0):
        return xlogy(p_t, p_s)
    if name == "jsd":
        m = 0.5 * (p_s + p_t)
        return 0.5 * xlogy(p_t, m) + 0.5 * xlogy(p_s, m)
    if name == "tv":
        return 0.5 * (p_s - p_t).abs()
    if name == "hellinger":
        return (p_s.sqrt() - p_t.sqrt()) ** 2
    a = params["alpha"]
    return (p_s - p_s**a * p_t ** (1 - a)) / (a * (1 - a))


def windowed_target(divergence, params, student, teacher) -> torch.Tensor:
    """``grad sum_s d(s) sum_a [pi(a|s) Q_W(s, a) + pi(a|s) c(s, a)]``: the state distribution ``d`` and ``Q_W`` held
    fixed in the first term, the cost ``c = term / pi_S`` in the second (the sampled token's own path; its mean is 0
    for k1). ``Q_W(s, a) = c(s, a) + V_{W-1}(s a)``, ``V_k(s) = sum_a pi(a|s) (c(s, a) + V_{k-1}(s a))``, ``V_0 = 0``."""
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    cost = per_action_terms(divergence, p_s, p_t, params) / p_s  # [13, V]
    fixed_cost, fixed_p = cost.detach(), p_s.detach()

    def value(prefix, k):
        if k == 0 or len(prefix) == H:
            return torch.zeros(())
        i = STATE[prefix]
        return sum(fixed_p[i, a] * (fixed_cost[i, a] + value(prefix + (a,), k - 1)) for a in range(V))

    q = torch.stack([torch.stack([fixed_cost[STATE[p], a] + value(p + (a,), WINDOW - 1) for a in range(V)])
                     for p in PREFIXES])
    reach = reach_probability(student).detach()
    objective = (reach.unsqueeze(-1) * (p_s * q + fixed_p * cost)).sum()
    return torch.autograd.grad(objective, student)[0].reshape(-1)


def cr_target(student, teacher, gamma, value) -> torch.Tensor:
    """``sum_y P_S(y) sum_t g_t(y)`` on the logits: ``g_t = pi_S - p*`` (the KL route) where the advantage is negative
    and the routed set is not empty, else the policy gradient ``-A_t (e_y - pi_S)``; p* from the note's formulas with
    the defaults of ``cr`` (p_S 0.95, k_S 20, eps_S 1e-4, p_T 0.9, eta 1)."""
    p_s, p_t = student.detach().softmax(-1), teacher.softmax(-1)
    kl_state = (p_s * (p_s.log() - p_t.log())).sum(-1)
    out = torch.zeros_like(p_s)

    def nucleus(p, top_p, eps):
        order, kept, mass = sorted(range(V), key=lambda v: -float(p[v])), set(), 0.0
        for v in order:
            if mass >= top_p:
                break
            mass += float(p[v])
            if float(p[v]) >= eps:
                kept.add(v)
        return kept

    for y in SEQUENCES.tolist():
        states = [STATE[tuple(y[:t])] for t in range(H)]
        r = [float(p_t[s, a].log() - p_s[s, a].log()) for s, a in zip(states, y)]
        weight = float(torch.tensor([float(p_s[s, a]) for s, a in zip(states, y)]).prod())
        for t, (s, a) in enumerate(zip(states, y)):
            advantage = r[t] + (sum(r[t + 1:]) if gamma == 1.0 else 0.0)
            if value == "analytic":
                advantage += float(kl_state[s])  # A = G - V(s_t), V = -KL, lam = 1
            routed = nucleus(p_s[s], 0.95, 1e-4) & nucleus(p_t[s], 0.9, 0.0) - {a}
            if advantage < 0 and routed:
                mass = sum(float(p_t[s, v]) for v in routed)
                delta = max(0.0, float(p_s[s, a] - p_t[s, a]))
                target = p_s[s].clone()
                target[a] -= delta
                for v in routed:
                    target[v] += delta * float(p_t[s, v]) / mass
                out[s] += weight * (p_s[s] - target)
            else:
                out[s] -= weight * advantage * (torch.nn.functional.one_hot(torch.tensor(a), V) - p_s[s])
    return out.reshape(-1)


def test_lookahead_and_routing_train_on_the_gradient_they_name_or_are_refused():
    student, teacher = tables(11, scale=1.0)
    named = {"lookahead": 0, "cr": 0}
    refused = 0
    for point in points():
        states, support, top_k, tail, divergence, params, estimator, grad_path, correction, gamma, value = point
        base = named_target(*point[:3], *point[4:])
        if states != "student" or base is None:
            continue  # refused already, whatever is added
        pg = support == "sampled" and grad_path == "pg"
        for axis, extra in (("lookahead", {"near_future": {"enabled": True, "window": WINDOW}}),
                            ("cr", {"routing": "cr"})):
            if axis == "lookahead":
                ok = pg and gamma == 0.0 and value == "none"
            else:
                ok = pg and divergence == "reverse_kl" and estimator in (None, "k1") and not correction
            objective = {"method": "opd", "states": states, "support": support, "tail": tail, "divergence": divergence,
                         "grad_path": grad_path, "correction": correction, "credit": {"gamma": gamma, "value": value},
                         **params, **extra, **({"top_k": top_k} if top_k is not None else {}),
                         **({"estimator": estimator} if estimator is not None else {})}
            if not ok:
                with pytest.raises(OPDError):
                    load_config(base={**BASE, "objective": objective})
                    pytest.fail(f"accepted {axis} on a point where it names nothing: {point}")
                refused += 1
                continue
            loaded = load_config(base={**BASE, "objective": objective}).objective
            got = expected_gradient(loaded, student, teacher)
            want = (windowed_target(divergence, params, student, teacher) if axis == "lookahead"
                    else cr_target(student, teacher, gamma, value))
            assert want.abs().max() > 1e-3, point
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (axis, point, (got - want).abs().max())
            named[axis] += 1
    assert named["lookahead"] >= 8 and named["cr"] >= 4 and refused > sum(named.values()), (named, refused)
