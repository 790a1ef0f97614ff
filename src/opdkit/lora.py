"""LoRA students through ``peft`` (``student.lora``): wrap, find, load and merge an adapter.

The student's weights stay frozen and only the adapter trains, so the optimizer (and a checkpoint) holds the
adapter alone. A checkpoint folder holds the adapter as peft writes it (``adapter_config.json``,
``adapter_model.safetensors``) on the base weights of ``student.path``; ``final/`` holds the merged model, which
``AutoModelForCausalLM.from_pretrained`` loads without peft, and the adapter under ``final/adapter``. peft is
imported only here, and only for a config that sets ``student.lora``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import OPDError

ADAPTER = "default"  # peft's name for the one adapter a model gets


def require_peft() -> None:
    """Checked with the data, before any weights load: a missing peft must not cost a model load first."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise OPDError("student.lora trains a LoRA adapter through peft, which is not installed: pip install peft "
                       "(or pip install 'opdkit[lora]'), or remove student.lora to train every weight") from None


def adapter_folder(path: str | Path) -> Path | None:
    """The adapter a folder holds: a LoRA checkpoint is one; ``final/`` keeps it under ``adapter/``."""
    for folder in (Path(path), Path(path) / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def wrap(model: torch.nn.Module, spec, adapter: Path | None = None) -> torch.nn.Module:
    """``model``'s weights frozen under a trainable adapter: a fresh one as ``spec`` (a ``LoraSpec``) describes
    (B = 0, so the wrapped model starts equal to ``model``), or the one saved in the folder ``adapter``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True).eval()
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config).eval()
    except ValueError as exc:  # peft: target modules not found in the model
        raise OPDError(f"student.lora.target_modules {spec.target_modules!r} does not fit the student ({exc}): name "
                       "linear layers it has (e.g. q_proj, v_proj for Llama-style models), or use all-linear") from None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Put the adapter saved in ``folder`` into ``model`` (wrapped by ``wrap``), bit for bit."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(device)))
    if result.unexpected_keys:
        raise OPDError(f"the adapter in {folder} does not fit the student (unexpected {result.unexpected_keys[:3]}): "
                       "resume with the student.path and student.lora the run was trained with")


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapter added (``W + scale * B A``), under the base model's own names, on
    the CPU, the model itself untouched: peft's ``merge_and_unload`` would change the student in place, and a copy
    of it to merge costs a second set of weights on its device; this adds one layer at a time."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {name.replace(".base_layer.", "."): value.cpu() for name, value in base.state_dict().items()
              if ".lora_" not in name}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = (weight + module.get_delta_weight(ADAPTER).to(weight.dtype)).cpu()
    return merged


def save_merged(model: torch.nn.Module, folder: Path) -> None:
    """``folder``: the merged model as ``save_pretrained`` writes it, plus the adapter in ``folder/adapter``."""
    model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
    model.save_pretrained(folder / "adapter")
