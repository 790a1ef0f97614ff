"""The server teacher: exact against the local teacher through our server, replicas, and fault injection
against a scripted server started here (slow answers, dropped connections, 500, 429, malformed JSON)."""

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opdkit.config import ServerTeacherSpec, load_config
from opdkit.data import Example
from opdkit.errors import OPDError
from opdkit.models import load_model, load_tokenizer
from opdkit.rollout import sample
from opdkit.serve import create_app, serve_in_thread
from opdkit.teachers import LocalTeacher
from opdkit.teachers.server import ServerTeacher, TeacherUnavailable
from opdkit.train import setup, train

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


def spec(url, **overrides) -> ServerTeacherSpec:
    values = {"kind": "server", "base_url": url, "model": "t", "top_k": 5, "timeout_s": 30, "backoff_s": 0.01,
              "max_backoff_s": 0.05, "max_retries": 3, "replica_cooldown_s": 60}
    return ServerTeacherSpec(**{**values, **overrides})


@pytest.fixture(scope="module")
def served(tiny):
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    with serve_in_thread(create_app(model, tokenizer, "t")) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def rollouts(tiny):
    tokenizer, student = load_tokenizer(str(tiny / "student")), load_model(str(tiny / "student"))
    torch.manual_seed(0)
    examples = [Example([{"role": "user", "content": f"{1000 + 37 * i}+{4000 + 11 * i}"}]) for i in range(6)]
    return sample(student, tokenizer, examples, max_completion_length=10)


def test_server_scores_equal_the_local_teacher_and_a_dead_replica_leaves_rotation(served, rollouts):
    url, model, tokenizer = served
    teacher = ServerTeacher(spec([DEAD, url]), tokenizer)
    teacher.probe()
    mask = rollouts.completion_mask
    local = LocalTeacher(model, tokenizer).score(rollouts, "topk", 5)
    remote = teacher.score(rollouts, "topk", 5)
    torch.testing.assert_close(remote.token_logprobs, local.token_logprobs, atol=1e-4, rtol=0)
    assert torch.equal(remote.topk_ids * mask[..., None].long(), local.topk_ids * mask[..., None].long())
    torch.testing.assert_close(remote.topk_logprobs * mask[..., None], local.topk_logprobs * mask[..., None], atol=1e-4, rtol=0)
    assert teacher.client.replicas[0].down_until > time.monotonic()  # the dead one is out of rotation
    assert remote.usage["requests"] == len(mask) and remote.usage.get("retries", 0) <= 8  # at most one refused try per request in flight (concurrency 8)
    token = teacher.score(rollouts, "token")
    torch.testing.assert_close(token.token_logprobs, local.token_logprobs, atol=1e-4, rtol=0)
    assert "retries" not in token.usage  # while it cools down, only the live replica is asked


def test_requests_are_spread_over_live_replicas(served, rollouts):
    url, model, tokenizer = served
    second = create_app(model, tokenizer, "t")
    with serve_in_thread(second) as other:
        signal = ServerTeacher(spec([url, other], concurrency=2), tokenizer).score(rollouts, "token")
    assert signal.usage["requests"] == len(rollouts.examples) and "retries" not in signal.usage
    assert sum(second.state.engine.batch_sizes) == len(rollouts.examples) // 2  # round-robin: half each


def test_objectives_that_need_full_logits_are_refused(served, rollouts):
    teacher = ServerTeacher(spec(served[0]), served[2])
    with pytest.raises(OPDError, match="full-vocabulary"):
        teacher.score(rollouts, "full")
    with pytest.raises(OPDError, match="exceeds teacher.top_k"):
        teacher.score(rollouts, "topk", 6)


@pytest.mark.parametrize("objective, message", [
    ({"method": "gkd"}, "full-vocabulary"), ({"method": "vopd"}, "full-vocabulary"),
    ({"method": "opd", "support": "teacher_topk", "top_k": 50, "grad_path": "direct"}, "top 50 log-probs")])
def test_config_refuses_objectives_a_server_cannot_feed(objective, message):
    base = {"student": {"path": "s"}, "data": {"train": "d"}, "objective": objective,
            "teacher": {"kind": "server", "base_url": DEAD, "model": "t", "top_k": 20}}
    with pytest.raises(OPDError, match=message):
        load_config(base=base)


def test_wrong_model_name_and_unreachable_server_are_reported(served):
    with pytest.raises(OPDError, match="not served"):
        ServerTeacher(spec(served[0], model="nope"), served[2]).probe()
    with pytest.raises(TeacherUnavailable, match="no teacher replica answered"):
        ServerTeacher(spec(DEAD), served[2]).probe()


