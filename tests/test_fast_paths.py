"""Each fast path of a step against the plain computation it replaces (issue: a lean, fast step)."""

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

import opdkit.decode
from opdkit.config import ObjectiveConfig, load_config
from opdkit.data import PromptSampler, left_pad, load_examples, render_prompt
from opdkit.decode import ROW_MAJOR_ROWS, _fast_projections, choose, decode
from opdkit.errors import OPDError
from opdkit.llama_step import LlamaStep, unsupported
from opdkit.models import load_model, load_tokenizer
from opdkit.native import kernel
from opdkit.products import FEW_ROWS, few_rows, float32_arithmetic, project
from opdkit.rollout import sample
from opdkit.teachers import LocalTeacher

ROOT = Path(__file__).resolve().parents[1]


# ---- decoding ------------------------------------------------------------------------------------------
def test_choose_applies_temperature_and_top_p_exactly_as_transformers_does():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    expected = TopPLogitsWarper(0.8)(None, logits / 0.7).log_softmax(-1)
    token, logprob = choose(logits, temperature=0.7, top_p=0.8)
    assert torch.allclose(logprob, expected.gather(-1, token.unsqueeze(-1)).squeeze(-1), atol=1e-6)
    assert torch.isfinite(expected.gather(-1, token.unsqueeze(-1))).all()  # never a token top-p removed


def test_choose_draws_from_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3])
    torch.manual_seed(1)
    tokens, _ = choose(probs.log().expand(40_000, 5).contiguous())
    freq = torch.bincount(tokens, minlength=5).float() / 40_000
    assert freq[0] == 0 and freq[3] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs, atol=0.01)  # 5 standard errors at n = 40,000


def test_sampler_log_probs_at_a_temperature_and_top_p_equal_a_separate_forward_pass(tiny):
    model, tokenizer = load_model(str(tiny / "student")), load_tokenizer(str(tiny / "student"))
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, load_examples(str(tiny / "train.jsonl"))[:6], max_completion_length=10,
                      temperature=0.7, top_p=0.9)
    logits = rollouts.completion_logits(model)
    processed = torch.stack([TopPLogitsWarper(0.9)(None, row / 0.7) for row in logits])
    expected = processed.log_softmax(-1).gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = rollouts.completion_mask.bool()
    assert torch.allclose(rollouts.sampler_logprobs[mask], expected[mask], atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])  # bf16: weights in float32 arithmetic, as a bf16 student's
def test_hidden_states_alone_project_no_position_through_the_head(tiny, bf16):
    """``completion_logits(logits=False)`` hands back the same hidden states with no logits, and the LM head sees
    zero rows (a bf16 head's product widens none of its weight)."""
    model = load_model(str(tiny / "student"))
    if bf16:
        float32_arithmetic(model.to(torch.bfloat16))
    tokenizer = load_tokenizer(str(tiny / "student"))
    torch.manual_seed(0)
    rollouts = sample(model, tokenizer, load_examples(str(tiny / "train.jsonl"))[:4], max_completion_length=6)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    logits, hidden = rollouts.completion_logits(model, return_hidden=True)
    none, hidden_alone = rollouts.completion_logits(model, return_hidden=True, logits=False)
    assert none is None and torch.equal(hidden, hidden_alone)
    assert rows == [logits.shape[0] * (logits.shape[1] + 1), 0]


