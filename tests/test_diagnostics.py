"""Per-step diagnostics on hand-built tensors with known answers, and each failure detector on synthetic logs."""

import math

import pytest
import torch

from opdkit import detectors
from opdkit.config import DetectorsConfig
from opdkit.diagnostics import (TokenSignals, by_position, edge_loss_shares, position_edges, repeated_ngram_share,
                                skewness, step_diagnostics, student_token_logprobs, token_signals,
                                topk_agreement)
from opdkit.rollout import Rollouts
from opdkit.teachers import LocalTeacher, TeacherSignal


def test_topk_agreement_masses_and_overlap():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    logits = probs.log().view(1, 1, 4) + 7.0  # a shift changes nothing
    ids = torch.tensor([[[1, 2]]])  # the teacher's top-2: tokens 1 and 2
    teacher = torch.tensor([[[0.6, 0.3]]]).log()
    student_mass, teacher_mass, overlap = topk_agreement(logits, ids, teacher)
    assert student_mass.item() == pytest.approx(0.4)
    assert teacher_mass.item() == pytest.approx(0.9)
    assert overlap.item() == pytest.approx(0.5)  # the student's top-2 is {0, 1}: one shared


def test_skewness_repeats_and_edges():
    assert skewness(torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(2 / 2**1.5)
    assert skewness(torch.tensor([1.0, 1.0, 1.0])) == 0.0
    ids = torch.tensor([[1, 2, 1, 2, 1, 2, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    assert repeated_ngram_share(ids, mask, n=2) == pytest.approx(3 / 5)  # (1,2) (2,1) seen, then 3 repeats
    assert repeated_ngram_share(ids, mask, n=7) is None  # no completion has 7 tokens
    loss = torch.ones(1, 12)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 2)], 1)
    assert edge_loss_shares(loss, mask) == (pytest.approx(0.3), pytest.approx(0.3))  # positions 0-2 and 7-9 of 10
    assert position_edges(32, 4) == [0, 8, 16, 24, 32]
    assert position_edges(3, 8) == [0, 1, 2, 3]


def _signals(signal, mask, **fields):
    mask = torch.tensor(mask, dtype=torch.float)
    return TokenSignals(torch.zeros_like(mask, dtype=torch.long), mask, mask, torch.ones_like(mask),
                        signal=torch.tensor(signal), **fields)


def test_step_diagnostics_pools_micro_batches_of_different_widths():
    a = _signals([[-1.0, -2.0, 3.0]], [[1, 1, 1]], teacher_entropy=torch.tensor([[1.0, 1.0, 1.0]]),
                 student_entropy=torch.tensor([[2.0, 2.0, 2.0]]))
    b = _signals([[-4.0, 0.0]], [[1, 0]])  # no teacher entropy here: its mean is over a's tokens only
    out = step_diagnostics([a, b], position_edges(4, 2), ngram=2)
    assert out["signal_mean"] == pytest.approx(-1.0)  # (-1 - 2 + 3 - 4) / 4
    assert out["signal_negative_share"] == pytest.approx(0.75)
    assert out["teacher_entropy"] == pytest.approx(1.0) and out["entropy_gap"] == pytest.approx(-1.0)
    assert "student_topk_mass" not in out and "ratio_mean" not in out  # never made up
    position = out["by_position"]
    assert position["edges"] == [0, 2, 4] and position["tokens"] == [3, 1]
    assert position["signal_mean"] == [pytest.approx(-7 / 3), pytest.approx(3.0)]
    assert position["teacher_entropy"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert out["log_ratio_abs_p999"] == pytest.approx(torch.tensor([1.0, 2, 3, 4]).quantile(0.999).item())


def test_by_position_marks_empty_buckets():
    pooled = _signals([[1.0, 0.0, 0.0, 0.0]], [[1, 0, 0, 0]])
    out = by_position(pooled, [0, 2, 4])
    assert out["tokens"] == [1, 0] and out["signal_mean"] == [1.0, None]


def test_token_signals_from_logits_and_teacher():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]]])
    ids = torch.tensor([[2, 0]])
    student = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rollouts = Rollouts(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), ids,
                        torch.ones(1, 2), torch.tensor([True]), [], "student", sampler_logprobs=student - 0.1)
    teacher = TeacherSignal(torch.tensor([[-0.5, -3.0]]), topk_ids=torch.tensor([[[2], [1]]]),
                            topk_logprobs=torch.tensor([[[-0.5], [-0.2]]]))
    out = token_signals(rollouts, teacher, torch.ones(1, 2), logits, student_token_logprobs(rollouts, logits, False), None)
    assert torch.allclose(student_token_logprobs(rollouts, None, True), rollouts.sampler_logprobs)
    assert student_token_logprobs(rollouts, None, False) is None
    assert torch.allclose(out.signal, teacher.token_logprobs - student)
    assert torch.allclose(out.ratio, torch.full((1, 2), math.exp(0.1)))
    assert torch.allclose(out.topk_overlap, torch.tensor([[1.0, 0.0]]))  # the student's top-1: 2, then 0
    assert torch.allclose(out.teacher_topk_mass, torch.tensor([[math.exp(-0.5), math.exp(-0.2)]]))


