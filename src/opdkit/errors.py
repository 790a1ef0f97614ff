"""One error type for every problem a user can fix: it names the problem and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class OPDError(Exception):
    """Bad input or an unusable setup, raised before any work that could be lost."""


def closest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
