"""NaN or ±inf in any input of every fused op gives a non-finite loss and a non-finite gradient, on
every backend that runs here (torch, C++, Triton through the interpreter on CPU or on the GPU), so
the trainer's non-finite skip fires whatever the backend (issue 18 item 1).

Before this, Triton's tl.minimum/tl.maximum and C++'s std::min/max dropped NaN (a NaN advantage
was clamped to -adv_clip and trained), and on every backend an infinitely far sample or an
infinite advantage / old log-prob gave a finite surrogate (r = 0, or a clamped advantage).
Value checks are off by default (no host synchronisation), so these inputs reach the kernels."""

import math
import os
import subprocess
import sys

import pytest
import torch

import tempflow_fast.ops as ops
from tempflow_fast.ops.testing import loss_inputs, require, to_device

BACKENDS = ["torch", "cpp", "triton"]
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


@pytest.fixture(autouse=True)
def _value_checks_off(monkeypatch):
    monkeypatch.delenv(ops.CHECK_VALUES_ENV, raising=False)
    previous = ops.set_value_checks(None)
    yield
    ops.set_value_checks(previous)


def _with(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of t with its last element (last row, last sample) set to value."""
    t = t.clone()
    t.view(-1)[-1] = value
    return t


def _assert_poisoned(value_name: str, loss: torch.Tensor, grad: torch.Tensor, what: str):
    assert not torch.isfinite(loss).all(), f"{what}: loss {loss.tolist()} is finite"
    assert not torch.isfinite(grad).all(), f"{what}: the gradient is finite everywhere"
    if value_name == "nan":
        assert torch.isnan(loss).all(), f"{what}: a NaN input gave loss {loss.tolist()}, not NaN"
        assert torch.isnan(grad).any(), f"{what}: a NaN input gave no NaN in the gradient"


FUSED_INPUTS = ["mean", "samples", "std", "old_log_prob", "advantages", "weights", "ref_mean", "kl_std"]


def _fused_loss(backend, inputs):
    args = dict(inputs)
    mean = args.pop("mean").clone().requires_grad_()
    with ops.use_backend(backend):
        out = ops.fused_flow_grpo_loss(mean, args.pop("samples"), args.pop("std"), args.pop("old_log_prob"),
                                       args.pop("advantages"), **args)
        (dmean,) = torch.autograd.grad(out.loss, mean)
    return out.loss.detach(), dmean


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", FUSED_INPUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_flow_grpo_loss(backend, name, value):
    device = require(backend)
    inputs = to_device(loss_inputs((2, 3, 40), torch.float32, beta=0.05), device)
    inputs[name] = _with(inputs[name], VALUES[value])
    loss, dmean = _fused_loss(backend, inputs)
    _assert_poisoned(value, loss, dmean, f"{backend}: {name} = {value}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_inputs_stay_finite(backend):
    """The control: the same inputs without a bad value give a finite loss and gradient, and
    every clipping branch is taken (so the poison terms add exactly 0 where they should)."""
    device = require(backend)
    inputs = to_device(loss_inputs((2, 3, 40), torch.float32, beta=0.05), device)
    loss, dmean = _fused_loss(backend, inputs)
    want, want_grad = _fused_loss("torch", inputs)
    assert torch.isfinite(loss) and torch.isfinite(dmean).all()
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(dmean, want_grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", ["log_prob", "old_log_prob", "advantages", "weights"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_clip_loss(backend, name, value):
    device = require(backend)
    g = torch.Generator().manual_seed(1)
    t = dict(log_prob=torch.randn(8, generator=g), old_log_prob=torch.randn(8, generator=g),
             advantages=3 * torch.randn(8, generator=g), weights=0.5 + torch.rand(8, generator=g))
    t = {k: (_with(v, VALUES[value]) if k == name else v).to(device) for k, v in t.items()}
    log_prob = t.pop("log_prob").requires_grad_()
    with ops.use_backend(backend):
        out = ops.grpo_clip_loss(log_prob, t["old_log_prob"], t["advantages"], clip_range=0.2,
                                 weights=t["weights"], adv_clip=2.0)
        (dlogp,) = torch.autograd.grad(out.loss, log_prob)
    _assert_poisoned(value, out.loss.detach(), dlogp, f"{backend}: {name} = {value}")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", ["samples", "mean", "std"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_log_prob(backend, name, value):
    device = require(backend)
    g = torch.Generator().manual_seed(2)
    t = dict(mean=torch.randn(2, 30, generator=g), std=0.5 + torch.rand(2, generator=g))
    t["samples"] = t["mean"][:, None] + torch.randn(2, 3, 30, generator=g)
    t = {k: (_with(v, VALUES[value]) if k == name else v).to(device) for k, v in t.items()}
    mean = t["mean"].requires_grad_()
    with ops.use_backend(backend):
        logp = ops.gaussian_log_prob(t["samples"], mean, t["std"])
        (dmean,) = torch.autograd.grad(logp.sum(), mean)
    _assert_poisoned(value, logp.detach()[-1, -1], dmean, f"{backend}: {name} = {value}")


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", ["sample", "velocity", "noise", "prev_sample"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_sde_step(backend, name, value):
    """The step's log-prob (the rollout's and the training pass's 'loss') and the gradient reaching
    the model output (velocity) and the state."""
    device = require(backend)
    g = torch.Generator().manual_seed(3)
    t = {k: torch.randn(2, 4, 5, generator=g) for k in ("sample", "velocity", "noise", "prev_sample")}
    t = {k: (_with(v, VALUES[value]) if k == name else v).to(device) for k, v in t.items()}
    sample, velocity = t["sample"].requires_grad_(), t["velocity"].requires_grad_()
    scored = name == "prev_sample"
    with ops.use_backend(backend):
        step = ops.flow_sde_step(sample, velocity, 0.7, 0.6, 0.7, noise=None if scored else t["noise"],
                                 prev_sample=t["prev_sample"] if scored else None)
        dsample, dvelocity = torch.autograd.grad(step.log_prob.sum(), (sample, velocity))
    _assert_poisoned(value, step.log_prob.detach()[-1], dsample, f"{backend}: {name} = {value} (d/dsample)")
    _assert_poisoned(value, step.log_prob.detach()[-1], dvelocity, f"{backend}: {name} = {value} (d/dvelocity)")


def test_nan_advantage_gives_nan_loss_with_the_triton_backend_from_the_environment():
    """Issue 18's must-show, as a user runs it: TEMPFLOW_FAST_BACKEND=triton, and on a machine
    without CUDA TRITON_INTERPRET=1, in a fresh process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ, TEMPFLOW_FAST_BACKEND="triton")
    env.pop(ops.CHECK_VALUES_ENV, None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    code = f"""
import torch, tempflow_fast.ops as ops
g = torch.Generator().manual_seed(0)
mean = torch.randn(2, 16, generator=g).to('{device}').requires_grad_()
samples = mean.detach()[:, None] + torch.randn(2, 3, 16, generator=g).to('{device}')
adv = torch.randn(2, 3, generator=g).to('{device}')
adv[1, 2] = float('nan')
old = ops.gaussian_log_prob(samples, mean.detach(), 0.5)
out = ops.fused_flow_grpo_loss(mean, samples, 0.5, old, adv, clip_range=0.2)
out.loss.backward()
print(ops.active_backend('{device}'), out.loss.item(), bool(torch.isnan(mean.grad).any()))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    backend, loss, grad_nan = proc.stdout.split()
    assert backend == "triton" and loss == "nan" and grad_nan == "True", proc.stdout
