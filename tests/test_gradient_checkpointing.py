"""``optim.gradient_checkpointing``: the same step, with each decoder layer's activations recomputed in the backward."""

import random

import pytest
import torch

from opdkit.config import load_config
from opdkit.train import lr_lambda, setup, train_step, trainable_parameters


def one_step(tiny_config, checkpointing: bool, lora: bool = False) -> tuple[dict, dict, int]:
    """The step's record, the trained weights after it, and how many times the first decoder layer's MLP ran forward
    with gradients (the layer's own hooks stay outside transformers' checkpoint; its submodules' run again)."""
    tree = {**tiny_config, "precision": "fp32", "optim": {**tiny_config.get("optim", {}), "gradient_checkpointing":
                                                          checkpointing}}
    tree["data"] = {k: v for k, v in tiny_config["data"].items() if k != "eval"}
    if lora:
        tree["student"] = {**tiny_config["student"], "lora": {"r": 4}}
    torch.manual_seed(0)
    run = setup(load_config(base=tree))
    layer = run.student.get_decoder().layers[0] if not lora else run.student.get_base_model().get_decoder().layers[0]
    calls = []
    # a pre-hook: torch stops a recomputation as soon as the tensors the backward needs exist again, before the MLP returns
    layer.mlp.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    optimizer = torch.optim.AdamW(trainable_parameters(run), lr=run.config.optim.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.config))
    record = train_step(run, optimizer, scheduler, random.Random(0))
    weights = {n: p.detach().clone() for n, p in run.student.named_parameters() if p.requires_grad}
    return record, weights, sum(calls)  # forwards with gradient enabled: the loss pass, and its recomputation


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_recomputes_the_layers_and_changes_nothing_else(tiny_config, lora):
    plain, plain_weights, plain_calls = one_step(tiny_config, False, lora)
    checkpointed, weights, calls = one_step(tiny_config, True, lora)
    assert calls == 2 * plain_calls  # each layer runs again in the backward pass
    assert checkpointed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    for name, value in plain_weights.items():
        assert torch.allclose(weights[name], value, atol=1e-6), name
