"""Loading students and teachers through ``transformers``, precision, and compatibility checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import OPDError


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str) -> str:
    """A local folder as is; ``builtin:<scenario>/<name>`` is built into the cache on first use; a Hub id
    ``org/name`` resolves to its snapshot in the local Hugging Face cache (never downloaded: runs are offline)."""
    if path.startswith("builtin:"):
        from .scenarios import resolve_builtin

        return str(resolve_builtin(path))
    if not Path(path).is_dir() and _HUB_ID.fullmatch(path):
        return _from_hub_cache(path)
    if not Path(path).is_dir():
        raise OPDError(
            f"model folder {path!r} not found: give a local folder written by save_pretrained "
            "(config.json and weights), a Hub id org/name in the local cache, or a built-in such as 'builtin:arith/teacher'"
        )
    if not (Path(path) / "config.json").is_file():
        raise OPDError(f"model folder {path!r} has no config.json: it must be written by save_pretrained")
    return path


def _from_hub_cache(repo_id: str) -> str:
    from huggingface_hub import constants, snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises one of several errors)
        raise OPDError(
            f"{repo_id!r} is neither a local folder nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and opdkit never downloads at run time: fetch it once on a machine with "
            f"network (hf download {repo_id}, or huggingface-cli download {repo_id}) into that cache, or give "
            "the path of a folder written by save_pretrained") from None
    if not (Path(folder) / "config.json").is_file():
        raise OPDError(f"the cached snapshot of {repo_id!r} ({folder}) has no config.json: download it again "
                       f"completely (hf download {repo_id})")
    return folder


def load_model(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Weights in ``dtype`` (float32 master weights for a student), eval mode; training code switches to train
    mode itself."""
    folder = resolve_model_path(path)
    try:
        model = from_folder(Path(folder), dtype)
    except Exception as exc:  # whatever transformers raises on a broken folder
        raise OPDError(f"cannot load the model in {folder!r} ({type(exc).__name__}: {exc}); the folder must hold "
                       "config.json and complete weights as save_pretrained writes them: save the model again") from None
    return model.to(device).eval()


