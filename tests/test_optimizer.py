"""``student.dtype: bf16``: AdamW on bf16 weights with stochastic rounding (``opdkit.optimizer``), its C kernel
against the same arithmetic in torch operators, and runs that train, save and resume in bf16."""

import copy

import pytest
import torch

from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.native import kernel
from opdkit.optimizer import AdamW, noise, round_stochastic
from opdkit.train import setup, train
from optimizer_checks import resumes_exactly, step_alike

needs_compiler = pytest.mark.skipif(kernel("adamw_bf16") is None, reason="no C compiler to build the kernel")


def params(dtype, seed=1, shapes=((300, 70), (5,), (1 << 21,))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(dtype)) for s in shapes]


def gradients(parameters, step):
    generator = torch.Generator().manual_seed(100 + step)
    for p in parameters:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(p.dtype)


def test_float32_weights_get_torchs_adamw():
    ours, theirs = params(torch.float32), params(torch.float32)
    a = AdamW(ours, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1, foreach=False)
    for step in range(4):
        gradients(ours, step), gradients(theirs, step)
        a.step(), b.step()
    for x, y in zip(ours, theirs):
        assert torch.equal(x, y)
        assert torch.equal(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"])


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_drops_the_update():
    spacing = 2.0**-7  # between bf16 values in [1, 2)
    values = torch.full((1 << 18,), 1.0 + spacing / 8)  # an update of an eighth of a spacing
    rounded = round_stochastic(values.clone(), noise(torch.arange(values.numel()), key=12345)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + spacing}
    assert rounded.mean().item() == pytest.approx(1.0 + spacing / 8, abs=spacing * 0.005)
    assert values.to(torch.bfloat16).float().unique().tolist() == [1.0]  # nearest: the update is gone
    negative = round_stochastic(-values.clone(), noise(torch.arange(values.numel()), key=7)).float()
    assert negative.mean().item() == pytest.approx(-1.0 - spacing / 8, abs=spacing * 0.005)
    uniform = noise(torch.arange(1 << 18), key=99).float()
    assert 0 <= uniform.min() and uniform.max() < 2**16 and uniform.mean().item() == pytest.approx(2**15, rel=0.01)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_compiler)])
def test_bf16_weights_follow_the_float32_trajectory_where_nearest_rounding_stalls(fused):
    """Many small steps at 1e-4 on weights near 1: torch's AdamW on bf16 weights (round to nearest) does not move
    them; ours lands within a few percent of what float32 weights travel."""
    start = 1.0 + torch.rand(1 << 16, generator=torch.Generator().manual_seed(0))
    target = torch.zeros_like(start)
    travelled = {}
    for name, dtype, make in (("float32", torch.float32, lambda p: torch.optim.AdamW(p, lr=1e-4)),
                              ("nearest", torch.bfloat16, lambda p: torch.optim.AdamW(p, lr=1e-4)),
                              ("ours", torch.bfloat16, lambda p: AdamW(p, lr=1e-4, fused=fused))):
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = make([weight])
        for _ in range(50):
            weight.grad = (weight.detach().float() - target).to(dtype)  # pulls every weight down
            optimizer.step()
        travelled[name] = (start.to(dtype).float() - weight.float()).mean().item()
    assert travelled["float32"] == pytest.approx(50 * 1e-4, rel=0.03)  # Adam: about lr a step
    assert travelled["nearest"] == 0.0
    assert travelled["ours"] == pytest.approx(travelled["float32"], rel=0.03)


