"""What a teacher server supports, asked before training, and whether the run's objective can use it.

A server can answer every request and still feed OPD wrong numbers: fewer top-k log-probs than the
objective reads, log-probs listed one position off from the tokens they belong to (llama-cpp-python 0.3.36
with a prompt that lacks the BOS), prompt log-probs passed through the sampler's temperature (vLLM's
``--logprobs-mode processed_logprobs``), or a chat template that renders prompts unlike the student's.
:func:`probe` measures each with a few short requests; :meth:`Probe.problems` names what rules the
objective out and the fix; :meth:`Probe.lines` says it all in plain words for the run log.

How each is measured, without trusting the server to say it:

- top-k: ask for ``max(20, what the run needs)`` log-probs per position; a refusal (4xx) halves the ask
  down to the largest accepted one. Entries per position are counted, not counting the sent token where
  the server adds it below its top-k (vLLM, ours and llama-cpp-python do).
- alignment: the probe prompt is scored three times, the last digit changed (``46``, ``47``, ``48``). A
  causal model's distributions agree up to and including that digit's position ``m`` and differ from
  ``m + 1`` on, where the context first differs; a server whose first differing position is ``m`` lists
  each position's log-probs one position early, ``m + 2`` one late.
- temperature: the same prompt at temperature 1 and 0.5; the model's own log-probs do not depend on it.
- chat template: the server's rendering of the probe message through vLLM's ``/tokenize`` (ours has it
  too), else the prompt length its ``/v1/chat/completions`` counts, against the student's rendering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..data import render_prompt
from ..errors import OPDError
from .server import Refused, TeacherUnavailable, _echo_positions, _one_choice, parse_scores

MESSAGES = [[{"role": "user", "content": f"Hello, world! 12+34={answer}"}] for answer in (46, 47, 48)]
ASK_TOP_K = 20  # asked first (vLLM's and our default cap); the most ``teacher.top_k: auto`` takes
TOLERANCE = 1e-2  # nats: two answers for the same context agree within this (servers batch nondeterministically)


@dataclass
class Probe:
    """A server's answers to the probe. ``None`` in a finding: the probe could not tell (``*_how`` says why)."""

    server: str
    models: list[str]
    owned_by: str | None
    max_model_len: int | None
    prompt_as: str  # ids | text: how the student's tokens are sent
    asked_top_k: int  # the most log-probs per position asked for
    max_top_k: int  # the most the server returned per position (== asked_top_k: its cap, if any, is higher)
    refused_top_k: int | None  # the smallest ask it refused
    vocabulary: int  # the student's: a server cannot return more
    prompt_logprobs: str | None  # "prompt_logprobs" (vLLM's, by id), "echo" (legacy logprobs), None: neither
    aligned: bool | None
    shift: int | None  # positions the log-probs come early (+1) or late (-1); 0 aligned
    aligned_how: str
    temperature_applied_to_prompt: bool | None
    temperature_how: str
    chat_template_matches: bool | None
    chat_template_how: str

    @property
    def capped(self) -> bool:
        """Whether the server returned fewer log-probs per position than asked (and than the vocabulary)."""
        return self.max_top_k < min(self.asked_top_k, self.vocabulary - 1)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "capped": self.capped, "findings": self.lines()}

    def lines(self) -> list[str]:
        """One plain-words line per finding, for the run log."""
        card = ", ".join(x for x in (f"owned by {self.owned_by}" if self.owned_by else "",
                                     f"context {self.max_model_len}" if self.max_model_len else "") if x)
        lines = [f"identity: serves {', '.join(self.models)}" + (f" ({card})" if card else "") +
                 f"; the student's tokens go as {'token ids' if self.prompt_as == 'ids' else 'their text'}"]
        if self.capped:
            refused = f" (refused {self.refused_top_k})" if self.refused_top_k else ""
            lines.append(f"top-k: at most {self.max_top_k} log-probs per position{refused}")
        else:
            lines.append(f"top-k: {self.max_top_k} log-probs per position when asked for {self.asked_top_k} "
                         "(any cap is higher)")
        lines.append({"prompt_logprobs": "prompt log-probs: come back for the ids sent (vLLM's prompt_logprobs)",
                      "echo": "prompt log-probs: come back in the echoed completion's logprobs",
                      None: "prompt log-probs: none come back"}[self.prompt_logprobs])
        lines.append(f"alignment: {'OK, ' if self.aligned else 'WRONG, ' if self.aligned is False else 'unknown, '}"
                     f"{self.aligned_how}")
        lines.append(f"temperature: {'WRONG, ' if self.temperature_applied_to_prompt else ''}{self.temperature_how}")
        lines.append(f"chat template: {'OK, ' if self.chat_template_matches else 'WRONG, ' if self.chat_template_matches is False else ''}"
                     f"{self.chat_template_how}")
        return lines

    def problems(self, top_k_needed: int, teacher_top_k: int | str, chat_template: bool) -> list[str]:
        """What rules the run out on this server, each with its fix (empty: it can run)."""
        out = []
        if self.prompt_logprobs is None:
            out.append("the server returns no log-probs for the prompt's tokens (neither vLLM's prompt_logprobs nor "
                       "echo with logprobs), so it cannot score the student's tokens: serve the teacher with one that "
                       "does (opd serve-teacher, vLLM, llama.cpp)")
        if self.aligned is False:
            off = f"{abs(self.shift)} position{'s' if abs(self.shift) > 1 else ''} {'early' if self.shift > 0 else 'late'}"
            out.append(f"the server lists each position's log-probs {off} ({self.aligned_how}), so every teacher "
                       f"log-prob would belong to {'a later' if self.shift > 0 else 'an earlier'} token. llama-cpp-python 0.3.36 does this when the "
                       "prompt does not start with the BOS token: render prompts with the BOS (chat templates do), or "
                       "serve the teacher with vLLM or opd serve-teacher")
        if self.temperature_applied_to_prompt:
            out.append("the server passes prompt log-probs through its sampler (the request's temperature changes "
                       "them, and so may its defaults for top-p, top-k and penalties), but OPD needs the model's own "
                       "log-probs: serve raw log-probs (vLLM: --logprobs-mode raw_logprobs, its default)")
        if self.capped and isinstance(teacher_top_k, int) and teacher_top_k > self.max_top_k:
            out.append(f"teacher.top_k is {teacher_top_k} but the server returns at most {self.max_top_k} log-probs per "
                       f"position: set teacher.top_k to {self.max_top_k} or auto, or raise the server's cap (vLLM and "
                       "opd serve-teacher: --max-logprobs)")
        elif self.capped and top_k_needed > self.max_top_k:
            out.append(f"the objective reads the teacher's top {top_k_needed} log-probs per position but the server "
                       f"returns at most {self.max_top_k}: lower the objective's top_k (objective.top_k, and "
                       "trust_region/entropy_gate/cr top_k where set) to at most that, use a sampled-token method "
                       "(opd), or raise the server's cap (vLLM and opd serve-teacher: --max-logprobs)")
        if chat_template and self.chat_template_matches is False:
            out.append(f"the server renders a chat prompt unlike the student's chat template ({self.chat_template_how}), "
                       "so the teacher would score the student's tokens in a context it was not trained on: serve the "
                       "model whose chat template the student uses, or set data.chat_template: false (raw prompts)")
        return out

    def top_k(self, teacher_top_k: int | str, top_k_needed: int) -> int:
        """Log-probs per position to ask for: ``teacher.top_k``, or for ``auto`` the most the server returns,
        at most ``ASK_TOP_K`` unless the objective needs more."""
        if isinstance(teacher_top_k, int):
            return teacher_top_k
        return max(top_k_needed, min(self.max_top_k, ASK_TOP_K))


