import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from opdkit.scenarios.arith import build_tokenizer  # noqa: E402
from opdkit.tasks import arithmetic  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(tokenizer, seed: int, hidden: int = 32, layers: int = 1, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64,
                         initializer_range=init, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random student and a sharper random teacher on the arithmetic tokenizer, plus data."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    for name, seed, init in (("student", 1, 0.02), ("teacher", 2, 0.3)):
        model = tiny_model(tokenizer, seed, init=init)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    splits = arithmetic.make_splits({"train": 64, "heldout": 16}, seed=3)
    for split, problems in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(p.record()) + "\n" for p in problems))
    return root


@pytest.fixture
def tiny_config(tiny, tmp_path):
    """A config dict for a short run on the tiny models. Float32, whatever the processor: ``precision: auto`` would
    be bf16 on one with AMX, whose rounding depends on the batch's shape, and the tests compare runs and passes
    that differ in it (two processes against one, stored scores against live ones); tests of bf16 ask for it."""
    return {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "threads": 2,
        "precision": "fp32",
        "student": {"path": str(tiny / "student")},
        "teacher": {"path": str(tiny / "teacher")},
        "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl"), "task": "arithmetic"},
        "rollout": {"max_completion_length": 12, "batch_size": 8},
        "optim": {"steps": 3, "learning_rate": 1e-3},
        "eval": {"batch_size": 16},
    }
