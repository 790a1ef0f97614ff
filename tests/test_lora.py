"""LoRA students (``student.lora``, through peft): only the adapter trains, a ``self`` teacher is the frozen base
without a copy, ``final/`` is a merged model that transformers loads alone, resume is exact, ``opd eval`` reads a
LoRA run."""

import json
import os
import signal
import sys

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM

from opdkit import checkpoint, train as train_module
from opdkit.cli import main
from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.models import load_model
from opdkit.train import check_data, collect, setup, train, train_step, trainable_parameters

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}

def lora_config(tiny_config, **changes) -> dict:
    return {**tiny_config, "student": {**tiny_config["student"], "lora": LORA}, **changes}

def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 3-step LoRA run: (run, base weights before, adapter weights before)."""

    root = tmp_path_factory.mktemp("lora")
    config = {
        "seed": 0, "output_dir": str(root / "run"), "threads": 2,
        "student": {"path": str(tiny / "student"), "lora": LORA}, "teacher": {"path": str(tiny / "teacher")},
        "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl"), "task": "arithmetic",
                 "eval_size": 8},
        "rollout": {"max_completion_length": 12, "batch_size": 8},
        "optim": {"steps": 3, "learning_rate": 1e-2},
        "eval": {"batch_size": 8},
    }
    run = setup(load_config(base=config))
    before = base_weights(run.student)
    adapter = {n: p.detach().clone() for n, p in run.student.named_parameters() if "lora_" in n}
    train(run, Console(quiet=True))
    return run, before, adapter

def test_only_the_adapter_trains(trained):
    run, before, adapter = trained
    names = {id(p): n for n, p in run.student.named_parameters()}
    assert all("lora_" in names[id(p)] for p in trainable_parameters(run))  # the optimizer holds the adapter alone
    after = dict(run.student.named_parameters())
    assert before and all(torch.equal(after[n], w) for n, w in before.items())
    assert all("lora_A" in n or "lora_B" in n for n in adapter)
    changed = [n for n, w in adapter.items() if not torch.equal(after[n], w)]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)

def test_a_checkpoint_holds_the_adapter_and_final_a_merged_model_that_loads_alone(trained):
    run, _, _ = trained
    last = checkpoint.latest(run.run_dir)
    assert (last / "adapter_model.safetensors").is_file() and not (last / "model.safetensors").exists()
    final = run.run_dir / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()  # no peft involved
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        expected = run.student.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    out = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=run.tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]

def test_opd_eval_reads_a_lora_run(trained, capsys):
    run, _, _ = trained
    assert main(["eval", str(run.run_dir)]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "accuracy" in measured
    assert main(["eval", str(run.run_dir), "--checkpoint", str(run.run_dir / "final")]) == 0

def test_the_self_teacher_of_a_lora_student_is_the_frozen_base_without_a_copy(tiny, tiny_config):
    config = lora_config(tiny_config, teacher={"kind": "self"})
    run = setup(load_config(base=config))
    assert run.teacher.model is run.student  # no second set of weights
    untouched = load_model(str(tiny / "student"))
    optimizer = torch.optim.AdamW(trainable_parameters(run), lr=5e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    import random

    rng = random.Random(0)
    train_step(run, optimizer, scheduler, rng)  # without a teacher.prompt the signal is zero: nothing moves
    with torch.no_grad():  # so move the adapter as training would
        for name, param in run.student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = collect(run, rng, 1)
    with torch.no_grad():
        expected = batch.token_logprobs(untouched)
        student = batch.token_logprobs(run.student)
    teacher = run.teacher.score(batch).token_logprobs
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(student, expected)  # the adapter moved the student away from its teacher
    run.student.train()
    run.teacher.score(batch)
    assert run.student.training  # scoring ran in eval mode and left the student's mode as it was
    assert any(p.requires_grad for p in run.student.parameters())  # and did not freeze the adapter

def test_the_self_teacher_projects_through_the_base_head_of_an_adapted_lm_head(tiny, tiny_config):
    """With ``lm_head`` among the adapted modules, the full distribution's hidden states are projected after
    scoring, outside the adapter-disabled context: by the head's base layer, for the loss and for the statistics
    read from it (``teachers.local.HeadStats``) alike."""
    lora = {**LORA, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    config = {**tiny_config, "student": {**tiny_config["student"], "lora": lora}, "teacher": {"kind": "self"}}
    run = setup(load_config(base=config))
    untouched = load_model(str(tiny / "student"))
    import random

    rng = random.Random(0)
    with torch.no_grad():  # an adapter that moved, on the head too
        for name, param in run.student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = collect(run, rng, 1)
    with torch.no_grad():
        expected = untouched(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
        width = batch.completion_ids.shape[1]
        expected = expected[:, -width - 1 : -1].float().log_softmax(-1)
    signal = run.teacher.score(batch, "full", top_k=3, entropy=True)
    token = expected.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
    torch.testing.assert_close(signal.token_logprobs, token, rtol=0, atol=1e-5)
    torch.testing.assert_close(signal.full_logprobs(), expected, rtol=0, atol=1e-5)


def test_lora_refuses_an_ema_self_teacher_and_a_missing_peft(tiny_config, monkeypatch):
    with pytest.raises(OPDError, match="teacher.ema"):
        load_config(base=lora_config(tiny_config, teacher={"kind": "self", "ema": 0.9}))
    config = load_config(base=lora_config(tiny_config))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(OPDError, match="pip install peft"):
        check_data(config)

def test_resume_of_a_lora_run_is_exact(tiny, tmp_path, monkeypatch):
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        def write(name):
            config = {
                "seed": 0, "output_dir": str(tmp_path / name), "threads": 2,
                "student": {"path": str(tiny / "student"), "lora": LORA}, "teacher": {"path": str(tiny / "teacher")},
                "data": {"train": str(tiny / "train.jsonl"), "eval": str(tiny / "heldout.jsonl"),
                         "task": "arithmetic", "eval_size": 8},
                "rollout": {"max_completion_length": 8, "batch_size": 4},
                "optim": {"steps": 4, "learning_rate": 1e-2, "warmup_steps": 1},
                "eval": {"batch_size": 8, "every": 2},
                "checkpoint": {"every": 2},
            }
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
            return tmp_path / f"{name}.yaml", tmp_path / name

        def curve(run_dir):
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            clock = {"tokens_per_s", "peak_memory_mib", "wall_s", "train_s"}
            return [{k: v for k, v in json.loads(line).items() if k not in clock and not k.startswith("time_")}
                    for line in lines]

        def adapter(run_dir):
            from safetensors.torch import load_file

            return load_file(checkpoint.latest(run_dir) / "adapter_model.safetensors")

        path, reference = write("reference")
        assert main(["train", str(path)]) == 0
        path, stopped = write("stopped")
        write_jsonl = train_module._write_jsonl

        def stop_after_step_2(target, record):
            write_jsonl(target, record)
            if record["step"] == 2 and "loss" in record:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop saves checkpoint-2 after this step and stops

        monkeypatch.setattr(train_module, "_write_jsonl", stop_after_step_2)
        assert main(["train", str(path)]) == 128 + signal.SIGTERM
        monkeypatch.setattr(train_module, "_write_jsonl", write_jsonl)
        assert checkpoint.latest(stopped).name == "checkpoint-2"
        assert main(["train", "--resume", str(stopped)]) == 0
        assert curve(stopped) == curve(reference)
        expected, got = adapter(reference), adapter(stopped)
        assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    finally:
        torch.use_deterministic_algorithms(deterministic)