def test_greedy_decoding_equals_transformers_generate(tiny):
    model, tokenizer = load_model(str(tiny / "teacher")), load_tokenizer(str(tiny / "teacher"))
    examples = load_examples(str(tiny / "train.jsonl"))[:8]
    ids, mask = left_pad([render_prompt(tokenizer, e.messages) for e in examples], tokenizer.pad_token_id)
    ours, _ = decode(model, ids, mask, 12, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0.0)
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_row_major_projections_give_the_same_logits(tiny):
    model = load_model(str(tiny / "teacher"))
    ids = torch.randint(0, model.config.vocab_size, (ROW_MAJOR_ROWS, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with _fast_projections(model, True):
            fast = model(input_ids=ids).logits
        assert "forward" not in vars(model.get_output_embeddings())  # restored after
        assert torch.allclose(plain, fast, atol=1e-5)


def test_few_row_products_take_the_form_that_reads_weights_faster_on_the_processor(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for units in (None, "AMX", "AVX512-BF16"):
        monkeypatch.setattr(opdkit.decode, "bf16_units", lambda: units)
        assert opdkit.decode.row_major(4, cpu, torch.float32)  # float32: W @ x.T on every processor
        assert not opdkit.decode.row_major(ROW_MAJOR_ROWS + 1, cpu, torch.float32)  # many rows: x @ W.T
        assert not opdkit.decode.row_major(4, cuda, torch.bfloat16)
        # bf16: W @ x.T with AMX tiles (and emulated), x @ W.T with AVX512-BF16 dot products alone
        assert opdkit.decode.row_major(ROW_MAJOR_ROWS, cpu, torch.bfloat16) == (units != "AVX512-BF16")
        # under a bf16 autocast on AVX512-BF16 alone, a few rows step in float32 on bf16 weights
        assert opdkit.decode.float32_steps(ROW_MAJOR_ROWS, cpu, torch.bfloat16) == (units == "AVX512-BF16")
        assert not opdkit.decode.float32_steps(ROW_MAJOR_ROWS + 1, cpu, torch.bfloat16)
        assert not opdkit.decode.float32_steps(4, cpu, torch.float32)
        assert not opdkit.decode.float32_steps(4, cuda, torch.bfloat16)


@pytest.mark.skipif(kernel("rows_matmul") is None, reason="no C compiler to build the kernel")
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, FEW_ROWS])
def test_few_rows_kernel_equals_torchs_float32_product(rows, weights):
    """Odd sizes on purpose: an output count that is not a multiple of the kernel's pair of columns or its 64-column
    tasks, an inner size that is not a multiple of its 8-wide vectors, rows that do not fill its groups of four.
    bf16 weights: the float32 product of the same (widened) values."""
    torch.manual_seed(rows)
    for n, k in ((131, 75), (7, 8), (577, 576)):
        x, weight = torch.randn(2 * rows, k)[::2], torch.randn(n, k).to(weights)  # x not contiguous
        expected = x @ weight.float().T
        out = few_rows(x, weight)
        assert out.shape == (rows, n) and torch.allclose(out, expected, atol=1e-4, rtol=1e-5)
        bias = torch.randn(n)
        assert torch.allclose(project(x, weight, bias, row_major=True), expected + bias, atol=1e-4, rtol=1e-5)


def test_few_rows_kernel_leaves_to_torch_what_it_does_not_compute(monkeypatch, tmp_path):
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    assert few_rows(torch.randn(FEW_ROWS + 1, 16), weight) is None  # many rows: a BLAS product
    assert few_rows(x.bfloat16(), weight.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert few_rows(x, weight) is None  # the product autocast asks for
        assert project(x, weight.bfloat16(), None, row_major=True).dtype == torch.bfloat16  # not widened
    assert few_rows(x, weight.requires_grad_()) is None  # no backward of its own
    with torch.no_grad():
        assert few_rows(x, weight) is not None or kernel("rows_matmul") is None
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    kernel.cache_clear()
    try:
        assert few_rows(x, weight.detach()) is None
        assert torch.allclose(project(x, weight.detach(), None, row_major=True), x @ weight.detach().T)
    finally:
        kernel.cache_clear()


def _family(kind: str, **extra):
    """A tiny random model of a Llama family with grouped-query attention (4 query heads, 2 key heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0, eos_token_id=1, bos_token_id=None, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


FAMILIES = {"llama": {}, "llama-biases": {"attention_bias": True, "mlp_bias": True}, "mistral": {"sliding_window": None},
            "qwen2": {}, "qwen3": {"head_dim": 8}}


def _forward_logprobs(model, ids, mask, tokens) -> torch.Tensor:
    """The model's own float32 log-probs of ``tokens`` after the left-padded prompts ``ids``, in one forward pass."""
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, tokens], 1), attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1 : -1]
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_step_samples_log_probs_equal_to_the_models_own_forward(family):
    model = _family(family.split("-")[0], **FAMILIES[family])
    assert unsupported(model) is None
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0)
    torch.manual_seed(3)
    tokens, logprobs = decode(model, ids, mask, 12, eos_id=-1, pad_id=0)
    expected = _forward_logprobs(model, ids, mask, tokens)
    assert torch.allclose(logprobs, expected, atol=1e-5)


