"""Which vocabulary entries a distributional loss sees (the support ``Omega``).

- ``full``: both distributions over the whole vocabulary;
- ``teacher_topk``: the teacher's k most likely tokens at each position;
- ``student_topk``: the student's k most likely tokens (needs the teacher's full distribution);
- ``sampled``: the sampled token only (route B: see ``divergence.phi`` and ``policy_gradient``).

On a truncated support both distributions are renormalised over it, or, with ``tail=True``, the
remaining mass of each is kept as one extra "tail" category so that nothing is thrown away.
For the full vocabulary, ``chunked_full`` evaluates a divergence from both models' hidden states a block of
positions at a time, so that no ``[N, V]`` tensor of the student or the teacher is ever held whole.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..products import project, times, weight_gradient
from .divergence import distributional, kl_direction


def sampled(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The sampled-token support: ``logprobs[b, t, ids[b, t]]``, ``[B, C, V] -> [B, C]``."""
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def sampled_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(logits)[ids], logsumexp(logits))`` in float32, ``[B, C, V] -> [B, C]`` twice, without a
    float32 log-softmax of the whole ``logits``."""
    lse = logits.float().logsumexp(-1)
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float() - lse, lse


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """Append ``log(1 - sum p)`` as a last category (clamped away from log 0)."""
    tail = torch.log1p(-logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([logprobs, tail], dim=-1)


def restrict(student_logprobs: torch.Tensor, teacher_on_support: torch.Tensor, ids: torch.Tensor, tail: bool = False):
    """``(student, teacher)`` log-probs on the support ``ids`` (``[..., k]``), renormalised or with a tail.

    ``student_logprobs`` is over the whole vocabulary; ``teacher_on_support[..., j]`` is the teacher's
    log-prob of ``ids[..., j]`` (as a server returns its top-k, or gathered by the caller)."""
    student = student_logprobs.gather(-1, ids)
    if tail:
        return _with_tail(student), _with_tail(teacher_on_support)
    return student.log_softmax(-1), teacher_on_support.log_softmax(-1)


def student_topk(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, k: int, tail: bool = False):
    """The student's top-k support (the teacher's full distribution gathered on it); the ids are chosen
    without gradient."""
    ids = student_logprobs.detach().topk(min(k, student_logprobs.shape[-1]), dim=-1).indices
    return restrict(student_logprobs, teacher_logprobs.gather(-1, ids), ids, tail)


SUB_ROWS = 16  # rows of a block whose probabilities exist at once in the closed-form KL gradients (3 MiB at V = 49,152)


def chunk_rows(vocab_size: int, memory_mib: float, live: int) -> int:
    """Rows per block so that a block's ``live`` float32 ``[rows, V]`` tensors fit in ``memory_mib``."""
    return max(1, int(memory_mib * 2**20 // (live * 4 * vocab_size)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum(a * b, -1)`` without an ``[rows, V]`` product (``einsum`` ran it as a ``bmm``, five times
    slower on a ``[128, 49152]`` block)."""
    return torch.linalg.vecdot(a, b)


def chunked_full(hidden: torch.Tensor, head: torch.nn.Module, teacher_logits: Callable[[int, int], torch.Tensor],
                 divergence: str, *, beta: float = 0.5, alpha: float = 0.5, temperature: float = 1.0,
                 chunk_size: int | None = None, memory_mib: float = 256.0, teacher_logprobs: bool = False):
    """``(loss, entropy, reverse_kl)`` per row of ``hidden [N, d]``: ``distributional(divergence)`` between
    ``log_softmax(head(h) / T)`` and ``log_softmax(teacher_logits(i, j) / T)``, and, without gradient, the student's
    entropy at ``T = 1`` and ``KL(student || teacher)`` at ``T``. ``teacher_logits(i, j)`` returns a fresh
    ``[j - i, V]`` tensor of the teacher's logits (or log-probs) for rows ``i:j``; it is overwritten. With
    ``teacher_logprobs`` it returns float32 log-probs normalised already (a local teacher's ``HeadStats.observe``,
    which takes their logsumexp for its own statistics), which the blocks use as they are at ``T = 1``.

    Rows go ``chunk_size`` at a time (default: as many as fit ``memory_mib``), so no ``[N, V]`` tensor of either
    model exists. Each block's gradient with respect to its logits is taken in the forward pass (in closed form
    where the divergence is a KL, by autograd otherwise) and folded at once into the gradients of ``h`` and of
    the head (``[N, d]`` and ``[V, d]``): backward costs nothing more when every row gets the same upstream
    gradient (a token mean) and recomputes each block once otherwise (a sequence mean, position weights). One
    block of fewer rows than the head's width keeps its logits' gradient instead, for backward to scale row by row
    and take the head's gradient from, whatever the upstream gradient."""
    direction = kl_direction(divergence, beta, alpha)
    if chunk_size is None:
        chunk_size = chunk_rows(head.weight.shape[0], memory_mib, live=4 if direction else 12)
    block = _Block(teacher_logits, direction, lambda s, t: distributional(divergence, s, t, beta=beta, alpha=alpha),
                   chunk_size, temperature, teacher_logprobs)
    return _FusedHeadDivergence.apply(hidden, head.weight, head.bias, block)


