"""torch.compile(fullgraph=True) over a function calling every public op: traces without graph
breaks (the ops are torch.library custom ops with fake implementations) and matches eager,
forward and gradients."""

import pytest
import torch

import tempflow_fast.ops as ops

from tempflow_fast.ops.testing import require


def _update(mean, samples, x, v, noise, old, adv, ref_mean):
    sigma, sigma_next = torch.tensor([1.0, 0.6], device=x.device), torch.tensor([0.9, 0.5], device=x.device)
    step = ops.flow_sde_step(x, v, sigma, sigma_next, 0.7, sigma_max=0.9, noise=noise)
    ddim = ops.ddim_sde_step(x, v, 0.6, 0.5, 0.7, prev_sample=step.prev_sample.detach())
    fused = ops.fused_flow_grpo_loss(mean, samples, step.std, old, adv, clip_range=0.2, ref_mean=ref_mean,
                                     beta=0.04)
    logp = ops.gaussian_log_prob(samples, mean, step.std)
    row_weights = torch.tensor([1.0, 0.5], device=x.device)[:, None]
    clip = ops.grpo_clip_loss(logp, old, adv, clip_range=0.2, weights=row_weights)
    return fused.loss + clip.loss + step.log_prob.sum() + ddim.log_prob.sum() + step.mean.square().mean()


@pytest.mark.parametrize("backend", ["triton"])
def test_compiled_matches_eager(backend):
    device = require(backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    n, k, d = 2, 3, 24
    mean = torch.randn(n, d, generator=g).to(device).requires_grad_()
    v = torch.randn(n, d, generator=g).to(device).requires_grad_()
    x, noise, ref_mean = (torch.randn(n, d, generator=g).to(device) for _ in range(3))
    samples = mean.detach()[:, None] + torch.randn(n, k, d, generator=g).to(device)
    old = torch.randn(n, k, generator=g).to(device) - 1.5
    adv = torch.randn(n, k, generator=g).to(device)
    compiled = torch.compile(_update, fullgraph=True)
    with ops.use_backend(backend):
        eager = _update(mean, samples, x, v, noise, old, adv, ref_mean)
        eager_grads = torch.autograd.grad(eager, [mean, v])
        got = compiled(mean, samples, x, v, noise, old, adv, ref_mean)
        got_grads = torch.autograd.grad(got, [mean, v])
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)
