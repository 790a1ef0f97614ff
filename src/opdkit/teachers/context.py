"""The teacher's own view of a prompt (``teacher.prompt``): a system message and a template of the last user
message, filled from the example and its dataset columns.

The student is trained on its own rendering of each state; the teacher scores the student's same completion
tokens after its rendering, which may hold what the student cannot see (a reference solution: privileged
information). Only the prompt ids change, so the teacher's log-probs stay aligned position by position with the
student's completion, and every objective reads them as before.
"""

from __future__ import annotations

import string
from dataclasses import replace

from ..data import Example, left_pad, render_prompt
from ..errors import OPDError
from ..rollout import Rollouts


def placeholders(template: str) -> set[str]:
    """The ``{name}`` fields of ``template``; ValueError for anything else (``{}``, ``{0}``, ``{a.b}``, ``{a!r}``),
    which the config reports before anything loads."""
    fix = "write placeholders as {prompt} or {column}, and literal braces as {{ and }}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"teacher.prompt.template {template!r} is not a template ({exc}): {fix}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"teacher.prompt.template: placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a column name: {fix}")
        names.add(name)
    return names


class TeacherContext:
    """Renders the teacher's view of examples and of the student's rollouts (``spec``: a ``TeacherPromptSpec``)."""

    def __init__(self, spec, tokenizer):
        self.system, self.template, self.tokenizer = spec.system, spec.template, tokenizer
        self.columns = placeholders(spec.template) - {"prompt"} if spec.template is not None else set()

    def check(self, examples: list[Example], name: str) -> None:
        """Every record has the columns the template names (and a user message to replace), before models load."""
        for i, example in enumerate(examples):
            missing = sorted(self.columns - set(example.columns))
            if missing:
                raise OPDError(f"{name} record {i + 1}: teacher.prompt.template uses {missing}, which the record does "
                               f"not have (its fields: {sorted(example.columns)}): add the column to every record, or "
                               "change the template")
            if self.template is not None and not any(m["role"] == "user" for m in example.messages):
                raise OPDError(f"{name} record {i + 1}: teacher.prompt.template replaces the last user message, and "
                               "this prompt has none: give every record a user message, or use teacher.prompt.system only")

    def messages(self, example: Example) -> list[dict]:
        """The example's messages as the teacher sees them."""
        messages = [dict(m) for m in example.messages if self.system is None or m["role"] != "system"]
        if self.template is not None:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last]["content"] = self.template.format_map({**example.columns, "prompt": messages[last]["content"]})
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + messages

    def examples(self, examples: list[Example]) -> list[Example]:
        return [replace(e, messages=self.messages(e)) for e in examples]

    def view(self, rollouts: Rollouts) -> Rollouts:
        """The same completions after the teacher's prompts."""
        return _with_prompts(rollouts, [self.messages(e) for e in rollouts.examples], self.tokenizer)

    def student_view(self, rollouts: Rollouts, examples: list[Example]) -> Rollouts:
        """Teacher-written completions (sampled in the teacher's view) after the student's prompts, so that the
        states the student trains on (or is measured on) never carry the teacher's context."""
        return replace(_with_prompts(rollouts, [e.messages for e in examples], self.tokenizer), examples=examples)


def _with_prompts(rollouts: Rollouts, messages: list[list[dict]], tokenizer) -> Rollouts:
    if len(messages) != rollouts.completion_ids.shape[0]:
        raise OPDError("teacher.prompt needs the examples of every batch it scores; these rollouts carry none "
                       "(teacher continuations of token prefixes): remove teacher.prompt for this method")
    ids, mask = left_pad([render_prompt(tokenizer, m) for m in messages], tokenizer.pad_token_id)
    device = rollouts.prompt_ids.device
    return rollouts.with_prompts(ids.to(device), mask.to(device))