@pytest.mark.parametrize("objective", [{"method": "opd"}, {"method": "gkd", "support": "teacher_topk", "top_k": 4, "lmbda": 1.0}])
def test_training_through_the_server_logs_teacher_calls(served, tiny_config, objective):
    tiny_config["teacher"] = {"kind": "server", "base_url": served[0], "model": "t", "top_k": 5}
    tiny_config["objective"] = objective
    tiny_config["optim"]["steps"] = 2
    result = train(setup(load_config(base=tiny_config)))
    records = [json.loads(line) for line in open(f"{tiny_config['output_dir']}/metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["teacher_requests"] for r in steps] == [8, 8]  # one request per rollout, none dropped or doubled
    assert "reverse_kl_k1" in result["after"] and result["teacher"]["accuracy"] is not None


# ---------------------------------------------------------------------------------------- fault injection


def fake_logprob(token_id: int) -> float:
    return -0.5 - 0.01 * token_id


class Scripted(BaseHTTPRequestHandler):
    """Answers with ``fake_logprob`` per token, after the server's scripted faults (one per request)."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"object": "list", "data": [{"id": "t", "object": "model"}]}).encode())

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.received.append(payload["prompt"])
            fault = server.faults.pop(0) if server.faults else "ok"
        if fault == "drop":
            self.close_connection = True
            return
        if fault == "500":
            return self._send(500, b'{"error": "boom"}')
        if fault == "401":
            return self._send(401, b'{"error": {"message": "bad key"}}')
        if fault == "429":
            return self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        if fault == "badjson":
            return self._send(200, b'{"choices": [{"text": "')
        if fault == "slow":
            time.sleep(1.0)
        ids, k = payload["prompt"], payload["prompt_logprobs"]
        if server.text_only:  # like llama-cpp-python: string prompts only
            if not isinstance(ids, str):
                return self._send(422, b'{"detail": "prompt: Input should be a valid string"}')
            ids = server.tokenizer(ids, add_special_tokens=False)["input_ids"]
        if fault in ("legacy", "llama"):  # OpenAI legacy echo; llama-cpp-python also leaves out ids equal to the first
            keep = [j for j in range(len(ids)) if fault == "legacy" or (j > 0 and ids[j] != ids[0])]
            text = [server.tokenizer.decode([ids[j]]) for j in keep]
            logprobs = {"tokens": text, "token_logprobs": [None] + [fake_logprob(ids[j]) for j in keep[1:]],
                        "top_logprobs": [None] + [{t: fake_logprob(ids[j])} for t, j in zip(text[1:], keep[1:])]}
            return self._send(200, json.dumps({"choices": [{"index": 0, "text": "", "logprobs": logprobs}]}).encode())
        shift = 1 if fault == "mismatch" else 0
        entries = [None] + [{str(i + shift): {"logprob": fake_logprob(i)}, **{str(1000 + r): {"logprob": -9.0 - r}
                                                                             for r in range(k)}} for i in ids[1:]]
        try:
            self._send(200, json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}],
                                        "usage": {"prompt_tokens": len(ids), "completion_tokens": 1}}).encode())
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first
            pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.lock, server.received, server.faults = threading.Lock(), [], []
    server.text_only, server.tokenizer = False, load_tokenizer_of(None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def expected_from_fake(rollouts) -> torch.Tensor:
    return rollouts.completion_ids.float().mul(-0.01).add(-0.5) * rollouts.completion_mask


@pytest.mark.parametrize("fault", ["drop", "500", "badjson", "slow"])
def test_each_fault_is_retried_and_every_row_gets_exactly_its_own_answer(scripted, rollouts, fault):
    server, url = scripted
    teacher = ServerTeacher(spec(url, timeout_s=0.3, concurrency=3), load_tokenizer_of(rollouts))
    server.faults = [fault, fault]
    signal = teacher.score(rollouts, "token")
    torch.testing.assert_close(signal.token_logprobs, expected_from_fake(rollouts), atol=1e-6, rtol=0)
    assert signal.usage["requests"] == len(rollouts.examples) and signal.usage["retries"] == 2
    assert len(server.received) == len(rollouts.examples) + 2  # the faulted ones, sent again


def test_429_waits_for_retry_after(scripted, rollouts):
    server, url = scripted
    teacher = ServerTeacher(spec(url, concurrency=1), load_tokenizer_of(rollouts))
    server.faults = ["429"]
    start = time.monotonic()
    signal = teacher.score(rollouts, "token")
    assert time.monotonic() - start >= 1.0 and signal.usage["retries"] == 1


def test_after_the_retry_budget_the_error_is_clear_and_4xx_is_not_retried(scripted, rollouts):
    server, url = scripted
    tokenizer = load_tokenizer_of(rollouts)
    server.faults = ["500"] * 3
    with pytest.raises(TeacherUnavailable, match=r"failed 3 times \(max_retries 2\).*HTTP 500"):
        teacher = ServerTeacher(spec(url, max_retries=2, concurrency=1), tokenizer)
        try:
            teacher.score(rollouts, "token")
        finally:
            teacher.client.close()
    server.faults, server.received = ["401"], []
    with pytest.raises(OPDError, match="HTTP 401.*api_key_env"):
        ServerTeacher(spec(url, concurrency=1), tokenizer).score(rollouts, "token")
    assert len(server.received) == 1


def test_on_failure_wait_outlasts_the_retry_budget(scripted, rollouts):
    server, url = scripted
    server.faults = ["500"] * 5
    teacher = ServerTeacher(spec(url, max_retries=1, on_failure="wait", concurrency=1), load_tokenizer_of(rollouts))
    signal = teacher.score(rollouts, "token")
    torch.testing.assert_close(signal.token_logprobs, expected_from_fake(rollouts), atol=1e-6, rtol=0)
    assert signal.usage["retries"] == 5


def test_a_server_that_takes_text_only_is_sent_text_and_checked(scripted, rollouts):
    server, url = scripted
    server.text_only = True
    teacher = ServerTeacher(spec(url), load_tokenizer_of(rollouts))
    teacher.probe()
    assert teacher.prompt_as == "text"
    signal = teacher.score(rollouts, "token")
    torch.testing.assert_close(signal.token_logprobs, expected_from_fake(rollouts), atol=1e-6, rtol=0)
    with pytest.raises(OPDError, match="HTTP 422"):
        ServerTeacher(spec(url, prompt_as="ids"), load_tokenizer_of(rollouts)).probe()


@pytest.mark.parametrize("layout", ["legacy", "llama"])
def test_legacy_echo_layouts_are_aligned_to_the_students_ids(scripted, rollouts, layout):
    server, url = scripted
    server.faults = [layout] * 20
    first = int(rollouts.prompt_ids[0, -rollouts.prompt_mask[0].sum()])  # llama.cpp leaves this id out everywhere
    clean = dataclasses.replace(rollouts, completion_ids=rollouts.completion_ids.masked_fill(rollouts.completion_ids == first, 5))
    teacher = ServerTeacher(spec(url), load_tokenizer_of(rollouts))
    signal = teacher.score(clean, "token")
    torch.testing.assert_close(signal.token_logprobs, expected_from_fake(clean), atol=1e-6, rtol=0)
    if layout == "llama" and bool(((rollouts.completion_ids == first) & rollouts.completion_mask.bool()).any()):
        with pytest.raises(OPDError, match="leaves out a completion token"):
            teacher.score(rollouts, "token")


def test_a_server_that_tokenizes_differently_is_reported(scripted, rollouts):
    server, url = scripted
    server.faults = ["mismatch"] * 10
    with pytest.raises(OPDError, match="tokenization differs"):
        ServerTeacher(spec(url), load_tokenizer_of(rollouts)).score(rollouts, "token")


@pytest.mark.parametrize("on_failure", ["raise", "wait"])
def test_training_stops_cleanly_or_continues_and_never_steps_on_a_partial_batch(scripted, tiny_config, on_failure):
    server, url = scripted
    tiny_config["teacher"] = {"kind": "server", "base_url": url, "model": "t", "top_k": 5, "max_retries": 2,
                              "backoff_s": 0.01, "max_backoff_s": 0.02, "on_failure": on_failure}
    tiny_config["optim"]["steps"] = 3
    tiny_config["data"].pop("eval")  # the fake server cannot generate text for greedy evaluation
    run = setup(load_config(base=tiny_config))
    calls = []
    score = run.teacher.score

    def failing_on_step_two(rollouts, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2: 8 requests, 3 of them fail 4 times in a row
            server.faults = ["ok"] * 5 + ["500"] * 12
        return score(rollouts, *args, **kwargs)

    run.teacher.score = failing_on_step_two
    metrics = f"{tiny_config['output_dir']}/metrics.jsonl"
    if on_failure == "raise":
        with pytest.raises(TeacherUnavailable, match="failed 3 times"):
            train(run)
        steps = [json.loads(line) for line in open(metrics) if '"loss"' in line]
        assert [r["step"] for r in steps] == [1]
    else:
        train(run)
        steps = [json.loads(line) for line in open(metrics) if '"loss"' in line]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert steps[1]["teacher_requests"] == 8 and steps[1]["teacher_retries"] == 12


def load_tokenizer_of(rollouts):
    from opdkit.scenarios.arith import build_tokenizer

    return build_tokenizer()