def probe(teacher, top_k_needed: int = 1, chat_template: bool = True) -> Probe:
    """Ask the server behind ``teacher`` (a ``ServerTeacher``) what it supports; sets ``teacher.prompt_as``.

    Raises only where nothing can be measured (the model is not served, no request is answered, the
    server's tokenization differs from the student's); what the run cannot use is for :meth:`Probe.problems`.
    """
    client, spec, tokenizer = teacher.client, teacher.spec, teacher.tokenizer
    cards = client.model_cards()
    card = next((c for c in cards if c["id"] == spec.model), None)
    if card is None:
        raise OPDError(f"teacher.model {spec.model!r} is not served at {client.replicas[0].url}; it serves "
                       f"{[c['id'] for c in cards]}")
    sequences = [render_prompt(tokenizer, messages) for messages in MESSAGES]
    ids = sequences[0]

    if spec.prompt_as == "auto":  # llama-cpp-python refuses id prompts (with a 500): one try, then text
        teacher.prompt_as = "ids"
        if _ask(teacher, ids, 1) is None:
            teacher.prompt_as = "text"

    asked = max(ASK_TOP_K, top_k_needed, spec.top_k if isinstance(spec.top_k, int) else 0)
    answer, accepted, refused = _ask(teacher, ids, asked), asked, None
    if answer is None:
        low, refused = 0, asked
        while refused - low > 1:
            middle = (low + refused) // 2
            found = _ask(teacher, ids, middle)
            if found is None:
                refused = middle
            else:
                low, answer, accepted = middle, found, middle
        if answer is None:  # not even one log-prob: ask again with retries, for the server's own error
            answer = client.post("/completions", teacher._payload(ids, 1), _one_choice)
            accepted = 1
    choice = answer["choices"][0]
    kind = "prompt_logprobs" if choice.get("prompt_logprobs") else \
        "echo" if (choice.get("logprobs") or {}).get("tokens") else None
    dists = _distributions(choice, ids, teacher.tokens) if kind else []
    returned = min(accepted, max((_counted(*d) for d in dists if d), default=0))

    aligned, shift, aligned_how = None, None, "not measured: no prompt log-probs"
    temperature, temperature_how = None, "not measured: no prompt log-probs"
    if kind:
        k = min(returned, 5) or 1
        answers = client.map("/completions", [teacher._payload(s, k) for s in sequences], _one_choice)
        aligned, shift, aligned_how = _alignment(sequences, [_distributions(a["choices"][0], s, teacher.tokens)
                                                             for a, s in zip(answers, sequences)])
        if aligned:  # the path training takes must accept the answer (it checks the echoed tokens)
            parse_scores(answers[0]["choices"][0], ids, k, teacher.tokens)
        cooler = client.post("/completions", {**teacher._payload(ids, k), "temperature": 0.5}, _one_choice)
        # the last prompt position left out: a server that lists log-probs early fills it from the sampled token
        difference = _difference(_distributions(answers[0]["choices"][0], ids, teacher.tokens)[:-1],
                                 _distributions(cooler["choices"][0], ids, teacher.tokens)[:-1])
        temperature = None if difference is None else difference > TOLERANCE
        temperature_how = ("not measured: no log-probs in common" if difference is None else
                           f"prompt log-probs at temperature 0.5 differ from those at 1 by up to {difference:.3g} nats: "
                           "the server tempers them" if temperature else
                           "prompt log-probs do not depend on the request's temperature (the model's own)")
    matches, matches_how = _chat_template(teacher, chat_template)
    client.take_usage()  # the probe's requests are not the first step's
    return Probe(client.replicas[0].url, [c["id"] for c in cards], card.get("owned_by"), card.get("max_model_len"),
                 teacher.prompt_as, asked, returned, refused, len(tokenizer), kind, aligned, shift, aligned_how,
                 temperature, temperature_how, matches, matches_how)


