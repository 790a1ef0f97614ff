"""Matrix products in the two forms torch's own do not serve well on a CPU: a decode step's few rows, and weights
stored in bf16 for float32 arithmetic.

**A few rows.** At decode time every projection multiplies at most a few rows; the product is bound by reading the
weights. ``few_rows`` runs it through opdkit's ``rows_matmul`` kernel (``native/products.c``), which reads each
weight once for every row: the SmolLM2 student decodes 4 rows at 15.6 ms per token against 30 with torch's product
(AMD EPYC Zen 3, 2 threads; ``docs/performance.md``).

**bf16 storage, float32 arithmetic** (``float32_arithmetic``). On a processor without bf16 units a bf16 product is
emulated (7x slower than float32 for a layer of the SmolLM2 teacher here) while the weights would happily sit in
half the memory. Such a model keeps its weights in bf16 and every ``nn.Linear`` widens them to float32 as it
computes: a few rows through ``bf16_rows_matmul`` (widened as read), more rows through float32 copies of at most
``WIDEN_ROWS`` output rows at a time, so no float32 copy of a whole weight ever exists. The results are those of
float32 arithmetic on the bf16-rounded weights, to float rounding. A trained model (a bf16 student in a float32
run) gets the same in its backward (``Widened``): the input's gradient through the widened weight again, the
weight's gradient in float32, rounded to bf16 once per pass.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .native import kernel

FEW_ROWS = 16  # at most this many rows of float32 on a CPU: ``few_rows`` (measured at 1, 4 and 16 rows)
WIDEN_ROWS = 8192  # output rows of a bf16 weight widened to float32 at once (18 MB for a hidden size of 576)
KERNELS = {torch.float32: "rows_matmul", torch.bfloat16: "bf16_rows_matmul"}


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_major: bool) -> torch.Tensor:
    """``x [N, d] @ weight.T + bias``, ``F.linear`` itself unless: with ``row_major`` (``decode.row_major``) as
    ``(weight @ x.T).T``, and for at most ``FEW_ROWS`` float32 rows on a CPU by ``few_rows``; a bf16 ``weight`` with
    float32 ``x`` is widened (``widened``) unless an autocast decides the product (``mixed``). A fixed rule, not a
    timing: a seed gives the same bits in every run on a machine."""
    if x.shape[0] == 0:  # a head asked for no position (``Rollouts.completion_logits`` for hidden states only)
        return x.new_zeros(0, weight.shape[0], dtype=torch.float32 if mixed(x, weight) else x.dtype)
    out = few_rows(x, weight) if row_major else None
    if out is None and mixed(x, weight):
        out = widened(x, weight)
    elif out is None and not row_major:
        return F.linear(x, weight, bias)
    elif out is None:
        out = (weight @ x.T).T
    return out if bias is None else out + bias


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` in float32 by the ``rows_matmul`` kernels (float32 or bf16 weights), or None where they do
    not apply: more than ``FEW_ROWS`` rows, not on a CPU, an autocast or a gradient to honour, or no C compiler."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (x.shape[0] > FEW_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype not in KERNELS
            or torch.is_autocast_enabled("cpu") or wants_grad or (matmul := kernel(KERNELS[weight.dtype])) is None):
        return None
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    matmul(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1],
           torch.get_num_threads())
    return out


def widen(weight: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a bf16 tensor (exact), by the ``bf16_to_float`` kernel on a CPU where it builds."""
    convert = kernel("bf16_to_float") if weight.device.type == "cpu" else None
    if convert is None:
        return weight.float()
    weight = weight.contiguous()
    out = torch.empty(weight.shape, dtype=torch.float32)
    convert(weight.data_ptr(), out.data_ptr(), weight.numel(), torch.get_num_threads())
    return out


