"""Decoder layers that keep fewer activations for backward, with the same values and gradients (to float rounding).

Autograd keeps what each operator needs for its own gradient. For a SwiGLU MLP, ``down(silu(gate) * up)``, that
is four ``[tokens, intermediate]`` tensors: ``gate`` (for silu), ``silu(gate)`` and ``up`` (for the product) and
the product (for ``down``'s weight). ``SwiGLUDown`` keeps ``gate`` and ``up`` and recomputes the two others in
backward, which costs two elementwise passes and no product. For an RMSNorm, ``weight * x / rms(x)``, autograd
keeps ``x`` and the normalised ``x``; ``RMSNorm`` keeps ``x`` and ``1 / rms(x)``, one value per token. On the
SmolLM2 student of ``bench/vs_trl.py`` that is 46 of the 158 MiB a step's forward keeps (``docs/performance.md``).

``keep_fewer_activations`` swaps these in for the MLPs and norms of the model families whose code they reproduce,
wherever a forward records a gradient outside an autocast; elsewhere (no gradient, an autocast, a LoRA or other
wrapped projection) the modules' own forwards run.
"""

from __future__ import annotations

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


def keep_fewer_activations(model: torch.nn.Module) -> int:
    """Give the model's SwiGLU MLPs and RMSNorms (of ``MLPS`` and ``NORMS``) forwards that keep fewer activations
    for backward; the number of modules changed. Bound methods, so a deep copy computes with its own weights."""
    changed = 0
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
