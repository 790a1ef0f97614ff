"""``opd serve-teacher``: any local HF causal LM behind an OpenAI-compatible HTTP API.

Endpoints (the subset that OPD clients use, in the shapes that OpenAI, vLLM, SGLang and llama.cpp's
server share, so one client talks to all of them):

- ``GET /v1/models``: the model, and each loaded LoRA adapter with ``"parent"``: the model (as vLLM lists them);
- ``POST /v1/completions``: ``prompt`` as a string or token ids (or a list of either), ``max_tokens``
  (``0`` scores the prompt only), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``echo``, ``logprobs: k``
  (top-k per position, OpenAI legacy shape), vLLM's ``prompt_logprobs: k`` (``{id: {logprob, rank,
  decoded_token}}`` per prompt position) and ``return_tokens_as_token_ids`` (tokens as ``token_id:N``);
- ``POST /v1/chat/completions``: ``messages``, ``max_tokens``/``max_completion_tokens``, ``n``,
  ``temperature``, ``top_p``, ``stop``, ``logprobs``/``top_logprobs``, and vLLM's
  ``continue_final_message`` (the final assistant message is a prefix to continue);
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "load_inplace"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}``, as vLLM (``opdkit.serve_adapters``): a request whose ``model`` names an adapter is served with
  it (a batch never mixes adapters), one naming the model with the base weights. ``opd train`` with
  ``rollout.engine: server`` keeps the student's adapter in sync through it (``opdkit.served_rollout``);
- ``POST /tokenize`` (vLLM's shape, at the root): a ``prompt`` or chat ``messages`` as the server renders
  them, ``{"count", "max_model_len", "tokens"}``; the client's probe compares it with the student's rendering.

A request with a ``seed`` is decoded alone, the torch RNG seeded with it, so that it draws exactly what the local
sampler (``rollout.sample`` after ``torch.manual_seed(seed)``) draws for the same prompt; unseeded requests share
batches.

Log-probs are the model's own at temperature 1 (``log_softmax(logits)``), whatever temperature the
sampler used: the contract OPD needs (``logprobs_mode="processed"`` breaks it on purpose, as vLLM's
``--logprobs-mode processed_logprobs`` does, so that clients can be tested against such a server). At most
``max_logprobs`` log-probs per position are returned; asking for more is refused with 400, as vLLM does. Requests from concurrent callers are queued and run in
batches of up to ``max_batch_size`` sequences by one worker that owns the model. With ``api_key`` set,
a request without ``Authorization: Bearer <key>`` is refused with 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .data import render_prompt
from .serve_adapters import AdapterError, Adapters

MAX_LOGPROBS = 20  # the default cap on log-probs per position, vLLM's too


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (stream: false, user, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None  # vLLM's: the request's draws reproduce

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0)
    return_tokens_as_token_ids: bool = False


class ChatRequest(_Request):
    messages: list[dict]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    continue_final_message: bool = False


class LoadAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str
    load_inplace: bool = False


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id

    lora_name: str


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` (special tokens added) or ``messages`` rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_generation_prompt: bool = True


@dataclass
class Sequence:
    """One generated (or scored-only) sequence: ``ids = prompt + generated`` and, if asked, per-position
    log-probs: ``token_logprobs[j] = log p(ids[j] | ids[:j])`` for ``j >= 1`` and the top-k there."""

    prompt_len: int
    ids: list[int]
    finish_reason: str
    token_logprobs: list[float] | None = None  # len(ids) - 1 entries, for positions 1..
    topk: list[list[tuple[int, float]]] | None = None
    ranks: list[int] | None = None


@dataclass
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stops: list[str]
    top_k: int | None  # None: no log-probs needed
    adapter: str | None = None  # the LoRA adapter to run with; None: the base weights
    seed: int | None = None  # decoded alone, the torch RNG seeded with it (as the local engine draws)
    future: asyncio.Future = field(repr=False, default=None)


class Engine:
    """Batched sampling and scoring; one worker thread owns the model and its adapters, an asyncio task feeds it."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_wait_s: float = 0.005,
                 logprobs_mode: str = "raw"):
        self.adapters = Adapters(model.eval().requires_grad_(False))
        self.logprobs_mode = logprobs_mode  # raw: log_softmax(logits); processed: of logits / the request's temperature
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.context = int(getattr(model.config, "max_position_embeddings", 10**9))
        self.batch_sizes: list[int] = []  # sequences per worker batch, for tests and monitoring
        self._queue: asyncio.Queue | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-serve-model")

    async def submit(self, job: _Job) -> list[Sequence]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._worker())
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        return await job.future

    async def call(self, function, *args):
        """``function(*args)`` on the worker thread, between batches (adapter loads: never during a forward)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while sum(j.n for j in jobs) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self._pool, self.run, jobs)
            except Exception as exc:  # a model failure answers every caller of the batch, never some
                for job in jobs:
                    if not job.future.done():  # a caller that went away was cancelled
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    def run(self, jobs: list[_Job]) -> list[list[Sequence]]:
        """Sample every job's ``n`` sequences (grouped by adapter and sampler settings; a seeded job alone), then
        score the rows that asked for log-probs in padded forwards of at most ``max_batch_size`` rows of one
        adapter each."""
        self.batch_sizes.append(sum(j.n for j in jobs))
        rows = [(job, Sequence(len(job.prompt_ids), list(job.prompt_ids), "length")) for job in jobs for _ in range(job.n)]
        groups: dict[tuple, list[tuple[_Job, Sequence]]] = {}
        for job, seq in rows:
            if job.max_tokens > 0:
                alone = id(job) if job.seed is not None else None
                # greedy jobs share a batch whatever their top_p, which decode.choose ignores at temperature 0
                key = (job.adapter, alone, job.temperature, job.top_p if job.temperature else None)
                groups.setdefault(key, []).append((job, seq))
        for members in groups.values():
            job0 = members[0][0]
            with self.adapters.use(job0.adapter) as model, _seeded(job0.seed):
                for start in range(0, len(members), self.max_batch_size):
                    self._generate(model, members[start : start + self.max_batch_size])
        scored: dict[str | None, list[tuple[_Job, Sequence]]] = {}
        for job, seq in rows:
            if job.top_k is not None:
                scored.setdefault(job.adapter, []).append((job, seq))
        for adapter, members in scored.items():
            with self.adapters.use(adapter) as model:
                for start in range(0, len(members), self.max_batch_size):
                    self._score(model, members[start : start + self.max_batch_size])
        out, index = [], 0
        for job in jobs:
            out.append([seq for _, seq in rows[index : index + job.n]])
            index += job.n
        return out

    @torch.no_grad()
    def _generate(self, model, members: list[tuple[_Job, Sequence]]) -> None:
        from .data import left_pad
        from .decode import decode

        job0 = members[0][0]
        tok = self.tokenizer
        ids, mask = left_pad([job.prompt_ids for job, _ in members], tok.pad_token_id)
        out, _ = decode(model, ids.to(self.device), mask.to(self.device), max(job.max_tokens for job, _ in members),
                        tok.eos_token_id, tok.pad_token_id, job0.temperature, job0.top_p)
        for (job, seq), row in zip(members, out.tolist()):
            new, reason = row[: job.max_tokens], "length"
            if tok.eos_token_id in new:
                new, reason = new[: new.index(tok.eos_token_id) + 1], "stop"
            cut = _stop_cut(tok, new, job.stops)
            if cut is not None:
                new, reason = new[:cut], "stop"
            seq.ids, seq.finish_reason = seq.ids + new, reason

    @torch.no_grad()
    def _score(self, model, members: list[tuple[_Job, Sequence]]) -> None:
        from .data import right_pad

        ids, mask = right_pad([seq.ids for _, seq in members], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        if self.logprobs_mode == "processed":
            temperatures = [job.temperature if job.temperature > 0 else 1.0 for job, _ in members]
            logits = logits / torch.tensor(temperatures, device=logits.device)[:, None, None]
        logprobs = logits.log_softmax(-1)
        targets = ids[:, 1:]
        token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        k = max(1, max(job.top_k for job, _ in members))
        top_values, top_ids = logprobs.topk(k, dim=-1)
        ranks = (logprobs > token.unsqueeze(-1)).sum(-1) + 1
        for row, (job, seq) in enumerate(members):
            n = len(seq.ids) - 1
            seq.token_logprobs = token[row, :n].tolist()
            seq.ranks = ranks[row, :n].tolist()
            kk = job.top_k
            seq.topk = [list(zip(i[:kk], v[:kk])) for i, v in zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist())]


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Draws from the torch RNG seeded with ``seed`` (its state restored after), or from the running one (None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _stop_cut(tokenizer, ids: list[int], stops: list[str]) -> int | None:
    """Number of generated tokens to keep so that the text ends before the first stop string, if any."""
    if not stops:
        return None
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if any(stop in text for stop in stops):
            return end - 1
    return None


# ----------------------------------------------------------------------------------------------- the app


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


class RequestLog:
    """What the server says about its traffic, so a person sees a trainer reaching it: one line per request
    (``each``), a line of rates every ``interval_s`` while requests come (``rate``), or nothing (``off``)."""

    def __init__(self, mode: str = "off", write=print, interval_s: float = 10.0):
        self.mode, self.write, self.interval_s = mode, write, interval_s
        self._since, self._requests, self._tokens = time.monotonic(), 0, 0

    def __call__(self, method: str, path: str, status: int, seconds: float, tokens: tuple[int, int] | None) -> None:
        if self.mode == "each":
            counted = f"  {tokens[0]} prompt + {tokens[1]} completion tokens" if tokens else ""
            self.write(f"{time.strftime('%H:%M:%S')} {method} {path} {status} {seconds * 1000:.0f} ms{counted}")
        elif self.mode == "rate":
            self._requests += 1
            self._tokens += sum(tokens or (0, 0))
            elapsed = time.monotonic() - self._since
            if elapsed >= self.interval_s:
                self.write(f"{time.strftime('%H:%M:%S')} {self._requests} requests in {elapsed:.0f} s "
                           f"({self._requests / elapsed:.1f}/s), {self._tokens / elapsed:.0f} tokens/s")
                self._since, self._requests, self._tokens = time.monotonic(), 0, 0


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch_size: int = 32,
               batch_wait_s: float = 0.005, max_pending: int = 256, log: RequestLog | None = None,
               max_logprobs: int = MAX_LOGPROBS, logprobs_mode: Literal["raw", "processed"] = "raw",
               shift_prompt_logprobs: int = 0):
    """The FastAPI application; ``app.state.engine`` is its :class:`Engine`. Past ``max_pending`` requests
    in flight, new ones are refused with 503 and ``Retry-After`` so that memory stays bounded under load.
    ``log`` hears of every request (its status, time and tokens).

    Three settings make the server behave like others that a client must detect (``opdkit.teachers.probe``):
    ``max_logprobs`` caps the log-probs per position (vLLM's ``--max-logprobs``); ``logprobs_mode="processed"``
    returns log-probs of the logits divided by the request's temperature (vLLM's ``processed_logprobs``);
    ``shift_prompt_logprobs=1`` reports at each position the log-probs of the next one, the echoed tokens
    themselves unchanged (what llama-cpp-python 0.3.36 does to an echoed prompt that lacks the BOS).
    The last two exist to test clients against: OPD needs neither."""
    engine = Engine(model, tokenizer, max_batch_size, batch_wait_s, logprobs_mode)
    app = FastAPI(title="opd serve-teacher", version="1")
    app.state.engine = engine

    if log is not None and log.mode != "off":
        @app.middleware("http")
        async def logged(request: Request, call_next):
            started = time.perf_counter()
            response = await call_next(request)
            log(request.method, request.url.path, response.status_code, time.perf_counter() - started,
                getattr(request.state, "tokens", None))
            return response

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              "authentication_error", "invalid_api_key")
        return await call_next(request)

    in_flight = [0]

    @app.middleware("http")
    async def bounded(request: Request, call_next):
        if request.method != "POST":
            return await call_next(request)
        if in_flight[0] >= max_pending:
            busy = _error(503, f"server busy: {max_pending} requests in flight; retry later", "server_error", "overloaded")
            busy.headers["Retry-After"] = "1"
            return busy
        in_flight[0] += 1
        try:
            return await call_next(request)
        finally:
            in_flight[0] -= 1

    def token_text(token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else tokenizer.decode([token_id])

    def check(prompt_ids: list[int], max_tokens: int) -> str | None:
        if not prompt_ids:
            return "empty prompt"
        if any(not 0 <= i < len(tokenizer) for i in prompt_ids):
            return f"token ids must lie in [0, {len(tokenizer)})"
        if len(prompt_ids) + max_tokens > engine.context:
            return f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} exceeds the context of {engine.context}"
        return None

    def too_many(*asked: int | None):
        k = max((a for a in asked if a is not None), default=0)
        if k > max_logprobs:
            return _error(400, f"requested {k} log-probs per position, which is greater than the max allowed: "
                               f"{max_logprobs} (opd serve-teacher --max-logprobs raises it)")
        return None

    def wrong_model(name: str | None):
        if name in (None, model_name) or name in engine.adapters.names():
            return None
        served = [model_name, *engine.adapters.names()]
        return _error(404, f"model {name!r} is not served here; this server serves {served}", code="model_not_found")

    def adapter(name: str | None) -> str | None:
        return None if name in (None, model_name) else name

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "opdkit", "max_model_len": engine.context}
        adapters = [{"id": name, **card, "root": path, "parent": model_name}
                    for name, path in engine.adapters.paths.items()]
        return {"object": "list", "data": [{"id": model_name, **card}, *adapters]}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if body.lora_name == model_name:
            return _error(400, f"lora_name {body.lora_name!r} is the base model's name: give the adapter another")
        try:
            await engine.call(engine.adapters.load, body.lora_name, body.lora_path, body.load_inplace)
        except AdapterError as exc:
            return _error(exc.status, str(exc))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            await engine.call(engine.adapters.unload, body.lora_name)
        except AdapterError as exc:
            return _error(exc.status, str(exc))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if error := wrong_model(body.model) or too_many(body.logprobs, body.prompt_logprobs):
            return error
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        for ids in encoded:
            if problem := check(ids, body.max_tokens):
                return _error(400, problem)
        want = [body.logprobs, body.prompt_logprobs]
        top_k = max((k for k in want if k is not None), default=None)
        jobs = [_Job(ids, body.max_tokens, body.temperature, body.top_p, body.n, body.stops(), top_k,
                     adapter(body.model), body.seed) for ids in encoded]
        results = await asyncio.gather(*(engine.submit(job) for job in jobs))
        choices, completion_tokens = [], 0
        for prompt, ids, sequences in zip(prompts, encoded, results):
            for seq in sequences:
                new = seq.ids[seq.prompt_len:]
                completion_tokens += len(new)
                if shift_prompt_logprobs and top_k is not None:
                    seq = _shifted(seq, shift_prompt_logprobs)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if body.echo:
                    text = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) + text
                choice = {"index": len(choices), "text": text, "finish_reason": seq.finish_reason,
                          "logprobs": None if body.logprobs is None else
                          _legacy_logprobs(seq, body.logprobs, body.echo, token_text, body.return_tokens_as_token_ids)}
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _prompt_logprobs(seq, body.prompt_logprobs, tokenizer)
                choices.append(choice)
        prompt_tokens = sum(len(ids) for ids in encoded)
        request.state.tokens = (prompt_tokens, completion_tokens)
        return {"id": f"cmpl-{secrets.token_hex(8)}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if error := wrong_model(body.model) or too_many(body.top_logprobs):
            return error
        messages = body.messages
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return _error(400, "messages must be a non-empty list of {'role': ..., 'content': str}")
        if body.continue_final_message:
            if messages[-1].get("role") != "assistant" or len(messages) < 2:
                return _error(400, "continue_final_message needs a final assistant message after the prompt")
            ids = render_prompt(tokenizer, messages[:-1]) + tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        else:
            ids = render_prompt(tokenizer, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens if max_tokens is not None else engine.context - len(ids)
        if problem := check(ids, max_tokens):
            return _error(400, problem)
        top_k = (body.top_logprobs or 0) if body.logprobs else None
        (sequences,) = await asyncio.gather(engine.submit(_Job(ids, max_tokens, body.temperature, body.top_p, body.n,
                                                                body.stops(), top_k, adapter(body.model), body.seed)))
        choices = []
        for seq in sequences:
            new = seq.ids[seq.prompt_len:]
            choices.append({"index": len(choices), "finish_reason": seq.finish_reason,
                            "message": {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)},
                            "logprobs": _chat_logprobs(seq, tokenizer) if body.logprobs else None})
        completion_tokens = sum(len(s.ids) - s.prompt_len for s in sequences)
        request.state.tokens = (len(ids), completion_tokens)
        return {"id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model or model_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(ids) + completion_tokens}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if error := wrong_model(body.model):
            return error
        if (body.prompt is None) == (body.messages is None):
            return _error(400, "give either prompt or messages")
        if body.messages is not None:
            if tokenizer.chat_template is None:
                return _error(400, "this model's tokenizer has no chat template")
            ids = list(tokenizer.apply_chat_template(body.messages, add_generation_prompt=body.add_generation_prompt,
                                                     tokenize=True, return_dict=True)["input_ids"])
        else:
            ids = tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return {"count": len(ids), "max_model_len": engine.context, "tokens": ids}

    return app


def _shifted(seq: Sequence, by: int) -> Sequence:
    """``seq`` with every position's log-probs moved ``by`` positions earlier (the last ones repeated): a fault."""
    move = lambda values: values[by:] + values[-by:]  # noqa: E731
    return dataclasses.replace(seq, token_logprobs=move(seq.token_logprobs), topk=move(seq.topk), ranks=move(seq.ranks))