def mixed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` meets ``weight`` in float32 arithmetic: float32 rows, bf16 weights, no autocast to decide."""
    return (x.dtype == torch.float32 and weight.dtype == torch.bfloat16
            and not torch.is_autocast_enabled(x.device.type))


def widened(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [N, d] @ weight.T`` in float32 for a bf16 ``weight [V, d]``, widened ``WIDEN_ROWS`` output rows at a time.
    No gradient of its own (``Widened`` gives one)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise RuntimeError("widened has no backward: use Widened.apply where a gradient is needed")
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], WIDEN_ROWS):
        torch.mm(x, widen(weight[start : start + WIDEN_ROWS]).T, out=out[:, start : start + WIDEN_ROWS])
    return out


def times(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g [N, V] @ weight [V, d]``: the gradient of ``x`` in ``x @ weight.T``. In float32 arithmetic (``mixed``)
    summed over widened slices of ``WIDEN_ROWS`` rows; otherwise ``g`` cast to the weight's dtype, never the weight."""
    if not mixed(g, weight):
        return g.to(weight.dtype) @ weight
    out = g[:, :WIDEN_ROWS] @ widen(weight[:WIDEN_ROWS])  # a layer's whole weight, or the head's first slice
    for start in range(WIDEN_ROWS, weight.shape[0], WIDEN_ROWS):
        out.addmm_(g[:, start : start + WIDEN_ROWS], widen(weight[start : start + WIDEN_ROWS]))
    return out


def weight_gradient(g: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                    total: torch.Tensor | None = None) -> torch.Tensor:
    """``g [N, V].T @ x [N, d]`` (the gradient of a weight ``[V, d]``), its products in ``g``'s dtype (``x`` cast to
    it), returned in ``dtype`` or, with ``total``, added into it in place. Where the result's dtype is not the
    products' it is written ``WIDEN_ROWS`` rows at a time, so no whole ``[V, d]`` exists in the other dtype: no
    float32 copy of a bf16 head's gradient, no bf16 temporary of a float32 sum of blocks."""
    x = x.to(g.dtype)
    if total is not None and total.dtype == g.dtype:
        return total.addmm_(g.T, x)
    if total is None and dtype == g.dtype:
        return g.T @ x
    out = torch.empty(g.shape[1], x.shape[1], dtype=dtype, device=g.device) if total is None else total
    for start in range(0, g.shape[1], WIDEN_ROWS):
        part = g[:, start : start + WIDEN_ROWS].T @ x
        if total is None:
            out[start : start + WIDEN_ROWS] = part
        else:
            out[start : start + WIDEN_ROWS] += part
    return out


class Widened(torch.autograd.Function):
    """``x [N, d] @ weight.T + bias`` in float32 on a bf16 weight, with a backward: saves ``x`` (as ``F.linear``
    does) and the bf16 weight itself, widens it again for the input's gradient, and rounds the weight's float32
    gradient to bf16."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return project(x, weight, bias, row_major=False)  # widened: no gradient is recorded inside forward

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        grad_x = times(g, weight) if ctx.needs_input_grad[0] else None
        grad_weight = weight_gradient(g, x, weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def through(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for activations of another dtype than the layer's weights (a teacher's float32 hidden states
    and its bf16 LM head, applied where no autocast decides): ``x`` in the weights' dtype, unless the layer is in
    float32 arithmetic, which widens its weights to float32 ``x`` itself."""
    return layer(x if is_float32_arithmetic(layer) else x.to(layer.weight.dtype))


def other_layers(model: torch.nn.Module) -> list[str]:
    """The kinds of layer holding a matrix that ``float32_arithmetic`` cannot widen (anything but ``nn.Linear`` and
    ``nn.Embedding``, such as GPT-2's ``Conv1D``): their products would meet bf16 weights with float32 inputs."""
    return sorted({type(m).__name__ for m in model.modules() if type(m) not in (torch.nn.Linear, torch.nn.Embedding)
                   and any(p.dim() >= 2 for p in m.parameters(recurse=False))})


def float32_arithmetic(model: torch.nn.Module) -> torch.nn.Module:
    """Make a model whose weights are bf16 compute in float32: every ``nn.Linear`` widens its weight as it computes
    (``project``, or ``Widened`` where a gradient is wanted), every ``nn.Embedding`` returns float32 rows; norms and
    other elementwise operators already promote bf16 weights against float32 activations, and autograd rounds
    their gradients back to bf16. ``is_float32_arithmetic`` says so afterwards. Bound methods, so that a deep copy
    of the model (a self teacher) computes with its own weights. A model with ``other_layers`` is refused."""
    if others := other_layers(model):
        raise ValueError(f"float32 arithmetic on bf16 weights widens nn.Linear and nn.Embedding layers; this model "
                         f"also has {', '.join(others)}")
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward, module._opd_float32_arithmetic = types.MethodType(_linear, module), True
        elif type(module) is torch.nn.Embedding:
            module.forward, module._opd_float32_arithmetic = types.MethodType(_embedding, module), True
    model._opd_float32_arithmetic = True
    return model


def is_float32_arithmetic(module: torch.nn.Module) -> bool:
    """Whether ``module`` (a model, or one of its linear layers or embeddings) went through ``float32_arithmetic``."""
    return getattr(module, "_opd_float32_arithmetic", False)


def _linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or self.weight.requires_grad)
    if needs_grad and mixed(flat, self.weight):
        out = Widened.apply(flat, self.weight, self.bias)
    else:
        out = project(flat, self.weight, self.bias, row_major=flat.shape[0] <= FEW_ROWS and not needs_grad)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _embedding(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, self.weight, self.padding_idx).float()
