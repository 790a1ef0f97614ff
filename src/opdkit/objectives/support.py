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


def sampled(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The sampled-token support: ``logprobs[b, t, ids[b, t]]``, ``[B, C, V] -> [B, C]``."""
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


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


def chunk_rows(vocab_size: int, memory_mib: float, live: int = 6) -> int:
    """Rows per block so that a block's ``live`` float32 ``[rows, V]`` tensors (student and teacher logits and
    log-probs, the divergence's intermediates, its gradient) fit in ``memory_mib``."""
    return max(1, int(memory_mib * 2**20 // (live * 4 * vocab_size)))


def chunked_full(hidden: torch.Tensor, head: torch.nn.Module, teacher_logits: Callable[[int, int], torch.Tensor],
                 divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk_size: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-position ``divergence(log_softmax(head(h) / T), log_softmax(teacher_logits(i, j) / T))`` for
    ``hidden [N, d]``, ``chunk_size`` rows at a time, and, without gradient, the student's entropy (at
    temperature 1) and ``KL(student || teacher)`` (at ``T``) per row as stats. ``teacher_logits(i, j)`` gives the teacher's ``[j - i, V]`` logits
    (or log-probs: log-softmax is shift-invariant) of rows ``i:j``.

    No ``[N, V]`` tensor of either model exists: each block's gradient with respect to its logits is taken in
    the forward pass and folded at once into the gradients of ``h`` and of the head (``[N, d]`` and ``[V, d]``),
    so the backward pass costs no recomputation when every row gets the same upstream gradient (a token mean),
    and recomputes each block once otherwise (a sequence mean, position weights): exact either way."""
    return _FusedHeadDivergence.apply(hidden, head.weight, head.bias, teacher_logits, divergence, chunk_size, temperature)


class _FusedHeadDivergence(torch.autograd.Function):
    @staticmethod
    def _blocks(ctx, hidden, weight, bias, upstream=None):
        """Yield ``(i, j, loss, logits_grad, student, teacher, student at T = 1)`` per block, ``loss`` and the gradient of
        ``sum(upstream * loss)`` (or of ``sum(loss)``) with respect to the block's student logits."""
        for i in range(0, hidden.shape[0], ctx.chunk_size):
            j = min(i + ctx.chunk_size, hidden.shape[0])
            with torch.enable_grad():
                logits = torch.nn.functional.linear(hidden[i:j], weight, bias).float().requires_grad_()
                student = (logits / ctx.temperature).log_softmax(-1)
                teacher = (ctx.teacher_logits(i, j).float() / ctx.temperature).log_softmax(-1)
                loss = ctx.divergence(student, teacher)
                weights = torch.ones_like(loss) if upstream is None else upstream[i:j]
                (logits_grad,) = torch.autograd.grad(loss, logits, weights)
            untempered = student.detach() if ctx.temperature == 1.0 else logits.detach().log_softmax(-1)
            yield i, j, loss.detach(), logits_grad, student.detach(), teacher, untempered

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, divergence, chunk_size, temperature):
        ctx.teacher_logits, ctx.divergence, ctx.chunk_size, ctx.temperature = teacher_logits, divergence, chunk_size, temperature
        ctx.autocast = torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type)
        n = hidden.shape[0]
        loss, entropy, reverse_kl = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(3))
        hidden_grad = torch.zeros(n, weight.shape[1], dtype=torch.float32, device=hidden.device)
        weight_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        bias_grad = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for i, j, block_loss, logits_grad, student, teacher, untempered in _FusedHeadDivergence._blocks(ctx, hidden, weight, bias):
            loss[i:j] = block_loss
            entropy[i:j] = -(untempered.exp() * untempered).sum(-1)
            reverse_kl[i:j] = (student.exp() * (student - teacher)).sum(-1)
            hidden_grad[i:j] = logits_grad @ weight.to(logits_grad.dtype)
            weight_grad += logits_grad.T @ hidden[i:j].to(logits_grad.dtype)
            if bias_grad is not None:
                bias_grad += logits_grad.sum(0)
        ctx.save_for_backward(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)
        ctx.mark_non_differentiable(entropy, reverse_kl)
        return loss, entropy, reverse_kl

    @staticmethod
    def backward(ctx, upstream, _entropy, _reverse_kl):
        hidden, weight, bias, hidden_grad, weight_grad, bias_grad = ctx.saved_tensors
        grads = [(upstream.unsqueeze(-1) * hidden_grad).to(hidden.dtype), None, None]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if upstream.numel() and bool((upstream == upstream[0]).all()):  # one scale for every row
                grads[1] = upstream[0] * weight_grad if ctx.needs_input_grad[1] else None
                grads[2] = upstream[0] * bias_grad if ctx.needs_input_grad[2] else None
            else:  # row weights differ: each block once more, its logits' gradient weighted by them
                weight_grad, bias_grad = torch.zeros_like(weight_grad), None if bias is None else torch.zeros_like(bias_grad)
                with torch.autocast(hidden.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                    for i, j, _, logits_grad, *_ in _FusedHeadDivergence._blocks(ctx, hidden, weight, bias, upstream):
                        weight_grad += logits_grad.T @ hidden[i:j].to(logits_grad.dtype)
                        if bias_grad is not None:
                            bias_grad += logits_grad.sum(0)
                grads[1], grads[2] = weight_grad, bias_grad
        grads[1] = None if grads[1] is None else grads[1].to(weight.dtype)
        grads[2] = None if grads[2] is None else grads[2].to(bias.dtype)
        return (*grads, None, None, None, None)
