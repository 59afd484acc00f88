"""Every compiled backend against the PyTorch reference: forward values and gradients of the
public ops, fp32/fp16/bf16 inputs, odd shapes (ragged D, N=1, K=1) and one FLUX-sized latent."""

import pytest
import torch

import tempflow_fast.ops as ops

from tempflow_fast.ops.testing import (BACKENDS, DTYPES, FLUX_SHAPE, SHAPES, TOL, assert_close_scaled, loss_inputs,
                                      require, to_device)


def _fused(backend, inputs):
    mean = inputs["mean"].clone().requires_grad_()
    args = dict(inputs, mean=mean)
    with ops.use_backend(backend):
        out = ops.fused_flow_grpo_loss(args.pop("mean"), args.pop("samples"), args.pop("std"),
                                       args.pop("old_log_prob"), args.pop("advantages"), **args)
        (dmean,) = torch.autograd.grad(2.5 * out.loss, mean)
    return out, dmean


def _compare_fused(backend, shape, dtype):
    device = require(backend)
    inputs = to_device(loss_inputs(shape, dtype), device)
    got, got_grad = _fused(backend, inputs)
    want, want_grad = _fused("torch", inputs)
    tol = TOL[dtype]
    for field in ops.LossOutput._fields:
        assert_close_scaled(getattr(got, field), getattr(want, field), tol, field)
    assert got_grad.dtype == dtype
    assert_close_scaled(got_grad, want_grad, tol, "dmean")
    if shape[0] * shape[1] >= 4:
        assert 0.0 < want.clip_frac.item() < 1.0, "inputs should clip some ratios and not others"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_flow_grpo_loss(backend, shape, dtype):
    _compare_fused(backend, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_flow_grpo_loss_flux_sized(backend):
    _compare_fused(backend, FLUX_SHAPE, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_flow_grpo_loss_without_reference_mean(backend):
    device = require(backend)
    inputs = to_device(loss_inputs((2, 3, 50), torch.float32, beta=0.0), device)
    inputs["ref_mean"] = None
    got, got_grad = _fused(backend, inputs)
    want, want_grad = _fused("torch", inputs)
    assert got.kl.item() == 0.0
    assert_close_scaled(got.loss, want.loss, TOL[torch.float32], "loss")
    assert_close_scaled(got_grad, want_grad, TOL[torch.float32], "dmean")


def _log_prob(backend, samples, mean, std):
    mean = mean.clone().requires_grad_()
    with ops.use_backend(backend):
        logp = ops.gaussian_log_prob(samples, mean, std)
        g = torch.linspace(-1.0, 2.0, logp.numel(), device=logp.device).reshape(logp.shape)
        (dmean,) = torch.autograd.grad((logp * g).sum(), mean)
    return logp, dmean


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_log_prob(backend, shape, dtype):
    device = require(backend)
    inputs = to_device(loss_inputs(shape, dtype), device)
    samples, mean, std = inputs["samples"], inputs["mean"], inputs["std"]
    for s in (samples, samples[:, 0]):  # (N, K, *D) and (N, *D)
        got, got_grad = _log_prob(backend, s, mean, std)
        want, want_grad = _log_prob("torch", s, mean, std)
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        assert_close_scaled(got, want, TOL[dtype], "log_prob")
        assert_close_scaled(got_grad, want_grad, TOL[dtype], "dmean")


def _step(backend, step_fn, sample, velocity, sigma, sigma_next, given_prev, noise, **kw):
    sample = sample.clone().requires_grad_()
    velocity = velocity.clone().requires_grad_()
    with ops.use_backend(backend):
        if given_prev is None:
            out = step_fn(sample, velocity, sigma, sigma_next, 0.7, noise=noise, **kw)
        else:
            out = step_fn(sample, velocity, sigma, sigma_next, 0.7, prev_sample=given_prev, **kw)
        g = torch.Generator().manual_seed(7)
        weights = [torch.randn(t.shape, generator=g).to(sample.device)
                   for t in (out.prev_sample, out.mean, out.log_prob)]
        objective = ((out.prev_sample.float() * weights[0]).sum() + (out.mean.float() * weights[1]).sum()
                     + (out.log_prob * weights[2]).sum())
        grads = torch.autograd.grad(objective, [sample, velocity])
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_sde_steps(kind, backend, shape, dtype):
    device = require(backend)
    n, _, *d = shape
    g = torch.Generator().manual_seed(1)
    sample, velocity, noise = (torch.randn(n, *d, generator=g).to(device, dtype) for _ in range(3))
    # per-row steps: row 0 starts at sigma = 1 (the Flow-GRPO guard), the others elsewhere
    sigma = torch.tensor([1.0, 0.6, 0.35], device=device)[:n]
    sigma_next = torch.tensor([0.9, 0.45, 0.2], device=device)[:n]
    step_fn, kw = (ops.flow_sde_step, dict(sigma_max=0.93)) if kind == "flow" else (ops.ddim_sde_step, {})
    if kind == "ddim":
        sigma = sigma.clamp(max=0.95)
    tol = TOL[dtype]
    drawn, drawn_grads = _step(backend, step_fn, sample, velocity, sigma, sigma_next, None, noise, **kw)
    want, want_grads = _step("torch", step_fn, sample, velocity, sigma, sigma_next, None, noise, **kw)
    for field in ("prev_sample", "log_prob", "mean", "std"):
        assert_close_scaled(getattr(drawn, field), getattr(want, field), tol, field)
    for name, got_g, want_g in zip(("dsample", "dvelocity"), drawn_grads, want_grads):
        assert got_g.dtype == dtype
        assert_close_scaled(got_g, want_g, tol, name)

    given = (want.prev_sample.float() + 0.1).to(dtype)  # score a given sample (training pass)
    scored, scored_grads = _step(backend, step_fn, sample, velocity, sigma, sigma_next, given, None, **kw)
    want, want_grads = _step("torch", step_fn, sample, velocity, sigma, sigma_next, given, None, **kw)
    assert torch.equal(scored.prev_sample, given)
    assert_close_scaled(scored.log_prob, want.log_prob, tol, "log_prob (given prev)")
    for name, got_g, want_g in zip(("dsample", "dvelocity"), scored_grads, want_grads):
        assert_close_scaled(got_g, want_g, tol, name + " (given prev)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 37, 2500])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_clip_loss(backend, m, dtype):
    device = require(backend)
    g = torch.Generator().manual_seed(m)
    logp = torch.randn(m, generator=g)
    old = logp + 0.3 * torch.randn(m, generator=g)
    adv = 3.0 * torch.randn(m, generator=g)
    weights = torch.rand(m, generator=g) + 0.5
    logp, old, adv, weights = (t.to(device) for t in (logp.to(dtype), old, adv, weights))
    results = []
    for name in (backend, "torch"):
        lp = logp.clone().requires_grad_()
        with ops.use_backend(name):
            out = ops.grpo_clip_loss(lp, old, adv, clip_range=0.2, weights=weights, adv_clip=2.0)
            (grad,) = torch.autograd.grad(out.loss, lp)
        results.append((out, grad))
    (got, got_grad), (want, want_grad) = results
    for field in ops.ClipLossOutput._fields:
        assert_close_scaled(getattr(got, field), getattr(want, field), TOL[torch.float32], field)
    assert got_grad.dtype == dtype
    assert_close_scaled(got_grad, want_grad, TOL[torch.float32], "dlogp")
