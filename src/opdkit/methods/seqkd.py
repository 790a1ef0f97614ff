"""Sequence-level KD (Kim & Rush 2016): supervised fine-tuning on teacher samples.

Not on-policy: the teacher writes the completions, the student maximises their likelihood,
``loss_t = -log pi_S(y_t)`` (the sampled-token forward KL up to a constant). The baseline every OPD run
should beat.
"""

PRESET = {"states": "teacher", "support": "sampled", "divergence": "forward_kl", "grad_path": "direct"}