@pytest.mark.skipif(kernel("decode_layer") is None, reason="no C compiler to build the kernel")
@pytest.mark.parametrize("weights", ["float32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_decode_layer_kernel_steps_as_llama_steps_torch_operators(family, weights):
    """``native/decode_layer.c`` (a whole layer per call, float32 arithmetic) against ``LlamaStep``'s operators for
    the same new tokens: biases, grouped-query attention, q/k norms, left padding, float32 and bf16 weights."""
    from opdkit.products import float32_arithmetic

    model = _family(family.split("-")[0], **FAMILIES[family])
    if weights == "bf16":
        float32_arithmetic(model.to(torch.bfloat16))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0)
    positions, key_mask = opdkit.decode.columns(mask, 6)  # as decode numbers them
    native, plain = (LlamaStep(model, positions, torch.float32, row_major=True) for _ in range(2))
    plain.native = None  # LlamaStep's torch operators
    assert native.native is not None  # the kernel built, so the step below is its
    with torch.no_grad():
        assert torch.allclose(native.prefill(ids, key_mask), plain.prefill(ids, key_mask), atol=1e-5)
        generator = torch.Generator().manual_seed(0)
        for column in range(ids.shape[1], key_mask.shape[1]):
            tokens = torch.randint(2, 40, (3,), generator=generator)
            got, expected = native.step(tokens, column, key_mask), plain.step(tokens, column, key_mask)
            assert torch.allclose(got, expected, atol=1e-5), (column, (got - expected).abs().max())
        for ours, theirs in zip(native.keys + native.values, plain.keys + plain.values):  # the caches written alike
            assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.skipif(kernel("decode_layer") is None, reason="no C compiler to build the kernel")
def test_the_decode_layer_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Each output column of a product, and each query head of a row's attention, is one task summed in one order,
    whichever thread takes it: a decode does not depend on ``threads``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=40, hidden_size=96, intermediate_size=160, head_dim=16,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                  max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0)
    positions, key_mask = opdkit.decode.columns(mask, 6)
    before, steps = torch.get_num_threads(), []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            steps.append(LlamaStep(model, positions, torch.float32, row_major=True))
            assert steps[-1].native is not None
    finally:
        torch.set_num_threads(before)
    one, three = steps
    with torch.no_grad():
        assert torch.equal(one.prefill(ids, key_mask), three.prefill(ids, key_mask))
        for column in range(ids.shape[1], key_mask.shape[1]):
            tokens = torch.tensor([column % 40, 3, 7])
            assert torch.equal(one.step(tokens, column, key_mask), three.step(tokens, column, key_mask))


