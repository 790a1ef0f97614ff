"""Classic on-policy distillation (Agarwal et al. 2024; Thinking Machines' recipe).

States from the current student; per-token reward on the sampled token ``r_t = log pi_T(y_t) - log pi_S(y_t)``
(= -k1, detached, no discount); loss ``-(pi_S/mu)(y_t) * r_t``. Its expectation is the per-token
reverse-KL gradient at each visited state (biased for the sequence-level objective: set
``credit.gamma: 1`` for the unbiased return-to-go estimator).
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg",
          "credit": {"gamma": 0.0}}
