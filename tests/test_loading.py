"""``models.from_folder``: ``from_pretrained`` with safetensors read by ``pread`` rather than mapped. The same model
(weights, tying, generation config; one file or shards), and a load peak without the file's pages, measured in
fresh processes."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from conftest import load_bench
from opdkit.models import from_folder, load_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random float32 Llama with tied embeddings (54 MB of weights, none over 4 MB), one file and in shards."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True))
    model.generation_config = GenerationConfig(temperature=0.2, top_p=0.9, do_sample=True)
    model.save_pretrained(root / "whole")
    model.save_pretrained(root / "shards", max_shard_size="10MB")
    assert (root / "shards" / "model.safetensors.index.json").is_file()
    return root


@pytest.mark.parametrize("folder", ["whole", "shards"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_loads_what_from_pretrained_loads(llama, folder, dtype):
    ours = from_folder(llama / folder, dtype)
    theirs = AutoModelForCausalLM.from_pretrained(llama / folder, dtype=dtype)
    assert type(ours) is type(theirs) and ours.dtype == dtype
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.generation_config.temperature == 0.2 and ours.generation_config.top_p == 0.9
    ids = torch.tensor([[1, 5, 9, 400]])
    assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert load_model(str(llama / folder), dtype=dtype).config._name_or_path == str(llama / folder)


def test_loading_in_bf16_does_not_hold_the_float32_file_in_resident_memory(llama):
    """A mapped file's pages count in the process's resident memory until loading ends; read ones do not. Loading the
    54 MB float32 file in bf16 (the peak of resident memory as the kernel counts it, above where it stood before): the
    mapped load holds the file beside the 27 MB bf16 copy, ours the copy and a tensor in float32 at a time."""
    measure = load_bench("load_memory").measure  # the bench's own measurement (GB)
    loads = {how: measure(str(llama / "whole"), how, "bf16", 1) for how in ("mmap", "pread")}
    peaks = {how: 1024 * (r["peak"]["VmRSS"] - r["before"]["VmRSS"]) for how, r in loads.items()}  # MiB
    file_mib = (llama / "whole" / "model.safetensors").stat().st_size / 2**20
    assert peaks["mmap"] - peaks["pread"] > 0.6 * file_mib, (peaks, file_mib)


def test_weights_stored_in_the_dtype_asked_for_are_mapped_as_from_pretrained_maps_them(llama, monkeypatch):
    """A float32 file loaded in float32 is the model itself once mapped (no copy): ``pread`` is only for a
    conversion."""
    from opdkit.models import stored_float_dtypes

    assert stored_float_dtypes([llama / "whole" / "model.safetensors"]) == {"F32"}

    def refuse(*args, **kwargs):
        raise AssertionError("read with pread")

    monkeypatch.setattr("safetensors.safe_open", refuse)
    model = from_folder(llama / "whole", torch.float32)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(AssertionError, match="read with pread"):
        from_folder(llama / "whole", torch.bfloat16)
