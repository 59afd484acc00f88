"""fp64 gradcheck of the backward kernels through the public ops (Triton through the interpreter
on CPU; the reference backend checks the oracle's explicit backward formulas the same way)."""

import pytest
import torch

import tempflow_fast.ops as ops

from tempflow_fast.ops.testing import require

pytestmark = pytest.mark.parametrize("backend", ["triton", "torch"])


def _check(backend, fn, inputs):
    require(backend)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gaussian_log_prob(backend):
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 3, 5, 3, generator=g, dtype=torch.float64)
    mean = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.4, 1.3], dtype=torch.float64)
    _check(backend, lambda m: ops.gaussian_log_prob(samples, m, std), (mean,))


def test_fused_flow_grpo_loss(backend):
    g = torch.Generator().manual_seed(1)
    n, k, d = 2, 4, 11
    mean = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 0.9], dtype=torch.float64)
    samples = mean.detach()[:, None] + std[:, None, None] * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    logp = ops.gaussian_log_prob(samples, mean.detach(), std)
    # ratios exp(±0.6), exp(±0.05): far from the clip edges 1±0.2, so the loss is smooth under eps
    old = logp - torch.tensor([-0.6, -0.05, 0.05, 0.6], dtype=torch.float64)
    adv = torch.tensor([[1.5, -0.7, 0.3, -2.5], [-1.0, 2.0, 0.8, -0.4]], dtype=torch.float64)
    ref_mean = mean.detach() + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.7, 1.4], dtype=torch.float64)

    def loss(m):
        return ops.fused_flow_grpo_loss(m, samples, std, old, adv, clip_range=0.2, weights=weights,
                                        ref_mean=ref_mean, beta=0.3, kl_std=0.8).loss

    _check(backend, loss, (mean,))


@pytest.mark.parametrize("kind", ["flow", "ddim"])
@pytest.mark.parametrize("scored", [False, True], ids=["drawn", "scored"])
def test_sde_step(backend, kind, scored):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    velocity = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    prev = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    step = ops.flow_sde_step if kind == "flow" else ops.ddim_sde_step
    extra = {"prev_sample": prev} if scored else {"noise": noise}

    def outputs(x, v):
        out = step(x, v, torch.tensor([0.8, 0.5], dtype=torch.float64), 0.3, 0.7, **extra)
        if scored:
            return out.mean, out.log_prob
        # A drawn sample's log-prob is differentiated with the sample held fixed (Flow-GRPO
        # detaches it), which finite differences of the whole function cannot see; that gradient
        # is what the scored case checks.
        return out.prev_sample, out.mean

    _check(backend, outputs, (sample, velocity))


def test_grpo_clip_loss(backend):
    logp = torch.tensor([0.1, -0.3, 0.2, 0.0, 0.4], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([-0.6, -0.05, 0.05, 0.6, 0.3], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 0.3, -2.5, 6.0], dtype=torch.float64)
    _check(backend, lambda lp: ops.grpo_clip_loss(lp, old, adv, clip_range=0.2).loss, (logp,))
