"""The embedded default: 4-digit addition with a carry scratchpad, a strong teacher and a weak student.

``build`` writes the scenario's cache folder, all of it loaded afterwards like any user's models and data:

1. a character-level tokenizer (``tokenizers`` WordLevel, one token per character, chat markers as
   special tokens) with a chat template, saved as a normal HF tokenizer;
2. disjoint seeded splits: ``train`` (prompts + reference completions), ``validation`` (used only to stop
   the student's warm-up) and ``heldout`` (every reported number);
3. a teacher (Llama, d=128, 2 layers) and a weak student (Llama, d=64, 2 layers), copied from the pair shipped
   with the package (``arith_pair/``, 2.6 MB of float32 safetensors), so the demo starts from the same bits on
   every processor.

Why the pair is shipped rather than trained on first use: ``train_pair``'s recipe, the same code and seed, gave
students at 29.5%, 23.6% and 43.2% held-out accuracy on three processors (AMD EPYC Zen 3, Intel Xeon with AMX,
AMD EPYC Zen 4), and the demo's verdict on the Xeon's pair differed from the others' (``docs/results.md``). Float
rounding differs between processors, and this task's learning has a long plateau and a sudden jump that the
rounding moves; no stop criterion tried pinned the student down across machines.

The shipped pair is ``build(folder, seed=0)`` run on the AMD EPYC (Zen 4, family 25 model 17, 2 threads,
float32) on 2026-12-06; its ``build.json`` records what the stops measured. ``build(tmp, seed=s)`` trains a pair
here instead (``bench/demo_seeds.py`` runs the demo over such pairs): the teacher from initialisation and batches
drawn from ``s``, trained on the reference completions until its validation accuracy reaches ``TEACHER_TARGET``;
the student from ``s + 1``, warmed up on the same data only until its per-token cross-entropy on the validation
completions first falls to ``STUDENT_CE`` (checked every step near it), so it knows the format but is weak. The
splits are the same for every pair.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data import Example, render_completion, render_prompt
from ..rollout import sample
from ..tasks import arithmetic

FOLDER = "arith-v3"
SHIPPED = Path(__file__).with_name("arith_pair")  # teacher/ and student/ weights and their build.json
ARTIFACTS = {"teacher": "teacher", "student": "student", "train": "train.jsonl",
             "validation": "validation.jsonl", "heldout": "heldout.jsonl"}
SPLITS = {"train": 20000, "validation": 256, "heldout": 512}
SEED = 0  # the splits' seed (the same problems for every pair)
TEACHER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
TEACHER_TARGET = 0.97
STUDENT_CE = 0.13  # nats per completion token on the validation split
SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}<|user|>{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of the task alphabet, plus chat markers as special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(arithmetic.CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL)
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>",
                                 unk_token="<unk>", padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def new_model(tokenizer, shape: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **shape)
    return LlamaForCausalLM(config)


def encode(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + completion`` ids and a mask that is 1 on completion tokens only."""
    rows, loss_rows = [], []
    for e in examples:
        prompt = render_prompt(tokenizer, e.messages)
        completion = render_completion(tokenizer, e.messages, e.completion)
        rows.append(prompt + completion)
        loss_rows.append([0] * len(prompt) + [1] * len(completion))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in loss_rows], dtype=torch.float)
    return ids, loss_mask


def accuracy(model, tokenizer, examples: list[Example], batch_size: int = 256) -> float:
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts = sample(model, tokenizer, batch, max_completion_length=32, temperature=0.0).texts(tokenizer)
        correct += sum(arithmetic.is_correct(t, e.answer) for t, e in zip(texts, batch))
    return correct / len(examples)


def validation_ce(model, ids: torch.Tensor, loss_mask: torch.Tensor, pad_id: int) -> float:
    """Per-token cross-entropy on the completion tokens of ``encode``'d examples, teacher-forced."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return float((nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum())


def supervised(model, tokenizer, train: list[Example], done: Callable[[object], tuple[bool, str]], *, max_steps: int,
               lr: float, check_every: int, seed: int, console: Console, label: str, batch_size: int = 64) -> int:
    """Next-token cross-entropy on completion tokens until ``done(model)`` says so (checked every ``check_every``
    steps, with what it measured); the step it stopped at."""
    ids, loss_mask = encode(tokenizer, train)
    attention = (ids != tokenizer.pad_token_id).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    started, last = time.perf_counter(), 0.0
    for step in range(1, max_steps + 1):
        model.train()
        rows = torch.randint(len(ids), (batch_size,), generator=generator)
        logits = model(input_ids=ids[rows], attention_mask=attention[rows]).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[rows, 1:], reduction="none")
        loss = (nll * loss_mask[rows, 1:]).sum() / loss_mask[rows, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % check_every == 0:
            stop, measured = done(model)
            elapsed = time.perf_counter() - started
            if stop or elapsed - last >= 10:  # a line every 10 s, and the last one
                console.print(f"  {label}: step {step:5d}  loss {float(loss.detach()):.3f}  {measured}  "
                              f"({elapsed:.0f} s)")
                last = elapsed
            if stop:
                return step
    raise RuntimeError(f"{label} did not stop within {max_steps} steps (last: {measured})")


def as_examples(splits: dict) -> dict[str, list[Example]]:
    """``arithmetic.make_splits``'s problems as chat examples, split by split."""
    return {name: [Example([{"role": "user", "content": p.prompt}], p.completion, p.answer) for p in problems]
            for name, problems in splits.items()}


