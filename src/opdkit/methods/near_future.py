"""Near-future guidance (arXiv 2606.00305): from token-level repair to trajectory bridging.

OPD samples whole trajectories but learns token by token; about 30% of its high-loss tokens sit where the two
next-token distributions are close (``opdkit.diagnostics.near_future_share``), so the real deviation lies in where
the trajectory goes next. The paper's definitions were not available to us: both options are OUR RECONSTRUCTION
(``/work/shared/methods/near_future.md`` sections 3-4), behind ``near_future.mode``; replace them with the paper's
when known. Classic OPD's token-level term stays; the guidance is added on top:

- ``lookahead`` (this preset): the advantage of token ``t`` is ``G_t = sum_{k=t}^{t+W-1} gamma^(k-t) r_k``,
  ``r_k = log pi_T(y_k) - log pi_S(y_k)`` (``objectives.credit.windowed_return``; W = 8, gamma = 1); no extra
  teacher cost, the teacher already scored every position;
- ``teacher_bridge``: at up to M = 2 high-loss tokens per rollout the teacher continues from the student's prefix
  ``x + y_<t`` for W tokens (``Teacher.continue_ids``: a local model, or ``/v1/completions`` from the student's
  token ids), and ``bridge_weight`` (0.1) times their cross-entropy is added at ``t``
  (``objectives.bridge``). Extra teacher calls and tokens are logged as ``teacher_bridge_calls`` and
  ``teacher_bridge_tokens``, the term's part of the loss as ``bridge_loss`` and ``bridge_share``.
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg", "credit": {"gamma": 0.0},
          "near_future": {"enabled": True, "mode": "lookahead", "window": 8}}
