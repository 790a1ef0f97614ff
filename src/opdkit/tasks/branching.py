"""Addition with a fork: the completion's first token decides how the rest is written (issue 19, GAE-OPD).

The prompt is ``arithmetic``'s (``a+b``); the completion starts with one of two fork tokens:

- ``+`` then the units-first carry scratchpad and the sum (``arithmetic.scratchpad``)::

      prompt:      857+385
      completion:  +2c1 4c1 2c1
                   1242

- ``=`` then the sum at once, most significant digit first: ``=1242``. Its first digit already depends on every
  column's carry (carry lookahead), which a small model learns far later than the column-by-column scratchpad.

A teacher trained on both formats of every problem gives the fork about even odds, so the fork token's own
per-token reward ``log pi_T - log pi_S`` is near zero whichever branch the student takes; what the branch costs
comes later, in the log-ratios of the tokens that follow it. That is the regime where credit across the horizon
(return-to-go, GAE) can matter and immediate credit is blind to it.

The checker reads the last line, less a leading fork token, so both formats are scored exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import arithmetic

SCRATCH, DIRECT = "+", "="  # fork tokens, both in arithmetic.CHARACTERS (so the arith tokenizer serves)
BRANCHES = {SCRATCH: "scratchpad", DIRECT: "direct"}


def completion(a: int, b: int, digits: int, fork: str) -> str:
    """The reference completion of ``a+b`` on the branch the fork token ``fork`` opens."""
    if fork == SCRATCH:
        return SCRATCH + arithmetic.scratchpad(a, b, digits)
    if fork == DIRECT:
        return DIRECT + str(a + b)
    raise ValueError(f"unknown fork token {fork!r}; known: {sorted(BRANCHES)}")


def branch(completion_text: str) -> str | None:
    """``scratchpad`` or ``direct`` by the completion's first character; None for anything else."""
    return BRANCHES.get(completion_text[:1])


def final_answer(completion_text: str) -> str | None:
    """The last non-empty line, less a leading fork token (``=1242`` -> ``1242``)."""
    last = arithmetic.final_answer(completion_text)
    if last is None:
        return None
    return last[1:].strip() if last[:1] in BRANCHES else last


def is_correct(completion_text: str, answer: str) -> bool:
    """Exact match of the final answer (either branch) with the reference answer."""
    return final_answer(completion_text) == str(answer).strip()


@dataclass(frozen=True)
class Problem(arithmetic.Problem):
    """``arithmetic.Problem`` on the branch the fork token ``fork`` opens."""

    fork: str = SCRATCH

    @property
    def completion(self) -> str:
        return completion(self.a, self.b, self.digits, self.fork)

    def record(self) -> dict:
        return {**super().record(), "branch": BRANCHES[self.fork]}


def make_splits(sizes: dict[str, int], digits: int = 3, seed: int = 0) -> dict[str, list[Problem]]:
    """``arithmetic.make_splits``'s disjoint problems; ``train`` holds every problem twice, once per branch
    (adjacent), so a model trained on it meets both formats of every prompt; the other splits hold each problem
    once, on a seeded fair coin's branch."""
    rng = random.Random(seed + 1)
    splits = {}
    for name, problems in arithmetic.make_splits(sizes, digits=digits, seed=seed).items():
        if name == "train":
            splits[name] = [Problem(p.a, p.b, digits, fork) for p in problems for fork in (SCRATCH, DIRECT)]
        else:
            splits[name] = [Problem(p.a, p.b, digits, rng.choice((SCRATCH, DIRECT))) for p in problems]
    return splits
