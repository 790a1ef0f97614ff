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

**8-bit moments** (``optim.moments: 8bit``, float32 or bf16 weights): a quarter of float32's moment memory, half of
bf16's. Each tensor of at least ``MIN_8BIT`` elements keeps its moments as 8-bit codes in blocks of ``BLOCK``
elements, each block scaled by its largest magnitude in float32 (block-wise quantization, as bitsandbytes' and
torchao's 8-bit AdamW). The first moment is a sign and a 7-bit float (2^-15 to 1 of its block's scale); the second
is kept as its square root (an 8-bit float over the same range, codes 6.25% apart), the step's own denominator,
whose range is that of the gradient rather than its square, and which never codes a nonzero value as 0. Codes round
stochastically, leaving the first moment and the second (the code's square) unbiased: rounded to the nearest, as
theirs are, a second moment whose gradients shrink cannot decay by 0.1% a step, and its weight steps less and less
than float32 AdamW's would (``native/adamw_8bit.c``). The update itself is computed in float32 from the decoded
moments, as above. Smaller tensors (norms, biases) keep moments in their weights' dtype.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
import torch.nn.functional as F

from .native import kernel

SLICE = 1 << 21  # elements updated at once by the eager path: bounds its float32 temporaries to a few 8 MB slices
THREADED = 1 << 20  # tensors at least this large are split over threads by the C path
BLOCK = 256  # elements sharing one scale in 8-bit moments (native/adamw_8bit.c's BLOCK)
MIN_8BIT = 4096  # smaller tensors keep their moments in the weights' dtype
M_BASE, S_BASE = 112 << 3, 112 << 4  # code 1 of m and of s: 2^-15 (its exponent and 3 or 4 mantissa bits)
KEY_MOMENTS = 0x632BE5AB  # the moments' rounding noise, keyed apart from the weights'


def fused_on(device: torch.device) -> bool:
    """Whether bf16 tensors on ``device`` update through the C kernel (CPU, a compiler) or torch operators."""
    return device.type == "cpu" and kernel("adamw_bf16") is not None


class AdamW(torch.optim.Optimizer):
    """torch's AdamW with bf16 weights and moments updated by stochastic rounding; float32 ones as torch does.
    ``fused``: None (default) runs bf16 tensors on CPU through the C kernel where it builds, True requires it (an
    error without a compiler), False always runs torch operators."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, fused: bool | None = None, moments: str = "auto"):
        if moments not in ("auto", "8bit"):
            raise ValueError(f"moments {moments!r}: auto (the weights' dtype) or 8bit")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed, self.moments = seed, moments
        self.kernel = kernel("adamw_bf16") if fused is not False else None
        self.kernel_8bit = kernel("adamw_8bit") if fused is not False and moments == "8bit" else None
        if fused and (self.kernel is None or (moments == "8bit" and self.kernel_8bit is None)):
            raise RuntimeError("the fused AdamW needs a C compiler (cc, gcc or $CC) to build opdkit's kernels")
        self.threads = ThreadPoolExecutor(torch.get_num_threads()) if self.kernel is not None else None
        self.register_load_state_dict_pre_hook(_keep_8bit_state)
        self.register_load_state_dict_post_hook(_restore_8bit_state)

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
                    state.update(self.initial_state(param))
                state["step"] += 1
                step = int(state["step"])
                hyper = hyperparameters(group, step)
                key = rounding_key(self.seed, step, index)
                if "exp_avg_sqrt" in state:  # 8-bit moments
                    tensors = [t.view(-1) for t in (param, param.grad, *(state[k] for k in EIGHT_BIT))]
                    if self.kernel_8bit is not None and fused_on(param.device):
                        pending += self.update_8bit_fused(*tensors, hyper, key)
                    else:
                        update_8bit_eager(*tensors, hyper, key)
                    continue
                tensors = [t.view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                if param.dtype != torch.bfloat16:
                    update_eager(*tensors, hyper, key=None)
                elif self.kernel is not None and fused_on(param.device) and param.grad.dtype == torch.bfloat16:
                    pending += self.update_fused(*tensors, hyper, key)
                else:
                    update_eager(*tensors, hyper, key)
        for call in pending:
            call.result()

    def initial_state(self, param: torch.Tensor) -> dict:
        """Zero moments: 8-bit codes and block scales (``moments: 8bit``, tensors of ``MIN_8BIT`` elements or more),
        else tensors of the weight's dtype."""
        state = {"step": torch.tensor(0.0)}
        if self.moments == "8bit" and param.numel() >= MIN_8BIT:
            blocks = -(-param.numel() // BLOCK)
            for name in ("exp_avg", "exp_avg_sqrt"):
                state[name] = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
                state[name + "_scale"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def update_8bit_fused(self, weight, grad, exp_avg, exp_avg_scale, exp_avg_sqrt, exp_avg_sqrt_scale, hyper: dict,
                          key: int) -> list:
        """Queues ``native/adamw_8bit.c`` over one tensor's blocks; returns the calls to wait on."""
        tensors = (weight, grad, exp_avg, exp_avg_scale, exp_avg_sqrt, exp_avg_sqrt_scale)
        return self._queue(self.kernel_8bit, tensors, exp_avg_scale.numel(), weight.numel(),
                           (weight.numel(), int(weight.dtype == torch.bfloat16)), hyper, key)

    def update_fused(self, weight, grad, exp_avg, exp_avg_sq, hyper: dict, key: int) -> list:
        """Queues the kernel's update of one bf16 tensor; returns the calls to wait on."""
        return self._queue(self.kernel, (weight, grad, exp_avg, exp_avg_sq), weight.numel(), weight.numel(), (),
                           hyper, key)

    def _queue(self, function, tensors, units: int, n: int, extra: tuple, hyper: dict, key: int) -> list:
        """``function(*addresses, begin, end, *extra, *constants)`` over ``[0, units)`` (elements, or blocks of
        them) on the threads, split among them where the tensor has ``THREADED`` elements or more. The parameters
        are independent, so every thread stays busy across them."""
        constants = [1 - hyper["lr"] * hyper["decay"], 1 - hyper["beta1"], hyper["beta2"], 1 - hyper["beta2"],
                     hyper["root_correction"], hyper["eps"], -hyper["step_size"], key]
        addresses = [t.data_ptr() for t in tensors]
        parts = torch.get_num_threads() if n >= THREADED else 1
        bounds = [units * i // parts for i in range(parts + 1)]
        return [self.threads.submit(function, *addresses, bounds[i], bounds[i + 1], *extra, *constants)
                for i in range(parts)]


def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Every trained parameter's optimizer state, as the first step would create it (zeros, step 0), allocated now:
    created by the first step it lands where that step's temporaries were freed, and every later step's temporaries
    go above it (on the SmolLM2 pair with 8-bit moments, a main heap of 800 MiB after two steps, against 685 with
    the state allocated first, from malloc_info). ``opdkit.optimizer.AdamW``'s state, or torch's fused AdamW's
    (its ``_init_group``'s); any other optimizer creates its own at its first step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not param.requires_grad or optimizer.state.get(param):
                continue
            state = optimizer.state[param]
            if isinstance(optimizer, AdamW):
                state.update(optimizer.initial_state(param))
            elif type(optimizer) is torch.optim.AdamW and group["fused"] and not group["amsgrad"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                for name in ("exp_avg", "exp_avg_sq"):
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


def hyperparameters(group: dict, step: int) -> dict:
    beta1, beta2 = group["betas"]
    return {"lr": group["lr"], "decay": group["weight_decay"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
            "step_size": group["lr"] / (1 - beta1 ** step), "root_correction": math.sqrt(1 - beta2 ** step)}


def rounding_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one parameter's rounding noise at one step."""
    return (seed * 0x85EBCA77 + step * 0xC2B2AE3D + index * 0x27D4EB2F) & 0xFFFFFFFF


def hash32(indices: torch.Tensor, key: int) -> torch.Tensor:
    """A 32-bit integer hash of each element index (int64) and ``key``, as int64: the C kernels' ``hash``
    (``native/rounding.h``) in torch operators (int64 arithmetic, products below 2**63, low 32 bits kept)."""
    x = (indices * 0x9E3779B1 & 0xFFFFFFFF) ^ key
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def noise(indices: torch.Tensor, key: int) -> torch.Tensor:
    """Uniform int32 in [0, 2**16), one per element index: bf16 rounding's noise."""
    return (hash32(indices, key) & 0xFFFF).to(torch.int32)


def round_stochastic(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``values`` (float32) rounded to bf16, up or down with probabilities that leave the mean unchanged, given
    ``noise`` uniform in [0, 2**16): adding it to the 16 bits bf16 drops and truncating rounds away from zero
    exactly when the noise exceeds the distance to the next value. Overwrites ``values``."""
    values.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return values.to(torch.bfloat16)  # exact: the low 16 bits are zero


def adamw_arithmetic(w, g, m, v, hyper: dict, root) -> torch.Tensor:
    """torch's AdamW on float32 tensors, in place: decoupled weight decay, the moments' update, the bias-corrected
    step over ``root(v)`` (torch's square root, or a correctly rounded one), which it returns."""
    w.mul_(1 - hyper["lr"] * hyper["decay"])
    m.lerp_(g, 1 - hyper["beta1"])
    v.mul_(hyper["beta2"]).addcmul_(g, g, value=1 - hyper["beta2"])
    s = root(v)
    w.addcdiv_(m, (s / hyper["root_correction"]).add_(hyper["eps"]), value=-hyper["step_size"])
    return s


def update_eager(weight, grad, exp_avg, exp_avg_sq, hyper: dict, key: int | None) -> None:
    """One AdamW step on flat tensors in torch operators, slice by slice: in place for float32 ones (``key``
    None), through float32 copies rounded back with ``key``'s noise for bf16 ones."""
    for start in range(0, weight.numel(), SLICE):
        part = slice(start, start + SLICE)
        w, m, v = (t[part].float() for t in (weight, exp_avg, exp_avg_sq))  # views of float32 state, else copies
        adamw_arithmetic(w, grad[part].float(), m, v, hyper, torch.sqrt)
        if key is not None:
            r = noise(torch.arange(start, start + len(w), device=w.device), key)
            for target, value in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
                target[part] = round_stochastic(value, r)


EIGHT_BIT = ("exp_avg", "exp_avg_scale", "exp_avg_sqrt", "exp_avg_sqrt_scale")  # an 8-bit state's tensors, in order


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int32).long() & 0xFFFFFFFF


def _floats(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)  # int64 below 2**32 -> the same 32 bits -> float32


@cache
def code_values(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The value of each of the 256 codes of the first moment and of the second moment's square root, relative
    to their block's scale (``native/adamw_8bit.c``'s ``decode_m`` and ``decode_s``)."""
    codes = torch.arange(256, device=device)
    magnitude = codes & 127
    m = torch.where(magnitude > 0, (magnitude - 1 + M_BASE) << 20, 0) | ((codes >> 7) << 31)
    s = torch.where(codes > 0, (codes - 1 + S_BASE) << 19, 0)
    return _floats(m), _floats(s)


def encode_m(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The first moment's codes of ``x`` in [-1, 1] given noise ``r`` uniform in [0, 2**16): a sign and a 7-bit float
    (4 exponent, 3 mantissa bits, 2^-15 to 1) rounded stochastically, unbiased; below 2^-15, 0 or 2^-15
    (``encode_m`` of the C kernel)."""
    b = _bits(x)
    a = b & 0x7FFFFFFF
    below = (_floats(torch.where(a < 112 << 23, a, 0)) * 2.0**31).to(torch.int32) > r
    magnitude = torch.where(a >= 112 << 23, ((a + (r << 4)) >> 20) - M_BASE + 1, below.long())
    return torch.where(magnitude > 0, magnitude | ((b >> 31) << 7), 0).to(torch.uint8)


def encode_s(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The second moment's square roots' codes of ``x`` in [0, 1] given noise ``r`` uniform in [0, 2**16): an 8-bit
    float (4 exponent, 4 mantissa bits, 2^-15 to 1), up to the next code with the probability that leaves ``x ** 2``
    unbiased; below 2^-15, 2^-15 unless ``x`` is 0 (``encode_s`` of the C kernel)."""
    a = _bits(x)
    low_bits = a & ~0x7FFFF
    low, high = _floats(low_bits), _floats(low_bits + (1 << 19))
    up = (r.float() * ((high - low) * (high + low)) < ((x - low) * (x + low)) * 65536.0).long()
    return torch.where(a >= 112 << 23, (low_bits >> 19) - S_BASE + 1 + up, (a != 0).long()).to(torch.uint8)


def correctly_rounded_sqrt(v: torch.Tensor) -> torch.Tensor:
    """C's ``sqrtf``, which the 8-bit kernel's codes follow: torch's vectorised float32 square root is not always
    correctly rounded, a float64 one rounded to float32 is."""
    return v.double().sqrt().float()


def update_8bit_eager(weight, grad, exp_avg, exp_avg_scale, exp_avg_sqrt, exp_avg_sqrt_scale, hyper: dict,
                      key: int) -> None:
    """``native/adamw_8bit.c`` in torch operators, a slice of whole blocks at a time (flat tensors; the last block
    padded with zeros, which change no scale)."""
    m_values, s_values = code_values(weight.device)
    n = weight.numel()
    for start in range(0, n, SLICE):
        end = min(start + SLICE, n)
        blocks = slice(start // BLOCK, -(-end // BLOCK))
        pad = -(end - start) % BLOCK
        w, g = (F.pad(t[start:end].float(), (0, pad)).view(-1, BLOCK) for t in (weight, grad))
        m = F.pad(m_values[exp_avg[start:end].long()], (0, pad)).view(-1, BLOCK) * exp_avg_scale[blocks, None]
        s0 = F.pad(s_values[exp_avg_sqrt[start:end].long()], (0, pad)).view(-1, BLOCK) * exp_avg_sqrt_scale[blocks, None]
        s = adamw_arithmetic(w, g, m, s0 * s0, hyper, correctly_rounded_sqrt)
        w, indices = w.view(-1)[: end - start], torch.arange(start, end, device=w.device)
        weight[start:end] = w if weight.dtype == torch.float32 else round_stochastic(w, noise(indices, key))
        r = hash32(indices, key ^ KEY_MOMENTS)
        for values, scale, codes, encode, noise_16 in ((m, exp_avg_scale, exp_avg, encode_m, r & 0xFFFF),
                                                       (s, exp_avg_sqrt_scale, exp_avg_sqrt, encode_s, r >> 16)):
            top = values.abs().amax(-1)
            scale[blocks] = top
            inverse = torch.where(top > 0, 1.0 / top, 0.0)  # a block of zeros stays zeros
            codes[start:end] = encode((values * inverse[:, None]).view(-1)[: end - start], noise_16)


def _keep_8bit_state(optimizer: AdamW, state_dict: dict) -> None:
    """torch's ``load_state_dict`` casts every state tensor but ``step`` to its parameter's dtype: keep the 8-bit
    codes and their float32 scales aside, by parameter index, for ``_restore_8bit_state`` (torch casts copies: the
    saved tensors themselves are untouched)."""
    optimizer._loaded_8bit = {index: {k: v for k, v in state.items() if k in EIGHT_BIT}
                              for index, state in state_dict["state"].items() if "exp_avg_sqrt" in state}


def _restore_8bit_state(optimizer: AdamW) -> None:
    kept = optimizer.__dict__.pop("_loaded_8bit", {})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, tensors in kept.items():
        param = params[index]
        optimizer.state[param].update({k: v.to(param.device) for k, v in tensors.items()})