@needs_compiler
def test_the_c_kernel_computes_what_the_torch_operators_compute():
    """Same arithmetic, same noise. Where torch's vectorised square root rounds differently from C's correctly rounded
    one, a float32 result differs by a unit in its last place, which changes a rounding draw about once in 65,536:
    the moments (which do not depend on the weights) agree bit for bit, the weights on all but a handful of two
    million elements, by a bf16 step for each update that rounded apart."""
    fused, eager = params(torch.bfloat16), params(torch.bfloat16)
    a = AdamW(fused, lr=1e-3, weight_decay=0.1, fused=True)
    b = AdamW(eager, lr=1e-3, weight_decay=0.1, fused=False)
    for step in range(3):
        gradients(fused, step), gradients(eager, step)
        a.step(), b.step()
    for x, y in zip(fused, eager):
        assert torch.equal(a.state[x]["exp_avg"], b.state[y]["exp_avg"])
        assert torch.equal(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"])
        differ = x != y
        assert differ.sum() <= max(2, x.numel() // 20_000)
        steps = (x.detach().view(torch.int16).int() - y.detach().view(torch.int16).int()).abs()
        assert (steps[differ] <= 3).all()  # one bf16 step per update at most (same sign: bit patterns count them)


def test_a_restored_optimizer_rounds_as_the_uninterrupted_one():
    whole = params(torch.bfloat16, shapes=((64, 33),))
    optimizer = AdamW(whole, lr=1e-3, seed=5)
    for step in range(2):
        gradients(whole, step)
        optimizer.step()
    saved = ([p.detach().clone() for p in whole], copy.deepcopy(optimizer.state_dict()))  # as a checkpoint holds it
    gradients(whole, 2)
    optimizer.step()
    resumed = [torch.nn.Parameter(p) for p in saved[0]]
    again = AdamW(resumed, lr=1e-3, seed=5)
    again.load_state_dict(saved[1])
    gradients(resumed, 2)
    again.step()
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))


def test_config_refuses_bf16_weights_with_lora_in_float32_or_sharded(tiny_config):
    tiny_config["student"]["dtype"] = "bf16"  # tiny_config runs precision fp32: float32 arithmetic, accepted
    load_config(base=tiny_config)
    tiny_config["student"]["lora"] = {"r": 4}
    with pytest.raises(OPDError, match="student.dtype bf16 with student.lora computes in bf16, but precision is fp32"):
        load_config(base=tiny_config)
    del tiny_config["student"]["lora"]
    tiny_config["precision"] = "bf16"
    tiny_config["distributed"] = {"strategy": "fsdp"}
    with pytest.raises(OPDError, match=r"bf16 weights \(student.dtype: bf16\) cannot be sharded yet"):
        load_config(base=tiny_config)


def test_auto_precision_on_a_machine_without_bf16_refuses_a_bf16_lora_base_before_loading(tiny_config, monkeypatch):
    import opdkit.models as models

    monkeypatch.setattr(models, "bf16_units", lambda: None)
    tiny_config["precision"] = "auto"
    tiny_config["student"]["dtype"] = "bf16"
    tiny_config["student"]["lora"] = {"r": 4}
    monkeypatch.setattr("opdkit.train.load_student", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(OPDError, match="precision 'auto' is float32 on this cpu.*set precision: bf16"):
        setup(load_config(base=tiny_config))


def test_a_bf16_student_with_layers_float32_arithmetic_cannot_widen_is_refused(tiny, tiny_config, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    tiny_config["student"] = {"path": str(tmp_path / "gpt2"), "dtype": "bf16"}  # precision fp32
    with pytest.raises(OPDError, match="this student also has Conv1D: set precision: bf16"):
        setup(load_config(base=tiny_config))


def test_a_bf16_student_in_float32_arithmetic_gets_the_float32_loss_and_gradients_of_its_weights(tiny):
    """Forward and backward of a bf16 student in a float32 run (``products.float32_arithmetic``) against a float32
    model holding the same bf16 values: the loss to float rounding, each gradient to bf16's (it is stored in bf16).
    Through the model's own forward and through the chunked full-vocabulary loss on its head, widened in slices
    smaller than the vocabulary."""
    import opdkit.products
    from opdkit.models import load_model
    from opdkit.objectives.support import chunked_full
    from opdkit.products import float32_arithmetic

    opdkit.products.WIDEN_ROWS, saved = 7, opdkit.products.WIDEN_ROWS
    try:
        exact = load_model(str(tiny / "student"))
        for param in exact.parameters():
            param.data = param.data.bfloat16().float()
        stored = float32_arithmetic(load_model(str(tiny / "student"), dtype=torch.bfloat16))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, exact.config.vocab_size, (3, 9), generator=g)
        teacher = torch.randn(3 * 9, exact.config.vocab_size, generator=g)

        def losses(model):
            out = model(input_ids=ids, labels=ids, output_hidden_states=True)
            hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])
            full = chunked_full(hidden, model.get_output_embeddings(), lambda i, j: teacher[i:j].clone(),
                                "reverse_kl", chunk_size=10)[0].mean()
            return out.loss, full

        for which in range(2):
            expected, got = losses(exact)[which], losses(stored)[which]
            assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
            names = [n for n, _ in exact.named_parameters()]
            wanted = dict(zip(names, torch.autograd.grad(expected, list(exact.parameters()))))
            for name, grad in zip(names, torch.autograd.grad(got, list(stored.parameters()))):
                assert grad.dtype == torch.bfloat16, name
                scale = wanted[name].abs().max()
                assert (grad.float() - wanted[name]).abs().max() <= 0.01 * scale + 1e-7, (which, name)
    finally:
        opdkit.products.WIDEN_ROWS = saved


