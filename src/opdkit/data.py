"""Prompt datasets, chat templating and left-padded batches.

A record becomes a :class:`Example`: the prompt as chat messages, and optionally a reference completion
(for off-policy batches) and an answer (for a task verifier). Sources:

- a JSONL file with a ``prompt`` (string) or ``messages`` (chat list; a final assistant turn is the
  completion) field, optional ``completion`` and ``answer``;
- ``builtin:<scenario>/<split>``, written into the cache by the scenario;
- ``hf:<name>[:<config>]:<split>``: a ``datasets`` dataset already in the local cache, or a folder
  written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .errors import OPDError


@dataclass
class Example:
    messages: list[dict]
    completion: str | None = None
    answer: str | None = None
    index: int | None = None  # the record's position in its dataset (stored teacher signals are keyed by it)
    columns: dict[str, str] = field(default_factory=dict)  # the record's text and number fields, for teacher.prompt


def _columns(row: dict) -> dict[str, str]:
    return {k: str(v) for k, v in row.items() if k != "messages" and isinstance(v, (str, int, float))}


def read_jsonl(path: Path, fix: str) -> list[dict]:
    """The records of a JSONL file (blank lines skipped); a line that is not JSON stops with its number and ``fix``,
    what to do about it (datasets and run logs call for different remedies)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise OPDError(f"{path}:{number}: not valid JSON ({exc.msg}); {fix}") from None
    return records


def _to_example(row: dict, where: str) -> Example:
    if not isinstance(row, dict):
        raise OPDError(f"{where}: each record must be a JSON object, got {type(row).__name__}")
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    if isinstance(row.get("prompt"), str):
        if not row["prompt"].strip():
            raise OPDError(f"{where}: empty prompt; remove the record or fill its 'prompt' field")
        completion = row.get("completion")
        return Example([{"role": "user", "content": row["prompt"]}], completion if isinstance(completion, str) else None, answer,
                       columns=_columns(row))
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        if not all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages):
            raise OPDError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': str}} objects")
        completion = None
        if messages[-1]["role"] == "assistant":
            completion, messages = messages[-1]["content"], messages[:-1]
        if not messages or not any(m["content"].strip() for m in messages):
            raise OPDError(f"{where}: empty prompt (no non-empty message before the assistant turn)")
        return Example(list(messages), completion, answer, columns=_columns(row))
    fields = sorted(row)
    raise OPDError(
        f"{where}: no usable prompt field: expected a non-empty string 'prompt' or a list 'messages' "
        f"(found fields {fields}); rename your prompt column to 'prompt'"
    )


def load_examples(source: str) -> list[Example]:
    """Read every record of ``source`` (see the module docstring) and validate it."""
    if source.startswith("builtin:"):
        from .scenarios import resolve_builtin

        source = str(resolve_builtin(source))
    if source.startswith("hf:"):
        rows, name = _load_hf(source[3:]), source
    else:
        path = Path(source)
        if not path.is_file():
            raise OPDError(f"dataset {source!r} not found: give a JSONL file, builtin:<scenario>/<split> or hf:<name>:<split>")
        rows, name = read_jsonl(path, "each line must be one JSON object"), str(path)
    if not rows:
        raise OPDError(f"dataset {name!r} is empty")
    examples = [_to_example(row, f"{name} record {i + 1}") for i, row in enumerate(rows)]
    for i, example in enumerate(examples):
        example.index = i
    return examples


def _load_hf(spec: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise OPDError("hf: datasets need the 'datasets' package: pip install 'opdkit[datasets]'") from None
    if Path(spec).is_dir():
        return [dict(r) for r in datasets.load_from_disk(spec)]
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise OPDError(f"hf:{spec}: expected hf:<name>:<split> or hf:<name>:<config>:<split>")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        return [dict(r) for r in datasets.load_dataset(name, config, split=split)]
    except Exception as exc:
        raise OPDError(f"hf:{spec} could not be loaded offline ({type(exc).__name__}: {exc}); download it once "
                       "into the datasets cache, or save it with save_to_disk and pass hf:<folder>") from None


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of the prompt, ending where the assistant's reply begins."""
    if tokenizer.chat_template is None:
        return tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def render_completion(tokenizer: PreTrainedTokenizerBase, messages: list[dict], completion: str) -> list[int]:
    """Token ids of the assistant reply as the template writes it, end-of-turn token included."""
    if tokenizer.chat_template is None:
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = render_prompt(tokenizer, messages)
    full = list(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                              tokenize=True, return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        raise OPDError("the chat template renders the prompt differently with and without the reply; "
                       "use a template whose generation prompt is a prefix of the full conversation")
    return full[len(prompt):]


def validate_lengths(tokenizer, examples: list[Example], max_completion_length: int, context: int, name: str,
                     prefix_length: int = 0, bridge: int = 0) -> None:
    """Every prompt must leave room for ``max_completion_length`` tokens within the model context, after a
    guidance prefix of up to ``prefix_length`` tokens (TrOPD), and with near-future bridges of ``bridge`` tokens
    for one written from the completion's last prefix (``max_completion_length - 1`` tokens of it)."""
    prefix = f" + a guidance prefix of up to {prefix_length}" if prefix_length else ""
    after = f" - 1 + a teacher bridge of near_future.window {bridge}" if bridge else ""
    fix = " or near_future.window" if bridge else ""
    for i, example in enumerate(examples):
        n = len(render_prompt(tokenizer, example.messages))
        if n + prefix_length + max_completion_length + max(bridge - 1, 0) > context:
            raise OPDError(
                f"{name} record {i + 1}: prompt of {n} tokens{prefix} + max_completion_length {max_completion_length}"
                f"{after} exceeds the model context of {context}; shorten or drop the prompt, or lower "
                f"max_completion_length{fix}"
            )


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` with every sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[:width]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class PromptSampler:
    """Seeded epochs of shuffled examples; ``position`` is enough to resume exactly."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed, self.position = examples, seed, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its permutation)

    def _permutation(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self, size: int) -> list[Example]:
        batch = []
        for _ in range(size):
            epoch, index = divmod(self.position, len(self.examples))
            batch.append(self.examples[self._permutation(epoch)[index]])
            self.position += 1
        return batch