@pytest.mark.parametrize("form", ["W @ x.T", "x @ W.T", "float32 steps"])
def test_llama_step_under_bf16_autocast_stays_close_to_the_models_forward(form, monkeypatch):
    """Each form a decode under a bf16 autocast can take, on any CPU: bf16 products either way round, or float32
    arithmetic on the bf16-rounded weights through the decode-layer kernel (``decode.float32_steps``)."""
    monkeypatch.setattr(opdkit.decode, "row_major", lambda rows, device, dtype: form == "W @ x.T")
    monkeypatch.setattr(opdkit.decode, "float32_steps", lambda rows, device, dtype: form == "float32 steps")
    if form == "float32 steps" and kernel("decode_layer") is None:
        pytest.skip("no C compiler to build the kernel")
    model = _family("llama")
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], pad_id=0)
    positions, key_mask = opdkit.decode.columns(mask, 12)
    floats = form == "float32 steps"  # then a float32 cache for the kernel's new tokens, after a bf16 prefill
    step = LlamaStep(model, positions, torch.bfloat16, form == "W @ x.T", floats)  # as decode builds it in each form
    assert (step.native is not None, step.keys[0].dtype) == (floats, torch.float32 if floats else torch.bfloat16)
    assert {w.dtype for w, _ in step.layers[0][1:4]} == {torch.bfloat16}  # the weights rounded to bf16 in each form
    if floats:  # the prompt exactly as the bf16 form takes it: its cache, held in float32, the same values
        bf16_step = LlamaStep(model, positions, torch.bfloat16, False)
        with torch.no_grad():
            assert torch.equal(step.prefill(ids, key_mask), bf16_step.prefill(ids, key_mask))
        caches = zip(step.keys + step.values, bf16_step.keys + bf16_step.values)
        assert all(torch.equal(ours.bfloat16(), theirs) for ours, theirs in caches)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logprobs = decode(model, ids, mask, 12, eos_id=-1, pad_id=0)
    expected = _forward_logprobs(model, ids, mask, tokens)
    assert (logprobs - expected).abs().max() < 0.05  # bf16 products: about 3 significant digits


def test_a_bf16_students_attention_is_float32_while_it_trains_where_the_rule_says(tiny_config, monkeypatch):
    """``attention.float32_training_attention``: where it applies (SDPA, a CPU whose bf16 units are AVX512-BF16
    alone; ``opd train`` gives it to the student), transformers' SDPA takes float32 query, key and value while a
    gradient is recorded and its output is rounded back to bf16; without a gradient it is that SDPA bit for bit. The
    loss and gradients stay within bf16's rounding of those of a float32 model holding the same values."""
    from opdkit import attention
    from opdkit.config import Config
    from opdkit.train import setup

    cpu = torch.device("cpu")
    for units, expected in (("AVX512-BF16", True), ("AMX", False), (None, False)):
        monkeypatch.setattr(attention, "bf16_units", lambda units=units: units)
        assert attention.applies(_family("llama"), cpu) == expected
    assert not attention.applies(_family("llama"), torch.device("cuda"))
    monkeypatch.setattr(attention, "bf16_units", lambda: "AVX512-BF16")
    assert not attention.applies(_family("llama", attn_implementation="eager"), cpu)
    assert setup(Config.model_validate(tiny_config)).student.config._attn_implementation == attention.IMPLEMENTATION

    model = _family("llama").to(torch.bfloat16)
    sdpa, reference = copy.deepcopy(model), copy.deepcopy(model).float()
    assert attention.float32_training_attention(model, cpu)
    seen = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda module, q, *rest, **kw: seen.append(q.dtype)
                        or real(module, q, *rest, **kw))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], pad_id=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits)
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    losses, grads = [], []
    for each in (model, reference):
        loss = each(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[..., 3].mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(each.model.layers[0].self_attn.q_proj.weight.grad.float())
    assert set(seen) == {torch.float32}  # the trained model's layers, in float32
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)
    assert torch.allclose(grads[0], grads[1], atol=3e-2 * grads[1].abs().max().item())


def test_llama_step_names_what_it_cannot_run(tiny):
    from peft import LoraConfig, get_peft_model

    assert "model type 'gpt2'" in unsupported(__import__("transformers").GPT2LMHeadModel(
        __import__("transformers").GPT2Config(n_layer=1, n_embd=8, n_head=2)))
    assert "sliding" in unsupported(_family("mistral", sliding_window=16))
    lora = get_peft_model(load_model(str(tiny / "student")), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "LoRA" in unsupported(lora.get_base_model())
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)  # and decoding falls back to the model's own forward
    assert decode(lora, ids, mask, 4, eos_id=-1, pad_id=0)[0].shape == (2, 4)


