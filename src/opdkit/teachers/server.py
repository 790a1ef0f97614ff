"""A teacher behind an OpenAI-compatible server: ours (``opd serve-teacher``), vLLM, SGLang, llama.cpp.

Scoring sends the student's exact token ids (prompt + completion through its end token) as the prompt
of ``/v1/completions`` with ``echo``, ``logprobs: k``, vLLM's ``prompt_logprobs: k`` and
``return_tokens_as_token_ids``, temperature 1 and ``max_tokens: 1`` (llama.cpp reads 0 as "no limit";
the one sampled token is ignored). The answer is read from ``prompt_logprobs`` (ids) when the server
gives it, else from the legacy ``logprobs`` (``token_id:N`` or token text mapped back to ids through
the student's tokenizer). Every echoed token is checked against the ids sent: a server that tokenized
differently is reported, never silently scored.

Only the sampled token's log-prob and the top-k are available, so ``support: full`` (``gkd`` without
``top_k``) is refused; ``opd`` (token) and ``gkd`` with ``top_k <= teacher.top_k`` work.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import httpx
import torch
from rich.console import Console

from ..data import Example, render_completion, render_prompt
from ..errors import OPDError
from ..rollout import Rollouts
from . import Support, TeacherSignal
from .context import TeacherContext

if TYPE_CHECKING:
    from .probe import Probe


class TeacherUnavailable(OPDError):
    """The teacher did not answer a request within the retry budget."""


class Refused(OPDError):
    """The server answered 4xx (other than 408/429): the request itself is wrong, so it is not retried."""


class Malformed(ValueError):
    """A 200 answer that cannot be used (bad JSON, missing or mis-sized fields): retried like a 5xx."""


@dataclass
class _Replica:
    url: str
    down_until: float = 0.0


class ApiClient:
    """Concurrent JSON POSTs over replicas with retries, backoff with full jitter, and an optional disk cache.

    ``map(path, payloads, check)`` returns one parsed answer per payload, in order, or raises: a request is
    never dropped or answered twice. Retried: connection errors, timeouts, 408/429/5xx (``Retry-After``
    honoured) and answers ``check`` rejects as :class:`Malformed`; other 4xx stop at once with the server's
    message. The sleep before retry ``a`` is ``uniform(0, min(max_backoff, backoff * 2**a))``, at least
    ``Retry-After``. A failing replica leaves the rotation for ``replica_cooldown_s``.

    ``role`` (teacher, student) and ``section`` (the config section of ``spec``) name the server in messages.
    """

    def __init__(self, spec, cache_dir: str | None = None, console: Console | None = None, role: str = "teacher",
                 section: str = "teacher"):
        import os

        self.role, self.section = role, section
        urls = [spec.base_url] if isinstance(spec.base_url, str) else list(spec.base_url)
        if not urls:
            raise OPDError(f"{section}.base_url is an empty list: give at least one server URL")
        self.replicas = [_Replica(u.rstrip("/")) for u in urls]
        self.spec = spec
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise OPDError(f"{section}.api_key_env names {spec.api_key_env!r}, which is not set: export it")
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(spec.timeout_s),
                                 limits=httpx.Limits(max_connections=spec.concurrency * 2))
        self.cache = Path(cache_dir) if cache_dir else None
        self.console = console or Console(stderr=True)
        self._lock = threading.Lock()
        self._next = 0
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix=f"opd-{role}")
        self.usage: dict[str, float] = {}

    def count(self, **values: float) -> None:
        with self._lock:
            for key, value in values.items():
                self.usage[key] = self.usage.get(key, 0) + value

    def take_usage(self) -> dict[str, float]:
        """Counters since the last call: requests, http_calls, retries, cache_hits, prompt/completion tokens."""
        with self._lock:
            usage, self.usage = self.usage, {}
        return usage

    def _pick(self) -> _Replica:
        """Round-robin over replicas in rotation; if none is, the one that comes back first."""
        with self._lock:
            now = time.monotonic()
            live = [r for r in self.replicas if r.down_until <= now]
            self._next += 1
            return live[self._next % len(live)] if live else min(self.replicas, key=lambda r: r.down_until)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0, min(self.spec.max_backoff_s, self.spec.backoff_s * 2**attempt))
        return max(delay, retry_after or 0.0)

    def post(self, path: str, payload: dict, check: Callable[[dict], None] = lambda body: None,
             max_retries: int | None = None) -> dict:
        """One request until it succeeds; see the class docstring for what is retried."""
        max_retries = self.spec.max_retries if max_retries is None else max_retries
        key = None
        if self.cache is not None:
            key = hashlib.sha256(json.dumps([path, payload], sort_keys=True).encode()).hexdigest()
            cached = self.cache / key[:2] / f"{key}.json"
            if cached.is_file():
                self.count(requests=1, cache_hits=1)
                return json.loads(cached.read_text())
        self.count(requests=1)
        attempt, failures = 0, []
        while True:
            replica = self._pick()
            retry_after = None
            self.count(http_calls=1)
            try:
                response = self.http.post(replica.url + path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, dropped mid-answer, timed out
                failure = f"{replica.url}: {type(exc).__name__} {exc}".strip()
            else:
                status = response.status_code
                if status == 200:
                    try:
                        body = response.json()
                        check(body)
                    except (ValueError, KeyError, TypeError, IndexError) as exc:  # JSONDecodeError is a ValueError
                        failure = f"{replica.url}: malformed answer ({type(exc).__name__}: {str(exc)[:200]})"
                    else:
                        self.count(**{f"{k}": float(v) for k, v in (body.get("usage") or {}).items()
                                       if k in ("prompt_tokens", "completion_tokens") and isinstance(v, (int, float))})
                        if key is not None:
                            cached.parent.mkdir(parents=True, exist_ok=True)
                            tmp = cached.with_suffix(f".tmp{threading.get_ident()}")
                            tmp.write_text(json.dumps(body))
                            tmp.replace(cached)
                        return body
                elif status in (408, 429) or status >= 500:
                    failure = f"{replica.url}: HTTP {status} {response.text[:200]}"
                    header = response.headers.get("retry-after")
                    retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
                else:
                    hint = (f" (set {self.section}.api_key_env to the variable holding the server's key)"
                            if status == 401 else "")
                    raise Refused(f"{self.role} server {replica.url}{path} refused the request with HTTP {status}: "
                                   f"{response.text[:300]}{hint}")
            failures.append(failure)
            with self._lock:
                replica.down_until = time.monotonic() + max(self.spec.replica_cooldown_s, retry_after or 0.0)
            attempt += 1
            self.count(retries=1)
            if attempt > max_retries:
                if self.spec.on_failure == "raise" or max_retries < self.spec.max_retries:
                    raise TeacherUnavailable(
                        f"{self.role} request to {path} failed {attempt} times (max_retries {max_retries}); "
                        f"last errors: {failures[-3:]}. Check that the server at {[r.url for r in self.replicas]} "
                        f"answers, or raise {self.section}.max_retries / timeout_s, or set "
                        f"{self.section}.on_failure: wait")
                self.console.print(f"[yellow]{self.role} unavailable after {attempt} tries ({failure}); "
                                   "on_failure: wait, so retrying")
                attempt = 0
            time.sleep(self._backoff(attempt, retry_after))

    def map(self, path: str, payloads: list[dict], check: Callable[[dict], None] = lambda body: None) -> list[dict]:
        """All answers in order, ``concurrency`` at a time; the first failure cancels the rest and raises."""
        futures = [self._pool.submit(self.post, path, p, check) for p in payloads]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        """Wait for requests still in flight, then release the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()

    def models(self) -> list[str]:
        """Model names from ``GET /v1/models`` of the first replica that answers."""
        return [card["id"] for card in self.model_cards()]

    def model_cards(self) -> list[dict]:
        """The entries of ``GET /v1/models`` (``id``, and ``owned_by``, ``max_model_len`` where the server says)."""
        errors = []
        for replica in self.replicas:
            try:
                response = self.http.get(replica.url + "/models")
            except httpx.TransportError as exc:
                errors.append(f"{replica.url}: {type(exc).__name__} {exc}")
                continue
            if response.status_code == 401:
                raise OPDError(f"{self.role} server {replica.url} refused the API key (HTTP 401): set "
                               f"{self.section}.api_key_env to the variable that holds the server's key")
            try:
                cards = response.json()["data"]
                if all(isinstance(card["id"], str) for card in cards):
                    return cards
            except (ValueError, KeyError, TypeError):
                pass
            errors.append(f"{replica.url}: HTTP {response.status_code} {response.text[:200]}")
        raise TeacherUnavailable(f"no {self.role} replica answered GET /models: {errors}. Start the server "
                                 f"(opd serve-teacher MODEL --port 8000) or fix {self.section}.base_url")

    def post_once(self, path: str, payload: dict, root: bool = False) -> dict | None:
        """One POST to the first replica, not retried: the JSON answer, or None for any failure (an endpoint the
        server lacks, a refusal, no answer). ``root``: the path is under the server's root, not the base URL
        (vLLM serves ``/tokenize`` there)."""
        url = self.replicas[0].url
        if root and url.endswith("/v1"):
            url = url[: -len("/v1")]
        self.count(http_calls=1)
        try:
            response = self.http.post(url + path, json=payload)
            return response.json() if response.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            return None

    def post_each(self, path: str, payload: dict) -> list[httpx.Response]:
        """One POST to every replica, not retried, for state each must hold (a loaded adapter): the responses, in
        the order of ``base_url``; a replica that does not answer raises :class:`TeacherUnavailable`."""
        responses = []
        for replica in self.replicas:
            self.count(http_calls=1)
            try:
                responses.append(self.http.post(replica.url + path, json=payload))
            except httpx.TransportError as exc:
                raise TeacherUnavailable(f"{self.role} server {replica.url} did not answer POST {path} "
                                         f"({type(exc).__name__} {exc}): check that it runs, or fix "
                                         f"{self.section}.base_url") from None
        return responses

    def check_model(self, name: str) -> None:
        served = self.models()
        if name not in served:
            raise OPDError(f"{self.section}.model {name!r} is not served at {self.replicas[0].url}; it serves {served}")


