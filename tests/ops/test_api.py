"""Public op API: the SDE formulas of design.md §1 written out directly, output shapes and
dtypes, input validation (ValueError naming the argument), and backend dispatch.

Ops run on DEVICE with the default backend: the GPU (Triton) where there is one, else the CPU (the
C++ extension, or the reference without a compiler). Validation raises before any backend runs."""

import math
import warnings

import pytest
import torch

import tempflow_fast.ops as ops
from tempflow_fast.ops import backends
from tempflow_fast.ops.testing import device_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def value_checks():
    previous = ops.set_value_checks(True)
    yield
    ops.set_value_checks(previous)


def test_flow_sde_step_matches_design_formula_per_row():
    g = torch.Generator().manual_seed(0)
    x, v, xi = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.85, 0.5, 0.0], dtype=torch.float64)
    eta, sigma_max = 0.9, 0.85
    out = ops.flow_sde_step(*(t.to(DEVICE) for t in (x, v, sigma, sigma_next)), eta, sigma_max=sigma_max,
                            noise=xi.to(DEVICE))
    out = type(out)(*(t.cpu() for t in out))

    sig, nxt = sigma.view(3, 1, 1), sigma_next.view(3, 1, 1)
    s = eta * torch.sqrt(sig / (1 - torch.where(sig == 1, torch.tensor(sigma_max, dtype=torch.float64), sig)))
    dt = nxt - sig
    mean = x * (1 + s**2 * dt / (2 * sig)) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    std = s * torch.sqrt(-dt)
    prev = mean + std * xi
    logp = (-((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2))
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.prev_sample, prev)
    torch.testing.assert_close(out.log_prob, logp)
    torch.testing.assert_close(out.std, std.flatten())


def test_ddim_sde_step_matches_design_formula():
    g = torch.Generator().manual_seed(1)
    x, v, xi = (torch.randn(2, 7, generator=g, dtype=torch.float64) for _ in range(3))
    sigma, sigma_next, eta = 0.6, 0.4, 0.5
    out = ops.ddim_sde_step(x.to(DEVICE), v.to(DEVICE), sigma, sigma_next, eta, noise=xi.to(DEVICE))
    out = type(out)(*(t.cpu() for t in out))
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(eta * math.pi / 2)
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.prev_sample, mean + std * xi)
    torch.testing.assert_close(out.std, torch.full((2,), std, dtype=torch.float64))


