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
import torch

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
from opdkit.teachers.server import ServerTeacher  # noqa: E402

# measured on this file (see docs/results.md): mean |diff| ~0.05, worst token ~0.4 nats
MEAN_TOLERANCE = 0.15
MAX_TOLERANCE = 1.5

PAIRS = [("Write one sentence about the ocean.", "The ocean covers most of our planet and is home to countless creatures."),
         ("Give three words that describe coffee.", "Warm, bitter, energizing."),
         ("Why do people like trains?", "Trains are comfortable, scenic and let you relax while you travel."),
         ("What is 12+34?", "12 + 34 = 46.")]


@pytest.fixture(scope="module")
def llamacpp_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--logits_all", "true", "--n_threads", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
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
                pytest.fail(f"llama_cpp.server exited: {process.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("llama_cpp.server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_scores_through_llamacpp_agree_with_the_local_load_of_the_same_gguf(llamacpp_server):
    tokenizer = load_tokenizer("builtin:smollm2/teacher")
    rollouts = from_dataset(tokenizer, [Example([{"role": "user", "content": p}], c) for p, c in PAIRS], 40)
    spec = ServerTeacherSpec(kind="server", base_url=llamacpp_server, model="smollm2", top_k=5, timeout_s=120,
                             concurrency=1)
    teacher = ServerTeacher(spec, tokenizer)
    teacher.probe()
    remote = teacher.score(rollouts, "topk", 5)
    local = LocalTeacher(load_model("builtin:smollm2/teacher")).score(rollouts, "topk", 5)

    mask = rollouts.completion_mask.bool()
    diff = (remote.token_logprobs - local.token_logprobs)[mask].abs()
    top1 = (remote.topk_ids[..., 0] == local.topk_ids[..., 0])[mask].float().mean()
    print(f"llama.cpp vs HF on {int(mask.sum())} tokens: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}, "
          f"top-1 agreement {top1:.3f}, prompt sent as {teacher.prompt_as}, unmapped top-k texts {teacher.unmapped}")
    assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE
    assert top1 > 0.9
    assert torch.isfinite(remote.topk_logprobs).all()