class _Block:
    """One block of rows: the loss, its gradient with respect to the student's logits, and the stats."""

    def __init__(self, teacher_logits, direction, divergence, size, temperature, teacher_logprobs):
        self.teacher_logits, self.direction, self.divergence = teacher_logits, direction, divergence
        self.size, self.temperature = size, temperature
        self.normalised = teacher_logprobs and temperature == 1.0  # the teacher's rows need no logsumexp

    def __call__(self, i: int, j: int, logits: torch.Tensor, upstream: torch.Tensor | None = None):
        """``(loss, logits_grad, entropy, reverse_kl)`` for rows ``i:j`` given their float32 student logits
        (overwritten); ``logits_grad`` is that of ``sum(upstream * loss)``, or of ``sum(loss)``."""
        T = self.temperature
        entropy = None
        if T != 1.0:
            logprobs = logits.log_softmax(-1)
            entropy = -_dot(logprobs.exp(), logprobs)
            del logprobs
            logits.div_(T)
        teacher = self.teacher_logits(i, j).float()
        if T != 1.0:
            teacher.div_(T)
        if self.direction is None:  # d/dz = (d/d(z / T)) / T
            loss, grad, student, teacher = self._autograd(logits, teacher, upstream)
            p = student.exp()
            reverse_kl = _dot(p, student) - _dot(p, teacher)
            entropy = -_dot(p, student) if entropy is None else entropy
        else:
            student = logits.sub_(logits.logsumexp(-1, keepdim=True))
            if not self.normalised:
                teacher = teacher.sub_(teacher.logsumexp(-1, keepdim=True))
            loss, reverse_kl, block_entropy = (student.new_empty(student.shape[0]) for _ in range(3))
            # SUB_ROWS rows at a time, the gradient written over the teacher's rows: no [rows, V] tensor beyond the two
            for r in range(0, student.shape[0], SUB_ROWS):
                s, t = student[r : r + SUB_ROWS], teacher[r : r + SUB_ROWS]
                p = s.exp()
                p_s, p_t = _dot(p, s), _dot(p, t)
                block_entropy[r : r + SUB_ROWS], reverse_kl[r : r + SUB_ROWS] = -p_s, p_s - p_t
                if self.direction == "forward":  # KL(q || p); d/dz = (p - q) / T
                    q = t.exp()
                    loss[r : r + SUB_ROWS] = _dot(q, t) - _dot(q, s)
                    t.copy_(p.sub_(q))
                else:  # KL(p || q); d/dz = p * (log p - log q - KL) / T
                    loss[r : r + SUB_ROWS] = p_s - p_t
                    t.neg_().add_(s).sub_(loss[r : r + SUB_ROWS].unsqueeze(-1)).mul_(p)
            grad, entropy = teacher, block_entropy if entropy is None else entropy
            if upstream is not None:
                grad.mul_(upstream.unsqueeze(-1))
        if T != 1.0:
            grad.div_(T)
        return loss.detach(), grad, entropy, reverse_kl.detach()

    def _autograd(self, logits, teacher, upstream):
        with torch.enable_grad():
            logits = logits.requires_grad_()
            student = logits.log_softmax(-1)
            teacher = teacher if self.normalised else teacher.log_softmax(-1)
            loss = self.divergence(student, teacher)
            weights = torch.ones_like(loss) if upstream is None else upstream
            (grad,) = torch.autograd.grad(loss, logits, weights)
        return loss, grad, student.detach(), teacher


def _add(total: torch.Tensor | None, block: torch.Tensor) -> torch.Tensor:
    """``total + block`` in place; the first block becomes the total (a bias's gradient, float32)."""
    return block if total is None else total.add_(block)


def _head_grads(weight_grad, bias_grad, weight, bias):
    """The summed head gradients, zeros where no block contributed (no rows)."""
    if weight_grad is None:
        weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        bias_grad = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    return weight_grad, bias_grad