class TokenMap:
    """Token text -> student id, for servers that name top-k tokens by text (llama.cpp, OpenAI legacy).

    Texts shared by several ids (or that decode to nothing printable) are ambiguous and mapped to None.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._ids: dict[str, int | None] | None = None

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tokenizer.decode([token_id])
        return self._text[token_id]

    def id(self, text: str) -> int | None:
        if text.startswith("token_id:"):
            return int(text[len("token_id:"):])
        if self._ids is None:
            self._ids = {}
            for i in range(len(self.tokenizer)):
                t = self.text(i)
                self._ids[t] = None if t in self._ids or not t or "\ufffd" in t else i
        return self._ids.get(text)

    def same(self, text: str, token_id: int) -> bool | None:
        """Whether an echoed token is ``token_id``; None when the text cannot tell (bytes, special tokens)."""
        if text.startswith("token_id:"):
            return int(text[len("token_id:"):]) == token_id
        mine = self.text(token_id)
        if not text or not mine or "\ufffd" in text or "\ufffd" in mine:
            return None
        return text == mine


@dataclass
class Scored:
    """Per position ``j >= 1`` of a sequence: ``log p(ids[j] | ids[:j])`` and the top-k ``(id, logprob)``."""

    token_logprobs: list[float]
    topk: list[list[tuple[int, float]]]
    unmapped: int = 0  # top-k entries whose text named no single student token


def parse_scores(choice: dict, ids: list[int], k: int, tokens: TokenMap) -> Scored:
    """Read one echoed choice; raises :class:`Malformed` for a broken answer, OPDError for a tokenization mismatch."""
    n = len(ids)
    if choice.get("prompt_logprobs"):
        entries = choice["prompt_logprobs"]
        if len(entries) < n:
            raise Malformed(f"prompt_logprobs has {len(entries)} positions for a prompt of {n} tokens")
        token_lp, topk = [], []
        for j in range(1, n):
            entry = {int(i): float(v["logprob"] if isinstance(v, dict) else v) for i, v in entries[j].items()}
            if ids[j] not in entry:
                raise _mismatch(j, ids, f"the server's position {j} does not list token id {ids[j]}", tokens)
            token_lp.append(entry[ids[j]])
            topk.append(sorted(entry.items(), key=lambda kv: -kv[1])[:k])
        return Scored(token_lp, topk)
    logprobs = choice.get("logprobs")
    if not logprobs or "tokens" not in logprobs:
        raise Malformed("the answer has neither prompt_logprobs nor echoed logprobs; the server must support "
                        "echo with logprobs (OpenAI legacy completions) or vLLM's prompt_logprobs")
    echoed, values, tops = logprobs["tokens"], logprobs["token_logprobs"], logprobs.get("top_logprobs") or []
    echo_index = {j: i for i, j in enumerate(_echo_positions(echoed, ids, tokens))}
    token_lp, topk, unmapped = [], [], 0
    for j in range(1, n):
        i = echo_index.get(j)
        if i is None or values[i] is None:  # a position the server left out of its echo: log-prob unknown
            token_lp.append(math.nan)
            topk.append([])
            continue
        token_lp.append(float(values[i]))
        pairs = []
        for text, value in sorted(((tops[i] if i < len(tops) else None) or {}).items(), key=lambda kv: -kv[1]):
            token_id = tokens.id(text)
            if token_id is None:
                unmapped += 1
            elif token_id not in {p[0] for p in pairs}:
                pairs.append((token_id, float(value)))
        topk.append(pairs[:k])
    return Scored(token_lp, topk, unmapped)


def _echo_positions(echoed: list[str], ids: list[int], tokens: TokenMap) -> list[int]:
    """The sequence position of each echoed token. OpenAI, vLLM and ours echo every token; llama-cpp-python
    leaves out the first token when it is the model's BOS and every later occurrence of that id. Every
    comparable echoed token must equal the student's, else the tokenizations differ (reported)."""
    n = len(ids)
    layouts = [list(range(n)), [j for j in range(1, n) if ids[j] != ids[0]]]
    for positions in layouts:
        if len(echoed) >= len(positions) and all(tokens.same(echoed[i], ids[j]) is not False
                                                 for i, j in enumerate(positions)):
            return positions
    j = next((j for j in range(min(n, len(echoed))) if tokens.same(echoed[j], ids[j]) is False), min(n, len(echoed)) - 1)
    raise _mismatch(j, ids, f"{len(echoed)} tokens echoed for {n} sent; at position {j} the server has "
                            f"{echoed[j]!r}, the student {tokens.text(ids[j])!r} (id {ids[j]})", tokens)