def write_splits(tmp: Path, splits: dict) -> None:
    """Each split's problems as ``<name>.jsonl`` records in ``tmp``."""
    for name, problems in splits.items():
        with (tmp / f"{name}.jsonl").open("w") as f:
            for p in problems:
                f.write(json.dumps(p.record()) + "\n")


def unpack_pair(shipped: Path, tmp: Path, tokenizer) -> None:
    """A pair shipped with the package (``shipped``: teacher/ and student/ weights, build.json) into ``tmp``, each
    model folder with ``tokenizer``."""
    for name in ("teacher", "student"):
        shutil.copytree(shipped / name, tmp / name)
        tokenizer.save_pretrained(tmp / name)
    shutil.copy(shipped / "build.json", tmp / "build.json")


def build(tmp: Path, console: Console | None = None, seed: int | None = None) -> None:
    """Write the tokenizer, splits, teacher and student into the (temporary) folder ``tmp``: the shipped pair
    (``seed=None``, the same bits on every processor), or a pair trained here from ``seed``."""
    console = console or Console(stderr=True)
    splits = arithmetic.make_splits(SPLITS, seed=SEED)
    write_splits(tmp, splits)
    tokenizer = build_tokenizer()
    if seed is None:
        unpack_pair(SHIPPED, tmp, tokenizer)
        return
    console.print(f"[bold]Training the embedded arithmetic scenario's teacher and student[/] from seed {seed}")
    train_pair(tmp, tokenizer, as_examples(splits), console, seed)


def train_pair(tmp: Path, tokenizer, examples: dict[str, list[Example]], console: Console, seed: int) -> None:
    """The recipe of the shipped pair: the teacher to ``TEACHER_TARGET`` validation accuracy, the student's
    warm-up to ``STUDENT_CE``; both saved into ``tmp`` with a ``build.json`` of what the stops measured."""
    validation = examples["validation"]

    measured = {}  # what each stop check measured last

    def accurate(model) -> tuple[bool, str]:
        measured["teacher_validation_accuracy"] = acc = accuracy(model, tokenizer, validation)
        return acc >= TEACHER_TARGET, f"validation accuracy {acc:.1%}"

    teacher = new_model(tokenizer, TEACHER, seed)
    teacher_steps = supervised(teacher, tokenizer, examples["train"], accurate, max_steps=4000, lr=1e-3,
                               check_every=200, seed=seed, console=console, label="teacher")
    teacher.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")

    ids, loss_mask = encode(tokenizer, validation)
    pad = tokenizer.pad_token_id
    ce, calls = float("inf"), 0

    def warm(model) -> tuple[bool, str]:
        """The validation cross-entropy every step once it is below twice the target, every 10th step before:
        a check costs two training steps, and the jump takes 30-50 steps from there to the target."""
        nonlocal ce, calls
        calls += 1
        if ce <= 2 * STUDENT_CE or calls % 10 == 0:
            ce = validation_ce(model, ids, loss_mask, pad)
        return ce <= STUDENT_CE, f"validation cross-entropy {ce:.3f}"

    student = new_model(tokenizer, STUDENT, seed + 1)
    student_steps = supervised(student, tokenizer, examples["train"], warm, max_steps=6000, lr=1e-3, check_every=1,
                               seed=seed + 1, console=console, label="student warm-up")
    student.save_pretrained(tmp / "student")
    tokenizer.save_pretrained(tmp / "student")
    record = {"seed": seed, "teacher_steps": teacher_steps, **measured, "student_steps": student_steps,
              "student_validation_ce": ce, "student_validation_accuracy": accuracy(student, tokenizer, validation),
              "teacher": TEACHER, "student": STUDENT, "splits": SPLITS}
    (tmp / "build.json").write_text(json.dumps(record, indent=2))
