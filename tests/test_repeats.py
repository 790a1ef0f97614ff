"""``objective.repeat_penalty``: the teacher's target without its repeats (``objectives.repeats``), against a
brute-force reading of its definition, on the chunked and the whole-distribution paths of the formula."""

from __future__ import annotations

import pytest
import torch

from opdkit.config import Config, ObjectiveConfig
from opdkit.methods.formula import Formula
from opdkit.objectives.repeats import repeat_targets
from opdkit.rollout import Rollouts
from opdkit.teachers import TeacherSignal


def _brute_force(ids: list[int], length: int, n: int) -> set[tuple[int, int]]:
    """(position, token): the token would make ``ids[t-n+1:t] + [token]`` equal an n-gram ending before ``t``."""
    pairs = set()
    for t in range(n - 1, length):
        for j in range(0, t - n + 1):
            if ids[j : j + n - 1] == ids[t - n + 1 : t]:
                pairs.add((t, ids[j + n - 1]))
    return pairs


@pytest.mark.parametrize("n", [2, 3, 4])
def test_repeat_targets_are_the_tokens_that_would_repeat_an_ngram_of_the_completion(n):
    generator = torch.Generator().manual_seed(n)
    B, C = 6, 17
    ids = torch.randint(0, 3, (B, C), generator=generator)  # three tokens: many repeats
    lengths = [17, 12, 5, 3, 1, 0]
    mask = torch.tensor([[1.0] * k + [0.0] * (C - k) for k in lengths])
    positions, tokens = repeat_targets(ids, mask, n)
    got = {(int(p) // C, int(p) % C, int(v)) for p, v in zip(positions, tokens)}
    assert len(got) == len(positions)  # each pair once
    expected = {(b, t, v) for b in range(B) for t, v in _brute_force(ids[b].tolist(), lengths[b], n)}
    assert got == expected and expected  # some, and all of them


def test_no_repeats_in_a_completion_shorter_than_the_ngram():
    positions, tokens = repeat_targets(torch.tensor([[5, 5, 5]]), torch.ones(1, 3), 4)
    assert positions.numel() == 0 and tokens.numel() == 0


class _Head(torch.nn.Module):
    def __init__(self, d: int, V: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(d, V, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def _rollouts(ids: torch.Tensor, mask: torch.Tensor) -> Rollouts:
    B = ids.shape[0]
    return Rollouts(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), ids, mask,
                    torch.zeros(B, dtype=torch.bool), [], "student")


@pytest.mark.parametrize("path", ["chunked", "whole"])
def test_the_student_learns_the_teachers_softmax_with_repeating_logits_lowered(path):
    torch.manual_seed(0)
    B, C, d, V, n, penalty = 2, 9, 5, 4, 2, 3.0
    ids = torch.tensor([[0, 1, 0, 1, 2, 0, 1, 3, 3], [2, 2, 2, 1, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 9, [1.0] * 4 + [0.0] * 5])
    teacher_logits = torch.randn(B, C, V) * 2
    head, hidden = _Head(d, V), torch.randn(B, C, d)
    objective = ObjectiveConfig(method="gkd", lmbda=1.0, beta=1.0, vocab_chunk_size=3 if path == "chunked" else None,
                                repeat_penalty={"enabled": True, "ngram_size": n, "penalty": penalty})
    method = Formula(objective)
    method.attach(head)
    signal = TeacherSignal(torch.zeros(B, C), logprobs=teacher_logits.log_softmax(-1))
    rollouts = _rollouts(ids, mask)
    if path == "chunked":
        out = method.token_loss(None, rollouts, signal, hidden=hidden)
    else:
        out = method.token_loss(head.lm_head(hidden), rollouts, signal)
    (out.loss * mask).sum().backward()

    lowered = teacher_logits.double().clone()  # the definition, in float64
    repeating = torch.zeros(B, C, dtype=torch.float64)
    mass = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for t, v in _brute_force(ids[b].tolist(), int(mask[b].sum()), n):
            mass[b, t] += teacher_logits[b, t].double().softmax(-1)[v]
            lowered[b, t, v] -= penalty
            repeating[b, t] = 1.0
    assert repeating.sum() >= 4
    w64 = head.lm_head.weight.detach().double().requires_grad_()
    student = (hidden.double() @ w64.T).log_softmax(-1)
    expected = (student.exp() * (student - lowered.log_softmax(-1))).sum(-1) * mask.double()  # reverse KL
    assert torch.allclose(out.loss.double() * mask.double(), expected, atol=1e-6)
    expected.sum().backward()
    assert torch.allclose(head.lm_head.weight.grad.double(), w64.grad, atol=1e-6)
    assert torch.equal(out.stats["repeat_positions"].double() * mask.double(), repeating)
    assert torch.allclose(out.stats["teacher_repeat_mass"].double() * mask.double(), mass, atol=1e-6)
    assert torch.equal(signal.logprobs, teacher_logits.log_softmax(-1))  # the teacher's own signal is left as it was


def test_repeat_penalty_is_refused_where_the_whole_vocabulary_is_not_seen(tiny_config):
    with pytest.raises(ValueError, match="repeat_penalty .*support: full"):
        ObjectiveConfig(method="opd", repeat_penalty={"enabled": True})
    with pytest.raises(ValueError, match="repeat_penalty.penalty set while repeat_penalty.enabled is false"):
        ObjectiveConfig(method="gkd", repeat_penalty={"penalty": 2.0})
    with pytest.raises(ValueError, match="ngram_size"):
        ObjectiveConfig(method="gkd", repeat_penalty={"enabled": True, "ngram_size": 1})
    config = Config.model_validate({**tiny_config, "objective": {"method": "gkd", "repeat_penalty": {"enabled": True}}})
    assert config.objective.repeat_penalty.ngram_size == 4


def test_a_run_with_the_penalty_logs_how_often_and_how_much_the_teacher_would_repeat(tiny_config):
    from opdkit.config import load_config
    from opdkit.train import setup, train

    tiny_config["objective"] = {"method": "gkd", "lmbda": 1.0,
                                "repeat_penalty": {"enabled": True, "ngram_size": 2, "penalty": 5.0}}
    tiny_config["optim"] = {"steps": 2, "learning_rate": 1e-3}
    run = setup(load_config(base=tiny_config))
    train(run)
    assert all({"repeat_positions", "teacher_repeat_mass"} <= set(record) for record in run.history)
    assert any(0 < r["repeat_positions"] <= 1 and 0 < r["teacher_repeat_mass"] < r["repeat_positions"]
               for r in run.history)


def test_a_local_teachers_blocks_are_lowered_after_its_statistics_are_taken(tiny):
    """The local teacher hands over hidden states, and its statistics (token log-probs, entropy) come from the
    loss's blocks: those stay the teacher's own, while the loss learns the lowered target."""
    from opdkit.data import load_examples
    from opdkit.models import load_model, load_tokenizer
    from opdkit.rollout import sample
    from opdkit.teachers import LocalTeacher

    student, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    teacher = LocalTeacher(load_model(str(tiny / "teacher")), tokenizer)
    torch.manual_seed(0)
    batch = sample(student, tokenizer, load_examples(str(tiny / "train.jsonl"))[:6], max_completion_length=12)
    mask = batch.completion_mask
    signal = teacher.score(batch, "full", entropy=True)
    own = signal.full_logprobs().double()
    lowered = own.clone()
    for b in range(mask.shape[0]):
        for t, v in _brute_force(batch.completion_ids[b].tolist(), int(mask[b].sum()), 2):
            lowered[b, t, v] -= 4.0
    assert (lowered != own).any()
    method = Formula(ObjectiveConfig(method="gkd", lmbda=1.0, beta=1.0, vocab_chunk_size=5,
                                     repeat_penalty={"enabled": True, "ngram_size": 2, "penalty": 4.0}))
    method.attach(student)
    _, hidden = batch.completion_logits(student, return_hidden=True, logits=False)
    loss = method.token_loss(None, batch, signal, hidden=hidden).loss
    student_lp = batch.completion_logits(student).double().log_softmax(-1)
    expected = (student_lp.exp() * (student_lp - lowered.log_softmax(-1))).sum(-1) * mask
    assert torch.allclose(loss.double() * mask, expected, atol=1e-5)
    token = own.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(signal.token_logprobs.double(), token, atol=1e-5)  # the teacher's own, unlowered


def test_the_step_line_shows_the_teachers_probability_where_a_token_would_repeat():
    from opdkit.console import step_line

    record = {"loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "completion_length": 40.0, "time_step": 2.0,
              "repeat_positions": 0.1, "teacher_repeat_mass": 0.05}
    assert "repeats 10% (teacher p 0.50 there)" in step_line(record)
    assert "repeats" not in step_line({**record, "repeat_positions": 0.0, "teacher_repeat_mass": 0.0})


@pytest.mark.parametrize("divergence, params", [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3}),
                                                ("hellinger", {})])
def test_by_enumeration_the_expected_gradient_is_the_divergence_to_the_lowered_teacher(divergence, params):
    """Over all 27 sequences of the enumerated model (V 3, horizon 3) with bigrams: at the state ``(a, a)`` the
    token ``a`` would repeat the bigram ``(a, a)``, so the target there is the teacher with that logit lowered,
    and the expected gradient of the library's loss is that of ``sum_s P(s) D(pi_S(s), lowered pi_T(s))``."""
    from enumeration import PREFIXES, STATE, expected_gradient, reach_probability, reference_divergence, tables

    student, teacher = tables(seed=7)
    lowered = teacher.clone()
    for a in range(3):
        lowered[STATE[(a, a)], a] -= 2.5
    assert all(len(p) <= 2 for p in PREFIXES)
    objective = ObjectiveConfig(method="gkd", lmbda=1.0, support="full", divergence=divergence,
                                **({"beta": params["beta"]} if "beta" in params else {}),
                                repeat_penalty={"enabled": True, "ngram_size": 2, "penalty": 2.5})
    got = expected_gradient(objective, student, teacher)
    per_state = reference_divergence(divergence, student.softmax(-1), lowered.softmax(-1), **params)
    want = torch.autograd.grad((reach_probability(student).detach() * per_state).sum(), student)[0].reshape(-1)
    assert torch.allclose(got, want, atol=1e-5)
    plain = expected_gradient(ObjectiveConfig(method="gkd", lmbda=1.0, support="full", divergence=divergence,
                                              **({"beta": params["beta"]} if "beta" in params else {})),
                              student, teacher)
    assert not torch.allclose(plain, want, atol=1e-3)  # the penalty changed the target
