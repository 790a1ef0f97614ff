"""Our server client against a server nobody here wrote: llama-cpp-python serving the SmolLM2 GGUF file.

The scores must agree with the local HF load of the same file (dequantized to float32) within the
quantization tolerance measured here: llama.cpp computes with the Q4_1 weights themselves (and 8-bit
activations in its matmuls), so the two disagree by a few hundredths of a nat per token, not 1e-4.
Build notes: DEVELOPERS.md. Skipped, with the reason, where llama-cpp-python is not installed.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (it builds llama.cpp from source, several minutes): "
                "see DEVELOPERS.md", allow_module_level=True)
pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python was installed without its [server] extra")

from opdkit.config import ServerTeacherSpec  # noqa: E402
from opdkit.data import Example  # noqa: E402
from opdkit.models import load_model, load_tokenizer  # noqa: E402
from opdkit.rollout import from_dataset  # noqa: E402
from opdkit.scenarios.smollm2 import gguf_path  # noqa: E402
from opdkit.teachers import LocalTeacher  # noqa: E402
from opdkit.teachers.probe import probe  # noqa: E402
from opdkit.teachers.server import ServerTeacher, sequences  # noqa: E402

# measured here (docs/results.md): mean |diff| 0.054 nats, worst token 0.293, top-1 agreement 49/55 (the
# misses are near-ties flipped by the quantized arithmetic); the bounds leave about 3x room
MEAN_TOLERANCE = 0.15
MAX_TOLERANCE = 1.0
TOP1_AGREEMENT = 0.8

PAIRS = [("Write one sentence about the ocean.", "The ocean covers most of our planet and is home to countless creatures."),
         ("Give three words that describe coffee.", "Warm, bitter, energizing."),
         ("Why do people like trains?", "Trains are comfortable, scenic and let you relax while you travel."),
         ("What is 12+34?", "12 + 34 = 46.")]


@pytest.fixture(scope="module")
def llamacpp_server(tmp_path_factory):
    log = (tmp_path_factory.mktemp("llamacpp") / "server.log").open("w+")  # a pipe would fill up and block it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--logits_all", "true", "--n_threads", "2"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited: {log.read()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("llama_cpp.server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_scores_through_llamacpp_agree_with_the_local_load_of_the_same_gguf(llamacpp_server):
    tokenizer = load_tokenizer("builtin:smollm2/teacher")
    rollouts = from_dataset(tokenizer, [Example([{"role": "user", "content": p}], c) for p, c in PAIRS], 40)
    spec = ServerTeacherSpec(kind="server", base_url=llamacpp_server, model="smollm2", top_k=5, timeout_s=120,
                             concurrency=1)
    teacher = ServerTeacher(spec, tokenizer)
    teacher.probe()
    remote = teacher.score(rollouts, "token")
    local = LocalTeacher(load_model("builtin:smollm2/teacher"), tokenizer).score(rollouts, "topk", 5)

    mask = rollouts.completion_mask.bool()
    diff = (remote.token_logprobs - local.token_logprobs)[mask].abs()
    # top-1 where llama.cpp's top-k texts map back to student ids (control tokens echo as "" and cannot)
    agree = total = 0
    for b, ((ids, p), scored) in enumerate(zip(sequences(rollouts), teacher.score_ids(sequences(rollouts), 5))):
        for t in range(len(ids) - p):
            if scored.topk[p - 1 + t]:
                total += 1
                agree += scored.topk[p - 1 + t][0][0] == int(local.topk_ids[b, t, 0])
    print(f"llama.cpp vs HF on {int(mask.sum())} tokens: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}, "
          f"top-1 agreement {agree}/{total}, prompt sent as {teacher.prompt_as}, unmapped top-k texts {teacher.unmapped}")
    assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE
    assert agree / total > TOP1_AGREEMENT and total > 0.8 * int(mask.sum())


def test_the_probe_reports_each_finding_on_llamacpp(llamacpp_server):
    """Each finding is measured on a server nobody here wrote (text prompts, legacy echo without BOS ids)."""
    tokenizer = load_tokenizer("builtin:smollm2/teacher")
    spec = ServerTeacherSpec(kind="server", base_url=llamacpp_server, model="smollm2", timeout_s=120, concurrency=1)
    teacher = ServerTeacher(spec, tokenizer)
    found = probe(teacher)  # the findings, whether or not the run could use them
    lines = found.lines()
    print("\n".join(lines + found.problems(1, "auto", True)))
    assert [line.split(":")[0] for line in lines] == ["identity", "top-k", "prompt log-probs", "alignment",
                                                      "temperature", "chat template"]
    assert found.models == ["smollm2"] and found.prompt_as == "text" and found.prompt_logprobs == "echo"
    assert found.max_top_k >= 5 and found.aligned  # chat-template prompts start with the BOS, which it needs
    assert found.temperature_applied_to_prompt is not None
