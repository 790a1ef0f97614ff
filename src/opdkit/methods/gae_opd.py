"""GAE-OPD (survey arXiv 2606.22793; our reconstruction, the paper's definition is not public).

Per-token log-ratio rewards ``r_t = log pi_T(y_t) - log pi_S(y_t)`` with generalized advantage estimation:
``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = sum_l (gamma lam)^l delta_{t+l}``. ``credit.value``
picks the value source: ``zero`` (a discounted return at ``gamma * lam``), ``analytic`` (``V_t = -KL_t``,
vOPD's baseline) or ``learned`` (a linear value head on the student's last hidden state).
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg",
          "credit": {"gamma": 1.0, "lam": 0.95, "value": "analytic"}}
