"""TrOPD (Xing et al., arXiv 2606.01249): trust-region OPD.

Sampled tokens pass a Bernoulli gate ``min(1, pi_T/pi_S)``; accepted ones get the K1 reward, rejected
ones ("policy-gradient outliers") get ``-FKL`` over the teacher's top-64 as a detached reward (the official
code's mode; ``trust_region.fkl_mode: direct`` backpropagates it instead; ``outliers: mask | clip`` are the
paper's other variants). Off-policy guidance: the student continues from a cosine-annealed prefix of the
teacher's answer, and prefix tokens get ``0.001 * (-log pi_S)``.
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg",
          "trust_region": {"enabled": True, "outliers": "fkl", "top_k": 64, "fkl_mode": "advantage"},
          "prefix_guidance": {"enabled": True, "beta": 0.001}}
