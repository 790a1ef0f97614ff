"""Which vocabulary entries a distributional loss sees.

- full vocabulary: both distributions as they are;
- teacher top-k: the teacher's k most likely tokens at each position, both distributions renormalised
  over that set (so the divergence compares shapes on the teacher's support).
"""

from __future__ import annotations

import torch


def teacher_topk(student_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_teacher_logprobs: torch.Tensor):
    """``(student, teacher)`` log-probs over the teacher's top-k ids, each renormalised to sum to 1."""
    student = student_logprobs.gather(-1, topk_ids)
    return student.log_softmax(-1), topk_teacher_logprobs.log_softmax(-1)
