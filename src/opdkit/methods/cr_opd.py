"""CR-OPD (survey arXiv 2606.22793): classic OPD with counterfactual vocabulary routing.

A negative reward on the sampled token frees mass that vanilla OPD hands to the student's own mode. Here, on
tokens whose advantage is negative, the policy-gradient term is replaced by ``KL(p* || pi_S)``: ``p*`` moves the
sampled token's excess mass ``(pi_S(y) - pi_T(y))_+`` onto the tokens the teacher supports and the student can
reach (the two nuclei), in proportion to the teacher's probabilities; with no such token, plain suppression stays.
The survey states only the principle: the sets, the target and the loss are OUR RECONSTRUCTION (taxonomy section
5.1; ``opdkit.objectives.routing``). Logged: ``cr_routed_share``, ``cr_unroutable_share``, ``cr_set_size``,
``cr_teacher_mass``.
"""

PRESET = {"support": "sampled", "divergence": "reverse_kl", "grad_path": "pg", "credit": {"gamma": 0.0},
          "routing": "cr"}
