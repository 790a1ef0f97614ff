"""Decoder layers that keep fewer activations for backward, with the same values and gradients (to float rounding).

Autograd keeps what each operator needs for its own gradient. For a SwiGLU MLP, ``down(silu(gate) * up)``, that
is four ``[tokens, intermediate]`` tensors: ``gate`` (for silu), ``silu(gate)`` and ``up`` (for the product) and
the product (for ``down``'s weight). ``SwiGLUDown`` keeps ``gate`` and ``up`` and recomputes the two others in
backward, which costs two elementwise passes and no product. For an RMSNorm, ``weight * x / rms(x)``, autograd
keeps ``x`` and the normalised ``x``; ``RMSNorm`` keeps ``x`` and ``1 / rms(x)``, one value per token. On the
SmolLM2 student of ``bench/vs_trl.py`` that is 47 of the 158 MiB a step's forward keeps (``docs/performance.md``).

An input embedding's backward makes a dense ``[V, d]`` gradient for the few rows a batch looked up, and with tied
weights autograd holds it beside the head's ``[V, d]`` gradient until it has added the two: on that student the
step's highest point (54 MiB each in bf16; 272 MiB each for Qwen2-0.5B's vocabulary). With ``rows_into_grad`` a
tied lookup reads the weight outside autograd and adds its rows' gradients into ``weight.grad`` in place once they
are known (``register_post_accumulate_grad_hook`` on the looked-up rows). Gradient hooks on the weight would not see
that addition: a forward where the weight has hooks runs the plain lookup, and so does a run of several processes
(``rows_into_grad=False``), whose reduction (DDP's) hooks in where Python cannot see it.

``keep_fewer_activations`` swaps these in for the MLPs and norms of the model families whose code they reproduce,
and for the input embedding, wherever a forward records a gradient outside an autocast; elsewhere (no gradient, an
autocast, a LoRA or other wrapped projection) the modules' own forwards run.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from .products import project, times, weight_gradient

# modules whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with silu, or Llama's RMSNorm
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


class SwiGLUDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a bias-free ``down`` projection of weight ``weight``, keeping only ``gate`` and
    ``up`` for backward. The product runs as ``opdkit.products`` runs a layer (float32 arithmetic on bf16 weights
    included), and backward takes the gradients as autograd and ``products.Widened`` would."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        hidden = F.silu(gate) * up
        out = project(hidden.reshape(-1, hidden.shape[-1]), weight, None, row_major=False)
        return out.reshape(*hidden.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        g = g.reshape(-1, g.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = weight_gradient(g, (silu * up).reshape(-1, up.shape[-1]), weight.dtype)
        grad_hidden = times(g, weight).reshape(up.shape).to(up.dtype)
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad_hidden * silu if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, grad_weight


class RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, ``weight * (x / sqrt(mean(x^2) + eps))`` taken in float32 and cast back to ``x``'s dtype
    before the weight, keeping ``x`` and ``1 / sqrt(mean(x^2) + eps)`` for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = x.to(torch.float32)
        inverse_rms = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, inverse_rms, weight)
        return weight * (wide * inverse_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, inverse_rms, weight = ctx.saved_tensors
        wide = x.to(torch.float32)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * (wide * inverse_rms).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (g * weight).to(torch.float32)
        # through wide * inverse_rms, and inverse_rms = rsqrt(mean(wide^2) + eps): d/dv rsqrt(v) = -rsqrt(v)^3 / 2
        grad_inverse_rms = (grad_normed * wide).sum(-1, keepdim=True)
        grad_mean = grad_inverse_rms * -0.5 * inverse_rms.pow(3)
        grad_x = grad_normed * inverse_rms + wide * (2 * grad_mean / x.shape[-1])
        return grad_x.to(x.dtype), grad_weight, None


def keep_fewer_activations(model: torch.nn.Module, rows_into_grad: bool = True) -> int:
    """Give the model's SwiGLU MLPs and RMSNorms (of ``MLPS`` and ``NORMS``) forwards that keep fewer activations
    for backward, and with ``rows_into_grad`` (one process) its input embedding a backward that adds into the
    weight's gradient; the number of modules changed. Bound methods, so a deep copy computes with its own weights."""
    changed = 0
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (rows_into_grad and type(embedding) is torch.nn.Embedding and head is not None
            and head.weight is embedding.weight  # tied: the gradient autograd would hold twice
            and embedding.max_norm is None and not embedding.scale_grad_by_freq and not embedding.sparse):
        embedding._opd_lookup, embedding.forward = embedding.forward, types.MethodType(_embedding, embedding)
        changed += 1
    for module in model.modules():
        name = type(module).__name__
        if name in MLPS and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation") and all(
                type(getattr(module, p)) is torch.nn.Linear for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_mlp, module)
            changed += 1
        elif name in NORMS:
            module.forward = types.MethodType(_norm, module)
            changed += 1
    return changed


def _records_gradient(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            and (x.requires_grad or any(w.requires_grad for w in weights)))


def _mlp(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    if down.bias is None and _records_gradient(x, down.weight, self.gate_proj.weight, self.up_proj.weight):
        return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), down.weight)
    return down(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _norm(self, x: torch.Tensor) -> torch.Tensor:
    if _records_gradient(x, self.weight):
        return RMSNorm.apply(x, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def _embedding(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    hooked = self.weight._backward_hooks or getattr(self.weight, "_post_accumulate_grad_hooks", None)
    if not (torch.is_grad_enabled() and self.weight.requires_grad) or hooked:  # hooks see the whole gradient
        return self._opd_lookup(ids)  # the forward it had (``products`` widens a bf16 table's rows)
    with torch.no_grad():  # the module's own lookup, outside autograd
        rows = self._opd_lookup(ids).requires_grad_()
    rows.register_post_accumulate_grad_hook(functools.partial(_add_rows, self.weight, ids, self.padding_idx))
    return rows


def _add_rows(weight: torch.nn.Parameter, ids: torch.Tensor, padding_idx: int | None, rows: torch.Tensor) -> None:
    """``weight.grad[ids] += rows.grad`` (F.embedding's gradient, which leaves the padding row out), in place."""
    grad, rows.grad = rows.grad.reshape(-1, rows.shape[-1]), None
    ids = ids.reshape(-1)
    if padding_idx is not None:
        keep = ids != padding_idx
        grad, ids = grad[keep], ids[keep]
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad.index_add_(0, ids, grad.to(weight.grad.dtype))
