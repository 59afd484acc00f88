"""fp64 gradcheck of the backward kernels through the public ops (Triton through the interpreter
on CPU, on the GPU when there is one; the reference backend checks the oracle's explicit backward
formulas the same way)."""

import pytest
import torch

import tempflow_fast.ops as ops
from tempflow_fast.ops.testing import require

pytestmark = pytest.mark.parametrize("backend", ["triton", "torch"])


def _randn(seed, device):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


def _f64(values, device):
    return torch.tensor(values, dtype=torch.float64, device=device)


def _check(backend, fn, inputs):
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gaussian_log_prob(backend):
    device = require(backend)
    randn = _randn(0, device)
    samples, mean = randn(2, 3, 5, 3), randn(2, 5, 3).requires_grad_()
    std = _f64([0.4, 1.3], device)
    _check(backend, lambda m: ops.gaussian_log_prob(samples, m, std), (mean,))


def test_fused_flow_grpo_loss(backend):
    device = require(backend)
    randn = _randn(1, device)
    n, k, d = 2, 4, 11
    mean = randn(n, d).requires_grad_()
    std = _f64([0.5, 0.9], device)
    samples = mean.detach()[:, None] + std[:, None, None] * randn(n, k, d)
    logp = ops.gaussian_log_prob(samples, mean.detach(), std)
    # ratios exp(±0.6), exp(±0.05): far from the clip edges 1±0.2, so the loss is smooth under eps
    old = logp - _f64([-0.6, -0.05, 0.05, 0.6], device)
    adv = _f64([[1.5, -0.7, 0.3, -2.5], [-1.0, 2.0, 0.8, -0.4]], device)
    ref_mean = mean.detach() + 0.2 * randn(n, d)
    weights = _f64([0.7, 1.4], device)

    def loss(m):
        return ops.fused_flow_grpo_loss(m, samples, std, old, adv, clip_range=0.2, weights=weights,
                                        ref_mean=ref_mean, beta=0.3, kl_std=0.8).loss

    _check(backend, loss, (mean,))


@pytest.mark.parametrize("kind", ["flow", "ddim"])
@pytest.mark.parametrize("scored", [False, True], ids=["drawn", "scored"])
def test_sde_step(backend, kind, scored):
    device = require(backend)
    randn = _randn(2, device)
    sample, velocity = randn(2, 3, 4).requires_grad_(), randn(2, 3, 4).requires_grad_()
    noise, prev = randn(2, 3, 4), randn(2, 3, 4)
    step = ops.flow_sde_step if kind == "flow" else ops.ddim_sde_step
    extra = {"prev_sample": prev} if scored else {"noise": noise}
    sigma = _f64([0.8, 0.5], device)

    def outputs(x, v):
        out = step(x, v, sigma, 0.3, 0.7, **extra)
        if scored:
            return out.mean, out.log_prob
        # A drawn sample's log-prob is differentiated with the sample held fixed (Flow-GRPO
        # detaches it), which finite differences of the whole function cannot see; that gradient
        # is what the scored case checks.
        return out.prev_sample, out.mean

    _check(backend, outputs, (sample, velocity))


def test_grpo_clip_loss(backend):
    device = require(backend)
    logp = _f64([0.1, -0.3, 0.2, 0.0, 0.4], device).requires_grad_()
    old = logp.detach() - _f64([-0.6, -0.05, 0.05, 0.6, 0.3], device)
    adv = _f64([1.5, -0.7, 0.3, -2.5, 6.0], device)
    _check(backend, lambda lp: ops.grpo_clip_loss(lp, old, adv, clip_range=0.2).loss, (logp,))
