"""The near-future diagnostic of a student against its local teacher, on held-out prompts.

    .venv/bin/python bench/near_future_share.py configs/smollm2-compress.yaml
    .venv/bin/python bench/near_future_share.py configs/smollm2-compress.yaml --student runs/x/checkpoint-20

Samples one completion per held-out prompt from the student (the config's rollout temperature and length, seed
0), scores it with the teacher's full distribution, and prints ``opdkit.diagnostics.near_future_share`` at
q = 0.05, 0.1 and 0.2 with its bootstrap interval and its definition (print it beside every figure).
"""

from __future__ import annotations

import argparse

import torch

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.diagnostics import NEAR_FUTURE_DEFINITION, near_future_share
from opdkit.models import load_model, load_tokenizer, set_threads
from opdkit.objectives.divergence import kl
from opdkit.objectives.support import sampled
from opdkit.rollout import sample
from opdkit.teachers import LocalTeacher


def per_token(student, teacher: LocalTeacher, tokenizer, examples, length: int, temperature: float, batch: int):
    """``(k1, KL, mask)`` ``[N, length]`` over every prompt's sampled completion."""
    k1s, kls, masks = [], [], []
    for i in range(0, len(examples), batch):
        rollouts = sample(student, tokenizer, examples[i:i + batch], max_completion_length=length,
                          temperature=temperature)
        with torch.no_grad():
            s = rollouts.completion_logits(student).float().log_softmax(-1)
            t = teacher.score(rollouts, "full").full_logprobs()
        pad = lambda x: torch.nn.functional.pad(x, (0, length - x.shape[1]))  # noqa: E731
        k1s.append(pad(sampled(s, rollouts.completion_ids) - sampled(t, rollouts.completion_ids)))
        kls.append(pad(kl(s, t)))
        masks.append(pad(rollouts.completion_mask))
    return torch.cat(k1s), torch.cat(kls), torch.cat(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--student", default=None, help="a checkpoint folder (default: the config's student)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.config)
    set_threads(config.threads)
    torch.manual_seed(0)
    path = args.student or config.student.path
    tokenizer = load_tokenizer(path)
    teacher = LocalTeacher(load_model(config.teacher.path), tokenizer)
    examples = load_examples(config.data.eval or config.data.train)[: args.prompts]
    k1, divergence, mask = per_token(load_model(path), teacher, tokenizer, examples,
                                     config.rollout.max_completion_length, config.rollout.temperature, args.batch_size)
    print(f"student {path}, teacher {config.teacher.path}, {len(examples)} prompts, {int(mask.sum())} tokens")
    for q in (0.05, 0.1, 0.2):
        share = near_future_share(k1, divergence, mask, fraction=q)
        print(f"q = {q}: {100 * share.share:.1f}% [{100 * share.low:.1f}, {100 * share.high:.1f}] of "
              f"{share.high_loss_tokens} high-loss tokens")
    print(f"definition: {NEAR_FUTURE_DEFINITION}")


if __name__ == "__main__":
    main()