def from_folder(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """``from_pretrained(folder, dtype=dtype)``. Where the weights are stored in another dtype (a float32 file loaded
    in bf16), its safetensors files are read with ``pread`` instead of mapped: a mapped file's pages count in the
    process's resident memory until loading ends, beside the converted copy (the SmolLM2 teacher in bf16: a peak 0.77
    GB above the start of loading mapped, 0.28 read; ``bench/load_memory.py``), while read pages pass through the
    page cache, which is not the process's. Stored in ``dtype`` already, the mapped file is the model, no copy
    (0.03 GB against 0.54 read), and ``from_pretrained`` maps it. The same keys, conversions and tying as
    ``from_pretrained``'s own (its ``state_dict`` path), and the folder's generation config. Other weights
    (``.bin``), quantized checkpoints and a ``safetensors`` without ``pread`` load through ``from_pretrained``."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [folder / "model.safetensors"])
    config = AutoConfig.from_pretrained(folder)
    mapped = lambda: AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype)  # noqa: E731
    if (not all(f.is_file() for f in files) or getattr(config, "quantization_config", None) is not None
            or stored_float_dtypes(files) <= {SAFETENSORS_DTYPES.get(dtype)}):
        return mapped()
    with contextlib.ExitStack() as stack:
        try:
            handles = [stack.enter_context(safe_open(str(f), framework="pt", backend="pread")) for f in files]
        except TypeError:  # a safetensors before its pread backend
            return mapped()
        state = {key: handle.get_slice(key) for handle in handles for key in handle.keys()}
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state,
                                                                          dtype=dtype)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config._name_or_path = str(folder)
    return model


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def stored_float_dtypes(files: list[Path]) -> set[str]:
    """The floating-point dtypes (safetensors' names: ``F32``, ``BF16``, ...) the files' tensors are stored in, from
    their headers (an 8-byte length, then JSON)."""
    found = set()
    for path in files:
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    return {name for name in found if name.startswith(("F", "BF"))}


def weights_dtype(name: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """A config's ``dtype`` for a model's weights (``student.dtype``, ``teacher.dtype``): ``fp32``, ``bf16``, or
    ``auto``, which follows the run's precision (``auto``)."""
    return {"auto": auto, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def load_student(spec, path: str | None = None, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The student a ``StudentSpec`` describes, in ``spec.dtype``, from ``path`` (a checkpoint; default
    ``spec.path``). With ``spec.lora``: ``spec.path``'s weights under the adapter ``path`` holds (a LoRA checkpoint,
    or ``final/``'s ``adapter/``), or under a fresh adapter where it holds none."""
    path, dtype = path or spec.path, weights_dtype(spec.dtype)
    if spec.lora is None:
        return load_model(path, device, dtype)
    from .lora import adapter_folder, wrap

    adapter = adapter_folder(path)
    return wrap(load_model(spec.path if adapter is not None else path, device, dtype), spec.lora, adapter)


def enable_gradient_checkpointing(model: torch.nn.Module, disable_dropout: bool) -> None:
    """transformers' gradient checkpointing (non-reentrant, so a frozen base under a LoRA adapter needs no input
    gradients). It acts only in train mode, so the loss pass runs in train mode; with ``disable_dropout`` every dropout
    is set to zero here instead, which leaves that pass as deterministic as in eval mode."""
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    folder = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # whatever transformers raises on a broken folder
        raise OPDError(f"cannot read a tokenizer from {folder!r} ({type(exc).__name__}: {exc}); save it next to "
                       "the model with tokenizer.save_pretrained(folder)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_tokenizers_match(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                           chat_template: bool = True) -> None:
    """Same vocabulary (token -> id), same end-of-sequence token, same chat rendering (where prompts are rendered
    with a chat template).

    A mismatch silently corrupts the per-token signal (different ids mean different tokens) or makes
    lengths blow up (a student that never emits the teacher's end token), so it stops training here.
    """
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
        raise OPDError(
            "student and teacher tokenizers differ, so per-token log-probs cannot be compared: "
            f"{len(s_vocab)} vs {len(t_vocab)} tokens; only in student {only_s}, only in teacher {only_t}, "
            f"different ids for {moved}. Use a student built on the teacher's tokenizer "
            "(same vocabulary and ids), or reach this teacher as text only: serve it (opd serve-teacher) and set "
            "teacher.kind: chat with objective.method: chunk_opd, which compares text, not tokens."
        )
    if student.eos_token_id != teacher.eos_token_id:
        raise OPDError(
            f"student end-of-sequence token {student.eos_token!r} differs from the teacher's {teacher.eos_token!r}: "
            "a student that never emits the teacher's end token produces runaway lengths. Save the student's "
            "tokenizer with the teacher's eos_token."
        )
    probe = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    if chat_template and (student.chat_template is not None or teacher.chat_template is not None):
        try:
            s_ids = student.apply_chat_template(probe, tokenize=True)
            t_ids = teacher.apply_chat_template(probe, tokenize=True)
        except Exception as exc:  # a missing template on one side
            raise OPDError(f"chat templates cannot both render a conversation ({exc}); give both the same template") from None
        if list(_ids(s_ids)) != list(_ids(t_ids)):
            raise OPDError(
                "student and teacher chat templates render the same conversation differently, so the teacher "
                "would score the student's tokens in a context it never sees. Copy the teacher's chat_template "
                "into the student's tokenizer_config.json."
            )


def _ids(encoded) -> list[int]:
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded


def context_length(model: PreTrainedModel | str) -> int:
    """A model's context in tokens; a path is read from its config alone, without loading weights."""
    if isinstance(model, str):
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(resolve_model_path(model)), "max_position_embeddings", 10**9))
    return int(getattr(model.config, "max_position_embeddings", 10**9))


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_units() -> str | None:
    """The CPU's bf16 matrix instructions, or None: ``AMX`` (Intel's tiles: bf16 products about 6x float32's) or
    ``AVX512-BF16`` (bf16 dot products: 2.4-3.7x float32's on an AMD EPYC Zen 4, ``docs/performance.md``)."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 autocast on CUDA and on CPUs with bf16 matrix instructions (``bf16_units``), else fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" or (device.type == "cpu" and bf16_units()):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for matmuls; a no-op for fp32. Log-softmax is always taken in fp32 by callers."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    """Never more threads than cores: two oversubscribed processes slow each other by 10x."""
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))


def machine_description(amp_dtype: torch.dtype) -> str:
    """What a run's figures depend on: the processor (or CUDA device), the CPU's bf16 matrix units (AMX,
    AVX512-BF16 or none), torch's CPU threads and the precision in use."""
    import platform

    if pick_device().type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.is_file() else []
        name = names[0] if names else platform.processor() or "an unnamed processor"
        units = bf16_units()
        machine = f"{name} ({f'bf16 matrix units: {units}' if units else 'without bf16 matrix units'})"
    precision = "float32" if amp_dtype == torch.float32 else "bf16 autocast"
    return f"{machine}, {torch.get_num_threads()} torch threads, {precision}"
