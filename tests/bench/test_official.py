"""The public codes' structure (bench/official.py) against the engine and the trainer's update: the same noises give
the same rollout (images, states, samples, log-probs), the same credit gives the same parameter gradient, and the
counter sees the structural difference (rows per sample, calls, checkpoint recomputation)."""

import copy

import pytest
import torch

from tempflow_fast.algorithms import FlowGRPO, TempFlowGRPO
from tempflow_fast.algorithms.base import Rewards
from tempflow_fast.bench.official import ForwardCounter, official_rollout, official_update
from tempflow_fast.bench.pipelines import flux_adapter
from tempflow_fast.images import to_unit_float
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.training.update import build_update_batch, policy_loss

PROMPTS = ["a red square", "two blue circles"]


@pytest.fixture(scope="module")
def model():
    m = flux_adapter("narrow", seed=0)
    m.module.enable_gradient_checkpointing()  # the public code's update runs with it; numbers do not change
    return m


def _algorithms():
    return [TempFlowGRPO(num_steps=4, num_seeds=2, branches=3, shift=3.0),
            FlowGRPO(num_steps=4, group_size=5, shift=3.0)]  # 10 trajectories: sampler batches of 9 and 1


@pytest.mark.parametrize("algorithm", _algorithms(), ids=["tempflow", "flow_grpo"])
def test_same_noise_same_rollout(model, algorithm):
    plan = algorithm.plan()
    ours = rollout(model, PROMPTS, plan, seed=7)
    theirs = official_rollout(model, PROMPTS, plan, seed=7)
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs.images[1], ours.images[1], **close)
    torch.testing.assert_close(theirs.final_latents[1], ours.final_latents[1], **close)
    for name in ("latents", "sigma", "sigma_next", "std"):
        torch.testing.assert_close(getattr(theirs.states, name), getattr(ours.states, name), **close)
    for name in ("step", "prompt", "seed"):
        assert torch.equal(getattr(theirs.states, name), getattr(ours.states, name))
    torch.testing.assert_close(theirs.samples.sample, ours.samples.sample, **close)
    torch.testing.assert_close(theirs.samples.old_log_prob, ours.samples.old_log_prob, rtol=0, atol=1e-4)
    assert torch.equal(theirs.samples.state, ours.samples.state)
    assert torch.equal(theirs.samples.trajectory, ours.samples.trajectory)
    for name in ("prompt", "seed", "branch_step", "branch"):
        assert torch.equal(getattr(theirs.trajectories, name), getattr(ours.trajectories, name))
    if ours.trunk_images is not None:
        torch.testing.assert_close(theirs.trunk_images, ours.trunk_images, **close)
    # the same rows through the transformer, in many more calls
    assert theirs.stats.nfe == ours.stats.nfe
    assert theirs.stats.batched_calls > ours.stats.batched_calls


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.module.parameters() if p.requires_grad])


@pytest.mark.parametrize("algorithm", _algorithms(), ids=["tempflow", "flow_grpo"])
def test_same_credit_same_gradient(model, algorithm):
    """Moved weights (ratios ≠ 1, a share of them clipped at ε = 1e-3) and a frozen reference (KL ≠ 0, β = 0.004, Gaussian
    convention): one policy forward per shared state (the trainer's update) and one row per sample (the public
    code's) give the same gradient."""
    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model.module).requires_grad_(False)
    ref_model = copy.copy(model)
    ref_model.module = reference
    result = rollout(policy, PROMPTS, algorithm.plan(), seed=3)
    r = to_unit_float(result.images[1]).mean(dim=(1, 2, 3))  # brightness: continuous, every group has a spread
    credit = algorithm.credit(result, Rewards({1: r}))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in policy.module.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    kw = dict(clip_range=1e-3, adv_clip=5.0, beta=0.004, kl_convention="gaussian")

    policy.module.zero_grad()
    groups = build_update_batch(result, credit)
    total = sum(gr.num_samples for gr in groups)
    clipped = []
    with ForwardCounter(policy.module) as ours, ForwardCounter(reference) as ours_ref:
        for gr in groups:
            loss, out = policy_loss(policy, gr, cond=result.cond, sde=result.sde, noise_level=result.noise_level,
                                    sigma_max=float(result.sigmas[1]), total_samples=total,
                                    reference=ref_model.velocity, **kw)
            loss.backward()
            clipped.append(float(out.clip_frac))
    g_ours = _grads(policy)
    assert 0.05 < max(clipped) < 0.95 and float(out.kl) > 0

    policy.module.zero_grad()
    with ForwardCounter(policy.module) as theirs, ForwardCounter(reference) as theirs_ref:
        stats = official_update(policy, result, credit, reference=ref_model.velocity, **kw)
    g_theirs = _grads(policy)
    rel = (g_theirs - g_ours).norm() / g_ours.norm()
    assert rel < 1e-5, float(rel)

    trained = ~credit.zero_std & (credit.trained if credit.trained is not None else True)
    M, S = int(trained.sum()), int(result.samples.state[trained].unique().numel())  # samples, states trained
    assert stats["rows"] == M == theirs.grad_rows and ours.grad_rows == S
    # every row with gradient recomputed once by checkpointing; the reference a no-grad row per trained row
    assert theirs.recompute_rows == M and ours.recompute_rows == S
    assert (theirs_ref.rows, theirs_ref.grad_rows, ours_ref.rows, ours_ref.grad_rows) == (M, 0, S, 0)
    assert theirs.forward_equivalents + theirs_ref.forward_equivalents == 5 * M
    assert ours.forward_equivalents + ours_ref.forward_equivalents == 5 * S
    if algorithm.name == "tempflow":
        assert M == 3 * S and stats["calls"] == S  # one call of K = 3 rows per (seed, k)
    else:  # batches of 9 and 1 trajectories × the 3 trained steps of 4 (timestep_fraction 0.99)
        assert M == S == 10 * 3 and stats["calls"] == 2 * 3
