"""A trained student's attention in float32 on a CPU whose bf16 units are AVX512-BF16 alone.

There torch's flash attention for CPU takes its backward in bf16 at a third of its float32 rate: a layer of the
SmolLM2 student of ``bench/vs_trl.py`` (4 rows of 71 positions, 9 heads of 64) takes 7.6 ms forward and backward in
bf16 and 3.2 ms with query, key and value widened to float32 and the output rounded back (AMD EPYC Zen 4, 2 threads;
``docs/performance.md``). ``float32_training_attention(model)`` gives such a model ``IMPLEMENTATION``, registered with
``transformers``' attention and mask interfaces: its own SDPA attention, computed in float32 from bf16 inputs
whenever a gradient is recorded (bf16 weights, or a bf16 autocast). Without a gradient (decoding, scoring,
evaluation) and for other dtypes it is that SDPA unchanged. Flash attention keeps no ``[heads, T, T]`` tensor in
either dtype, so the memory of a long sequence is unchanged; the products are float32's, more exact than bf16's. Not
applied on AMX processors, where this was not measured, nor on CUDA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .models import bf16_units

IMPLEMENTATION = "opdkit_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    device = query.device.type
    # bf16 where the model computes in bf16: its weights, or an autocast that would cast these inputs to bf16
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    trained = any(t.requires_grad for t in (query, key, value))
    if not (torch.is_grad_enabled() and dtype == torch.bfloat16 and trained):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(device, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def applies(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether a student trained on ``device`` takes ``IMPLEMENTATION``: SDPA attention on a CPU whose bf16 units
    are AVX512-BF16 alone. A fixed rule of the machine, not a timing."""
    return (device.type == "cpu" and bf16_units() == "AVX512-BF16"
            and getattr(model.config, "_attn_implementation", None) == "sdpa")


def float32_training_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Give ``model`` ``IMPLEMENTATION`` where ``applies``; whether it did. Not saved with the model: its
    ``config.json`` names no attention implementation."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA adapter (peft)
    if not applies(base, device):
        return False
    base.set_attn_implementation(IMPLEMENTATION)
    return True
