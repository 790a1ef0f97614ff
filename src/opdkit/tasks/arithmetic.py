"""Multi-digit addition with a carry scratchpad: the embedded verifiable task.

A prompt asks for ``a+b`` with ``digits``-digit operands. The reference completion works the columns
units first, one ``<digit>c<carry>`` group per column, then gives the sum alone on the last line::

    prompt:      1857+5385
    completion:  2c1 4c1 2c1 7c0
                 7242

Each column needs the two digits of that column and the previous carry, so the model must learn to
attend to the right positions step by step: the scratchpad is where the reasoning happens. The checker
reads only the last line, so a model may reason differently and still be scored exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CHARACTERS = "0123456789+=c \n"


def scratchpad(a: int, b: int, digits: int) -> str:
    """The reference completion for ``a+b``: column groups units first, then the sum on its own line."""
    groups, carry = [], 0
    for column in range(digits):
        da = (a // 10**column) % 10
        db = (b // 10**column) % 10
        total = da + db + carry
        carry = total // 10
        groups.append(f"{total % 10}c{carry}")
    return " ".join(groups) + "\n" + str(a + b)


def final_answer(completion: str) -> str | None:
    """The text of the last non-empty line, or None for an empty completion."""
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the completion's last line with the reference answer."""
    return final_answer(completion) == str(answer).strip()


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    digits: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def completion(self) -> str:
        return scratchpad(self.a, self.b, self.digits)

    def record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "answer": self.answer}


def make_splits(sizes: dict[str, int], digits: int = 4, seed: int = 0) -> dict[str, list[Problem]]:
    """Disjoint seeded splits of distinct problems, e.g. ``{"train": 20000, "heldout": 500}``."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if sum(sizes.values()) > (hi - lo + 1) ** 2:
        raise ValueError(f"asked for {sum(sizes.values())} distinct {digits}-digit problems; too many")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        problems = []
        while len(problems) < size:
            pair = (rng.randint(lo, hi), rng.randint(lo, hi))
            if pair not in seen:
                seen.add(pair)
                problems.append(Problem(*pair, digits))
        splits[name] = problems
    return splits
