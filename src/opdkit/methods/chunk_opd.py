"""Logit-free chunk-level OPD (OmniOPD-style; a reconstruction, see ``opdkit.teachers.chat``).

States from the current student. A text-only teacher (``teacher.kind: chat``) audits a few uncertain
chunks of each rollout and returns the per-token reward itself (``objective.reward: teacher``): the
chunk's Dirichlet-smoothed similarity to the teacher's continuations minus a baseline, 0 on unaudited
tokens. With immediate credit the loss per token is

    -(pi_S/mu)(y_t) * A_t  +  ref_kl_coef * k3(pi_ref(y_t) / pi_S(y_t))

Unaudited tokens get gradient from the anchor only, so use it with ``objective.ref_kl_coef > 0`` (the
shared k3 regularizer to the frozen initial student; 0.01-0.05 is the reconstruction's range). Every
chunk-level knob lives in the ``chat`` teacher spec.
"""

PRESET = {"reward": "teacher", "support": "sampled", "grad_path": "pg", "credit": {"gamma": 0.0}}
