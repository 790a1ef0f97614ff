"""How much of the return a linear value head on a student's last hidden states can explain (issue 19, GAE-OPD).

The learned value of ``credit.value: learned`` is a linear head on the student's last hidden states, regressed on
GAE's lambda-returns. Whatever its learning rate, it cannot explain more of the return's variance than the best
linear map of those states does. For a student folder (the untrained one, or a run's ``final/``) this samples one
temperature-1 completion for each of the first ``--prompts`` training prompts of the run's config, computes the
per-token log-ratio rewards ``r_t = log pi_T(y_t) - log pi_S(y_t)`` against the config's teacher and the
undiscounted return-to-go ``G_t``, fits least squares (ridge 1e-3) on 3/4 of the tokens and prints the explained
variance ``1 - Var(G - V) / Var(G)`` on the other quarter, for: the hidden states, the position alone (one-hot),
both, and (no fit) the analytic value ``V_t = -KL(pi_S || pi_T)`` at the state.

    .venv/bin/python bench/value_ceiling.py configs/branch-gae.yaml                       # the untrained student
    .venv/bin/python bench/value_ceiling.py configs/branch-gae.yaml runs/gae/norm-critic-learned/gae_opd/seed0/final
"""

from __future__ import annotations

import argparse

import torch

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.models import load_model, load_tokenizer
from opdkit.objectives import credit
from opdkit.objectives.divergence import kl
from opdkit.rollout import sample


def explained(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(1 - (target - prediction).var() / target.var())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run's config (its teacher, training data and completion budget)")
    parser.add_argument("student", nargs="?", help="a student folder (default: the config's student)")
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    path = args.student or config.student.path
    tokenizer, student, teacher = load_tokenizer(path), load_model(path), load_model(config.teacher_specs()[0].path)
    examples = load_examples(config.data.train)[: args.prompts]
    length = config.rollout.max_completion_length
    torch.manual_seed(0)
    hidden, returns, positions, analytic = [], [], [], []
    for start in range(0, len(examples), 512):
        batch = sample(student, tokenizer, examples[start : start + 512], max_completion_length=length)
        with torch.no_grad():
            logits, states = batch.completion_logits(student, return_hidden=True)
            s, t = logits.float().log_softmax(-1), batch.completion_logits(teacher).float().log_softmax(-1)
        ids, mask = batch.completion_ids.unsqueeze(-1), batch.completion_mask
        keep = mask.bool()
        reward = (t.gather(-1, ids) - s.gather(-1, ids)).squeeze(-1)
        hidden.append(states[keep].float())
        returns.append(credit.returns_to_go(reward, mask, 1.0)[keep])
        positions.append(torch.arange(mask.shape[1]).expand_as(mask)[keep])
        analytic.append(-kl(s, t)[keep])
    hidden, returns, positions, analytic = map(torch.cat, (hidden, returns, positions, analytic))
    cut = int(0.75 * len(returns))

    def fit(features: torch.Tensor) -> float:
        x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
        a, y = x[:cut], returns[:cut].double()
        w = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), a.T @ y)
        return explained((x[cut:] @ w).float(), returns[cut:])

    onehot = torch.nn.functional.one_hot(positions, length).float()
    print(f"student {path}: {len(returns)} tokens, return-to-go mean {returns.mean():.2f} sd {returns.std():.2f} nats")
    print(f"explained variance on the held-out quarter: linear on the hidden states {fit(hidden):.3f}; position "
          f"alone {fit(onehot):.3f}; hidden states and position {fit(torch.cat([hidden, onehot], 1)):.3f}; the "
          f"analytic -KL_t, unfitted, {explained(analytic[cut:], returns[cut:]):.3f}")


if __name__ == "__main__":
    main()