@pytest.mark.parametrize("precision", ["bf16", "fp32"], ids=["bf16 arithmetic", "float32 arithmetic"])
def test_a_bf16_student_learns_saves_bf16_and_resumes_exactly(tiny_config, tmp_path, precision):
    from transformers import AutoModelForCausalLM

    from opdkit.products import is_float32_arithmetic

    tiny_config["precision"] = precision
    tiny_config["student"]["dtype"] = "bf16"
    tiny_config["optim"] = {"steps": 4, "learning_rate": 3e-3}
    tiny_config["checkpoint"] = {"every": 2, "keep": 2, "best_metric": None}
    run = setup(load_config(base=tiny_config))
    result = train(run)
    assert is_float32_arithmetic(run.student) == (precision == "fp32")
    assert all(p.dtype == torch.bfloat16 for p in run.student.parameters())
    assert result["after"]["reverse_kl"] < result["before"]["reverse_kl"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), run.student.parameters()))

    resumes_exactly(run, tmp_path / "run", 4)


def test_a_bf16_head_gets_its_gradient_in_bf16_from_one_block_and_summed_in_float32_from_several():
    """The chunked loss's head gradient: one block's product is the whole gradient, so a bf16 head takes it as it
    comes, without a float32 ``[V, d]`` copy; several blocks are summed in float32 first. Both match the float32
    computation to bf16's precision."""
    from opdkit.objectives.support import chunked_full

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16).float()  # values that bf16 holds exactly
    teacher = torch.randn(40, 300, generator=g)
    hidden = torch.randn(40, 16, generator=g).bfloat16().float()
    exact = torch.autograd.grad(chunked_full(hidden, head, lambda i, j: teacher[i:j].clone(), "reverse_kl")[0].sum(),
                                head.weight)[0]
    head.to(torch.bfloat16)
    for chunk_size in (40, 8):
        loss = chunked_full(hidden.bfloat16(), head, lambda i, j: teacher[i:j].clone(), "reverse_kl", chunk_size=chunk_size)[0]
        (grad,) = torch.autograd.grad(loss.sum(), head.weight)
        assert grad.dtype == torch.bfloat16
        assert (grad.float() - exact).abs().max() < 0.02 * exact.abs().max()  # bf16 logits: about 1% here