# ---- the teacher ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(tiny):
    student_tokenizer = load_tokenizer(str(tiny / "student"))
    teacher = LocalTeacher(load_model(str(tiny / "teacher")), student_tokenizer)
    torch.manual_seed(0)
    batch = sample(load_model(str(tiny / "student")), student_tokenizer, load_examples(str(tiny / "train.jsonl"))[:6],
                   max_completion_length=10)
    with torch.no_grad():
        full = batch.completion_logits(teacher.model).float().log_softmax(-1)
    return teacher, batch, full


def test_teacher_token_and_topk_log_probs_equal_the_full_log_softmax(scored):
    teacher, batch, full = scored
    mask = batch.completion_mask
    token = full.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * mask
    top_values, top_ids = full.topk(5, dim=-1)
    signal = teacher.score(batch, "topk", top_k=5, entropy=True)
    assert torch.allclose(signal.token_logprobs, token, atol=1e-5)
    assert torch.equal(signal.topk_ids, top_ids) and torch.allclose(signal.topk_logprobs, top_values, atol=1e-5)
    assert torch.allclose(signal.entropy, -(full.exp() * full).sum(-1), atol=1e-5)
    assert signal.logprobs is None and signal.hidden is None  # nothing [B, C, V] kept


def test_teacher_full_support_never_copies_its_head_per_row(scored):
    """``logits_to_keep=1`` made the head a ``bmm`` over a ``[B, d, V]`` copy of its weight (decode.one_position)."""
    from torch.profiler import profile

    teacher, batch, _ = scored
    head = teacher.model.get_output_embeddings().weight
    expanded = [len(batch.completion_ids), head.shape[1], head.shape[0]]
    with profile(record_shapes=True) as run:
        teacher.score(batch, "full", top_k=5, entropy=True)
    shapes = [shape for event in run.events() for shape in event.input_shapes]
    assert expanded not in shapes and [head.shape[0], head.shape[1]] in shapes  # the head ran, on its own weight


def test_teacher_full_support_hands_over_hidden_states_that_give_the_same_distribution(scored):
    teacher, batch, full = scored
    signal = teacher.score(batch, "full", entropy=True)
    assert signal.logprobs is None and signal.hidden.shape[-1] == teacher.model.config.hidden_size
    assert torch.allclose(signal.full_logprobs(), full, atol=1e-5)
    token = full.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
    assert torch.allclose(signal.token_logprobs, token, atol=1e-5)
    assert torch.allclose(signal.entropy, -(full.exp() * full).sum(-1), atol=1e-5)


def test_the_full_distributions_statistics_come_from_the_blocks_the_loss_projects(tiny, scored):
    """A local teacher's token log-probs, entropy and top-k (support "full") come from the blocks the chunked loss
    projects anyway (``HeadStats.observe``): scoring applies the head to no block, the loss to every kept position
    once, and reading the statistics projects only the masked positions; the values are those of projecting them
    all when read (``HeadStats.complete``), which the tests above check against the full log-softmax."""
    from opdkit.methods import build_method

    teacher, batch, _ = scored
    batch = copy.copy(batch)
    batch.completion_mask = batch.completion_mask.clone()
    batch.completion_mask[0, 4:] = 0  # masked positions, whatever the sample
    student = load_model(str(tiny / "student"))
    method = build_method(ObjectiveConfig(method="gkd", beta=1.0, lmbda=1.0))
    method.attach(student)
    rows = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        signal = teacher.score(batch, "full", top_k=5, entropy=True)
        assert sum(rows) <= len(batch.completion_ids)  # the forward's one position a row (logits_to_keep), no block
        with torch.no_grad():
            _, hidden = batch.completion_logits(student, return_hidden=True, logits=False)
        rows.clear()
        method.token_loss(None, batch, signal, hidden=hidden)
        kept = int(batch.completion_mask.sum())
        assert sum(rows) == kept and int(signal.pending.done.sum()) == kept
        rows.clear()
        observed = [signal.token_logprobs, signal.entropy, signal.topk_ids, signal.topk_logprobs]
        assert sum(rows) == batch.completion_mask.numel() - kept and signal.pending is None
    finally:
        hook.remove()
    fresh = teacher.score(batch, "full", top_k=5, entropy=True)
    expected = [fresh.token_logprobs, fresh.entropy, fresh.topk_ids, fresh.topk_logprobs]
    assert torch.equal(observed[2], expected[2])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(observed, expected))


