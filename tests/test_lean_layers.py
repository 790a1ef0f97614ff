"""``lean_layers``: SwiGLU MLPs and RMSNorms that keep fewer activations give the same values and gradients."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from opdkit import lean_layers
from opdkit.lean_layers import keep_fewer_activations
from opdkit.products import float32_arithmetic

LAYERS, HIDDEN, INTERMEDIATE, ROWS, LENGTH, VOCAB, PAD = 2, 64, 160, 3, 17, 101, 0


def model(dtype: torch.dtype, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                         tie_word_embeddings=tied)
    built = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms away from 1, so that their gradients are not the trivial ones
        for name, p in built.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return float32_arithmetic(built) if dtype == torch.bfloat16 else built


def forward_backward(m: LlamaForCausalLM, ids: torch.Tensor):
    """Logits, parameter gradients, and the bytes of the distinct tensors autograd saved (weights aside)."""
    saved = {}
    weights = {p.data_ptr() for p in m.parameters()}

    def pack(t):
        if t.data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = m(ids).logits
    logits.float().log_softmax(-1)[..., 3].sum().backward()
    return logits, {n: p.grad for n, p in m.named_parameters()}, sum(saved.values())


def batch(seed: int = 1) -> torch.Tensor:
    """Token ids with repeats and padding (whose embedding row gets no gradient)."""
    ids = torch.randint(0, 12, (ROWS, LENGTH), generator=torch.Generator().manual_seed(seed))
    ids[0, :4] = PAD
    return ids


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: float32 arithmetic on bf16 weights
def test_same_values_and_gradients_fewer_activations(dtype, tied):
    plain = model(dtype, tied)
    lean = copy.deepcopy(plain)
    # MLPs, two norms a layer, the final norm, and a tied input embedding
    assert keep_fewer_activations(lean) == LAYERS + 2 * LAYERS + 1 + tied
    ids = batch()
    logits, grads, saved = forward_backward(plain, ids)
    lean_logits, lean_grads, lean_saved = forward_backward(lean, ids)
    assert torch.equal(logits, lean_logits)  # the forward's own operations, in the same order
    for name, grad in grads.items():
        scale = grad.float().abs().max()
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 gradients round to 8 bits
        assert (lean_grads[name].float() - grad.float()).abs().max() <= tolerance * scale, name
    # float32 activations either way; per layer the MLP keeps two [tokens, intermediate] tensors fewer (silu(gate)
    # and the product) and each norm one [tokens, hidden] fewer (the normalised input), as does the final norm; a
    # tied lookup's ids (int64) are held by its hook rather than saved
    tokens = ROWS * LENGTH
    assert saved - lean_saved == 4 * tokens * (LAYERS * (2 * INTERMEDIATE + 2 * HIDDEN) + HIDDEN) + 8 * tokens * tied
    if not tied:  # the padding row gets no gradient from the lookup (tied, it gets the head's)
        assert lean_grads["model.embed_tokens.weight"][PAD].abs().max() == 0


class Ops(TorchDispatchMode):
    """The names of the aten operators run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_embedding_adds_into_the_gradient_without_a_dense_one(dtype):
    """The plain backward makes the lookup's dense [V, d] gradient (``embedding_dense_backward``) and adds it to the
    head's; the lean one adds the rows into the weight's gradient, and a second backward (accumulation) again."""
    plain = model(dtype, tied=True)
    lean = copy.deepcopy(plain)
    keep_fewer_activations(lean)
    grads = {}
    for name, m in (("plain", plain), ("lean", lean)):
        losses = [m(batch(seed)).logits.float().log_softmax(-1)[..., 3].sum() for seed in (1, 2)]
        with Ops() as ops:
            losses[0].backward()
        assert ("embedding_dense_backward.default" in ops.names) == (name == "plain")
        assert ("index_add_.default" in ops.names) == (name == "lean")
        losses[1].backward()
        grads[name] = m.model.embed_tokens.weight.grad
    scale = grads["plain"].float().abs().max()
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert (grads["lean"].float() - grads["plain"].float()).abs().max() <= tolerance * scale


def test_several_processes_keep_the_plain_lookup():
    m = model(torch.float32, tied=True)
    assert keep_fewer_activations(m, rows_into_grad=False) == LAYERS + 2 * LAYERS + 1
    assert "forward" not in vars(m.model.embed_tokens)


def test_a_hook_on_the_tied_weight_sees_the_whole_gradient():
    plain = model(torch.float32, tied=True)
    lean = copy.deepcopy(plain)
    keep_fewer_activations(lean)
    seen = {}
    for name, m in (("plain", plain), ("lean", lean)):
        m.model.embed_tokens.weight.register_hook(lambda g, name=name: seen.__setitem__(name, g.clone()))
        m(batch()).logits.float().log_softmax(-1)[..., 3].sum().backward()
    assert torch.equal(seen["lean"], lean.model.embed_tokens.weight.grad)  # the hook saw all of it
    assert torch.allclose(seen["lean"], seen["plain"], rtol=0, atol=1e-5 * seen["plain"].abs().max().item())


def test_no_gradient_or_autocast_runs_the_modules_own_forward(monkeypatch):
    plain = model(torch.float32)
    lean = copy.deepcopy(plain)
    keep_fewer_activations(lean)
    calls = []
    for function in (lean_layers.SwiGLUDown, lean_layers.RMSNorm):
        monkeypatch.setattr(function, "apply", lambda *args, f=function.apply: calls.append(1) or f(*args))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(lean(ids).logits, plain(ids).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lean(ids).logits, plain(ids).logits)
    assert calls == []
    lean(ids)  # a gradient to record, no autocast
    assert len(calls) == LAYERS * 3 + 1


def test_wrapped_projections_are_left_alone():
    m = model(torch.float32)
    m.model.layers[0].mlp.down_proj = torch.nn.Sequential(m.model.layers[0].mlp.down_proj)  # as a LoRA wrapper would
    assert keep_fewer_activations(m) == LAYERS - 1 + 2 * LAYERS + 1
