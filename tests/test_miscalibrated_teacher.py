"""``bench/miscalibrated_teacher.py``: scaling the final RMSNorm of a tied-embedding Llama multiplies every logit by
alpha exactly (a hidden temperature 1/alpha), so the greedy text is unchanged and only the calibration moves. That is
the premise of results.md's chunk-level vs token-level regime."""

import torch
from conftest import load_bench
from transformers import LlamaConfig, LlamaForCausalLM

bench = load_bench("miscalibrated_teacher")


def test_scaled_norm_multiplies_every_logit(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a non-trivial norm weight, so that scaling it is not the same as the init
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "src")
    for alpha in (0.5, 3.0):
        bench.scale_logits(tmp_path / "src", tmp_path / f"a{alpha}", alpha)
        scaled = LlamaForCausalLM.from_pretrained(tmp_path / f"a{alpha}").eval()
        ids = torch.randint(0, 20, (3, 9))
        with torch.no_grad():
            z0, z1 = model(ids).logits, scaled(ids).logits
        torch.testing.assert_close(z1, alpha * z0, rtol=1e-5, atol=1e-5)
        assert torch.equal(z0.argmax(-1), z1.argmax(-1))
        assert torch.equal(scaled.get_input_embeddings().weight, model.get_input_embeddings().weight)