def test_drawn_noise_follows_generator_and_output_dtypes():
    x = torch.randn(2, 4, 4, dtype=torch.bfloat16, device=DEVICE)
    a = ops.flow_sde_step(x, x, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(5))
    b = ops.flow_sde_step(x, x, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert a.prev_sample.dtype == a.mean.dtype == torch.bfloat16
    assert a.log_prob.dtype == a.std.dtype == torch.float32 and a.log_prob.shape == (2,)


def test_log_prob_shapes_and_fused_loss_consistency():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(2, 3, 4, generator=g).to(DEVICE)
    samples = torch.randn(2, 5, 3, 4, generator=g).to(DEVICE)
    assert ops.gaussian_log_prob(samples, mean, 0.5).shape == (2, 5)
    assert ops.gaussian_log_prob(samples[:, 0], mean, torch.tensor(0.5)).shape == (2,)
    # the fused loss reports the same log-probs, and ratio 1 when old_log_prob is them
    logp = ops.gaussian_log_prob(samples, mean, 0.5)
    out = ops.fused_flow_grpo_loss(mean, samples, 0.5, logp, torch.ones(2, 5, device=DEVICE), clip_range=0.1)
    torch.testing.assert_close(out.log_prob, logp)
    torch.testing.assert_close(out.ratio, torch.ones(2, 5, device=DEVICE))
    assert out.clip_frac.item() == 0.0 and out.kl.item() == 0.0
    torch.testing.assert_close(out.loss.cpu(), torch.tensor(-1.0))  # -A·r with A = 1, r = 1


def test_only_the_loss_carries_gradient():
    mean = torch.randn(2, 6, device=DEVICE, requires_grad=True)
    z = dict(device=DEVICE)
    out = ops.fused_flow_grpo_loss(mean, torch.randn(2, 3, 6, **z), 0.5, torch.zeros(2, 3, **z), torch.ones(2, 3, **z),
                                   clip_range=0.2, ref_mean=torch.zeros(2, 6, **z), beta=0.1)
    assert out.loss.requires_grad
    assert not any(t.requires_grad for t in out[1:])
    clip = ops.grpo_clip_loss(torch.zeros(4, requires_grad=True, **z), torch.zeros(4, **z), torch.ones(4, **z),
                              clip_range=0.2)
    assert clip.loss.requires_grad and not any(t.requires_grad for t in clip[1:])


def _loss_args():
    g = torch.Generator().manual_seed(3)
    return dict(mean=torch.randn(2, 3, 4, generator=g), samples=torch.randn(2, 5, 3, 4, generator=g),
                std=torch.tensor([0.5, 0.6]), old_log_prob=torch.zeros(2, 5), advantages=torch.zeros(2, 5))


def _fused(**over):
    args = dict(_loss_args(), **over)
    kw = {k: args.pop(k) for k in list(args) if k not in ("mean", "samples", "std", "old_log_prob", "advantages")}
    kw.setdefault("clip_range", 0.2)
    return ops.fused_flow_grpo_loss(args["mean"], args["samples"], args["std"], args["old_log_prob"],
                                    args["advantages"], **kw)


@pytest.mark.parametrize("over, match", [
    (dict(samples=torch.randn(2, 3, 4)), r"samples must have shape \(N, K, \*D\).*\(2, 3, 4\)"),
    (dict(samples=torch.randn(2, 5, 3, 5)), r"samples.*\(2, 5, 3, 5\)"),
    (dict(old_log_prob=torch.zeros(2, 4)), r"old_log_prob must have shape \(N, K\) = \(2, 5\).*\(2, 4\)"),
    (dict(advantages=torch.zeros(2, 6)), r"advantages must have shape \(N, K\) = \(2, 5\).*\(2, 6\)"),
    (dict(std=torch.tensor([0.5, 0.6, 0.7])), r"std must have shape \(\) or \(2,\).*\(3,\)"),
    (dict(std=-1.0), r"std must lie"),
    (dict(samples=torch.randn(2, 5, 3, 4, dtype=torch.float64)), r"samples has dtype torch.float64 but mean"),
    (dict(mean=torch.randn(2, 3, 4).to(torch.bfloat16)), r"samples has dtype torch.float32 but mean has"),
    (dict(mean=torch.randn(2, 3, 4).to("meta")), r"samples is on cpu but mean is on meta"),
    (dict(ref_mean=torch.randn(2, 3, 5)), r"ref_mean has shape \(2, 3, 5\) but mean has shape \(2, 3, 4\)"),
    (dict(beta=0.1), r"beta = 0.1 needs ref_mean"),
    (dict(clip_range=0.0), r"clip_range must be a finite Python float > 0"),
    (dict(mean=torch.zeros(2, 3, 4, dtype=torch.int32)), r"mean must be a floating tensor"),
    (dict(weights=torch.ones(3)), r"weights must have shape \(\) or \(2,\)"),
    (dict(samples=torch.randn(2, 0, 3, 4)), r"samples is empty, got shape \(2, 0, 3, 4\)"),
    (dict(kl_std=float("inf")), r"kl_std must lie"),
])
def test_fused_loss_validation(over, match):
    with pytest.raises(ValueError, match=match):
        _fused(**over)


_TENSOR_VALUES = [
    (dict(std=torch.tensor([0.5, 0.0])), r"std must lie in \(0.0, inf\)"),
    (dict(std=torch.tensor([0.5, float("nan")])), r"std must lie"),
    (dict(kl_std=torch.tensor([1.0, -1.0])), r"kl_std must lie"),
]


@pytest.mark.parametrize("over, match", _TENSOR_VALUES)
def test_fused_loss_value_checks(value_checks, over, match):
    """Values held in tensors are checked when value checks are on (they read the data)."""
    with pytest.raises(ValueError, match=match):
        _fused(**over)


@pytest.mark.parametrize("over", [dict(std=torch.tensor([0.5, 0.0])), dict(std=torch.tensor([0.5, float("nan")])),
                                  dict(kl_std=torch.tensor([1.0, 0.0]))])
def test_tensor_values_unchecked_by_default_give_a_non_finite_loss(over):
    """Off (the default), no data is read on the host; the bad value reaches the kernels and the
    loss is non-finite, which the trainer skips."""
    over = {k: v.to(DEVICE) for k, v in over.items()}
    args = {k: v.to(DEVICE) for k, v in _loss_args().items()}
    out = _fused(**dict(args, ref_mean=args["mean"] + 1.0, beta=0.1, **over))
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("call, match", [
    (lambda x: ops.flow_sde_step(x, x[:1], 0.5, 0.4, 0.7),
     r"velocity has shape \(1, 8\) but sample has shape \(2, 8\)"),
    (lambda x: ops.flow_sde_step(x[0], x[0], 0.5, 0.4, 0.7), r"sample must have at least 2 dims"),
    (lambda x: ops.flow_sde_step(x, x, 1.0, 0.9, 0.7), r"sigma == 1 needs sigma_max"),
    (lambda x: ops.flow_sde_step(x, x, 0.4, 0.5, 0.7), r"sigma_next must be < sigma"),
    (lambda x: ops.flow_sde_step(x, x, 1.5, 0.5, 0.7), r"sigma must lie in \(0.0, 1.0\]"),
    (lambda x: ops.flow_sde_step(x, x, 0.5, 0.4, 0.7, noise=x, prev_sample=x),
     r"at most one of noise / prev_sample"),
    (lambda x: ops.flow_sde_step(x, x, 0.5, 0.4, 0.7, prev_sample=x.double()),
     r"prev_sample has dtype torch.float64"),
    (lambda x: ops.flow_sde_step(x, x, torch.tensor([0.5, 0.4, 0.3]), 0.2, 0.7),
     r"sigma must have shape \(\) or \(2,\)"),
    (lambda x: ops.ddim_sde_step(x, x, 0.5, 0.0, 0.7), r"sigma_next must lie in \(0.0, 1.0\)"),
    (lambda x: ops.gaussian_log_prob(x, x[:, :4], 1.0), r"samples must have shape \(N, K, \*D\) or \(N, \*D\)"),
    (lambda x: ops.grpo_clip_loss(x, x[:, :3], x, clip_range=0.2), r"old_log_prob must have log_prob's shape"),
    (lambda x: ops.grpo_clip_loss(x, x, x, clip_range=0.2, weights=x[:, :3]),
     r"weights of shape \(2, 3\) do not broadcast"),
    (lambda x: ops.grpo_clip_loss(x, x, x, clip_range=0.2, adv_clip=float("inf")), r"adv_clip must be a finite"),
])
def test_step_and_loss_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 8))


