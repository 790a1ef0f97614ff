"""GKD (Agarwal et al. 2024): generalized JSD(beta) on a mix of student and dataset states.

With probability ``lmbda`` a batch is sampled by the student, otherwise it is the dataset's completions.
Per token, ``JSD_beta(pi_T, pi_S)`` over the full vocabulary (or ``support: teacher_topk``), both from
``logits / temperature``, backpropagated directly. ``beta = 0`` is forward KL, ``1`` reverse KL.
Defaults as in TRL's GKDConfig: ``beta = 0.5``, ``lmbda = 0.5``.
"""

PRESET = {"support": "full", "divergence": "jsd", "beta": 0.5, "lmbda": 0.5, "grad_path": "direct"}
