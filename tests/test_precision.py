"""bf16 autocast (the default on CPUs with AMX and on CUDA) keeps fp32 master weights and fp32
log-softmax; the metrics it produces stay close to fp32's."""

import torch

from opdkit.config import load_config
from opdkit.data import load_examples
from opdkit.models import autocast, load_model, load_tokenizer, resolve_precision
from opdkit.rollout import sample
from opdkit.train import setup, train


def test_auto_precision_follows_the_hardware(monkeypatch):
    import opdkit.models as models

    for units in ("AMX", "AVX512-BF16"):
        monkeypatch.setattr(models, "bf16_units", lambda: units)
        assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(models, "bf16_units", lambda: None)
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32


def test_bf16_log_probs_stay_close_to_fp32(tiny):
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, load_examples(str(tiny / "train.jsonl"))[:8], max_completion_length=10)
    with torch.no_grad():
        fp32 = rollouts.completion_logits(model).float().log_softmax(-1)
        with autocast(torch.device("cpu"), torch.bfloat16):
            logits = rollouts.completion_logits(model)
        bf16 = logits.float().log_softmax(-1)
    assert logits.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    mask = rollouts.completion_mask.bool()
    from opdkit.objectives.divergence import kl

    assert kl(fp32, bf16)[mask].mean() < 1e-3  # the distributions agree; single logits may move by a bf16 ulp
    token_fp32 = fp32.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)[mask]
    token_bf16 = bf16.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)[mask]
    assert (token_fp32 - token_bf16).abs().mean() < 0.02


def test_training_under_bf16_keeps_fp32_weights_and_still_learns(tiny_config):
    tiny_config["precision"] = "bf16"
    tiny_config["optim"] = {"steps": 15, "learning_rate": 3e-3}
    run = setup(load_config(base=tiny_config))
    result = train(run)
    assert all(p.dtype == torch.float32 for p in run.student.parameters())
    assert result["after"]["reverse_kl"] < result["before"]["reverse_kl"]
