"""OPD+ (Zhao et al., arXiv 2606.01039): f-divergence rewards with the bias-corrected advantage.

Sampled-token cost ``phi(l)``, ``l = log pi_S(y) - log pi_T(y)`` (``objective.divergence``: reverse_kl,
forward_kl, jsd, tv, hellinger, alpha). The stop-gradient advantage ``-phi(l)`` is biased for every f but
reverse KL; OPD+ uses ``A_t = -(G_t + phi'(l_t))`` with ``G_t`` the return of ``phi`` (token level:
``gamma = 0``). Default divergence here: Jensen-Shannon.
"""

PRESET = {"support": "sampled", "divergence": "jsd", "beta": 0.5, "grad_path": "pg", "correction": True,
          "credit": {"gamma": 0.0}}
