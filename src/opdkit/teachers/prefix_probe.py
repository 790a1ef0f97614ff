"""Does a text-only teacher continue its own answer from a prefix cut anywhere? Asked before training.

Chunk-level OPD (``teachers.chat``) sends the teacher the student's text up to a fork, cut wherever one of the
student's tokens ends. A teacher whose tokenizer splits that text differently reads a prefix that ends inside one of
its own tokens: a segmentation its training never showed it. Such a teacher can continue it badly, and then the
chunk's reward punishes the student's right tokens (``docs/results.md``: a teacher with another tokenizer continued
its own right answers correctly from 100% of cuts at its token boundaries and 1.6% of cuts inside its tokens, and
chunk-level OPD against it took the student from 43% to 9%).

Measured without a verifier and without the teacher's tokenizer: the teacher's greedy answers to a few training
prompts, each cut after every student token (at most ``CUTS`` cuts per answer, evenly spaced), continued greedily for
``chunk_length`` tokens, as a fork would be. A cut is consistent when the continuation reproduces the answer's next
characters as far as both go (``reproduces``): a teacher that is deterministic at temperature 0 reproduces them from
every cut unless the cut itself changes what it reads.

The probe also keeps the share per context, the kinds of the two characters around the cut (``digit|letter``, ...):
a tokenizer's boundaries follow such kinds (digits grouped, a space before or after a word), so ``teacher.fork_snap``
moves each fork back to the nearest cut whose context the teacher read right (``reads``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data import Example

CUTS = 24  # per answer, evenly spaced
WARN_BELOW = 0.9  # a share of consistent cuts under which the run log warns


@dataclass
class PrefixProbe:
    prompts: int
    cuts: int
    consistent: float  # share of cuts from which the teacher reproduced its own answer
    examples: list[dict]  # a few inconsistent cuts: the prefix's end, what the answer continues with, what came
    contexts: dict[str, list[int]]  # "left|right" kinds of the characters around a cut -> [consistent, cuts]

    def reads(self, prefix: str, rest: str) -> bool:
        """Whether the teacher read cuts in this context right (at least ``WARN_BELOW`` of them); True where the probe
        saw no such cut (no evidence against it), and at either end of the answer."""
        if not prefix or not rest:
            return True
        right, seen = self.contexts.get(context(prefix, rest), (1, 1))
        return right >= WARN_BELOW * seen

    def as_dict(self) -> dict:
        return {**asdict(self), "findings": self.lines()}

    def lines(self) -> list[str]:
        """The finding in plain words for the run log: one line, two with the fix when it is low."""
        verdict = "OK, " if self.consistent >= WARN_BELOW else "LOW, "
        line = (f"prefix probe: {verdict}the teacher continues its own greedy answers as it wrote them from "
                f"{self.consistent:.0%} of {self.cuts} cuts after a student token ({self.prompts} training prompts)")
        if self.consistent >= WARN_BELOW:
            return [line]
        shown = "; ".join(f"...{e['prefix_end']!r} went on {e['got']!r}, not {e['expected']!r}"
                          for e in self.examples[:2])
        misread = ", ".join(f"{c} {r}/{n}" for c, (r, n) in sorted(self.contexts.items()) if r < WARN_BELOW * n)
        return [line, f"  chunk rewards will punish the student's right tokens where the teacher misreads the cut. A "
                      "teacher whose tokenizer splits text unlike the student's misreads prefixes that end inside one "
                      "of its tokens: set teacher.fork_snap: true (forks move back to cuts whose context it read "
                      "right), use a teacher on the student's tokenizer, or continuation: instruct if the teacher "
                      f"follows instructions. Misread contexts: {misread}. Seen: {shown}"]


def kind(character: str) -> str:
    if character == "\n":
        return "newline"
    if character.isspace():
        return "space"
    return "digit" if character.isdigit() else "letter" if character.isalpha() else "symbol"


def context(prefix: str, rest: str) -> str:
    """The kinds of the characters on either side of a cut, ``left|right``."""
    return f"{kind(prefix[-1])}|{kind(rest[0])}"


def reproduces(rest: str, rest_ended: bool, got: str, got_ended: bool) -> bool:
    """Whether a continuation ``got`` reproduces the rest of the answer, ``rest``, as far as both go. A side that ended
    (the teacher stopped) is matched to its end; a side cut by its token limit (the continuation by ``chunk_length``,
    the answer by ``max_completion_length``) only as far as it goes."""
    if rest_ended and got_ended:
        return got == rest
    if rest_ended:
        return got != "" and rest.startswith(got)
    if got_ended:
        return got.startswith(rest)
    return got != "" and (rest.startswith(got) or got.startswith(rest))


def cuts(length: int) -> list[int]:
    """At most ``CUTS`` token ends of an answer of ``length`` tokens, evenly spaced from the first to the last."""
    ends = range(1, length)
    n = min(CUTS, len(ends))
    return sorted({ends[round(i * (len(ends) - 1) / max(1, n - 1))] for i in range(n)})


def probe_prefixes(teacher, examples: list[Example], max_completion_length: int) -> PrefixProbe:
    """Ask ``teacher`` (a ``ChatTeacher``) for its greedy answers to ``examples`` and to continue each from its cuts."""
    tok = teacher.tokenizer
    asks, expected = [], []
    for example, (text, ended) in zip(examples, teacher.answers(examples, max_completion_length, temperature=0.0)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for end in cuts(len(ids)):
            prefix = tok.decode(ids[:end], skip_special_tokens=True)
            if not text.startswith(prefix):  # a cut inside a character the student's tokenizer splits: no fork there
                continue
            asks.append((example, prefix))
            expected.append((prefix, text[len(prefix):], ended))
    consistent, wrong, contexts = 0, [], {}
    for (prefix, rest, rest_ended), [(got, ended)] in zip(expected, teacher.continuations(asks, n=1, temperature=0.0)):
        right = reproduces(rest, rest_ended, got, ended)
        consistent += right
        if not right:
            wrong.append({"prefix_end": prefix[-8:], "expected": rest[: max(1, len(got))], "got": got})
        tally = contexts.setdefault(context(prefix, rest), [0, 0])
        tally[0], tally[1] = tally[0] + right, tally[1] + 1
    teacher.client.take_usage()  # the probe's requests are not the first step's
    return PrefixProbe(len(examples), len(expected), consistent / max(1, len(expected)), wrong[:5], contexts)
