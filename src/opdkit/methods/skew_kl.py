"""Skew KL (DistiLLM, Ko et al. 2024): ``KL(pi_T || alpha pi_T + (1 - alpha) pi_S)`` with ``alpha = 0.1``,
over the full vocabulary, backpropagated directly. Bounded where plain forward KL explodes
(``pi_S -> 0``). ``divergence: skew_rkl`` gives the reverse variant. DistiLLM's adaptive off-policy replay
is not included: states come from the student (``lmbda`` mixes in dataset completions).
"""

PRESET = {"support": "full", "divergence": "skew_kl", "alpha": 0.1, "grad_path": "direct"}
