"""Several teachers in one run (``teachers:``, ``teacher_routing``): routing, merged and combined signals,
per-teacher metrics, the config's refusals and the resume check."""

import json
import math

import pytest
import torch

from opdkit.checkpoint import check_folder
from opdkit.config import TeacherRouting, load_config
from opdkit.data import load_examples
from opdkit.errors import OPDError
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import from_dataset
from opdkit.teachers import LocalTeacher
from opdkit.teachers.multi import MultiTeacher, teacher_metrics
from opdkit.train import check_data, setup, train


@pytest.fixture
def routed_data(tiny, tmp_path):
    """The tiny train and held-out records with a ``teacher`` column alternating a, b."""
    paths = {}
    for split in ("train", "heldout"):
        records = [json.loads(line) for line in (tiny / f"{split}.jsonl").read_text().splitlines()]
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({**r, "teacher": "ab"[i % 2]}) + "\n" for i, r in enumerate(records)))
        paths[split] = str(path)
    return paths


@pytest.fixture
def two_teachers(tiny):
    """Two local teachers: the tiny teacher (a) and the student's own folder (b)."""
    tokenizer = load_tokenizer(str(tiny / "student"))
    device = torch.device("cpu")
    return tokenizer, {name: LocalTeacher(load_model(str(tiny / folder), device), tokenizer)
                       for name, folder in (("a", "teacher"), ("b", "student"))}


class Recording:
    """A teacher that records the examples it scores."""

    def __init__(self, teacher):
        self.teacher, self.seen, self.returns_logprobs = teacher, [], True

    def score(self, rollouts, *args, **kwargs):
        self.seen += rollouts.examples
        return self.teacher.score(rollouts, *args, **kwargs)


def batch(tokenizer, path, size=8):
    return from_dataset(tokenizer, load_examples(path)[:size], 10)


def multi_config(tiny_config, tiny, routed_data, **routing):
    config = {**tiny_config, "data": {**tiny_config["data"], "train": routed_data["train"],
                                      "eval": routed_data["heldout"]}}
    config.pop("teacher")
    config["teachers"] = [{"name": "a", "path": str(tiny / "teacher")}, {"name": "b", "path": str(tiny / "student")}]
    if routing:
        config["teacher_routing"] = routing
    return config