def _mismatch(j: int, ids: list[int], detail: str, tokens: TokenMap) -> OPDError:
    return OPDError(f"the teacher server's tokenization differs from the student's ({detail}), so its log-probs "
                    f"would belong to other tokens. Serve a teacher with exactly the student's tokenizer "
                    f"(same vocabulary and ids); text near the mismatch: {tokens.tokenizer.decode(ids[max(0, j - 8):j + 1])!r}")


def sequences(rollouts: Rollouts) -> list[tuple[list[int], int]]:
    """Per row: unpadded ``prompt + completion`` ids (completion through its end token) and the prompt length."""
    out = []
    for p_ids, p_mask, c_ids, c_mask in zip(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                            rollouts.completion_mask):
        prompt = p_ids[p_mask.bool()].tolist()
        out.append((prompt + c_ids[c_mask.bool()].tolist(), len(prompt)))
    return out


def rollouts_from_texts(tokenizer, examples: list[Example], texts: list[str], stopped: list[bool],
                        max_completion_length: int) -> Rollouts:
    """Teacher text answers as student-tokenized Rollouts (``source="teacher"``): the reply is tokenized as
    the chat template writes it, so an answer that ended (``stopped``) keeps its end token."""
    from ..data import left_pad, right_pad

    prompt_ids, prompt_mask = left_pad([render_prompt(tokenizer, e.messages) for e in examples], tokenizer.pad_token_id)
    completions = []
    for example, text, ended in zip(examples, texts, stopped):
        ids = render_completion(tokenizer, example.messages, text)
        if not ended:  # cut by max_tokens: drop the end-of-turn the template adds
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        completions.append(ids[:max_completion_length])
    completion_ids, completion_mask = right_pad(completions, tokenizer.pad_token_id, max(1, max(map(len, completions))))
    truncated = torch.tensor([tokenizer.eos_token_id not in c for c in completions])
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask.float(), truncated, examples, "teacher")