def _top_dict(seq: Sequence, position: int, k: int, token_text) -> dict[str, float]:
    """Top-k at sequence position ``position`` (>= 1) plus the actual token, as ``{text: logprob}``."""
    out: dict[str, float] = {}
    for token_id, value in seq.topk[position - 1][:k]:
        out.setdefault(token_text(token_id), value)
    out.setdefault(token_text(seq.ids[position]), seq.token_logprobs[position - 1])
    return out


def _legacy_logprobs(seq: Sequence, k: int, echo: bool, token_text, as_ids: bool) -> dict:
    """OpenAI legacy completions shape; with ``echo`` the prompt positions come first (the first is None)."""
    start = 0 if echo else seq.prompt_len
    tokens = [token_text(i, as_ids) for i in seq.ids[start:]]
    text = lambda i: token_text(i, as_ids)  # noqa: E731
    token_logprobs = [None if j == 0 else seq.token_logprobs[j - 1] for j in range(start, len(seq.ids))]
    top = [None if j == 0 else _top_dict(seq, j, k, text) if k else {} for j in range(start, len(seq.ids))]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _prompt_logprobs(seq: Sequence, k: int, tokenizer) -> list[dict | None]:
    """vLLM shape: per prompt position ``{str(id): {"logprob", "rank", "decoded_token"}}``, None first."""
    out: list[dict | None] = [None]
    for j in range(1, seq.prompt_len):
        entries = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": tokenizer.decode([i])}
                   for r, (i, v) in enumerate(seq.topk[j - 1][:k])}
        actual = seq.ids[j]
        entries.setdefault(str(actual), {"logprob": seq.token_logprobs[j - 1], "rank": seq.ranks[j - 1],
                                         "decoded_token": tokenizer.decode([actual])})
        out.append(entries)
    return out