def test_routing_by_column_sends_each_example_to_its_teacher(two_teachers, routed_data):
    tokenizer, teachers = two_teachers
    rollouts = batch(tokenizer, routed_data["train"])
    recording = {name: Recording(t) for name, t in teachers.items()}
    multi = MultiTeacher(recording, TeacherRouting(), seed=0, pad_id=tokenizer.pad_token_id)
    signal = multi.score(rollouts, "topk", top_k=4, entropy=True)
    for name, teacher in recording.items():
        assert teacher.seen and all(e.columns["teacher"] == name for e in teacher.seen)
        rows = signal.by_teacher[name][0]
        assert [e.columns["teacher"] == name for e in rollouts.examples] == rows.tolist()
        own = teachers[name].score(rollouts, "topk", top_k=4, entropy=True)  # the whole batch, to compare rows
        torch.testing.assert_close(signal.token_logprobs[rows], own.token_logprobs[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(signal.entropy[rows], own.entropy[rows], atol=1e-5, rtol=0)
        assert torch.equal(signal.topk_ids[rows], own.topk_ids[rows])
    usage = signal.usage
    assert usage["a_tokens"] + usage["b_tokens"] == rollouts.num_tokens
    assert usage["a_calls"] == usage["b_calls"] == 1


def test_per_teacher_metrics_add_up(two_teachers, routed_data):
    tokenizer, teachers = two_teachers
    batches = [batch(tokenizer, routed_data["train"], size) for size in (8, 5)]
    multi = MultiTeacher(teachers, TeacherRouting(), seed=0, pad_id=tokenizer.pad_token_id)
    parts = []
    for b in batches:
        b.source = "student"  # k1 is measured on the student's own samples
        student = torch.zeros_like(b.completion_mask)
        parts.append((b, multi.score(b), student))
    total = sum(b.num_tokens for b in batches)
    metrics = teacher_metrics(parts, total)
    assert metrics["teacher_a_token_share"] + metrics["teacher_b_token_share"] == pytest.approx(1.0)
    for name in "ab":  # k1 with log pi_S = 0 is minus the teacher's mean token log-prob over its rows
        rows = [(b.completion_mask * s.by_teacher[name][0].unsqueeze(1), s.token_logprobs) for b, s, _ in parts]
        expected = -sum(float((t * m).sum()) for m, t in rows) / sum(float(m.sum()) for m, _ in rows)
        assert metrics[f"teacher_{name}_reverse_kl_k1"] == pytest.approx(expected, rel=1e-6)


def test_combined_signals_equal_a_hand_computed_value(two_teachers, routed_data):
    tokenizer, teachers = two_teachers
    rollouts = batch(tokenizer, routed_data["train"])
    mask = rollouts.completion_mask
    full = {n: t.score(rollouts, "full").full_logprobs() for n, t in teachers.items()}
    token = {n: t.score(rollouts).token_logprobs for n, t in teachers.items()}
    weights = {"a": 1.0, "b": 3.0}  # normalised: 0.25, 0.75

    mean = MultiTeacher(teachers, TeacherRouting(rule="combine", weights=weights), 0, tokenizer.pad_token_id)
    torch.testing.assert_close(mean.score(rollouts).token_logprobs, (0.25 * token["a"] + 0.75 * token["b"]) * mask)

    mixture = MultiTeacher(teachers, TeacherRouting(rule="combine", weights=weights, combine="distribution_mixture"),
                           0, tokenizer.pad_token_id)
    by_hand = torch.logsumexp(torch.stack([full["a"] + math.log(0.25), full["b"] + math.log(0.75)]), 0)
    signal = mixture.score(rollouts, "full", top_k=3, entropy=True)
    torch.testing.assert_close(signal.logprobs, by_hand)
    at_token = by_hand.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(signal.token_logprobs, at_token, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixture.score(rollouts).token_logprobs, at_token, atol=1e-5, rtol=0)
    torch.testing.assert_close(signal.entropy, -(by_hand.exp() * by_hand).sum(-1))
    assert torch.equal(signal.topk_ids, by_hand.topk(3, dim=-1).indices)
    assert signal.by_teacher["a"][0].all() and signal.by_teacher["b"][0].all()


def test_mixture_draws_each_example_once_by_weight(two_teachers, routed_data):
    tokenizer, teachers = two_teachers
    examples = load_examples(routed_data["train"])
    routing = TeacherRouting(rule="mixture", weights={"a": 3.0, "b": 1.0})
    multi = MultiTeacher(teachers, routing, seed=7, pad_id=tokenizer.pad_token_id)
    from opdkit.teachers.multi import route

    first = route(routing, ["a", "b"], 7, examples)
    assert first == route(routing, ["a", "b"], 7, examples[::-1])[::-1]  # by example, not by position in the batch
    assert 0.6 < first.count("a") / len(first) < 0.9
    rollouts = multi.sample(examples[:6], 6, temperature=0.0)  # each example's own teacher writes its completion
    for i, example in enumerate(examples[:6]):
        own = teachers[first[i]].sample([example], 6, temperature=0.0)
        assert rollouts.texts(tokenizer)[i] == own.texts(tokenizer)[0]


def test_two_teacher_run_logs_per_teacher_metrics_and_refuses_a_changed_set_on_resume(tiny_config, tiny,
                                                                                       routed_data):
    config = load_config(base={**multi_config(tiny_config, tiny, routed_data), "optim": {"steps": 2,
                                                                                          "learning_rate": 1e-3}})
    assert config.checkpoint.best_metric == "reverse_kl_k1"
    run = setup(config)
    train(run)
    steps = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()][1:-1]
    assert len(steps) == 2
    for record in steps:
        assert record["teacher_a_token_share"] + record["teacher_b_token_share"] == pytest.approx(1.0)
        tokens = record["completion_length"] * config.rollout.batch_size
        assert record["teacher_a_tokens"] + record["teacher_b_tokens"] == pytest.approx(tokens)
        assert {"teacher_a_reverse_kl_k1", "teacher_b_reverse_kl_k1", "teacher_a_time_s"} <= set(record)
    reread = load_config(run.run_dir / "config.yaml")  # what opd train --resume reads
    assert reread.teachers == config.teachers and reread.teacher_routing == config.teacher_routing
    check_folder(run.run_dir, True, 3, reread)  # the same teachers resume
    changed = config.model_copy(deep=True)
    changed.teachers[1].path = str(tiny / "teacher")
    with pytest.raises(OPDError, match=r"teacher 'b' .*student.* now gives .*teacher"):
        check_folder(run.run_dir, True, 3, changed)
    renamed = config.model_copy(deep=True)
    renamed.teachers[1].name = "c"
    with pytest.raises(OPDError, match=r"trained by teachers \['a', 'b'\] and the config now names \['a', 'c'\]"):
        check_folder(run.run_dir, True, 3, renamed)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(teacher={"path": "x"}), "set teacher: .* or teachers:"),
    (lambda c: c["teachers"][1].update(name="a"), "unique name"),
    (lambda c: c["teachers"][1].pop("name"), "unique name"),
    (lambda c: c.update(teacher_routing={"rule": "mixture", "weights": {"a": 1, "z": 1}}), r"weights names \['z'\]"),
    (lambda c: c.update(teacher_routing={"map": {"x": "z"}}), r"map names \['z'\]"),
    (lambda c: c.update(teacher_routing={"rule": "mixture", "weights": {"a": 1, "b": 0}}), "must be positive"),
    (lambda c: c.update(teacher_routing={"weights": {"a": 1, "b": 1}}), "does nothing with rule 'column'"),
    (lambda c: c.update(teacher_routing={"rule": "combine"}, objective={"method": "gkd"}), "mean_log_ratio"),
])
def test_config_refusals(tiny_config, tiny, routed_data, change, message):
    config = multi_config(tiny_config, tiny, routed_data)
    change(config)
    with pytest.raises(OPDError, match=message):
        load_config(base=config)


