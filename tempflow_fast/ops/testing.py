"""Helpers for testing a backend of the fused ops against the PyTorch reference (the oracle):
the backends to compare, the per-dtype tolerance table, the shapes that catch tiling bugs, and
input builders. Used by tests/ops; importable by anyone adding a backend (pytest needed only for
`require`)."""

import torch

import tempflow_fast.ops as ops
from tempflow_fast.ops import reference

# Every compiled backend is compared against the reference; one that cannot run here is skipped
# with the dispatcher's own reason (e.g. the C++ extension failed to build).
BACKENDS = ["triton", "cpp"]

# Max abs error allowed relative to the largest magnitude of the reference output, per input
# dtype. Both sides see the same low-precision inputs and accumulate in fp32, so the error left is
# accumulation order plus at most ~1 ulp of output rounding (bf16: 2^-7, fp16: 2^-10); the Triton
# interpreter truncates fp32 -> bf16 where torch and the GPU round to nearest, which is that 1 ulp.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)

# (N, K, *D): ragged D, N=1, K=1, multi-dim latents; FLUX-like packed latents (4096 tokens x 64)
# run once in fp32 (the interpreter is slow).
SHAPES = [(3, 4, 123), (1, 1, 64), (2, 1, 7, 9), (1, 5, 16, 12)]
FLUX_SHAPE = (1, 2, 4096, 64)


def device_for(backend: str) -> torch.device:
    """Where a backend is tested: Triton on the GPU when there is one (on CPU it needs the
    interpreter), everything else on CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def require(backend: str) -> torch.device:
    """The device to test `backend` on; skips the calling test, with the dispatcher's reason,
    when the backend cannot run there."""
    import pytest

    device = device_for(backend)
    try:
        with ops.use_backend(backend):
            ops.active_backend(device)
    except ops.BackendUnavailable as exc:
        pytest.skip(f"backend {backend!r} cannot run here: {exc}")
    return device


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def assert_close_scaled(got, want, tol, name=""):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30) + 1e-30, f"{name}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def loss_inputs(shape, dtype, seed=0, beta=0.05):
    """Inputs of fused_flow_grpo_loss with ratios spread over both sides of the clip range and
    advantages beyond adv_clip, so every branch of the surrogate is exercised."""
    n, k, *d = shape
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, *d, generator=g)
    std = 0.3 + torch.rand(n, generator=g)
    samples = mean[:, None] + std.view(n, 1, *[1] * len(d)) * torch.randn(n, k, *d, generator=g)
    mean = mean + 0.05 * torch.randn(n, *d, generator=g)
    # the reference primitive, not the dispatcher: building inputs must not load (or build) a backend
    logp_now = reference.gaussian_log_prob_fwd(samples.reshape(n, k, -1), mean.reshape(n, -1), std)
    old = logp_now + 0.3 * torch.randn(n, k, generator=g)
    adv = 3.0 * torch.randn(n, k, generator=g)
    weights = 0.5 + torch.rand(n, generator=g)
    ref_mean = mean + 0.1 * torch.randn(n, *d, generator=g)
    kl_std = 0.5 + torch.rand(n, generator=g)
    return dict(mean=mean.to(dtype), samples=samples.to(dtype), std=std, old_log_prob=old, advantages=adv,
                weights=weights, ref_mean=ref_mean.to(dtype), kl_std=kl_std, beta=beta, clip_range=0.2,
                adv_clip=2.0)