def test_a_local_teachers_full_support_gives_the_same_topk_and_entropy_as_its_logits(tiny):
    from transformers import AutoModelForCausalLM

    from opdkit.models import load_tokenizer
    from opdkit.rollout import sample
    from opdkit.data import Example

    tokenizer = load_tokenizer(str(tiny / "teacher"))
    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(tiny / "teacher"), tokenizer)
    torch.manual_seed(0)
    rollouts = sample(teacher.model, tokenizer, [Example([{"role": "user", "content": "1+2="}])] * 3,
                      max_completion_length=6)
    full = teacher.score(rollouts, "full", 5, entropy=True)
    topk = teacher.score(rollouts, "topk", 5, entropy=True)
    assert torch.equal(full.topk_ids, topk.topk_ids)
    assert torch.allclose(full.topk_logprobs, topk.topk_logprobs, atol=1e-5)
    assert torch.allclose(full.entropy, topk.entropy, atol=1e-5)


# ---- detectors -------------------------------------------------------------------------------------------
BEFORE = {"reverse_kl": 0.5, "accuracy": 0.4, "token_agreement": 0.6}  # the evaluation before training


def healthy(step: int) -> dict:
    record = {"step": step, "truncation_rate": 0.1, "completion_length": 20.0 + step % 3, "repeated_ngram_share": 0.02,
              "student_entropy": 1.5 - 0.01 * step, "signal_negative_share": 0.6, "log_ratio_abs_p999": 4.0 + step % 2,
              "grad_norm": 1.0, "student_topk_mass": 0.97, "topk_overlap": 0.8,
              "by_position": {"edges": [0, 8, 16], "teacher_entropy": [1.0, 1.2]}}
    if step % 10 == 0:  # an evaluation every 10 steps, each better than the last
        record["eval"] = {"reverse_kl": 0.5 - 0.005 * step, "accuracy": 0.4 + 0.002 * step, "token_agreement": 0.6}
    return record


def run_detectors(history: list[dict], cfg=DetectorsConfig()) -> list[str]:
    """Feed the records one by one as the loop does; the detectors that fired, in order."""
    seen, names = [], []
    for record in history:
        seen.append(record)
        alerts = detectors.check(seen, cfg, max_completion_length=32, before=BEFORE, metric="reverse_kl")
        if alerts:
            record["alerts"] = [a.as_record() for a in alerts]
            names += [a.detector for a in alerts]
    return names


def test_clean_logs_trigger_no_detector():
    assert run_detectors([healthy(s) for s in range(1, 41)]) == []