def test_one_teacher_takes_no_routing(tiny_config):
    with pytest.raises(OPDError, match="teacher_routing shares the work of several teachers"):
        load_config(base={**tiny_config, "teacher_routing": {"rule": "mixture"}})


def test_a_missing_column_is_refused_when_the_data_is_read(tiny_config, tiny, routed_data):
    config = load_config(base=multi_config(tiny_config, tiny, routed_data, column="expert"))
    with pytest.raises(OPDError, match="teacher_routing.column is 'expert'.* no such field"):
        check_data(config)
    unknown = load_config(base=multi_config(tiny_config, tiny, routed_data, column="answer"))
    with pytest.raises(OPDError, match=r"record 0 has answer='\d+', which names none of the teachers"):
        check_data(unknown)


def test_a_local_and_a_served_teacher_in_one_run(tiny_config, tiny, routed_data):
    """Teacher b is served over HTTP (our server, the student's weights); the column routes each example: b's rows
    are scored through the server (its calls counted under its name) and equal the same model scored locally."""
    from opdkit.serve import create_app, serve_in_thread

    model, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    with serve_in_thread(create_app(model, tokenizer, "b-model")) as url:
        tree = multi_config(tiny_config, tiny, routed_data)
        tree["teachers"][1] = {"name": "b", "kind": "server", "base_url": url, "model": "b-model"}
        tree["optim"] = {"steps": 2, "learning_rate": 1e-3}
        config = load_config(base=tree)
        run = setup(config)
        rollouts = batch(run.tokenizer, routed_data["train"])
        signal = run.teacher.score(rollouts)
        b_rows = [i for i, e in enumerate(rollouts.examples) if e.columns["teacher"] == "b"]
        local_b = LocalTeacher(model, tokenizer).score(rollouts)
        mask = rollouts.completion_mask.bool()
        assert torch.allclose(signal.token_logprobs[b_rows][mask[b_rows]], local_b.token_logprobs[b_rows][mask[b_rows]],
                              atol=1e-4)
        train(run)
    steps = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()][1:-1]
    for record in steps:
        assert record["teacher_b_requests"] > 0 and "teacher_a_requests" not in record  # only b goes over HTTP
        assert record["teacher_a_token_share"] + record["teacher_b_token_share"] == pytest.approx(1.0)
