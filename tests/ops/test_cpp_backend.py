"""C++ (OpenMP) backend of the fused-op primitives against the PyTorch reference.

Both sides get the same (possibly fp16/bf16) inputs and both compute in fp32, so they differ only by
summation order and by one rounding of latent-shaped outputs to the input dtype: the tolerances
below are that, not the (larger) error of low precision against an fp64 oracle. fp64 gradcheck
runs through small autograd.Functions around the C++ forward/backward pairs.

The extension builds on first use (about 45 s once per machine, cached afterwards). Tests skip only
when no C++ compiler is on PATH; with a compiler present, a failing build fails them.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tempflow_fast.ops import cpp_backend
from tempflow_fast.ops import reference as ref

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler on PATH: the C++ backend cannot build here")

# dtype -> (atol, rtol) for latent-shaped outputs (rounded to the dtype once on each side).
LATENT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# fp32 statistics computed from identical inputs: only the summation order differs.
STAT_TOL = dict(atol=2e-5, rtol=2e-5)
DTYPES = list(LATENT_TOL)
# (N, K, D): ragged tail, single row, single sample, K = 6 over several chunks (the backward's
# four-samples-at-a-time path plus a remainder), and FLUX-like packed latents (4096·64).
SHAPES = [(3, 4, 123), (1, 3, 123), (2, 1, 123), (2, 6, 2 * 2048 + 123), (2, 2, 4096 * 64 + 7)]


@pytest.fixture(scope="module")
def cpp():
    return cpp_backend.load()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _latents(N, K, D, dtype, seed=0, std_scale=0.3):
    g = _gen(seed)
    mean = torch.randn(N, D, generator=g)
    std = 0.2 + torch.rand(N, generator=g)
    samples = mean[:, None] + std_scale * std[:, None, None] * torch.randn(N, K, D, generator=g)
    return mean.to(dtype), samples.to(dtype), std


def _close_latent(actual, expected):
    atol, rtol = LATENT_TOL[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def _close_stat(actual, expected):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.float(), **STAT_TOL)


# 1. Gaussian log-prob ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_log_prob_matches_reference(cpp, dtype, shape):
    N, K, D = shape
    mean, samples, std = _latents(N, K, D, dtype, seed=1)
    _close_stat(cpp_backend.gaussian_log_prob_fwd(samples, mean, std), ref.gaussian_log_prob_fwd(samples, mean, std))
    grad = torch.randn(N, K, generator=_gen(2))
    _close_latent(cpp_backend.gaussian_log_prob_bwd(grad, samples, mean, std),
                  ref.gaussian_log_prob_bwd(grad, samples, mean, std))


# 2. SDE step ---------------------------------------------------------------------------------

def _step_inputs(N, D, dtype, seed=3):
    g = _gen(seed)
    x, v = torch.randn(N, D, generator=g).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    a = 1.0 + 0.1 * torch.rand(N, generator=g)
    b = -0.1 - 0.1 * torch.rand(N, generator=g)
    std = 0.05 + 0.3 * torch.rand(N, generator=g)
    noise = torch.randn(N, D, generator=g).to(dtype)
    return x, v, a, b, std, noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prev_given", [False, True])
@pytest.mark.parametrize("N, D", [(3, 123), (1, 4096 * 2 + 5)])
def test_sde_step_matches_reference(cpp, dtype, prev_given, N, D):
    x, v, a, b, std, noise = _step_inputs(N, D, dtype)
    if prev_given:
        kw = dict(prev_sample=(a[:, None] * x.float() + b[:, None] * v.float() + std[:, None] * noise.float()).to(dtype))
    else:
        kw = dict(noise=noise)
    prev, mu, logp = cpp_backend.sde_step_fwd(x, v, a, b, std, **kw)
    prev_r, mu_r, logp_r = ref.sde_step_fwd(x, v, a, b, std, **kw)
    _close_latent(prev, prev_r)
    _close_latent(mu, mu_r)
    # Both score the prev_sample as returned (rounded to dtype); identical fp32 math after that.
    _close_stat(logp, logp_r)

    g = _gen(4)
    grad_prev, grad_mean = torch.randn(N, D, generator=g).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    grad_logp = torch.randn(N, generator=g)
    for grads in [(grad_prev, grad_mean, grad_logp), (None, grad_mean, None), (grad_prev, None, grad_logp),
                  (None, None, grad_logp)]:
        got = cpp_backend.sde_step_bwd(*grads, x, v, prev, a, b, std, prev_given)
        want = ref.sde_step_bwd(*grads, x, v, prev_r, a, b, std, prev_given)
        for actual, expected in zip(got, want):
            _close_latent(actual, expected)


# 3. GRPO clipped surrogate -------------------------------------------------------------------

def _scored(M, seed=5, spread=0.3):
    g = _gen(seed)
    old = torch.randn(M, generator=g)
    logp = old + spread * torch.randn(M, generator=g)  # ratios from ~0.4 to ~2.5: both PPO branches
    adv = 4.0 * torch.randn(M, generator=g)  # some beyond adv_clip
    w = 0.5 + torch.rand(M, generator=g)
    return logp, old, adv, w


@pytest.mark.parametrize("M", [1, 24, 257])
def test_grpo_clip_loss_matches_reference(cpp, M):
    logp, old, adv, w = _scored(M)
    got = cpp_backend.grpo_clip_loss_fwd(logp, old, adv, w, 0.2, 5.0)
    want = ref.grpo_clip_loss_fwd(logp, old, adv, w, 0.2, 5.0)
    for actual, expected in zip(got, want):
        _close_stat(actual, expected)
    grad = torch.tensor(0.7)
    _close_stat(cpp_backend.grpo_clip_loss_bwd(grad, logp, old, adv, w, 0.2, 5.0),
                ref.grpo_clip_loss_bwd(grad, logp, old, adv, w, 0.2, 5.0))


def test_grpo_clip_loss_exercises_both_branches(cpp):
    """Guard for the test above: the data must contain clipped and unclipped samples."""
    logp, old, adv, w = _scored(257)
    _, _, clip_frac, _ = cpp_backend.grpo_clip_loss_fwd(logp, old, adv, w, 0.2, 5.0)
    dlogp = cpp_backend.grpo_clip_loss_bwd(torch.tensor(1.0), logp, old, adv, w, 0.2, 5.0)
    assert 0.1 < clip_frac.item() < 0.9
    assert 0 < int((dlogp == 0).sum()) < 257


# 4. Fused Flow-GRPO loss ---------------------------------------------------------------------

def _fused_inputs(N, K, D, dtype, seed=6):
    mean, samples, std = _latents(N, K, D, dtype, seed=seed)
    g = _gen(seed + 1)
    logp = ref.gaussian_log_prob_fwd(samples, mean, std)
    old = logp + 0.3 * torch.randn(N, K, generator=g)  # a share of samples clipped
    adv = 3.0 * torch.randn(N, K, generator=g)
    w = 0.5 + torch.rand(N, generator=g)
    ref_mean = (mean.float() + 0.05 * torch.randn(N, D, generator=g)).to(dtype)
    kl_std = 0.3 + torch.rand(N, generator=g)
    return mean, samples, std, old, adv, w, ref_mean, kl_std


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_ref", [False, True])
def test_flow_grpo_loss_matches_reference(cpp, dtype, shape, with_ref):
    N, K, D = shape
    mean, samples, std, old, adv, w, ref_mean, kl_std = _fused_inputs(N, K, D, dtype)
    rm, beta = (ref_mean, 0.04) if with_ref else (None, 0.0)
    args = (mean, samples, std, old, adv, w, rm, kl_std, 0.2, 5.0, beta)
    got = cpp_backend.flow_grpo_loss_fwd(*args)
    want = ref.flow_grpo_loss_fwd(*args)
    for actual, expected in zip(got, want):
        _close_stat(actual, expected)
    if with_ref:
        assert got[5].item() > 0
    grad = torch.tensor(1.3)
    bwd_args = (grad, mean, samples, std, got[1], old, adv, w, rm, kl_std, 0.2, 5.0, beta)
    _close_latent(cpp_backend.flow_grpo_loss_bwd(*bwd_args), ref.flow_grpo_loss_bwd(*bwd_args))


def test_flow_grpo_loss_skips_nothing_it_needs(cpp):
    """Clipped samples are not read in the backward; with every sample clipped only the KL term is left."""
    N, K, D = 2, 3, 123
    mean, samples, std, old, adv, w, ref_mean, kl_std = _fused_inputs(N, K, D, torch.float32)
    logp = ref.gaussian_log_prob_fwd(samples, mean, std)
    old = logp - 1.0  # r = e > 1+ε everywhere
    adv = torch.ones(N, K)  # A > 0 and r above the range: the clipped term strictly wins
    args = (torch.tensor(1.0), mean, samples, std, logp, old, adv, w, ref_mean, kl_std, 0.2, 5.0, 0.5)
    dmean = cpp_backend.flow_grpo_loss_bwd(*args)
    kl_only = 0.5 * (mean - ref_mean) / (N * kl_std[:, None] ** 2 * D)
    torch.testing.assert_close(dmean, kl_only, atol=1e-6, rtol=1e-5)


def test_results_do_not_depend_on_thread_count(cpp):
    mean, samples, std, old, adv, w, ref_mean, kl_std = _fused_inputs(4, 3, 4096 * 8 + 3, torch.float32)
    args = (mean, samples, std, old, adv, w, ref_mean, kl_std, 0.2, 5.0, 0.04)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp_backend.flow_grpo_loss_fwd(*args)
        d_one = cpp_backend.flow_grpo_loss_bwd(torch.tensor(1.0), mean, samples, std, one[1], *args[3:])
        torch.set_num_threads(2)
        two = cpp_backend.flow_grpo_loss_fwd(*args)
        d_two = cpp_backend.flow_grpo_loss_bwd(torch.tensor(1.0), mean, samples, std, two[1], *args[3:])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + (d_one,), two + (d_two,)):
        assert torch.equal(a, b)


# 5. fp64 gradcheck of the backward primitives ----------------------------------------------

class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, samples, std, old, adv, w, ref_mean, kl_std, beta):
        out = cpp_backend.flow_grpo_loss_fwd(mean, samples, std, old, adv, w, ref_mean, kl_std, 0.2, 5.0, beta)
        ctx.save_for_backward(mean, samples, std, out[1], old, adv, w, ref_mean, kl_std)
        ctx.beta = beta
        return out[0]

    @staticmethod
    def backward(ctx, grad_loss):
        mean, samples, std, logp, old, adv, w, ref_mean, kl_std = ctx.saved_tensors
        dmean = cpp_backend.flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old, adv, w, ref_mean, kl_std,
                                               0.2, 5.0, ctx.beta)
        return (dmean,) + (None,) * 8


class _LogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, samples, std):
        ctx.save_for_backward(samples, mean, std)
        return cpp_backend.gaussian_log_prob_fwd(samples, mean, std)

    @staticmethod
    def backward(ctx, grad):
        samples, mean, std = ctx.saved_tensors
        return cpp_backend.gaussian_log_prob_bwd(grad, samples, mean, std), None, None


class _SdeStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, a, b, std, noise, prev_sample):
        prev, mu, logp = cpp_backend.sde_step_fwd(x, v, a, b, std, noise, prev_sample)
        ctx.save_for_backward(x, v, prev, a, b, std)
        ctx.prev_given = prev_sample is not None
        return prev, mu, logp

    @staticmethod
    def backward(ctx, grad_prev, grad_mean, grad_logp):
        x, v, prev, a, b, std = ctx.saved_tensors
        dx, dv = cpp_backend.sde_step_bwd(grad_prev, grad_mean, grad_logp, x, v, prev, a, b, std, ctx.prev_given)
        return dx, dv, None, None, None, None, None


class _ClipLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, adv, w):
        ctx.save_for_backward(logp, old, adv, w)
        return cpp_backend.grpo_clip_loss_fwd(logp, old, adv, w, 0.2, 5.0)[0]

    @staticmethod
    def backward(ctx, grad):
        logp, old, adv, w = ctx.saved_tensors
        return cpp_backend.grpo_clip_loss_bwd(grad, logp, old, adv, w, 0.2, 5.0), None, None, None


def _away_from_clip_edges(logp, old, eps=0.2, margin=0.02):
    """Shift old log-probs so no ratio sits within `margin` of 1±ε (the loss has kinks there)."""
    r = torch.exp(logp - old)
    near = ((r - (1 + eps)).abs() < margin) | ((r - (1 - eps)).abs() < margin)
    return torch.where(near, old + 0.1, old)


@pytest.mark.parametrize("with_ref", [False, True])
def test_gradcheck_fused_loss_fp64(cpp, with_ref):
    N, K, D = 2, 3, 37
    mean, samples, std, old, adv, w, ref_mean, kl_std = _fused_inputs(N, K, D, torch.float64)
    std, w, kl_std = std.double(), w.double(), kl_std.double()
    old = _away_from_clip_edges(cpp_backend.gaussian_log_prob_fwd(samples, mean, std), old.double())
    rm, beta = (ref_mean, 0.5) if with_ref else (None, 0.0)
    mean = mean.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda m: _FusedLoss.apply(m, samples, std, old, adv.double(), w, rm, kl_std, beta), (mean,))


def test_gradcheck_log_prob_fp64(cpp):
    mean, samples, std = _latents(2, 3, 37, torch.float64, seed=8)
    mean = mean.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: _LogProb.apply(m, samples, std.double()), (mean,))


@pytest.mark.parametrize("prev_given", [False, True])
def test_gradcheck_sde_step_fp64(cpp, prev_given):
    x, v, a, b, std, noise = _step_inputs(2, 37, torch.float64, seed=9)
    a, b, std = a.double(), b.double(), std.double()
    prev = (a[:, None] * x + b[:, None] * v + std[:, None] * noise) if prev_given else None
    x, v = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    # With prev drawn from noise, prev-μ = std·noise does not depend on (x, v), so the true
    # derivative of logp is 0, while the contract (Flow-GRPO detaches prev in the log-prob) keeps
    # grad_logp·(prev-μ)/(std²·D): finite differences can check only prev and mean there.
    n_out = 3 if prev_given else 2
    assert torch.autograd.gradcheck(
        lambda x_, v_: _SdeStep.apply(x_, v_, a, b, std, None if prev_given else noise, prev)[:n_out], (x, v))


def test_gradcheck_clip_loss_fp64(cpp):
    logp, old, adv, w = (t.double() for t in _scored(16, seed=10))
    old = _away_from_clip_edges(logp, old)
    logp = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: _ClipLoss.apply(lp, old, adv, w), (logp,))


# 6. Bad input and the loader -----------------------------------------------------------------

def test_bad_input_raises_value_error(cpp):
    mean, samples, std = _latents(2, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="mean"):
        cpp_backend.gaussian_log_prob_fwd(samples, mean[:, :15].contiguous(), std)
    with pytest.raises(ValueError, match="std"):
        cpp_backend.gaussian_log_prob_fwd(samples, mean, std[:1])
    with pytest.raises(ValueError, match="dtype"):
        cpp_backend.gaussian_log_prob_fwd(samples, mean.half(), std)
    with pytest.raises(ValueError, match="contiguous"):
        cpp_backend.gaussian_log_prob_fwd(samples.transpose(0, 1), mean, std)
    x, v, a, b, s, noise = _step_inputs(2, 16, torch.float32)
    with pytest.raises(ValueError, match="exactly one of noise / prev_sample"):
        cpp_backend.sde_step_fwd(x, v, a, b, s)
    with pytest.raises(ValueError, match="kl_std"):
        cpp_backend.flow_grpo_loss_fwd(mean, samples, std, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2),
                                       mean, None, 0.2, 5.0, 0.1)


def test_load_without_compiler_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_module", None)
    monkeypatch.setattr(cpp_backend, "_error", None)
    monkeypatch.setitem(__import__("sys").modules, "tempflow_fast._C", None)  # no prebuilt extension
    monkeypatch.setenv("CXX", "tempflow-fast-no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpp_backend.load()
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # the failure is cached, not retried
        cpp_backend.load()


# 7. Low-precision conversions ------------------------------------------------------------------

def test_fp16_round_trip_is_exact_for_every_value(cpp):
    """mean = 1·x + 0·v must give back every fp16 bit pattern (normals, subnormals, ±0, ±Inf):
    checks the vectorised fp16 <-> fp32 conversions of the C++ loads and stores."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    finite_or_inf = ~torch.isnan(x)
    x = x[finite_or_inf].reshape(1, -1).contiguous()
    ones, zeros = torch.ones(1), torch.zeros(1)
    _, mu, _ = cpp_backend.sde_step_fwd(x, torch.zeros_like(x), ones, zeros, ones,
                                        prev_sample=torch.zeros_like(x))
    expected = torch.where(x == 0, torch.zeros_like(x), x)  # -0 + 0 = +0 in IEEE arithmetic
    assert torch.equal(mu.view(torch.int16), expected.view(torch.int16))
    nan = torch.full((1, 8), float("nan"), dtype=torch.float16)
    _, mu_nan, _ = cpp_backend.sde_step_fwd(nan, torch.zeros_like(nan), ones, zeros, ones, prev_sample=nan)
    assert torch.isnan(mu_nan).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_round_like_torch(cpp, dtype):
    """prev = μ + std·noise computed in fp32 and rounded to nearest even, bit for bit as torch's .to(dtype),
    including results in fp16's subnormal range and beyond its largest value."""
    N, D = 3, 2 * 2048 + 77
    x, v, a, b, std, noise = _step_inputs(N, D, dtype, seed=11)
    scale = torch.tensor([1e-6, 1.0, 3e4])  # fp16 subnormals, ordinary values, overflow to ±Inf
    a, b, std = a * scale, b * scale, std * scale
    prev, mu, _ = cpp_backend.sde_step_fwd(x, v, a, b, std, noise=noise)
    prev_r, mu_r, _ = ref.sde_step_fwd(x, v, a, b, std, noise=noise)
    assert torch.equal(mu.float(), mu_r.float())
    assert torch.equal(prev.float(), prev_r.float())


def test_per_row_scalars_in_any_dtype_and_layout(cpp):
    """fp32/fp64 per-row tensors are read in place, others converted: same numbers either way."""
    mean, samples, std = _latents(3, 2, 50, torch.float32, seed=12)
    expected = cpp_backend.gaussian_log_prob_fwd(samples, mean, std.half().float())
    strided = torch.stack([std.half().float(), torch.zeros(3)], 1)[:, 0]  # non-contiguous
    assert not strided.is_contiguous()
    for s in (std.half(), std.half().double(), strided):
        torch.testing.assert_close(cpp_backend.gaussian_log_prob_fwd(samples, mean, s), expected, atol=0, rtol=0)