def _ask(teacher, ids: list[int], k: int) -> dict | None:
    """One scoring request for ``k`` log-probs per position, not retried; None when refused or unanswered."""
    try:
        return teacher.client.post("/completions", teacher._payload(ids, k), _one_choice, max_retries=0)
    except (Refused, TeacherUnavailable):
        return None


Distribution = tuple[dict[str, float], str]  # one position's listed log-probs by token key, and the sent token's key


def _distributions(choice: dict, ids: list[int], tokens) -> list[Distribution | None]:
    """Per sequence position ``j >= 1`` (index ``j - 1``) the log-probs the server lists there, None where it
    lists none (llama-cpp-python leaves BOS ids out of its echo). Raises OPDError when the echoed tokens are
    not the ids sent (reported as a tokenization difference, or as an echo one position off)."""
    n = len(ids)
    out: list[Distribution | None] = [None] * (n - 1)
    if choice.get("prompt_logprobs"):
        for j, entry in enumerate(choice["prompt_logprobs"][1:n], start=1):
            if entry:
                out[j - 1] = ({str(key): float(v["logprob"] if isinstance(v, dict) else v) for key, v in entry.items()},
                              str(ids[j]))
        return out
    logprobs = choice["logprobs"]
    echoed, tops = logprobs["tokens"], logprobs.get("top_logprobs") or []
    try:
        positions = _echo_positions(echoed, ids, tokens)
    except OPDError:
        if len(echoed) >= n - 1 and all(tokens.same(echoed[i], ids[i + 1]) is not False for i in range(n - 1)):
            raise OPDError("the teacher server echoes the prompt one token early (it echoes token i + 1 where the "
                           "student sent token i), so its log-probs cannot be matched to the student's tokens: serve "
                           "the teacher with vLLM or opd serve-teacher") from None
        raise
    for i, j in enumerate(positions):
        if j >= 1 and i < len(tops) and tops[i]:
            out[j - 1] = ({str(key): float(v) for key, v in tops[i].items()}, echoed[i])
    return out


