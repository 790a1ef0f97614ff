"""The linear bridge that stands in for a removed block of layers (``builtin:smollm2/student-20-bridge``)."""

import torch

from opdkit.data import load_examples
from opdkit.models import load_tokenizer
from opdkit.scenarios.smollm2 import calibration_answers, fold_bridge, linear_bridge, prune_layers

from conftest import tiny_model


def mlp_output(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    captured = {}
    hook = model.model.layers[layer].mlp.register_forward_hook(lambda m, i, out: captured.__setitem__("M", out))
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask)
    hook.remove()
    return captured["M"]


def test_folding_a_bridge_multiplies_that_layers_mlp_output_by_it(tiny):
    tokenizer = load_tokenizer(str(tiny / "teacher"))
    teacher = tiny_model(tokenizer, seed=5, layers=4, init=0.2)
    student = prune_layers(teacher, [0, 3])
    ids = torch.randint(0, len(tokenizer), (2, 7))
    bridge = torch.randn(32, 32, dtype=torch.float64)
    plain = mlp_output(student, 0, ids)
    fold_bridge(student, 0, bridge)
    torch.testing.assert_close(mlp_output(student, 0, ids), (plain.double() @ bridge).float(), rtol=1e-4, atol=1e-5)


def test_the_bridge_is_the_least_squares_fit_and_brings_the_cut_closer_to_the_teacher(tiny):
    tokenizer = load_tokenizer(str(tiny / "teacher"))
    teacher = tiny_model(tokenizer, seed=5, layers=4, init=0.2)
    examples = load_examples(str(tiny / "train.jsonl"))[:16]
    rollouts = calibration_answers(teacher, tokenizer, examples)  # the fit's own tokens
    bridge = linear_bridge(teacher, rollouts, before=0, after=3)  # layers 1 and 2 removed
    keep = [0, 3]
    plain, bridged = prune_layers(teacher, keep), prune_layers(teacher, keep)
    fold_bridge(bridged, 0, bridge)
    real = rollouts.attention_mask.bool()

    def hidden(model, index):
        with torch.no_grad():
            out = model(rollouts.input_ids, attention_mask=rollouts.attention_mask, output_hidden_states=True)
        return out.hidden_states[index][real].double()

    target = hidden(teacher, 3)  # what the removed layers hand to layer 3
    plain_error = (hidden(plain, 1) - target).pow(2).sum()
    bridged_error = (hidden(bridged, 1) - target).pow(2).sum()
    assert bridged_error < 0.5 * plain_error, (bridged_error, plain_error)
    # least squares: the residual is orthogonal to the MLP outputs it was fitted on
    mlp_out = mlp_output(teacher, 0, rollouts.input_ids, rollouts.attention_mask)[real].double()
    gradient = mlp_out.T @ (hidden(bridged, 1) - target)
    assert gradient.abs().max() < 1e-3 * (mlp_out.T @ (hidden(plain, 1) - target)).abs().max()
