"""``optim.moments: 8bit``: AdamW whose moments are 8-bit codes in blocks (``opdkit.optimizer``), its C kernel
against the same arithmetic in torch operators, the codes' rounding, how close it stays to float32 AdamW, and runs
that train and resume with it."""

import copy

import pytest
import torch

from opdkit.config import load_config
from opdkit.errors import OPDError
from opdkit.native import kernel
from opdkit.optimizer import BLOCK, MIN_8BIT, AdamW, code_values, encode_m, encode_s
from opdkit.train import setup, train
from optimizer_checks import resumes_exactly, step_alike

needs_compiler = pytest.mark.skipif(kernel("adamw_8bit") is None, reason="no C compiler to build the kernel")
SHAPES = ((300, 70), (5,), ((1 << 20) + 77,))  # blocks of 256 and a shorter last one; one tensor under MIN_8BIT


def params(dtype, seed=1, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(dtype)) for s in shapes]


def gradients(parameters, step):
    generator = torch.Generator().manual_seed(100 + step)
    for p in parameters:
        scales = 10 ** (-6 * torch.rand(p.shape, generator=generator))  # magnitudes over six decades in each block
        p.grad = (torch.randn(p.shape, generator=generator) * scales * 1e-2).to(p.dtype)


def decoded(state) -> tuple[torch.Tensor, torch.Tensor]:
    """The first moment and the second moment's square root an 8-bit state holds, as float32."""
    m_values, s_values = code_values(state["exp_avg"].device)
    flat = lambda codes, values, scale: (values[codes.view(-1).long()].view(-1)  # noqa: E731
                                         * scale.repeat_interleave(BLOCK)[: codes.numel()])
    return (flat(state["exp_avg"], m_values, state["exp_avg_scale"]),
            flat(state["exp_avg_sqrt"], s_values, state["exp_avg_sqrt_scale"]))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32 weights", "bf16 weights"])
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp low", "lerp high"])
def test_the_c_kernel_computes_what_the_torch_operators_compute_to_the_bit(dtype, beta1):
    """Same arithmetic, same noise, a correctly rounded square root on both sides: weights, codes and scales equal."""
    fused, eager = params(dtype), params(dtype)
    a = AdamW(fused, lr=1e-3, betas=(beta1, 0.999), weight_decay=0.1, fused=True, moments="8bit")
    b = AdamW(eager, lr=1e-3, betas=(beta1, 0.999), weight_decay=0.1, fused=False, moments="8bit")
    step_alike(a, b, fused, eager, gradients)
    big, small = a.state[fused[2]], a.state[fused[1]]
    assert big["exp_avg"].dtype == big["exp_avg_sqrt"].dtype == torch.uint8 and big["exp_avg"].shape == fused[2].shape
    assert big["exp_avg_scale"].dtype == torch.float32 and big["exp_avg_scale"].numel() == -(-fused[2].numel() // BLOCK)
    assert fused[1].numel() < MIN_8BIT and small["exp_avg"].dtype == small["exp_avg_sq"].dtype == dtype


def test_codes_round_to_a_neighbouring_value_leaving_m_and_v_unbiased():
    m_values, s_values = code_values(torch.device("cpu"))
    assert m_values[0] == s_values[0] == 0 and m_values[1] == s_values[1] == 2.0**-15
    assert (m_values == 1).any() and (s_values == 1).any() and m_values.max() == 1.75 and s_values.max() == 1.875
    generator = torch.Generator().manual_seed(0)
    x = torch.logspace(-8, 0, 4001)  # across both codes' ranges, and under 2^-15
    n = 4096
    r = torch.randint(0, 1 << 16, (n, 1), generator=generator)  # the kernels' 16 bits of noise
    for values, encode, sign in ((m_values, encode_m, 1.0), (m_values, encode_m, -1.0), (s_values, encode_s, 1.0)):
        got = values[encode((sign * x).expand(n, -1).contiguous(), r).long()]
        assert (got * sign >= 0).all()
        got = got.abs()
        magnitudes = values[values * sign >= 0].abs().unique()  # sorted, 0 first
        lower = magnitudes[torch.searchsorted(magnitudes, x, right=True) - 1]
        upper = magnitudes[torch.searchsorted(magnitudes, x)]
        power = 2 if encode is encode_s else 1  # what is unbiased: v = s^2, and m itself
        if encode is encode_s:  # below 2^-15, s rounds up: never 0, so a step's denominator is never eps alone
            assert (got[:, x < 2.0**-15] == 2.0**-15).all()
            lower, upper, got, x = lower[x >= 2.0**-15], upper[x >= 2.0**-15], got[:, x >= 2.0**-15], x[x >= 2.0**-15]
        assert ((got == lower) | (got == upper)).all()  # every draw is one of the two codes around x
        error = (got.pow(power).mean(0) - x.pow(power)).abs()
        assert error.le(0.06 * (upper.pow(power) - lower.pow(power))).all()  # within 4,096 draws' noise
    assert (encode_m(torch.zeros(8), torch.full((8, ), (1 << 16) - 1)) == 0).all()  # zeros stay zeros
    assert (encode_s(torch.zeros(8), torch.full((8, ), (1 << 16) - 1)) == 0).all()


def nearest(monkeypatch):
    """Every moment rounded to its nearest code (noise of half a code; for s, nearest in v): bitsandbytes' and
    torchao's rounding, through the torch operators."""
    monkeypatch.setattr("opdkit.optimizer.hash32", lambda indices, key: torch.full_like(indices, 0x80008000))


def test_a_second_moment_decays_as_float32s_where_nearest_rounding_holds_it(monkeypatch):
    """One element of each block keeps a large gradient (its block's scale); the others get one gradient, then none
    for 300 steps: float32 AdamW's v decays by 0.999 a step, 26% in all, while the codes of s are 6.25% apart. Rounded
    stochastically, v decays on average as float32's; rounded to the nearest code, its code never moves."""
    n = 64 * BLOCK
    leaders = torch.arange(n) % BLOCK == 0

    def second_moments(optimizer_class, **kwargs):
        weight = torch.nn.Parameter(torch.zeros(n))
        optimizer = optimizer_class([weight], lr=1e-6, **kwargs)
        for step in range(301):
            weight.grad = torch.where(leaders, 10.0, 1.0 if step == 0 else 0.0)
            optimizer.step()
        state = optimizer.state[weight]
        return decoded(state)[1] ** 2 if "exp_avg_sqrt" in state else state["exp_avg_sq"]

    exact = second_moments(torch.optim.AdamW)
    assert exact[~leaders].mean().item() == pytest.approx(0.001 * 0.999**300, rel=1e-3)
    ours = second_moments(AdamW, moments="8bit", fused=False)
    assert ours[~leaders].mean().item() == pytest.approx(exact[~leaders].mean().item(), rel=0.01)
    assert torch.allclose(ours[leaders], exact[leaders], rtol=1e-5)  # the scale itself is float32
    nearest(monkeypatch)
    stuck = second_moments(AdamW, moments="8bit", fused=False)
    # a code of s relative to the block's scale, which grows with the leader's v: v grows tenfold instead of decaying
    assert stuck[~leaders].mean().item() > 5 * 0.001


def test_it_follows_float32_adamw_on_an_ill_conditioned_least_squares(monkeypatch):
    """Minibatch least squares over features spanning two decades of scale, 600 steps: the held-out loss of 8-bit
    moments (float32 and bf16 weights) within 5% of torch's AdamW at every hundredth step; rounded to the nearest
    code instead, 15% or more above it by the end."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2048, 256, generator=generator) * torch.logspace(0, -2, 256)
    targets = features @ torch.randn(256, 64, generator=generator) + 0.01 * torch.randn(2048, 64, generator=generator)

    def losses(make, dtype=torch.float32):
        weight = torch.nn.Parameter(torch.zeros(256, 64, dtype=dtype))
        optimizer, draws, curve = make([weight]), torch.Generator().manual_seed(1), []
        for step in range(600):
            rows = torch.randint(0, 2048, (128,), generator=draws)
            w = weight.detach().float().requires_grad_()
            ((features[rows] @ w - targets[rows]) ** 2).mean().backward()
            weight.grad = w.grad.to(dtype)
            optimizer.step()
            if step % 100 == 99:
                curve.append(((features @ weight.float() - targets) ** 2).mean().item())
        return torch.tensor(curve)

    expected = losses(lambda p: torch.optim.AdamW(p, lr=3e-3))
    for dtype in (torch.float32, torch.bfloat16):
        got = losses(lambda p: AdamW(p, lr=3e-3, moments="8bit"), dtype)
        assert torch.allclose(got, expected, rtol=0.05), (dtype, got, expected)
    nearest(monkeypatch)
    assert losses(lambda p: AdamW(p, lr=3e-3, moments="8bit", fused=False))[-1] > 1.15 * expected[-1]


def test_a_restored_optimizer_keeps_its_codes_and_steps_as_the_uninterrupted_one():
    """torch's ``load_state_dict`` casts state to the parameter's dtype; the 8-bit codes and float32 scales are kept
    as saved (bf16 weights: a cast would turn codes into numbers and round the scales)."""
    whole = params(torch.bfloat16, shapes=((64, 130),))
    optimizer = AdamW(whole, lr=1e-3, seed=5, moments="8bit")
    for step in range(2):
        gradients(whole, step)
        optimizer.step()
    saved = ([p.detach().clone() for p in whole], copy.deepcopy(optimizer.state_dict()))
    gradients(whole, 2)
    optimizer.step()
    resumed = [torch.nn.Parameter(p) for p in saved[0]]
    again = AdamW(resumed, lr=1e-3, seed=5, moments="8bit")
    again.load_state_dict(saved[1])
    state = again.state[resumed[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sqrt_scale"].dtype == torch.float32
    assert torch.equal(state["exp_avg_scale"], saved[1]["state"][0]["exp_avg_scale"])
    gradients(resumed, 2)
    again.step()
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))
    assert all(torch.equal(optimizer.state[whole[0]][k], again.state[resumed[0]][k]) for k in state)


def test_config_takes_8bit_moments_and_refuses_them_sharded(tiny_config):
    tiny_config["optim"] = {"moments": "8bit"}
    assert load_config(base=tiny_config).optim.moments == "8bit"
    tiny_config["distributed"] = {"strategy": "fsdp"}
    with pytest.raises(OPDError, match=r"8-bit moments \(optim.moments: 8bit\) cannot be sharded yet"):
        load_config(base=tiny_config)
    tiny_config["optim"] = {"moments": "int8"}
    del tiny_config["distributed"]
    with pytest.raises(OPDError, match="moments"):
        load_config(base=tiny_config)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_run_with_8bit_moments_learns_and_resumes_exactly(tiny_config, tmp_path, dtype, monkeypatch):
    monkeypatch.setattr("opdkit.optimizer.MIN_8BIT", 256)  # the tiny student's matrices are smaller than 4,096
    tiny_config["student"]["dtype"] = dtype
    tiny_config["optim"] = {"steps": 4, "learning_rate": 3e-3, "moments": "8bit"}
    tiny_config["checkpoint"] = {"every": 2, "keep": 2, "best_metric": None}
    run = setup(load_config(base=tiny_config))
    result = train(run)
    assert result["after"]["reverse_kl"] < result["before"]["reverse_kl"]
    run_dir = tmp_path / "run"
    state = torch.load(run_dir / "checkpoint-4" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    coded = [s for s in state.values() if "exp_avg_sqrt" in s]
    assert coded and all(s["exp_avg"].dtype == torch.uint8 for s in coded)
    resumes_exactly(run, run_dir, 4)


def test_without_a_compiler_8bit_moments_run_in_torch_operators(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("OPDKIT_CACHE", str(tmp_path))
    kernel.cache_clear()
    try:
        weights = params(torch.float32, shapes=((80, 80),))
        optimizer = AdamW(weights, lr=1e-3, moments="8bit")
        assert optimizer.kernel_8bit is None
        gradients(weights, 0)
        before = weights[0].detach().clone()
        optimizer.step()
        assert not torch.equal(before, weights[0]) and optimizer.state[weights[0]]["exp_avg"].dtype == torch.uint8
        with pytest.raises(RuntimeError, match="needs a C compiler"):
            AdamW(weights, lr=1e-3, fused=True, moments="8bit")
    finally:
        kernel.cache_clear()