@pytest.mark.parametrize("detector, change", [
    ("truncation", lambda r, s: r.update(truncation_rate=0.8 if s > 15 else 0.1)),
    ("length_inflation", lambda r, s: r.update(completion_length=20.0 + 2 * s)),
    ("repetition", lambda r, s: r.update(repeated_ngram_share=0.5 if s > 15 else 0.02)),
    ("entropy_collapse", lambda r, s: r.update(student_entropy=1.5 * 0.85**s)),
    ("one_sided_signal", lambda r, s: r.update(signal_negative_share=0.95 if s > 15 else 0.6)),
    ("signal_spike", lambda r, s: r.update(log_ratio_abs_p999=40.0 if s == 20 else 4.0)),
    ("teacher_confidence_decay", lambda r, s: r["by_position"].update(teacher_entropy=[1.0, 2.5 if s > 15 else 1.2])),
    ("incompatible_teacher", lambda r, s: r.update(student_topk_mass=0.3, topk_overlap=0.1)),
    ("heldout_regression", lambda r, s: "eval" in r and r["eval"].update(reverse_kl=0.6)),
])
def test_each_detector_fires_once_on_logs_built_to_trigger_it(detector, change):
    history = []
    for step in range(1, 41):
        record = healthy(step)
        change(record, step)
        history.append(record)
    fired = run_detectors(history)
    assert fired == [detector]
    alert = next(a for r in history for a in r.get("alerts", []))
    assert alert["message"] and alert["cause"] and alert["try"]
    assert detectors.fired(history) == {detector}  # a resumed run reads this back and does not warn again


def test_a_threshold_of_null_turns_its_detector_off_and_missing_keys_are_not_guessed():
    history = [{**healthy(s), "truncation_rate": 0.9} for s in range(1, 21)]
    assert run_detectors(history, DetectorsConfig(truncation_rate=None)) == []
    bare = [{"step": s, "completion_length": 10.0} for s in range(1, 21)]  # a run that logged no diagnostics
    assert run_detectors(bare) == []


def test_a_heldout_regression_needs_two_evaluations_in_a_row_past_the_margin_and_watches_accuracy_too():
    def with_evals(evals: dict[int, dict]) -> list[dict]:
        history = [healthy(s) for s in range(1, 41)]
        for record in history:
            record.pop("eval", None)
            if record["step"] in evals:
                record["eval"] = {**BEFORE, **evals[record["step"]]}
        return history

    assert run_detectors(with_evals({10: {"reverse_kl": 0.7}, 20: {"reverse_kl": 0.4}, 30: {"reverse_kl": 0.7}})) == []
    assert run_detectors(with_evals({10: {"reverse_kl": 0.505}, 20: {"reverse_kl": 0.505}})) == []  # within 2%
    stuck = with_evals({10: {"accuracy": 0.0}, 20: {"accuracy": 0.0}})  # no better, and no worse, than 0 before
    seen = []
    for record in stuck:
        seen.append(record)
        assert detectors.check(seen, DetectorsConfig(), 32, before={**BEFORE, "accuracy": 0.0}, metric="accuracy") == []
    # a collapse the tracked KL calls an improvement: the verifier's accuracy falls
    history = with_evals({10: {"reverse_kl": 0.3, "accuracy": 0.2}, 20: {"reverse_kl": 0.2, "accuracy": 0.05}})
    assert run_detectors(history) == ["heldout_regression"]
    alert = history[19]["alerts"][0]
    assert alert["step"] == 20 and "held-out accuracy is worse than before training" in alert["message"]
    assert "0.4 at step 0, then 0.2, 0.05" in alert["message"]
    # the agreement a chat teacher's run tracks (results.md: chunk_opd on smollm2-heal-24, 65.3% -> 59.5%, 60.1%)
    history = with_evals({35: {"token_agreement": 0.5946}, 40: {"token_agreement": 0.6008}})
    seen = []
    for record in history:
        seen.append(record)
        alerts = detectors.check(seen, DetectorsConfig(), 32, before={"token_agreement": 0.6528},
                                 metric="token_agreement")
    assert [a.detector for a in alerts] == ["heldout_regression"] and "token_agreement" in alerts[0].message
    assert run_detectors(with_evals({10: {"reverse_kl": 0.7}, 20: {"reverse_kl": 0.7}}),
                         DetectorsConfig(heldout_regression=None)) == []


def test_a_positive_one_sided_signal_says_so():
    history = [{**healthy(s), "signal_negative_share": 0.02} for s in range(1, 11)]
    alerts = detectors.check(history, DetectorsConfig(), 32)
    assert [a.detector for a in alerts] == ["one_sided_signal"] and "only 2%" in alerts[0].message
