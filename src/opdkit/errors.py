"""One error type for every problem a user can fix: it names the problem and the fix."""

from __future__ import annotations

import difflib
import signal
from typing import Iterable


class OPDError(Exception):
    """Bad input or an unusable setup, raised before any work that could be lost."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; ``opd train --resume`` continues it."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to "
                         f"{checkpoint}. Continue with: opd train --resume {checkpoint.parent}")


class Stopped(Exception):
    """Ctrl-C where nothing could be saved first (while loading, or a second Ctrl-C): one line, no traceback."""


def closest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)  # a YAML value may be any type
    return f" (did you mean {match[0]!r}?)" if match else ""
