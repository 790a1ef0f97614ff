"""vOPD (arXiv 2605.07865): classic OPD with the analytic baseline ``b_t = -KL(pi_S || pi_T)`` at ``s_t``.

``A_t = r_t - b_t``: the exact value of the immediate reward, so the advantage is centred per state
without changing the gradient's expectation. It is GAE with ``gamma = 0`` and the analytic value.
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg",
          "credit": {"gamma": 0.0, "value": "analytic"}}
