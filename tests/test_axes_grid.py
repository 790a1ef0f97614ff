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
- every other point is refused at config load with an ``OPDError``.

Not here, because they name no single target: the gates and clips (TrOPD's trust region, EOPD's entropy gate,
``log_ratio_clip``), ``0 < gamma < 1`` and ``lam < 1`` (bias traded for variance), ``position_decay`` and the
regularizers. ``test_axes_units.py`` pins each of them to values computed by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from enumeration import expected_gradient, on_support, reach_probability, reference_divergence, tables
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