@pytest.mark.parametrize("call, match", [
    (lambda x: ops.flow_sde_step(x, x, torch.tensor([0.5, 0.4]), torch.tensor([0.4, 0.5]), 0.7),
     r"sigma_next must be < sigma"),
    (lambda x: ops.flow_sde_step(x, x, torch.tensor([1.0, 0.5]), 0.3, 0.7), r"sigma == 1 needs sigma_max"),
    (lambda x: ops.flow_sde_step(x, x, torch.tensor([0.5, 1.5]), 0.3, 0.7), r"sigma must lie in \(0.0, 1.0\]"),
    (lambda x: ops.ddim_sde_step(x, x, 0.5, 0.4, torch.tensor([0.5, 1.2])), r"noise_level must lie in"),
    (lambda x: ops.gaussian_log_prob(x, x, torch.tensor([1.0, -1.0])), r"std must lie"),
])
def test_step_value_checks(value_checks, call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 8))


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    with ops.use_backend("cpp"), pytest.raises(ops.BackendUnavailable, match="CPU tensors only"):
        ops.active_backend("cuda")
    from tempflow_fast.ops import triton_backend

    monkeypatch.setattr(triton_backend, "interpreted", lambda: False)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable, match="interpreter"):
        ops.gaussian_log_prob(torch.randn(2, 3), torch.randn(2, 3), 1.0)


def test_environment_variable_and_context_manager(monkeypatch):
    monkeypatch.setenv("TEMPFLOW_FAST_BACKEND", "torch")
    assert ops.active_backend("cpu") == "torch"
    with ops.use_backend("triton"):  # on the GPU, or on CPU through the interpreter (conftest)
        assert ops.active_backend(device_for("triton")) == "triton"
    monkeypatch.setenv("TEMPFLOW_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="TEMPFLOW_FAST_BACKEND must be one of"):
        ops.active_backend("cpu")
    with pytest.raises(ValueError, match="use_backend: name must be one of"):
        with ops.use_backend("fast"):
            pass


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.delenv("TEMPFLOW_FAST_BACKEND", raising=False)
    monkeypatch.setitem(backends._PROBLEM, "cpp", lambda device: "no compiler in this test")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="PyTorch reference backend on cpu because no compiler in this test"):
        assert ops.active_backend("cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.active_backend("cpu") == "torch"
    monkeypatch.setitem(backends._PROBLEM, "cpp", lambda device: None)
    assert ops.active_backend("cpu") == "cpp"


def test_import_needs_torch_only():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; sys.modules['diffusers'] = None; "
            "sys.modules['transformers'] = None; import tempflow_fast.ops as ops, torch; "
            "import os; os.environ['TEMPFLOW_FAST_BACKEND'] = 'torch'; "
            "print(ops.gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1])" in out.stdout