class ServerTeacher:
    """``score`` through ``/v1/completions`` (see the module docstring); ``sample`` for teacher states."""

    model = None
    returns_logprobs = True

    def __init__(self, spec, tokenizer, context: TeacherContext | None = None, console: Console | None = None):
        self.spec, self.tokenizer = spec, tokenizer
        self.client = ApiClient(spec, console=console)
        self.tokens = TokenMap(tokenizer)
        self.unmapped = 0
        self.prompt_as = "ids" if spec.prompt_as == "auto" else spec.prompt_as
        self.top_k = spec.top_k if isinstance(spec.top_k, int) else None  # auto: chosen by probe()
        self.findings = None  # the probe's, for the run log
        self.context = context  # teacher.prompt: the teacher's own view of each prompt (teachers.context)

    def take_usage(self) -> dict[str, float]:
        """Calls and tokens since the last ``score`` or ``take_usage`` (``score`` reports its own in the signal)."""
        return self.client.take_usage()

    def probe(self, top_k_needed: int = 1, chat_template: bool = True) -> "Probe":
        """Before training: ask the server what it supports (``opdkit.teachers.probe``), choose how to send the
        prompt and how many log-probs to ask for (``teacher.top_k: auto``), and refuse, with the reasons and
        the fixes, what the objective (which reads ``top_k_needed`` log-probs per position) cannot use.
        ``chat_template``: prompts are rendered with the student's chat template, so the server's must agree."""
        from .probe import probe

        found = probe(self, top_k_needed, chat_template)
        problems = found.problems(top_k_needed, self.spec.top_k, chat_template)
        if problems:
            raise OPDError("the teacher server cannot feed this run:\n" + "\n".join(f"  - {p}" for p in problems) +
                           "\nwhat the probe found:\n" + "\n".join(f"  {line}" for line in found.lines()))
        self.top_k = found.top_k(self.spec.top_k, top_k_needed)
        self.findings = found
        return found

    def _payload(self, ids: list[int], k: int) -> dict:
        prompt = self.tokenizer.decode(ids) if self.prompt_as == "text" else ids
        return {"model": self.spec.model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "echo": True,
                "logprobs": k, "prompt_logprobs": k, "return_tokens_as_token_ids": True}

    def score_ids(self, rows: list[tuple[list[int], int]], k: int) -> list[Scored]:
        """Raw per-position scores of ``(ids, prompt_length)`` rows (top-k lists may be short where a server
        names tokens by texts that map to no single student id)."""
        payloads = [self._payload(ids, k) for ids, _ in rows]

        def check(body: dict) -> None:
            if len(body["choices"]) != 1:
                raise Malformed(f"expected 1 choice, got {len(body['choices'])}")

        answers = self.client.map("/completions", payloads, check)
        return [parse_scores(a["choices"][0], ids, k, self.tokens) for a, (ids, _) in zip(answers, rows)]

    def score(self, rollouts: Rollouts, support: Support = "token", top_k: int | None = None,
              entropy: bool = False) -> TeacherSignal:
        """``entropy`` is never known here (a server gives a top-k, not the whole distribution): ``signal.entropy``
        stays None and an entropy gate falls back to the top-k's."""
        if support == "full":
            raise OPDError("this objective needs the teacher's full-vocabulary log-probs, which a server does not return "
                           "(only the sampled token's and the top-k): use objective.method opd, or gkd with objective.top_k "
                           f"<= teacher.top_k ({self.top_k or self.spec.top_k}), or a local teacher")
        k = top_k if support == "topk" else 1
        if self.top_k is None:
            raise OPDError("teacher.top_k is auto: probe() the server first, which chooses it")
        if k > self.top_k:
            raise OPDError(f"objective.top_k {k} exceeds teacher.top_k {self.top_k}, the log-probs the server "
                           "returns per position: lower objective.top_k or raise teacher.top_k (if the server allows)")
        if self.context is not None:  # the same completion tokens after the teacher's own prompt
            rollouts = self.context.view(rollouts)
        rows = sequences(rollouts)
        scored = self.score_ids(rows, k)
        B, C = rollouts.completion_ids.shape
        token = torch.zeros(B, C)
        ids = torch.arange(k).repeat(B, C, 1)  # padding positions: a finite uniform placeholder, masked later
        values = torch.full((B, C, k), -math.log(k))
        for b, ((seq, p), s) in enumerate(zip(rows, scored)):
            width = len(seq) - p
            if any(math.isnan(v) for v in s.token_logprobs[p - 1:]):
                raise OPDError("the teacher server's echo leaves out a completion token, so its log-prob is unknown "
                               "(llama-cpp-python omits every token equal to the model's BOS, here the first prompt "
                               "token): use a server that echoes every token (ours, vLLM)")
            token[b, :width] = torch.tensor(s.token_logprobs[p - 1:])
            if support == "topk":
                for t in range(width):
                    pairs = s.topk[p - 1 + t]
                    if len(pairs) < k:
                        raise OPDError(f"the teacher server returned {len(pairs)} usable top-k entries where {k} were "
                                       "asked (texts that name no single student token are dropped): lower objective.top_k")
                    ids[b, t] = torch.tensor([i for i, _ in pairs])
                    values[b, t] = torch.tensor([v for _, v in pairs])
            self.unmapped += s.unmapped
        device = rollouts.completion_ids.device
        signal = TeacherSignal(token.to(device) * rollouts.completion_mask, usage=self.client.take_usage())
        if support == "topk":
            signal.topk_ids, signal.topk_logprobs = ids.to(device), values.to(device)
        return signal

    def continue_ids(self, prefixes: list[list[int]], max_new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
        """Continuations of the prefixes through ``/v1/completions``, sent as the student's token ids (as text with
        ``prompt_as: text``). The ids come back as ``token_id:N`` tokens (``return_tokens_as_token_ids``, ours and
        vLLM) or as token texts mapped to the student's ids; a continuation with a text that names no single id is
        tokenized from its text instead, counted in the usage as ``bridge_retokenized``."""
        payloads = [{"model": self.spec.model, "prompt": self.tokenizer.decode(p) if self.prompt_as == "text" else p,
                     "max_tokens": max_new_tokens, "temperature": temperature, "logprobs": 0,
                     "return_tokens_as_token_ids": True} for p in prefixes]
        answers = self.client.map("/completions", payloads, _one_choice)
        out = []
        for answer in answers:
            choice = answer["choices"][0]
            tokens = (choice.get("logprobs") or {}).get("tokens")
            ids = None if tokens is None else [self.tokens.id(t) for t in tokens]
            if ids is None or None in ids:
                ids = self.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
                if choice.get("finish_reason") == "stop":
                    ids.append(self.tokenizer.eos_token_id)
                self.client.count(bridge_retokenized=1)
            eos = self.tokenizer.eos_token_id
            out.append(ids[: ids.index(eos) + 1] if eos in ids else ids[:max_new_tokens])
        return out

    def sample(self, examples: list[Example], max_completion_length: int, temperature: float = 1.0,
               top_p: float = 1.0) -> Rollouts:
        """Teacher completions of the prompts (for teacher-state methods and greedy teacher accuracy), written in the
        teacher's view and returned after the student's prompts."""
        seen = examples if self.context is None else self.context.examples(examples)
        prompts = [render_prompt(self.tokenizer, e.messages) for e in seen]
        payloads = [{"model": self.spec.model, "prompt": self.tokenizer.decode(p) if self.prompt_as == "text" else p,
                     "max_tokens": max_completion_length, "temperature": temperature, "top_p": top_p}
                    for p in prompts]
        answers = self.client.map("/completions", payloads, _one_choice)
        texts = [a["choices"][0]["text"] for a in answers]
        stopped = [a["choices"][0].get("finish_reason") == "stop" for a in answers]
        return rollouts_from_texts(self.tokenizer, examples, texts, stopped, max_completion_length)  # student's view


def _one_choice(body: dict) -> None:
    if len(body["choices"]) != 1 or not isinstance(body["choices"][0]["text"], str):
        raise Malformed("expected exactly one choice with text")