class _FusedHeadDivergence(torch.autograd.Function):
    @staticmethod
    def _blocks(block: _Block, hidden, weight, bias, upstream=None):
        """``(i, j, loss, logits_grad, entropy, reverse_kl)`` block by block."""
        for i in range(0, hidden.shape[0], block.size):
            j = min(i + block.size, hidden.shape[0])
            logits = project(hidden[i:j], weight, bias, row_major=False).float()  # F.linear; widened for a bf16 head
            yield i, j, *block(i, j, logits, None if upstream is None else upstream[i:j])

    @staticmethod
    def forward(ctx, hidden, weight, bias, block: _Block):
        # the logits' gradient meets the head in the dtype their product ran in: bf16 where hidden states and head
        # are both bf16, as a plain bf16 linear's backward would (twice float32's rate where bf16 units exist);
        # float32 otherwise (a float32 head, or a bf16 one widened to float32 hidden states)
        product = weight.dtype if hidden.dtype == weight.dtype else torch.float32
        ctx.block, ctx.product = block, product
        ctx.autocast = torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type)
        n = hidden.shape[0]
        loss, entropy, reverse_kl = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(3))
        hidden_grad = torch.zeros(n, weight.shape[1], dtype=torch.float32, device=hidden.device)
        weight_grad = bias_grad = logits_grad = None  # [V, d]: the first block's, then a sum in float32
        # one block of fewer rows than the head's width: keep its [rows, V] logits' gradient (`product`) for backward
        # to scale by the rows' upstream gradients and take the head's from, rather than a [V, d] one held from here
        # to there (and the block computed again for row weights)
        deferred = n <= block.size and n * product.itemsize < weight.shape[1] * weight.element_size()
        accumulate = weight.dtype if n <= block.size else torch.float32
        for i, j, block_loss, logits_grad, block_entropy, block_kl in _FusedHeadDivergence._blocks(block, hidden, weight, bias):
            loss[i:j], entropy[i:j], reverse_kl[i:j] = block_loss, block_entropy, block_kl
            logits_grad = logits_grad.to(product)
            hidden_grad[i:j] = times(logits_grad, weight)  # the [rows, V] block cast, never the [V, d] head
            if not deferred:
                weight_grad = weight_gradient(logits_grad, hidden[i:j], accumulate, weight_grad)
                if bias is not None:
                    bias_grad = _add(bias_grad, logits_grad.sum(0, dtype=torch.float32))
        if not deferred:
            weight_grad, bias_grad, logits_grad = *_head_grads(weight_grad, bias_grad, weight, bias), None
        ctx.save_for_backward(hidden, weight, bias, hidden_grad, weight_grad, bias_grad, logits_grad)
        ctx.mark_non_differentiable(entropy, reverse_kl)
        return loss, entropy, reverse_kl

    @staticmethod
    def backward(ctx, upstream, _entropy, _reverse_kl):
        hidden, weight, bias, hidden_grad, weight_grad, bias_grad, logits_grad = ctx.saved_tensors
        grads = [(upstream.unsqueeze(-1) * hidden_grad).to(hidden.dtype), None, None]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if logits_grad is not None:  # the one block's gradient, the head's taken once: (u G).T h = G.T (u h)
                scaled = hidden * upstream.unsqueeze(-1)  # each row's upstream gradient on [N, d], not on [N, V]
                grads[1] = weight_gradient(logits_grad, scaled, weight.dtype) if ctx.needs_input_grad[1] else None
                grads[2] = logits_grad.T.float() @ upstream if ctx.needs_input_grad[2] else None
            elif upstream.numel() and bool((upstream == upstream[0]).all()):  # one scale for every row
                grads[1] = weight_grad.mul_(upstream[0]) if ctx.needs_input_grad[1] else None  # in place: no copy
                grads[2] = bias_grad.mul_(upstream[0]) if ctx.needs_input_grad[2] else None
            else:  # row weights differ: each block once more, its logits' gradient weighted by them
                weight_grad = bias_grad = None
                with torch.autocast(hidden.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                    for i, j, _, logits_grad, *_ in _FusedHeadDivergence._blocks(ctx.block, hidden, weight, bias, upstream):
                        weight_grad = weight_gradient(logits_grad.to(ctx.product), hidden[i:j], torch.float32, weight_grad)
                        if bias is not None:
                            bias_grad = _add(bias_grad, logits_grad.sum(0, dtype=torch.float32))
                grads[1], grads[2] = _head_grads(weight_grad, bias_grad, weight, bias)
        grads[1] = None if grads[1] is None else grads[1].to(weight.dtype)
        grads[2] = None if grads[2] is None else grads[2].to(bias.dtype)
        return (*grads, None)
