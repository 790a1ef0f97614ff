"""``rollout.engine: server``: the student's rollouts drawn by an OpenAI-compatible server that serves it (vLLM,
SGLang, ``opd serve-teacher``), its LoRA adapter kept equal to the trained one.

The server serves the student's base model (``rollout.server.model``) and, under ``adapter_name``, the adapter being
trained. ``sync`` writes the adapter into a new folder under ``adapter_dir`` (complete before the server is told of
it: it never reads a half-written adapter) and loads it through vLLM's ``POST /v1/load_lora_adapter`` with
``load_inplace: true``, on every replica: once at the start (a server that cannot is refused before any work), again
before the first rollout (a resume restores the weights after the start), and after every optimizer step (the
loop), so the served student equals the local one for every rollout.

``sample`` sends each row's rendered prompt (and guidance prefix) as token ids with ``return_tokens_as_token_ids``
and ``logprobs``, and a ``seed`` drawn from the run's torch RNG, so that a run is reproducible where the server
honours seeds (vLLM and ours do). The server's log-probs are the model's raw ones, which are the sampler's
``log mu`` at temperature 1 and top-p 1 only (the config refuses others). The local student still computes the
loss; the served one only samples.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ServedStudentSpec
from .data import Example
from .distributed import Processes
from .errors import OPDError
from .rollout import Rollouts, from_samples, starts_of
from .teachers.server import ApiClient, Malformed, TokenMap


class ServedStudent:
    """The student served elsewhere: ``sample`` its rollouts, ``sync`` its adapter."""

    def __init__(self, spec: ServedStudentSpec, tokenizer, student: torch.nn.Module, adapter_dir: str | Path,
                 processes: Processes | None = None):
        self.spec, self.tokenizer, self.student = spec, tokenizer, student
        self.processes = processes or Processes()  # several: the first writes and loads the adapter, all sample
        self.adapter_dir = Path(adapter_dir).resolve()  # the server reads it by this path
        self.client = ApiClient(spec, role="student", section="rollout.server")
        self.tokens = TokenMap(tokenizer)
        self.served: Path | None = None  # the folder the server last loaded
        self.client.check_model(spec.model)
        self.sync()  # at the start: a server that cannot load the adapter fails the run before any work
        self.resynced = False  # synced again before the first rollout: a resume restores the weights after this

    def sync(self) -> None:
        """Write the student's adapter to a new folder and load it into every replica under ``adapter_name``; with
        several processes the first does, and the others wait until the server holds it."""
        if self.processes.main:
            self._load()
        self.processes.barrier()

    def _load(self) -> None:
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=self.adapter_dir, prefix=".partial-adapter-"))
        self.student.save_pretrained(partial)  # peft: the adapter alone
        folder = partial.with_name(partial.name.removeprefix(".partial-"))
        partial.rename(folder)
        payload = {"lora_name": self.spec.adapter_name, "lora_path": str(folder), "load_inplace": True}
        for replica, response in zip(self.client.replicas, self.client.post_each("/load_lora_adapter", payload)):
            if response.status_code == 404:
                raise OPDError(f"the server at {replica.url} has no runtime LoRA loading (POST /load_lora_adapter: "
                               "404), so the served student cannot follow the trained one: for vLLM start it with "
                               "--enable-lora (and --max-lora-rank >= student.lora.r) and the environment variable "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; or set rollout.engine: hf")
            if response.status_code != 200:
                raise OPDError(f"the server at {replica.url} refused the student's adapter (HTTP "
                               f"{response.status_code}: {response.text[:300]}). It must read {folder} (the same "
                               "machine or a shared filesystem: set rollout.server.adapter_dir), serve LoRA adapters "
                               "of student.lora's rank, and reload one in place (load_inplace)")
        if self.served is not None:  # the server holds the new one now
            shutil.rmtree(self.served, ignore_errors=True)
        self.served = folder

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0, prefixes: list[list[int]] | None = None) -> Rollouts:
        """One completion per example (``source="student"``, ``sampler_logprobs`` the server's), on the student's
        device, laid out as ``rollout.sample`` lays out its own."""
        _, starts = starts_of(self.tokenizer, examples, prefixes)
        # the seeds of the whole global batch, this process's share kept: each row's as one process would draw it
        share = slice(self.processes.rank * len(starts), (self.processes.rank + 1) * len(starts))
        seeds = torch.randint(0, 2**31 - 1, (len(starts) * self.processes.world,))[share].tolist()
        if not self.resynced:
            self.sync()
            self.resynced = True
        payloads = [{"model": self.spec.adapter_name, "prompt": ids, "max_tokens": max_completion_length,
                     "temperature": temperature, "top_p": top_p, "logprobs": 1, "return_tokens_as_token_ids": True,
                     "seed": seed} for ids, seed in zip(starts, seeds)]
        check = lambda body: read_draw(body, max_completion_length, self.tokens)  # noqa: E731
        answers = self.client.map("/completions", payloads, check)
        draws = [read_draw(answer, max_completion_length, self.tokens) for answer in answers]
        device = next(self.student.parameters()).device
        return from_samples(self.tokenizer, examples, draws, max_completion_length, device, prefixes)


def read_draw(body: dict, max_tokens: int, tokens: TokenMap) -> tuple[list[int], list[float]]:
    """``(token ids, log-probs)`` of the one completion in a ``/v1/completions`` answer; :class:`Malformed` (retried)
    for a broken answer, OPDError for tokens that name no student id."""
    if len(body["choices"]) != 1:
        raise Malformed(f"expected 1 choice, got {len(body['choices'])}")
    logprobs = body["choices"][0].get("logprobs") or {}
    texts, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not isinstance(texts, list) or not isinstance(values, list) or len(texts) != len(values):
        raise Malformed("the completion's logprobs lack tokens and token_logprobs of equal length")
    if len(texts) > max_tokens:
        raise Malformed(f"{len(texts)} tokens returned for max_tokens {max_tokens}")
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise Malformed("a sampled token's log-prob is missing or not finite")
    ids = [tokens.id(t) for t in texts]
    if any(i is None or not 0 <= i < len(tokens.tokenizer) for i in ids):
        raise OPDError(f"the student server returned tokens that name no student token id ({texts[:8]}): it must "
                       "serve the student's tokenizer and honour return_tokens_as_token_ids (vLLM, SGLang and opd "
                       "serve-teacher do)")
    return ids, [float(v) for v in values]
