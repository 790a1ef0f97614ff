"""Does a text-only teacher's chunk reward say what its log-probs say? The reward a ``chunk_opd`` run gives each
audited chunk, set beside the same teacher's log-probs of that chunk, on the student's own rollouts.

    .venv/bin/python bench/chunk_reward_validity.py CONFIG TEACHER [--checkpoint DIR] [--prompts 64] [--seed 0] \\
        [--threads 1] [--similarities char token_f1 embedding] [--set key=value ...]

CONFIG is a ``chunk_opd`` run's config (``teacher.kind: chat``); TEACHER the model folder (or ``builtin:...``) that
the chat API serves. The teacher is served in this process by ``opd serve-teacher``'s app and reached as that run
reaches it (its ``base_url`` is replaced). The student (``--checkpoint`` or ``student.path``) samples ``--prompts``
training prompts as a run's rollouts do; the run's fork scheduler picks the chunks; each chunk gets the run's
preference ``p`` (Dirichlet-smoothed similarity to ``samples_per_fork`` continuations), drawn twice independently,
by each of ``--similarities`` on the same continuations. The same teacher, loaded locally, gives the log-probs of
each chunk's tokens. Printed as one JSON line, per similarity:

- ``validity``: Spearman correlation over chunks between ``p`` (both draws pooled) and the token-level signal over
  the chunk, ``sum_t log pi_T(y_t) - log mu(y_t)`` (what sampled-token OPD would reward there), and with the
  teacher's mean log-prob of the chunk alone; 95% bootstrap intervals over chunks;
- ``reliability``: the correlation of ``p`` between the two draws (Spearman-Brown for the pooled one), at a
  temperature above 0 (greedy continuations are the same twice);
- the mean similarity, the spread of ``p`` over chunks, and a few chunks with the best and worst ``p``.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.models import check_tokenizers_match, load_model, load_student, load_tokenizer
from opdkit.rollout import sample
from opdkit.serve import create_app, serve_in_thread
from opdkit.teachers.chat import ChatTeacher, dirichlet_preference, similarities
from opdkit.teachers.similarity import Similarity


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def with_interval(a: np.ndarray, b: np.ndarray, draws: int = 1000, seed: int = 0) -> list[float] | None:
    """Spearman correlation and its 95% percentile-bootstrap interval over the pairs; None where either side is the
    same for every pair (no order to correlate)."""
    if np.isnan(spearman(a, b)):
        return None
    rng = np.random.default_rng(seed)
    boots = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(draws))]
    low, high = np.nanpercentile(boots, [2.5, 97.5])
    return [round(spearman(a, b), 3), round(float(low), 3), round(float(high), 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("teacher", help="the model folder the chat API serves")
    parser.add_argument("--checkpoint", help="the student to sample (default: the config's student.path)")
    parser.add_argument("--prompts", type=int, default=64, help="training prompts the student answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--similarities", nargs="+", choices=["char", "token_f1", "embedding"],
                        help="score the same continuations by each (default: the config's teacher.similarity)")
    parser.add_argument("--embedding-model", help="for embedding where the config's teacher.similarity is another: "
                        "a model folder (default: the packaged MiniLM)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    if config.teacher.kind != "chat":
        raise SystemExit(f"{args.config}: teacher.kind is {config.teacher.kind!r}; this measures a chat teacher's reward")
    tokenizer, teacher_tokenizer = load_tokenizer(config.student.path), load_tokenizer(args.teacher)
    check_tokenizers_match(tokenizer, teacher_tokenizer)  # the teacher's log-probs of the student's own tokens
    student = load_student(config.student, args.checkpoint)
    examples = load_examples(config.data.train)
    examples = random.Random(args.seed).sample(examples, min(args.prompts, len(examples)))
    torch.manual_seed(args.seed)
    rollouts = sample(student, tokenizer, examples, max_completion_length=config.rollout.max_completion_length,
                      temperature=config.rollout.temperature, top_p=config.rollout.top_p)
    if rollouts.sampler_logprobs is None:
        raise SystemExit("rollout.temperature 0 keeps no sampler log-probs to pick forks from: chunk_opd samples")

    local = load_model(args.teacher)
    with torch.no_grad():
        teacher_logprobs = rollouts.token_logprobs(local)  # [B, C]
    with serve_in_thread(create_app(local, teacher_tokenizer, "teacher", max_batch_size=64)) as url:
        spec = config.teacher.model_copy(update={"base_url": url, "model": "teacher", "cache_dir": None})
        chat = ChatTeacher(spec, tokenizer)
        chunks, _ = chat.chunks(rollouts)
        draws = chat.asked(rollouts, chunks), chat.asked(rollouts, chunks)  # two independent draws of K each

    span = lambda values, c: values[c.row, c.start : c.start + c.width]  # noqa: E731
    ratio = np.array([float((span(teacher_logprobs, c) - span(rollouts.sampler_logprobs, c)).sum()) for c in chunks])
    teacher_mean = np.array([float(span(teacher_logprobs, c).mean()) for c in chunks])
    found = {"config": args.config, "checkpoint": args.checkpoint or config.student.path, "prompts": len(examples),
             "chunks": len(chunks), "chunk_length": spec.chunk_length, "samples_per_fork": spec.samples_per_fork,
             "temperature": spec.temperature, "token_signal_sd": round(float(ratio.std()), 3)}
    for kind in args.similarities or [spec.similarity]:
        measure = chat.similarity if kind == spec.similarity else Similarity(kind, args.embedding_model)
        first, second = (similarities(measure, chunks, draw) for draw in draws)
        pooled = np.array([dirichlet_preference(a + b, spec.prior) for a, b in zip(first, second)])
        half = spearman(*(np.array([dirichlet_preference(s, spec.prior) for s in draw]) for draw in (first, second)))
        by_p = sorted(range(len(chunks)), key=lambda i: pooled[i])
        show = lambda i: {"prefix_end": chunks[i].prefix[-40:], "chunk": chunks[i].text,  # noqa: E731
                          "p": round(float(pooled[i]), 3), "log_ratio": round(float(ratio[i]), 2)}
        found[kind] = {
            "mean_similarity": round(float(np.mean([x for a, b in zip(first, second) for x in a + b])), 3),
            "p_sd": round(float(pooled.std()), 3),
            "validity": {"log_ratio": with_interval(pooled, ratio, seed=args.seed),
                         "teacher_mean_logprob": with_interval(pooled, teacher_mean, seed=args.seed)},
            "reliability": None if spec.temperature == 0 or np.isnan(half) else  # greedy: the same draw twice
            {"one_draw": round(half, 3), "pooled": round(2 * half / (1 + half), 3)},
            "lowest_p": [show(i) for i in by_p[:3]], "highest_p": [show(i) for i in by_p[-3:]]}
    print(json.dumps(found))


if __name__ == "__main__":
    main()
