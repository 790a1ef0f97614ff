"""AdamW for a student whose weights are kept in bf16 (``student.dtype: bf16``): half the training state.

With float32 weights a step holds 16 bytes a parameter (weights, gradients, two moments); with bf16 ones, 8. But
bf16 keeps 8 bits of mantissa: an update of 1e-5 on a weight of 0.02 is 1/8 of the spacing between neighbouring
bf16 values, and rounding to the nearest one drops it, every step. So each update is computed in float32 and
written back by **stochastic rounding** (as torchao's ``bf16_stochastic_round``): up to the next bf16 value with
probability equal to the distance covered, so that the weights move by the update in expectation. The moments are
rounded the same way: ``beta2 * v`` with beta2 = 0.999 is within half a spacing of ``v`` and would never decay.

The arithmetic is torch's AdamW, term for term (decoupled weight decay first, then the bias-corrected step), and
float32 parameters (a LoRA adapter on a bf16 base, a method's value head) are updated as torch's eager AdamW does.
The rounding noise is a hash of each element's index and a key drawn from (seed, step, parameter), so a resumed run
rounds as the uninterrupted one and every process of a DDP run rounds its replica alike.

On CPU the bf16 update runs as one C loop (``opdkit.native``: a fused pass instead of about 25 eager ones), split
over torch's threads; without a C compiler, and on CUDA, the same arithmetic runs as torch operators.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from .native import kernel

SLICE = 1 << 21  # elements updated at once by the eager path: bounds its float32 temporaries to a few 8 MB slices
THREADED = 1 << 20  # tensors at least this large are split over threads by the C path


def fused_on(device: torch.device) -> bool:
    """Whether bf16 tensors on ``device`` update through the C kernel (CPU, a compiler) or torch operators."""
    return device.type == "cpu" and kernel("adamw_bf16") is not None


class AdamW(torch.optim.Optimizer):
    """torch's AdamW with bf16 weights and moments updated by stochastic rounding; float32 ones as torch does.
    ``fused``: None (default) runs bf16 tensors on CPU through the C kernel where it builds, True requires it (an
    error without a compiler), False always runs torch operators."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, fused: bool | None = None):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.kernel = kernel("adamw_bf16") if fused is not False else None
        if fused and self.kernel is None:
            raise RuntimeError("the fused bf16 AdamW needs a C compiler (cc, gcc or $CC) to build opdkit's kernel")
        self.threads = ThreadPoolExecutor(torch.get_num_threads()) if self.kernel is not None else None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("opdkit's AdamW takes no closure")
        index, pending = 0, []  # the C kernel's calls, queued for every parameter before any is waited on
        for group in self.param_groups:
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"])
                tensors = [t.view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                hyper = hyperparameters(group, step)
                if param.dtype != torch.bfloat16:
                    update_eager(*tensors, hyper, key=None)
                elif self.kernel is not None and fused_on(param.device) and param.grad.dtype == torch.bfloat16:
                    pending += self.update_fused(*tensors, hyper, rounding_key(self.seed, step, index))
                else:
                    update_eager(*tensors, hyper, rounding_key(self.seed, step, index))
        for call in pending:
            call.result()

    def update_fused(self, weight, grad, exp_avg, exp_avg_sq, hyper: dict, key: int) -> list:
        """Queues the kernel's update of one bf16 tensor on the threads (a large one split among them); returns the
        calls to wait on. The parameters are independent, so every thread stays busy across them."""
        n = weight.numel()
        args = [t.data_ptr() for t in (weight, grad, exp_avg, exp_avg_sq)]
        constants = [1 - hyper["lr"] * hyper["decay"], 1 - hyper["beta1"], hyper["beta2"], 1 - hyper["beta2"],
                     hyper["root_correction"], hyper["eps"], -hyper["step_size"], key]
        parts = torch.get_num_threads() if n >= THREADED else 1
        bounds = [n * i // parts for i in range(parts + 1)]
        return [self.threads.submit(self.kernel, *args, bounds[i], bounds[i + 1], *constants) for i in range(parts)]


def hyperparameters(group: dict, step: int) -> dict:
    beta1, beta2 = group["betas"]
    return {"lr": group["lr"], "decay": group["weight_decay"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
            "step_size": group["lr"] / (1 - beta1 ** step), "root_correction": math.sqrt(1 - beta2 ** step)}


def rounding_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one parameter's rounding noise at one step."""
    return (seed * 0x85EBCA77 + step * 0xC2B2AE3D + index * 0x27D4EB2F) & 0xFFFFFFFF


def noise(indices: torch.Tensor, key: int) -> torch.Tensor:
    """Uniform int32 in [0, 2**16), one per element index (int64): a 32-bit integer hash of the index and ``key``,
    the C kernel's ``noise`` in torch operators (int64 arithmetic, products below 2**63, low 32 bits kept)."""
    x = (indices * 0x9E3779B1 & 0xFFFFFFFF) ^ key
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (((x >> 16) ^ x) & 0xFFFF).to(torch.int32)


def round_stochastic(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``values`` (float32) rounded to bf16, up or down with probabilities that leave the mean unchanged, given
    ``noise`` uniform in [0, 2**16): adding it to the 16 bits bf16 drops and truncating rounds away from zero
    exactly when the noise exceeds the distance to the next value. Overwrites ``values``."""
    values.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return values.to(torch.bfloat16)  # exact: the low 16 bits are zero


def update_eager(weight, grad, exp_avg, exp_avg_sq, hyper: dict, key: int | None) -> None:
    """One AdamW step on flat tensors in torch operators, slice by slice: in place for float32 ones (``key``
    None), through float32 copies rounded back with ``key``'s noise for bf16 ones."""
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    for start in range(0, weight.numel(), SLICE):
        part = slice(start, start + SLICE)
        w, m, v = (t[part].float() for t in (weight, exp_avg, exp_avg_sq))  # views of float32 state, else copies
        g = grad[part].float()
        w.mul_(1 - hyper["lr"] * hyper["decay"])
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        w.addcdiv_(m, v.sqrt().div_(hyper["root_correction"]).add_(hyper["eps"]), value=-hyper["step_size"])
        if key is not None:
            r = noise(torch.arange(start, start + len(w), device=w.device), key)
            for target, value in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
                target[part] = round_stochastic(value, r)