def _chat_logprobs(seq: Sequence, tokenizer) -> dict:
    def entry(token_id: int, value: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for j in range(seq.prompt_len, len(seq.ids)):
        item = entry(seq.ids[j], seq.token_logprobs[j - 1])
        item["top_logprobs"] = [entry(i, v) for i, v in seq.topk[j - 1]]
        content.append(item)
    return {"content": content}


# ------------------------------------------------------------------------------------------- running it


def load_app(model_path: str, name: str | None = None, api_key: str | None = None, max_batch_size: int = 32,
             max_pending: int = 256, log: RequestLog | None = None, max_logprobs: int = MAX_LOGPROBS):
    """The app for a local model folder or ``builtin:`` name, on the best device, in float32."""
    from .models import load_model, load_tokenizer, pick_device

    model = load_model(model_path, pick_device())
    return create_app(model, load_tokenizer(model_path), name or model_path, api_key, max_batch_size,
                      max_pending=max_pending, log=log, max_logprobs=max_logprobs)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run ``app`` with uvicorn in a background thread; yields ``http://host:port/v1``; stops on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    else:
        raise RuntimeError("the server did not start within 5 s")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def config_snippet(host: str, port: int, name: str, api_key: bool) -> str:
    """The ``teacher:`` section a training config needs to reach this server."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a wildcard listens everywhere; name one address
    lines = ["teacher:", "  kind: server", f"  base_url: http://{reach}:{port}/v1", f"  model: {name}"]
    if api_key:
        lines.append("  api_key_env: OPD_SERVE_API_KEY   # the variable holding the key the server was given")
    return "\n".join(lines)


def serve(model_path: str, host: str, port: int, api_key: str | None, name: str | None, max_batch_size: int,
          max_pending: int = 256, threads: int | None = None, log_requests: str = "each",
          max_logprobs: int = MAX_LOGPROBS) -> None:
    """Serve until interrupted (the ``opd serve-teacher`` command)."""
    import uvicorn

    from .models import set_threads

    set_threads(threads)  # oversubscribed OpenMP threads make small models 10-25x slower
    app = load_app(model_path, name, api_key, max_batch_size, max_pending, RequestLog(log_requests, flush_print),
                   max_logprobs)
    flush_print(f"serving {name or model_path} on http://{host}:{port}/v1 (Ctrl-C stops it). In a training config:\n"
                f"{config_snippet(host, port, name or model_path, api_key is not None)}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def flush_print(line: str) -> None:
    print(line, flush=True)  # seen at once through a pipe or a log file
