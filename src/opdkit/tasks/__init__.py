"""Built-in verifiable tasks: a generator and an exact answer checker each.

A verifier is ``(completion_text, reference_answer) -> bool``. Datasets name theirs in ``data.task``.
"""

from __future__ import annotations

from typing import Callable

from . import arithmetic, branching

Verifier = Callable[[str, str], bool]

VERIFIERS: dict[str, Verifier] = {
    "arithmetic": arithmetic.is_correct,
    "branching": branching.is_correct,
}


def get_verifier(name: str) -> Verifier:
    from ..errors import OPDError, closest

    if name not in VERIFIERS:
        raise OPDError(f"unknown task verifier {name!r}{closest(name, VERIFIERS)}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[name]