def _counted(listed: dict[str, float], sent: str) -> int:
    """Top-k entries at a position: the sent token is not counted when the server added it below its top-k."""
    others = [v for key, v in listed.items() if key != sent]
    if sent in listed and others and listed[sent] < min(others):
        return len(others)
    return len(listed)


def _differ(a: Distribution | None, b: Distribution | None) -> bool | None:
    """Whether two positions' distributions differ: other top-k tokens, or other log-probs for the same ones. The
    sent tokens are left out (a server adds them below its top-k, with values that depend on the token, not
    the context). None: cannot tell (a position not listed, or a top-k of the sent tokens only)."""
    if a is None or b is None:
        return None
    sent = {a[1], b[1]}
    keys_a, keys_b = a[0].keys() - sent, b[0].keys() - sent
    if not keys_a and not keys_b:
        return None
    return keys_a != keys_b or any(abs(a[0][key] - b[0][key]) > TOLERANCE for key in keys_a)


def _difference(a: list[Distribution | None], b: list[Distribution | None]) -> float | None:
    """The largest log-prob difference between two answers for the same ids, on the tokens both list."""
    gaps = [abs(x[0][key] - y[0][key]) for x, y in zip(a, b) if x and y for key in x[0].keys() & y[0].keys()]
    return max(gaps) if gaps else None


def _alignment(sequences: list[list[int]], answers: list[list[Distribution | None]]) -> tuple[bool | None, int | None, str]:
    """See the module docstring: the first position whose distribution differs between the base sequence and
    each variant must be the one after the changed token."""
    base, n = sequences[0], len(sequences[0])
    changed = [[j for j in range(n) if j < len(s) and s[j] != base[j]] for s in sequences[1:]]
    if any(len(s) != n for s in sequences) or any(len(c) != 1 for c in changed) or changed[0] != changed[1]:
        return None, None, "not measured: the student's tokenizer does not render the probe's digits as one token each"
    m = changed[0][0]
    firsts = []
    for variant in answers[1:]:
        first = next((j for j in range(1, n) if _differ(answers[0][j - 1], variant[j - 1])), None)
        if first is not None:
            firsts.append(first)
    if not firsts:
        return None, None, "not measured: the server's listed log-probs do not change with the context"
    first = min(firsts)  # a late first difference can come from two tokens of equal log-prob; an early one cannot
    shift = m + 1 - first
    where = f"a token changed at position {m} changes the listed log-probs from position {first} on"
    if shift == 0:
        return True, 0, f"log-probs belong to the tokens they are listed with ({where}, as a causal model's do)"
    return False, shift, f"{where}, where a causal model's change from {m + 1} on"


def _chat_template(teacher, chat_template: bool) -> tuple[bool | None, str]:
    """Whether the server renders the probe message as the student does (vLLM's /tokenize, else the prompt
    length that /v1/chat/completions counts)."""
    tokenizer, client, spec = teacher.tokenizer, teacher.client, teacher.spec
    if not chat_template or tokenizer.chat_template is None:
        return None, "not compared: prompts are sent as raw text (data.chat_template: false, or no student template)"
    mine = render_prompt(tokenizer, MESSAGES[0])
    rendered = client.post_once("/tokenize", {"model": spec.model, "messages": MESSAGES[0], "add_generation_prompt": True},
                                root=True)
    theirs = rendered.get("tokens") if isinstance(rendered, dict) else None
    if isinstance(theirs, list):
        if theirs == mine:
            return True, f"its /tokenize renders a chat message as the student's template does ({len(mine)} tokens)"
        j = next((j for j, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
        return False, (f"its /tokenize renders a chat message as {tokenizer.decode(theirs)!r}, the student's template "
                       f"as {tokenizer.decode(mine)!r} (first difference at token {j})")
    answer = client.post_once("/chat/completions", {"model": spec.model, "messages": MESSAGES[0], "max_tokens": 1,
                                                    "temperature": 0.0})
    counted = (answer or {}).get("usage", {}).get("prompt_tokens") if isinstance(answer, dict) else None
    if not isinstance(counted, int):
        return None, "unknown: the server does not expose its rendering (no /tokenize, no prompt_tokens from chat)"
    if counted != len(mine):
        return False, (f"its chat endpoint counts {counted} prompt tokens for a message the student's template "
                       f"renders in {len(mine)}")
    return None, (f"unknown, but plausible: its chat endpoint counts {counted} prompt tokens, as many as the "
                  "student's template renders (the server does not expose the tokens themselves)")


__all__ = ["ASK_TOP_K", "Probe", "probe"]
