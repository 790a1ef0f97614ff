"""EOPD (Jin et al., arXiv 2603.07079): entropy-aware OPD.

Classic OPD everywhere, plus a forward KL over the teacher's top-16 (backpropagated directly) on tokens
where the teacher's entropy exceeds 0.8 nats: reverse KL is mode-seeking exactly where the teacher is
unsure, and the forward term keeps the alternatives. (Teacher entropy is taken over its top-k,
renormalised, when the full distribution is not available.)
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg",
          "entropy_gate": {"enabled": True, "threshold": 0.8, "coef": 1.0, "top_k": 16}}