def test_a_step_completes_the_teachers_statistics_before_the_optimizer_moves_any_weight(tiny_config, monkeypatch):
    """A self teacher with ``ema`` follows the student after each optimizer step: statistics the loss did not take
    (masked positions, or all of them where no diagnostic reads them in the loss loop: the dataset's completions at
    ``lmbda: 0``) are computed before it, from the weights that scored the step."""
    from opdkit.teachers.local import HeadStats
    from opdkit.train import optimizer_and_schedule, setup, train_step

    tiny_config["objective"] = {"method": "gkd", "beta": 1.0, "lmbda": 0.0}
    tiny_config["teacher"] = {"kind": "self", "ema": 0.5}
    run = setup(load_config(base=tiny_config))
    optimizer, scheduler = optimizer_and_schedule(run)
    events = []
    complete, step = HeadStats.complete, optimizer.step
    monkeypatch.setattr(HeadStats, "complete", lambda self: events.append("complete") or complete(self))
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: events.append("step") or step(*a, **k))
    train_step(run, optimizer, scheduler, random.Random(0))
    assert "complete" in events and events.index("step") > max(i for i, e in enumerate(events) if e == "complete")


def test_teacher_dtype_bf16_loads_bf16_weights_and_scores_close_to_fp32(tiny_config, scored):
    from opdkit.train import setup

    tiny_config["teacher"]["dtype"] = "bf16"
    run = setup(load_config(base=tiny_config))
    assert run.teacher.dtype == torch.bfloat16 and next(run.student.parameters()).dtype == torch.float32
    _, batch, full = scored
    token = full.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
    assert (run.teacher.score(batch).token_logprobs - token).abs().max() < 0.1


def test_bf16_teacher_in_a_float32_run_computes_in_float32_on_its_bf16_weights(tiny, scored, monkeypatch):
    """``teacher.dtype: bf16`` under ``precision: fp32``: half the teacher's memory, and every score and sample is
    the float32 computation on the bf16-rounded weights (here: a float32 model holding those values), not a bf16
    one. Widened in slices smaller than the vocabulary, so the slicing is exercised."""
    import opdkit.products
    from opdkit.products import is_float32_arithmetic

    monkeypatch.setattr(opdkit.products, "WIDEN_ROWS", 7)
    _, batch, _ = scored
    student_tokenizer = load_tokenizer(str(tiny / "student"))
    stored = LocalTeacher(load_model(str(tiny / "teacher"), dtype=torch.bfloat16), student_tokenizer, torch.float32)
    assert is_float32_arithmetic(stored.model)
    assert all(p.dtype == torch.bfloat16 for p in stored.model.parameters())  # no float32 copy kept
    model = load_model(str(tiny / "teacher"))
    for param in model.parameters():  # the parameters rounded, the rotary tables (buffers) not: as bf16 loading does
        param.data = param.data.bfloat16().float()
    rounded = LocalTeacher(model, student_tokenizer)
    for support in ("token", "topk", "full"):
        got, expected = (t.score(batch, support, top_k=5) for t in (stored, rounded))
        assert torch.allclose(got.token_logprobs, expected.token_logprobs, atol=1e-5), support
        if support == "full":
            from opdkit.token_table import _teacher_full  # the token table's per-rollout distribution

            assert got.hidden.dtype == torch.float32
            assert torch.allclose(got.full_logprobs(), expected.full_logprobs(), atol=1e-5)
            assert torch.allclose(_teacher_full(got, 1), _teacher_full(expected, 1), atol=1e-5)
        if support == "topk":
            assert torch.equal(got.topk_ids, expected.topk_ids)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    for teacher in (stored, rounded):  # decoding too: few rows through the bf16 kernel, widened as read
        torch.manual_seed(4)
        tokens, logprobs = decode(teacher.model, ids, mask, 6, eos_id=-1, pad_id=0)
        teacher.sampled = (tokens, logprobs)
    assert torch.equal(stored.sampled[0], rounded.sampled[0])
    assert torch.allclose(stored.sampled[1], rounded.sampled[1], atol=1e-5)


