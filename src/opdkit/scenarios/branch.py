"""Addition with a fork (``tasks.branching``): a teacher fluent in both formats, a student weak on the direct one.

The regime of issue 19's GAE-OPD item: the completion's first token decides what follows (``+`` the scratchpad,
``=`` the sum at once). Like ``arith``, the pair is shipped with the package (``branch_pair/``, 2.6 MB: the pair of
``docs/results.md``, ``build(folder, seed=0)`` on an AMD EPYC Zen 4), so every processor starts from the same bits;
``build`` unpacks it with the tokenizer and splits into ``$OPDKIT_CACHE/branch-v2``. ``build(tmp, seed=s)`` trains a
pair here instead, with ``arith``'s functions (tokenizer, model shapes, supervised training):

1. splits of ``DIGITS``-digit problems; ``train`` holds every problem on both branches, so the teacher learns even
   odds at the fork;
2. a teacher (``arith.TEACHER``) trained until greedy accuracy on each branch, the fork forced, reaches
   ``TEACHER_TARGET`` on the validation split;
3. a student (``arith.STUDENT``) warmed up on the same data until its validation cross-entropy falls to
   ``STUDENT_CE``: it knows both formats and takes each about half the time, but the direct sum needs carry
   lookahead, which it has not learned yet, so its direct answers are much worse than its scratchpad ones.

``fork_report`` measures what the fork does to a model (the probability it gives the direct branch, the branch its
greedy answer takes, and its accuracy on each branch, free and forced); the build records it for both models in
``build.json`` and ``bench/branch_shares.py`` for trained students.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from ..rollout import sample
from ..tasks import branching
from . import arith

FOLDER = "branch-v2"
SHIPPED = Path(__file__).with_name("branch_pair")  # teacher/ and student/ weights and their build.json
ARTIFACTS = arith.ARTIFACTS
DIGITS = 3
SPLITS = {"train": 10000, "validation": 256, "heldout": 512}
SEED = 0
TEACHER_TARGET = 0.95  # greedy validation accuracy on each branch, the fork forced
STUDENT_CE = 0.25  # nats per completion token on the validation split (both branches)
MAX_LENGTH = 24  # completion tokens: 1 fork + 11 scratchpad + 1 newline + 4 sum + end = 18 at 3 digits


def fork_report(model, tokenizer, examples, batch_size: int = 256) -> dict:
    """On ``examples``: ``p_direct`` (the mean probability of ``=`` at the fork, i.e. the share of sampled
    completions at temperature 1 that take the direct branch), ``greedy_direct`` (the share of greedy answers that
    do), ``accuracy`` (greedy), ``accuracy_<branch>`` (greedy answers that took that branch, correct; None when
    none did) and ``forced_<branch>`` (greedy accuracy with the fork forced to that branch)."""
    forks = {name: tokenizer.convert_tokens_to_ids(token) for token, name in branching.BRANCHES.items()}
    p_direct, taken, correct = [], [], []
    forced = {name: 0 for name in forks}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        greedy = sample(model, tokenizer, batch, max_completion_length=MAX_LENGTH, temperature=0.0)
        with torch.no_grad():
            fork_logits = greedy.completion_logits(model)[:, 0].float()
        p_direct += fork_logits.softmax(-1)[:, forks["direct"]].tolist()
        for text, e in zip(greedy.texts(tokenizer), batch):
            taken.append(branching.branch(text))
            correct.append(branching.is_correct(text, e.answer))
        for name, token in forks.items():
            texts = sample(model, tokenizer, batch, max_completion_length=MAX_LENGTH, temperature=0.0,
                           prefixes=[[token]] * len(batch)).texts(tokenizer)
            forced[name] += sum(branching.is_correct(t, e.answer) for t, e in zip(texts, batch))
    n = len(examples)
    report = {"p_direct": sum(p_direct) / n, "greedy_direct": taken.count("direct") / n, "accuracy": sum(correct) / n}
    for name in forks:
        on = [c for c, b in zip(correct, taken) if b == name]
        report[f"accuracy_{name}"] = sum(on) / len(on) if on else None
        report[f"forced_{name}"] = forced[name] / n
    return report


def build(tmp: Path, console: Console | None = None, seed: int | None = None) -> None:
    """Write the tokenizer, splits, teacher and student into the (temporary) folder ``tmp``: the shipped pair
    (``seed=None``), or a pair trained here from ``seed``."""
    splits = branching.make_splits(SPLITS, digits=DIGITS, seed=SEED)
    arith.write_splits(tmp, splits)
    tokenizer = arith.build_tokenizer()
    if seed is None:
        arith.unpack_pair(SHIPPED, tmp, tokenizer)
        return
    console = console or Console(stderr=True)
    console.print(f"[bold]Training the branching-addition scenario's teacher and student[/] from seed {seed}")
    examples = arith.as_examples(splits)
    validation = examples["validation"]
    measured = {}

    def fluent(model) -> tuple[bool, str]:
        measured["teacher"] = report = fork_report(model, tokenizer, validation)
        worst = min(report["forced_scratchpad"], report["forced_direct"])
        return worst >= TEACHER_TARGET, (f"validation accuracy scratchpad {report['forced_scratchpad']:.1%}, "
                                         f"direct {report['forced_direct']:.1%}")

    teacher = arith.new_model(tokenizer, arith.TEACHER, seed)
    teacher_steps = arith.supervised(teacher, tokenizer, examples["train"], fluent, max_steps=8000, lr=1e-3,
                                     check_every=250, seed=seed, console=console, label="teacher")
    teacher.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")

    ids, loss_mask = arith.encode(tokenizer, validation)
    ce = float("inf")

    def warm(model) -> tuple[bool, str]:
        nonlocal ce
        ce = arith.validation_ce(model, ids, loss_mask, tokenizer.pad_token_id)
        return ce <= STUDENT_CE, f"validation cross-entropy {ce:.3f}"

    student = arith.new_model(tokenizer, arith.STUDENT, seed + 1)
    student_steps = arith.supervised(student, tokenizer, examples["train"], warm, max_steps=8000, lr=1e-3,
                                     check_every=5, seed=seed + 1, console=console, label="student warm-up")
    student.save_pretrained(tmp / "student")
    tokenizer.save_pretrained(tmp / "student")
    measured["student"] = fork_report(student, tokenizer, validation)
    record = {"seed": seed, "digits": DIGITS, "teacher_steps": teacher_steps, "student_steps": student_steps,
              "student_validation_ce": ce, "validation": measured, "teacher_shape": arith.TEACHER,
              "student_shape": arith.STUDENT, "splits": SPLITS}
    (tmp / "build.json").write_text(json.dumps(record, indent=2))
    console.print(f"  built: teacher {measured['teacher']}\n  student {measured['student']}")