@needs_compiler
def test_the_kernel_built_for_this_processor_gives_the_portable_builds_bits(tmp_path):
    """``-march=native`` vectorises the loop; every operation is still one IEEE-rounded float32 operation (no
    contraction), so the result is the same to the bit as the portable build's."""
    import ctypes
    import os
    import shutil
    from pathlib import Path

    from opdkit import native

    portable = tmp_path / "portable.so"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert native._compile(compiler, native.FLAGS, Path(native.__file__).with_name("adamw_bf16.c"), portable,
                           ["-lm"])
    slow = ctypes.CDLL(str(portable)).adamw_bf16
    slow.argtypes, slow.restype = native.ARGUMENTS["adamw_bf16"], None
    generator = torch.Generator().manual_seed(4)
    start = [(torch.randn(100_003, generator=generator) * scale).bfloat16() for scale in (0.02, 1e-3, 1e-3, 1e-6)]
    start[3] = start[3].abs()
    results = []
    for function in (kernel("adamw_bf16"), slow):
        tensors = [t.clone() for t in start]
        for one_minus_beta1 in (0.1, 0.7):  # both of lerp's branches
            function(*[t.data_ptr() for t in tensors], 0, 100_003, 0.9999, one_minus_beta1, 0.999, 0.001, 0.03, 1e-8,
                     -1e-3, 12345)
        results.append(tensors)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_lora_adapter_on_a_bf16_base_trains_in_float32(tiny_config):
    """With ``lora`` the frozen base loads in bf16 (half its memory) and peft keeps the adapter in float32, which the
    optimizer updates as torch's AdamW does; the base does not move."""
    pytest.importorskip("peft")
    from rich.console import Console

    tiny_config["precision"] = "bf16"
    tiny_config["student"] = {**tiny_config["student"], "dtype": "bf16",
                              "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    run = setup(load_config(base=tiny_config))
    named = dict(run.student.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    assert {p.dtype for p in base.values()} == {torch.bfloat16} and {p.dtype for p in adapter.values()} == {torch.float32}
    train(run, Console(quiet=True))
    assert all(torch.equal(named[n], w) for n, w in base.items())
    assert any(not torch.equal(named[n], w) for n, w in adapter.items())


def test_without_a_compiler_the_optimizer_runs_torch_operators(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    kernel.cache_clear()
    try:
        assert kernel("adamw_bf16") is None
        weights = params(torch.bfloat16, shapes=((8, 8),))
        optimizer = AdamW(weights, lr=1e-3)
        assert optimizer.kernel is None
        gradients(weights, 0)
        optimizer.step()
        with pytest.raises(RuntimeError, match="needs a C compiler"):
            AdamW(weights, lr=1e-3, fused=True)
    finally:
        kernel.cache_clear()


@pytest.mark.parametrize("max_norm", [0.05, 1e3, float("inf")], ids=["clipped", "below", "no bound"])
def test_clipping_gives_torchs_clip_grad_norm_bits_and_skips_only_a_scaling_by_one(max_norm):
    """``Processes.clip_grad_norm`` skips torch's multiplication of every gradient by 1 on a CPU (below the bound):
    the norm and the gradients are torch's ``clip_grad_norm_``'s to the bit either way."""
    from opdkit.distributed import Processes

    ours, theirs = params(torch.bfloat16), params(torch.bfloat16)
    for p in (ours, theirs):
        gradients(p, 0)
    untouched = [p.grad.clone() for p in ours]
    norm = Processes().clip_grad_norm(ours, max_norm)
    assert norm == float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert all(torch.equal(a.grad, b) for a, b in zip(ours, untouched)) == (max_norm > norm)


@pytest.mark.parametrize("kind", ["torch fused", "bf16", "8-bit"])
def test_state_allocated_before_the_first_step_trains_as_the_lazily_created_one(kind):
    """``allocate_state`` creates, before any step, the state the first step would (zeros, step 0): the same
    keys, dtypes and devices, and the same weights and state, to the bit, after a few steps."""
    from opdkit.optimizer import allocate_state

    dtype = torch.float32 if kind == "torch fused" else torch.bfloat16
    make = {"torch fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
            "bf16": lambda p: AdamW(p, lr=1e-3), "8-bit": lambda p: AdamW(p, lr=1e-3, moments="8bit")}[kind]
    early, lazy = params(dtype), params(dtype)
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    a, b = make(early + [frozen]), make(lazy)
    allocate_state(a)
    assert frozen not in a.state and all(int(a.state[p]["step"]) == 0 for p in early)
    step_alike(a, b, early, lazy, gradients)