def test_float32_arithmetic_takes_only_models_whose_matrices_it_widens(tiny):
    """GPT-2's Conv1D holds a matrix that float32 arithmetic does not widen: such a bf16 teacher keeps computing in
    bf16, and a bf16 student of that kind in a float32 run is refused (test_optimizer); Llama-family ones widen."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from opdkit.products import float32_arithmetic, is_float32_arithmetic, other_layers

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).bfloat16()
    assert other_layers(gpt2) == ["Conv1D"]
    with pytest.raises(ValueError, match="also has Conv1D"):
        float32_arithmetic(gpt2)
    teacher = LocalTeacher(gpt2, load_tokenizer(str(tiny / "student")), torch.float32)
    assert not is_float32_arithmetic(teacher.model)
    assert other_layers(load_model(str(tiny / "teacher"))) == []


# ---- the loss and the config ---------------------------------------------------------------------------
def test_full_support_is_chunked_by_default_and_the_chunk_keys_are_checked():
    assert ObjectiveConfig(method="gkd").chunked
    assert not ObjectiveConfig(method="gkd", ref_kl_coef=0.1).chunked  # needs every token's log-prob: unchunked
    with pytest.raises(ValueError, match="give one of them"):
        ObjectiveConfig(method="gkd", vocab_chunk_size=8, chunk_memory_mib=64)
    with pytest.raises(ValueError, match="chunk_memory_mib applies to support: full"):
        ObjectiveConfig(method="gkd", top_k=5, support="teacher_topk", chunk_memory_mib=64)


def _loss_peak(variant: str, case: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--variant", variant, "--case", case,
                          "--threads", "2"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_chunked_loss_needs_a_quarter_of_the_plain_memory_or_less():
    """Peak RSS of loss plus backward, each in a fresh process: 2,048 tokens, vocabulary 32,768."""
    case = "32768:64:2048"
    ours, plain = _loss_peak("ours", case), _loss_peak("plain", case)
    assert abs(ours["loss"] - plain["loss"]) < 1e-4
    assert ours["peak_mib"] <= 0.25 * plain["peak_mib"], (ours, plain)


# ---- data ----------------------------------------------------------------------------------------------
def test_prompt_sampler_draws_one_seeded_permutation_per_epoch():
    examples = list(range(7))
    sampler = PromptSampler(examples, seed=3)
    drawn = [x for _ in range(5) for x in sampler.next_batch(3)]  # 15 draws: two epochs and a bit
    expected = []
    for epoch in range(3):
        order = list(range(7))
        random.Random(3 * 1_000_003 + epoch).shuffle(order)
        expected += order
    assert drawn == expected[:15]
    resumed = PromptSampler(examples, seed=3)
    resumed.position = 9
    assert resumed.next_batch(6) == expected[9:15]


def test_bad_teacher_dtype_is_refused_before_loading(tiny_config):
    tiny_config["teacher"]["dtype"] = "fp16"
    with pytest.raises(OPDError, match="dtype"):
        load_config(base=tiny_config)


def test_reference_model_loads_in_the_runs_precision(tiny_config):
    from opdkit.console import precisions
    from opdkit.train import setup

    tiny_config["precision"] = "bf16"
    tiny_config["objective"] = {"method": "opd", "ref_kl_coef": 0.1}
    run = setup(load_config(base=tiny_config))
    assert next(run.reference.parameters()).dtype == torch.bfloat16
    assert next(run.student.parameters()).dtype == torch.float32  # master weights stay float32
    assert precisions(run) == ("student float32 weights with bf16 autocast, teacher bf16 weights, "
                               "reference bf16 weights")
