"""``opd serve-teacher`` under load: many concurrent scoring requests on 127.0.0.1.

Every request gets its own correct log-probs or a clean 503 with ``Retry-After``; nothing is lost (the
refused ones succeed when retried) or mixed with another request's tokens; the server's memory does not
grow from one burst to the next. ``OPD_LOAD_REQUESTS`` sets the requests per burst (default 80).
"""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from opdkit.models import load_model, load_tokenizer

REQUESTS = int(os.environ.get("OPD_LOAD_REQUESTS", 80))
CONCURRENCY, MAX_PENDING, BURSTS = 32, 8, 3


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "opdkit.cli", "serve-teacher", str(tiny / "teacher"),
                                "--port", str(port), "--served-model-name", "t", "--max-pending", str(MAX_PENDING),
                                "--max-batch-size", "16"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            httpx.get(f"{url}/models", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.1)
    yield url, process
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


def expected_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


async def score(client: httpx.AsyncClient, url: str, ids: list[int]) -> httpx.Response:
    return await client.post(f"{url}/completions", json={"model": "t", "prompt": ids, "max_tokens": 0, "echo": True,
                                                         "logprobs": 1, "return_tokens_as_token_ids": True})


async def burst(url: str, prompts: list[list[int]], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        return await asyncio.gather(*(score(client, url, ids) for ids in prompts))


def check_answer(response: httpx.Response, ids: list[int], model) -> None:
    """The answer is for exactly these ids, with the model's own log-probs."""
    choice = response.json()["choices"][0]["logprobs"]
    assert [int(t.split(":")[1]) for t in choice["tokens"]] == ids  # not another request's tokens
    got = torch.tensor(choice["token_logprobs"][1:])
    torch.testing.assert_close(got, torch.tensor(expected_logprobs(model, ids)), atol=1e-4, rtol=0)


def test_concurrent_scoring_is_answered_correctly_or_refused_cleanly_and_memory_stays_bounded(server, tiny):
    url, process = server
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    rng = random.Random(0)
    served = refused = 0
    memory = []
    for _ in range(BURSTS):
        prompts = [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(2, 40))] for _ in range(REQUESTS)]
        waiting, concurrency = prompts, CONCURRENCY
        for _ in range(10):  # refused, not lost: retried (within the bound) until answered
            retry = []
            for ids, response in zip(waiting, asyncio.run(burst(url, waiting, concurrency))):
                if response.status_code == 200:
                    check_answer(response, ids, model)
                else:
                    assert response.status_code in (429, 503), response.text
                    assert response.headers["retry-after"] and "busy" in response.json()["error"]["message"]
                    retry.append(ids)
            served += len(waiting) - len(retry) if waiting is prompts else 0
            refused += len(retry) if waiting is prompts else 0
            waiting, concurrency = retry, MAX_PENDING
            if not waiting:
                break
        assert not waiting, f"{len(waiting)} requests never answered"
        memory.append(rss_mib(process.pid))

    print(f"\nserver load: {BURSTS} bursts x {REQUESTS} requests at concurrency {CONCURRENCY}, max_pending "
          f"{MAX_PENDING}: {served} answered first time, {refused} refused with 503 then answered on retry; "
          f"server RSS after each burst (MiB): {[round(m) for m in memory]}")
    assert refused > 0, "the load never reached max_pending: the test did not exercise the bound"
    assert memory[-1] - memory[0] < 64, memory  # no growth from burst to burst
