"""tempflow_fast.compat.flow_grpo.sde_step_with_logprob against a straightforward re-derivation
of Flow-GRPO's SDE step (design.md §1) on a real diffusers FlowMatchEulerDiscreteScheduler.

Each backend runs on its device (Triton on the GPU where there is one, else through the
interpreter on CPU); the re-derivation runs on CPU in fp64."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from tempflow_fast.compat.flow_grpo import sde_step_with_logprob  # noqa: E402
from tempflow_fast.ops import use_backend  # noqa: E402
from tempflow_fast.ops.testing import require  # noqa: E402


def _scheduler(steps=10, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def _rederived(scheduler, v, t_index, x, eta, xi=None, prev=None):
    """Flow-GRPO's formulas written out per element in fp64, one batch row per entry of t_index."""
    sig_all = scheduler.sigmas.double()
    sigma = sig_all[t_index].view(-1, 1, 1, 1)
    sigma_next = sig_all[[i + 1 for i in t_index]].view(-1, 1, 1, 1)
    guard = torch.where(sigma == 1, sig_all[1], sigma)
    s = eta * torch.sqrt(sigma / (1 - guard))
    dt = sigma_next - sigma
    x, v = x.double(), v.double()
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    prev = mean + std * xi.double() if prev is None else prev.double()
    logp = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, logp.mean(dim=(1, 2, 3)), mean, s


@pytest.mark.parametrize("t_index", [[0, 0], [4, 7], [0, 8]], ids=["sigma1-guard", "mid", "first-and-last"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_matches_rederivation_drawn_and_scored(backend, t_index, in_dtype):
    device = require(backend)
    torch.manual_seed(0)
    scheduler = _scheduler()
    x = torch.randn(2, 4, 6, 5).to(in_dtype)
    v = torch.randn(2, 4, 6, 5).to(in_dtype)
    timestep = scheduler.timesteps[t_index]
    with use_backend(backend):
        # a CPU generator, as Flow-GRPO's pipelines pass: randn_tensor draws on CPU and moves ξ
        prev, logp, mean, std_dev_t = sde_step_with_logprob(
            scheduler, v.to(device), timestep, x.to(device), noise_level=0.7,
            generator=torch.Generator().manual_seed(3))
    for got in (prev, logp, mean, std_dev_t):
        assert got.dtype == torch.float32 and got.device.type == device.type
    prev, logp, mean, std_dev_t = (t.cpu() for t in (prev, logp, mean, std_dev_t))
    # Flow-GRPO draws ξ with randn_tensor(shape, generator, dtype=fp32) after the upcast
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    want_prev, want_logp, want_mean, want_s = _rederived(scheduler, v.float(), t_index, x.float(), 0.7, xi=xi)
    assert std_dev_t.shape == (2, 1, 1, 1) and logp.shape == (2,)
    torch.testing.assert_close(prev.double(), want_prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std_dev_t.double(), want_s, rtol=1e-6, atol=1e-7)

    # scoring a given prev_sample (the training pass): same mean, log-prob of the given sample
    given = prev + 0.05 * torch.randn_like(prev)
    with use_backend(backend):
        _, logp2, mean2, _ = sde_step_with_logprob(scheduler, v.to(device), timestep, x.to(device), noise_level=0.7,
                                                   prev_sample=given.to(device))
    _, want_logp2, _, _ = _rederived(scheduler, v.float(), t_index, x.float(), 0.7, prev=given)
    torch.testing.assert_close(logp2.cpu().double(), want_logp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean2.cpu(), mean)


def test_gradient_reaches_model_output_through_mean_and_log_prob():
    """On the machine's default device and backend (the GPU's Triton where there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scheduler = _scheduler()
    x = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4).to(device).requires_grad_()
    prev = torch.randn(2, 3, 4, 4)
    timestep = scheduler.timesteps[[2, 2]]
    _, logp, _, _ = sde_step_with_logprob(scheduler, v, timestep, x.to(device), prev_sample=prev.to(device))
    (grad,) = torch.autograd.grad(logp.sum(), v)
    grad = grad.cpu()

    v64 = v.detach().cpu().double().requires_grad_()
    _, want_logp, _, _ = _rederived(scheduler, v64, [2, 2], x, 0.7, prev=prev)
    (want,) = torch.autograd.grad(want_logp.sum(), v64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


def test_timestep_count_must_match_batch():
    scheduler = _scheduler(steps=4)
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="timestep"):
        sde_step_with_logprob(scheduler, x, scheduler.timesteps[[0, 1, 2]], x)
