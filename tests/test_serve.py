"""``opd serve-teacher`` against clients nobody here wrote: the official ``openai`` client and raw HTTP."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from opdkit.models import load_model, load_tokenizer
from opdkit.serve import create_app, serve_in_thread

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tiny):
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    app = create_app(model, tokenizer, "tiny-teacher", api_key=KEY, batch_wait_s=0.05)
    with serve_in_thread(app) as url:
        yield url, app, model, tokenizer


def local_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[n-1, V]`` log-probs predicting positions 1.. of ``ids``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_openai_completions_echo_logprobs_equal_the_local_model(served):
    url, _, model, tokenizer = served
    client = openai.OpenAI(base_url=url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny-teacher"]

    prompt = "1234+5678"
    answer = client.completions.create(model="tiny-teacher", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    choice = answer.choices[0]
    ids = tokenizer(prompt)["input_ids"]
    expected = local_logprobs(model, ids)
    assert choice.text == prompt and choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == len(ids) and answer.usage.prompt_tokens == len(ids)
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    torch.testing.assert_close(got, expected.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
    for j, top in enumerate(choice.logprobs.top_logprobs[1:]):
        values, top_ids = expected[j].topk(5)
        for value, token_id in zip(values.tolist(), top_ids.tolist()):
            assert abs(top[tokenizer.decode([token_id])] - value) < 1e-4

    # token ids in, sampled tokens out: every returned log-prob (prompt and generated) is the model's
    ids = tokenizer("12+34")["input_ids"]
    answer = client.completions.create(model="tiny-teacher", prompt=ids, max_tokens=6, echo=True, logprobs=1,
                                       extra_body={"return_tokens_as_token_ids": True})
    lp = answer.choices[0].logprobs
    full = [int(t.split(":")[1]) for t in lp.tokens]
    assert full[: len(ids)] == ids and len(full) > len(ids)
    expected = local_logprobs(model, full).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)


def test_openai_chat_completions_are_well_formed_and_exact(served):
    url, _, model, tokenizer = served
    client = openai.OpenAI(base_url=url, api_key=KEY)
    messages = [{"role": "user", "content": "4321+1234"}]
    answer = client.chat.completions.create(model="tiny-teacher", messages=messages, max_tokens=8, n=2,
                                            logprobs=True, top_logprobs=3, temperature=1.0)
    assert len(answer.choices) == 2 and answer.object == "chat.completion"
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert answer.usage.prompt_tokens == len(prompt)
    for choice in answer.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length") and len(choice.logprobs.content) <= 8
        generated = [tokenizer.convert_tokens_to_ids(t.token) if t.token in tokenizer.get_vocab()
                     else tokenizer.encode(t.token, add_special_tokens=False)[0] for t in choice.logprobs.content]
        expected = local_logprobs(model, prompt + generated)[len(prompt) - 1:]
        got = torch.tensor([t.logprob for t in choice.logprobs.content])
        torch.testing.assert_close(got, expected.gather(-1, torch.tensor(generated)[:, None])[:, 0], atol=1e-4, rtol=0)
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)

    greedy = [client.chat.completions.create(model="tiny-teacher", messages=messages, max_tokens=8, temperature=0)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_vllm_prompt_logprobs_and_max_tokens_zero(served):
    url, _, model, tokenizer = served
    ids = tokenizer("999+1")["input_ids"]
    body = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-teacher", "prompt": ids, "max_tokens": 0, "prompt_logprobs": 2}).json()
    choice = body["choices"][0]
    assert choice["text"] == "" and body["usage"]["completion_tokens"] == 0
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    expected = local_logprobs(model, ids)
    for j, entry in enumerate(entries[1:]):
        actual = entry[str(ids[j + 1])]
        assert abs(actual["logprob"] - float(expected[j, ids[j + 1]])) < 1e-4
        assert actual["rank"] == int((expected[j] > expected[j, ids[j + 1]]).sum()) + 1
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:2] == [1, 2]


def test_api_key_is_required_when_set(served):
    url = served[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong").models.list()
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.post(f"{url}/completions", json={"prompt": "1+1"}).status_code == 401


def test_bad_requests_are_refused_with_openai_errors(served):
    url, _, _, tokenizer = served
    client = openai.OpenAI(base_url=url, api_key=KEY)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="other", prompt="1+1", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.completions.create(model="tiny-teacher", prompt="1+1", max_tokens=1000)


def test_concurrent_callers_are_batched_and_each_gets_its_own_answer(served):
    url, app, model, tokenizer = served
    prompts = [tokenizer(f"{1000 + 7 * i}+{2000 + 3 * i}")["input_ids"] for i in range(12)]
    answers: dict[int, list[float]] = {}
    before = len(app.state.engine.batch_sizes)
    barrier = threading.Barrier(len(prompts))

    def call(i: int) -> None:
        barrier.wait()
        body = httpx.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": "tiny-teacher", "prompt": prompts[i], "max_tokens": 0, "echo": True, "logprobs": 1}).json()
        answers[i] = body["choices"][0]["logprobs"]["token_logprobs"][1:]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert max(app.state.engine.batch_sizes[before:]) > 1  # several callers shared one forward
    for i, ids in enumerate(prompts):
        expected = local_logprobs(model, ids).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(answers[i]), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_opd_serve_teacher_command(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "opdkit.cli", "serve-teacher", str(tiny / "teacher"), "--port",
                                str(port), "--api-key", KEY, "--served-model-name", "t"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read().decode()
                time.sleep(0.3)
        assert response.json()["data"][0]["id"] == "t"
    finally:
        process.terminate()
        process.wait(timeout=20)
