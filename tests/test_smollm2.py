"""The realistic scenario: SmolLM2-135M-Instruct from its GGUF file, and a layer-pruned student."""

import pytest
import torch

from opdkit.config import load_config
from opdkit.demo import shipped_config
from opdkit.models import load_model, load_tokenizer
from opdkit.scenarios import resolve_builtin
from opdkit.train import setup, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenario():
    return resolve_builtin("builtin:smollm2/teacher").parent


def test_converted_teacher_loads_like_any_hf_model_and_matches_the_gguf(scenario):
    from opdkit.scenarios.smollm2 import load_gguf_as_plain_model

    teacher = load_model(str(scenario / "teacher"))
    tokenizer = load_tokenizer(str(scenario / "teacher"))
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    reference, _ = load_gguf_as_plain_model()
    with torch.no_grad():
        assert torch.allclose(teacher(ids).logits, reference(ids).logits, atol=1e-4)
    student = load_model(str(scenario / "student"))
    assert student.config.num_hidden_layers == 10
    # shared parts are copies of the teacher's; layer i of the student is layer 3i of the teacher
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[6].mlp.up_proj.weight)
    # the two-thirds student drops the block 12-21: its layer 12 is the teacher's layer 22
    student_20 = load_model(str(scenario / "student-20"))
    assert student_20.config.num_hidden_layers == 20
    assert torch.equal(student_20.model.layers[11].self_attn.q_proj.weight, teacher.model.layers[11].self_attn.q_proj.weight)
    assert torch.equal(student_20.model.layers[12].self_attn.q_proj.weight, teacher.model.layers[22].self_attn.q_proj.weight)
    assert torch.equal(student_20.lm_head.weight, teacher.lm_head.weight)
    # the bridged cut: the same weights but one, layer 11's down-projection, and closer to the teacher
    bridged = load_model(str(scenario / "student-20-bridge"))
    changed = [name for name, w in bridged.state_dict().items() if not torch.equal(w, student_20.state_dict()[name])]
    assert changed == ["model.layers.11.mlp.down_proj.weight"]
    text = tokenizer(["Bicycles are a simple machine: two wheels, a frame, pedals and a chain that turns the back wheel."],
                     return_tensors="pt")["input_ids"]
    with torch.no_grad():
        target = teacher(text).logits.log_softmax(-1)
        kls = [torch.nn.functional.kl_div(target, m(text).logits.log_softmax(-1), log_target=True,
                                          reduction="batchmean").item() for m in (student_20, bridged)]
    assert kls[1] < 0.8 * kls[0], kls
    # the milder cut drops the block 12-17 with a bridge: its layer 12 is the teacher's 18, its layer 11's
    # down-projection the only weight that is not the teacher's, and it is closer to the teacher than the 20-layer cut
    student_24 = load_model(str(scenario / "student-24-bridge"))
    assert student_24.config.num_hidden_layers == 24
    assert torch.equal(student_24.model.layers[12].self_attn.q_proj.weight, teacher.model.layers[18].self_attn.q_proj.weight)
    assert not torch.equal(student_24.model.layers[11].mlp.down_proj.weight, teacher.model.layers[11].mlp.down_proj.weight)
    assert torch.equal(student_24.model.layers[11].mlp.up_proj.weight, teacher.model.layers[11].mlp.up_proj.weight)
    with torch.no_grad():
        kl_24 = torch.nn.functional.kl_div(target, student_24(text).logits.log_softmax(-1), log_target=True,
                                           reduction="batchmean").item()
    assert kl_24 < kls[1], (kl_24, kls)


def test_a_few_steps_of_smollm2_compress_lower_the_reverse_kl(scenario, tmp_path):
    config = load_config(shipped_config("smollm2-compress.yaml"), [
        f"output_dir={tmp_path}", "optim.steps=4", "optim.learning_rate=1e-4", "optim.warmup_steps=0",
        "rollout.batch_size=4", "rollout.max_completion_length=16", "data.eval_size=6",
        "eval.max_completion_length=12", "eval.batch_size=6"])
    result = train(setup(config))
    before, after = result["before"], result["after"]
    assert before["accuracy"] is None and 0 <= before["token_agreement"] <= 1
    assert after["reverse_kl"] < before["reverse_kl"], (before, after)
