"""A teacher with another tokenizer, reached as text only: issue 19's "unavailable" regime for chunk-level OPD.

``make``: train an arith teacher (the shipped teacher's shape and recipe, ``scenarios.arith``) on a tokenizer that
shares no token ids and no segmentation with the student's character-level one, the way two real model families'
tokenizers differ: digits in groups of up to three as Llama 3's pre-tokenizer does (``\\p{N}{1,3}``), a newline
merged into the number after it and a carry with its trailing space into one token (as BPE merges frequent
strings), special tokens at the end of the vocabulary, and Llama 2's ``[INST] ... [/INST] ... </s>`` chat markers
instead of the student's ``<|user|>``. ``2c1 4c1 2c1 7c0\\n7242`` is 20 student tokens and 10 of this teacher's.
The student (``builtin:arith/student``) and such a teacher share only text: token-level OPD refuses the pair at
load, and the teacher can only be reached through ``/v1/chat/completions``.

Then ``make`` describes the teacher on the held-out prompts, before any distillation: greedy accuracy, tokens per
answer in each tokenizer, whether its greedy text equals the shipped teacher's, and how well it continues its own
correct answer from a prefix cut at each character. A cut inside one of its tokens (``...c`` of ``c1 ``) gives it a
segmentation it never saw in training, which is what chunk-level OPD asks of it at a fork between two of its tokens.

    python bench/foreign_tokenizer_teacher.py make --out runs/chunk19/teacher-l3
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["</s>", "[INST]", "[/INST]", "<pad>", "<unk>"]
PIECES = r"c\d ?|\n?\d{1,3}|[\s\S]"  # a carry and its space; a newline and up to three digits; any character
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% else %}[INST]{{ message['content'] }}[/INST]{% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Every string ``PIECES`` can cut from the task's alphabet as one token, specials last."""
    from opdkit.tasks.arithmetic import CHARACTERS

    groups = ["".join(g) for n in (1, 2, 3) for g in itertools.product("0123456789", repeat=n)]
    pieces = (list(CHARACTERS) + [f"c{d}" for d in "0123456789"] + [f"c{d} " for d in "0123456789"] + groups[10:]
              + ["\n" + g for g in groups])
    vocab = {token: i for i, token in enumerate(dict.fromkeys(pieces + SPECIAL))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make(out: Path, seed: int, prompts: int, console: Console) -> None:
    from opdkit.scenarios import arith
    from opdkit.tasks import arithmetic

    tokenizer = build_tokenizer()
    examples = arith.as_examples(arithmetic.make_splits(arith.SPLITS, seed=arith.SEED))
    started = time.perf_counter()

    def accurate(target: float):
        def done(model) -> tuple[bool, str]:
            acc = arith.accuracy(model, tokenizer, examples["validation"])
            return acc >= target, f"validation accuracy {acc:.1%}"
        return done

    # The shipped teacher's recipe (learning rate 1e-3 to TEACHER_TARGET) stalls between 75% and 91% on these
    # tokens (seed 0, 4,000 steps), so it is finished at a fifth of the learning rate.
    teacher = arith.new_model(tokenizer, arith.TEACHER, seed)
    steps = 0
    for lr, target in ((1e-3, 0.8), (2e-4, arith.TEACHER_TARGET)):
        steps += arith.supervised(teacher, tokenizer, examples["train"], accurate(target), max_steps=8000, lr=lr,
                                  check_every=200, seed=seed + steps, console=console, label=f"teacher (lr {lr:g})")
    teacher.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"seed": seed, "steps": steps, "train_seconds": round(time.perf_counter() - started, 1)}
    record |= describe(out, examples["heldout"][:prompts])
    (out / "FOREIGN_TOKENIZER.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def describe(folder: Path, examples) -> dict:
    """What the teacher in ``folder`` does on ``examples`` before any distillation (see the module docstring)."""
    from opdkit.data import render_prompt
    from opdkit.models import load_model, load_tokenizer
    from opdkit.rollout import sample
    from opdkit.tasks.arithmetic import is_correct

    tok, model = load_tokenizer(str(folder)), load_model(str(folder))
    student_tok, shipped = load_tokenizer("builtin:arith/student"), load_model("builtin:arith/teacher")
    with torch.no_grad():
        texts = sample(model, tok, examples, max_completion_length=32, temperature=0.0).texts(tok)
        shipped_texts = sample(shipped, student_tok, examples, max_completion_length=32, temperature=0.0).texts(student_tok)
    correct = [is_correct(t, e.answer) for t, e in zip(texts, examples)]

    # Continue each correct answer from every cut, as the server does with continue_final_message: the prompt
    # rendered by the chat template, then the prefix tokenized on its own.
    inside, boundary = [], []
    for text, example, ok in zip(texts, examples, correct):
        if not ok:
            continue
        pieces = tok.tokenize(text)
        bounds = set(itertools.accumulate(len(p) for p in pieces))
        prompt = render_prompt(tok, example.messages)
        rows = [prompt + tok(text[:cut], add_special_tokens=False)["input_ids"] for cut in range(1, len(text))]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        with torch.no_grad():
            new = model.generate(ids, attention_mask=(ids != tok.pad_token_id).long(), max_new_tokens=32,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for cut, row in zip(range(1, len(text)), new[:, width:].tolist()):
            whole = text[:cut] + tok.decode(row, skip_special_tokens=True)
            (boundary if cut in bounds else inside).append(is_correct(whole, example.answer))
    answer_tokens = [len(tok.tokenize(t)) for t in texts]
    student_tokens = [len(student_tok.tokenize(t)) for t in texts]
    return {
        "prompts": len(examples),
        "greedy_accuracy": sum(correct) / len(examples),
        "same_greedy_text_as_shipped_teacher": sum(a == b for a, b in zip(texts, shipped_texts)) / len(examples),
        "answer_tokens_teacher": sum(answer_tokens) / len(texts),
        "answer_tokens_student": sum(student_tokens) / len(texts),
        "continued_correct_cut_at_token_boundary": sum(boundary) / max(1, len(boundary)),
        "continued_correct_cut_inside_a_token": sum(inside) / max(1, len(inside)),
        "cuts": {"boundary": len(boundary), "inside": len(inside)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="train the teacher into --out and describe it")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--prompts", type=int, default=256, help="held-out prompts to describe it on")
    d = sub.add_parser("describe", help="describe a teacher folder made before")
    d.add_argument("folder", type=Path)
    d.add_argument("--prompts", type=int, default=256)
    args = parser.parse_args()
    console = Console(stderr=True)
    if args.command == "make":
        make(args.out, args.seed, args.prompts, console)
    else:
        from opdkit.data import load_examples

        print(json.dumps(describe(args.folder, load_examples("builtin:arith/heldout")[: args.prompts])))


if __name__ == "__main__":
    main()
