"""Completion solvers (sampling/solvers.py): their indices and calls, their math against diffusers' schedulers,
the engine stepping them inside its batched walk, and every solver reaching the Euler-T image as its steps grow."""

import math

import numpy as np
import pytest
import torch

from tempflow_fast.sampling.accounting import min_nfe
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, FullSDE, SingularSDE
from tempflow_fast.sampling.runners import EagerRunner
from tempflow_fast.sampling.solvers import (COMPLETION_SOLVERS, completion_calls, completion_indices, solve,
                                            solver_calls)

PROMPTS = ["a red square left of a blue square", "two green squares"]


def test_indices_and_calls():
    # T = 10, branch at k = 0: the completion starts at index 1 with 9 steps left.
    assert completion_indices(10, 1) == list(range(1, 11))
    assert completion_indices(10, 1, "euler", 9) == completion_indices(10, 1, "euler", 20) == list(range(1, 11))
    assert completion_indices(10, 1, "euler", 3) == [1, 4, 7, 10]
    assert completion_indices(10, 1, "dpmpp_2m", 2) == [1, 6, 10]  # 4.5 rounds up, then T
    assert completion_indices(10, 1, "tweedie") == [1, 10]           # x̂0 at the first state after the branch
    assert completion_indices(10, 1, "tweedie", 3) == [1, 2, 3, 10]
    assert completion_indices(10, 9, "heun", 4) == [9, 10]
    assert completion_calls(10, 1, "euler", 3) == 3
    assert completion_calls(10, 1, "heun", 3) == 5                   # 2 Heun steps + the last Euler step
    assert completion_calls(10, 1, "tweedie", 3) == 3
    assert solver_calls("heun", [9, 10]) == 1
    for start in range(1, 10):
        for steps in (None, 1, 2, 3, 5, 12):
            for solver in COMPLETION_SOLVERS:
                idx = completion_indices(10, start, solver, steps)
                assert idx[-1] == 10 and idx == sorted(set(idx)) and idx[0] == start


def _field(x, sigma):
    """A smooth nonlinear velocity field: enough curvature that solver orders differ."""
    return torch.sin(3 * x) * (1 + sigma) - 0.5 * x * sigma ** 2


def test_heun_is_diffusers_flow_match_heun():
    from diffusers import FlowMatchHeunDiscreteScheduler

    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    for t in sched.timesteps:
        sigma = float(t) / 1000
        x = sched.step(_field(x, sigma), t, x).prev_sample
    sig = sched.sigmas.unique_consecutive().tolist()  # the 6 steps' sigmas and the final 0
    assert len(sig) == 7 and sig[-1] == 0.0
    ours = solve(lambda x_, s: _field(x_, s), x0, list(range(7)), sig, "heun")
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_is_diffusers_dpm_solver_multistep():
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                        final_sigmas_type="zero")
    sched.set_timesteps(6)
    sig = sched.sigmas.tolist()
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    x = x0.clone()
    for j, t in enumerate(sched.timesteps):
        x = sched.step(_field(x, sig[j]), t, x).prev_sample
    ours = solve(lambda x_, s: _field(x_, s), x0, list(range(len(sig))), sig, "dpmpp_2m")
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def _mixture_velocity(x, sigma):
    """The exact flow-matching velocity of a two-Gaussian mixture per element (x = (1-σ)·x0 + σ·ε, v = ε - x0):
    a realistic field, smooth in σ, non-linear in x."""
    mean, std, weight = torch.tensor([-1.0, 1.5]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6])
    a = 1.0 - sigma
    var = a * a * std ** 2 + sigma * sigma
    xx = x[..., None]
    w = torch.softmax(torch.log(weight) - 0.5 * (xx - a * mean) ** 2 / var - 0.5 * torch.log(var), -1)
    x0 = (w * (mean + a * std ** 2 / var * (xx - a * mean))).sum(-1)
    return (x - x0) / sigma


@pytest.mark.parametrize("solver", COMPLETION_SOLVERS)
def test_every_solver_reaches_the_euler_image_as_steps_grow(solver):
    """From index 1 of a T = 48 schedule, as the steps grow: Euler and the Tweedie shortcut close in on the Euler-T
    end point and are it at all 47 steps; the second-order solvers close in on the exact solution and at 47 steps
    are at least as close to it as Euler-T is, so within twice Euler-T's own error of the Euler-T image."""
    from tempflow_fast.sampling.schedules import flow_sigmas

    T = 48
    sig = flow_sigmas(T, 3.0).tolist()
    x1 = torch.randn(256, generator=torch.Generator().manual_seed(2))
    f = _mixture_velocity
    euler_t = solve(f, x1, completion_indices(T, 1), sig)
    fine = flow_sigmas(8 * T, 3.0).tolist()  # 8× finer Heun: the exact solution to ~1e-4
    exact = solve(f, x1, list(range(8, 8 * T + 1)), fine, "heun")
    euler_err = (euler_t - exact).abs().max().item()
    ends = {n: solve(f, x1, completion_indices(T, 1, solver, n), sig, solver) for n in (2, 4, 8, 16, 47)}
    # Euler-path solvers converge to Euler-T itself; the second-order ones to the exact solution
    target = euler_t if solver in ("euler", "tweedie") else exact
    dists = [(end - target).abs().max().item() for end in ends.values()]
    assert all(b <= a + 1e-6 for a, b in zip(dists, dists[1:])), dists
    if solver in ("euler", "tweedie"):
        assert dists[-1] == 0.0
    else:
        assert dists[-1] <= euler_err < 0.15
        assert (ends[47] - euler_t).abs().max().item() <= 2 * euler_err


@pytest.mark.parametrize("solver, steps", [("euler", None), ("euler", 3), ("heun", 2), ("heun", 3),
                                           ("dpmpp_2m", 3), ("tweedie", None), ("tweedie", 2)])
def test_engine_steps_each_completion_like_solve(tiny_model, counting_model, solver, steps):
    """The engine's batched walk gives every branch the completion `solve` gives it alone, with the calls
    `min_nfe` counts; the trunk, states and samples do not depend on the solver."""
    T = 6
    base = Bifurcation(num_steps=T, seeds_per_prompt=2, branches=3, bifurcation_steps=(0, 2, 4), shift=3.0)
    plan = Bifurcation(num_steps=T, seeds_per_prompt=2, branches=3, bifurcation_steps=(0, 2, 4), shift=3.0,
                       completion_solver=solver, completion_steps=steps)
    ref = rollout(tiny_model, PROMPTS, base, seed=3)
    res = rollout(counting_model, PROMPTS, plan, seed=3)
    assert counting_model.rows == res.stats.total_nfe
    assert res.stats.nfe == min_nfe(plan.layout(), len(PROMPTS))
    # the same states and samples; a solver that batches other completion rows beside them changes the calls' row
    # counts, and on some CPUs (oneDNN/MKL kernels chosen by row count) the float32 rounding with them (~1 ulp)
    torch.testing.assert_close(res.samples.sample, ref.samples.sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.trunk_images, ref.trunk_images, rtol=0, atol=1e-5)
    sig = res.sigmas.tolist()
    smp, tr = res.samples, res.trajectories
    for k in (0, 2, 4):
        sel = tr.branch_step[smp.trajectory] == k
        rows = smp.trajectory[sel]
        cond = {name: t[tr.prompt[rows]] for name, t in res.cond.items()}
        with torch.no_grad():
            expect = solve(lambda x_, s: tiny_model.velocity(x_, torch.full((x_.shape[0],), s), cond).float(),
                           smp.sample[sel], completion_indices(T, k + 1, solver, steps), sig, solver)
        torch.testing.assert_close(res.final_latents[1][rows], expect, rtol=0, atol=1e-5)
    if (solver, steps) == ("euler", None):
        assert torch.equal(res.images[1], ref.images[1])


@pytest.mark.parametrize("solver", ["euler", "tweedie", "heun"])
def test_segment_runner_same_completions(tiny_model, solver):
    """Euler-path solvers go through runner.ode_segment in one piece; the others step through the runner's
    per-call path; either way the images equal the per-step walk's."""
    plan = Bifurcation(num_steps=5, seeds_per_prompt=2, branches=2, completion_solver=solver, completion_steps=2)
    a = rollout(tiny_model, PROMPTS, plan, seed=4)
    b = rollout(tiny_model, PROMPTS, plan, seed=4, runner=EagerRunner(tiny_model, segments=True))
    assert a.stats.nfe == b.stats.nfe
    torch.testing.assert_close(a.images[1], b.images[1], rtol=0, atol=1e-5)


def test_g2rpo_single_granularity_and_refusals(counting_model):
    plan = SingularSDE(num_steps=8, branches=3, granularities=(1,), completion_solver="dpmpp_2m", completion_steps=3)
    res = rollout(counting_model, PROMPTS[:1], plan, seed=0)
    assert res.stats.nfe == min_nfe(plan.layout(), 1)
    assert res.stats.nfe["completion"] == 3 * sum(min(3, 8 - k - 1) for k in range(4))
    with pytest.raises(ValueError, match="granularities"):
        SingularSDE(granularities=(1, 2), completion_solver="heun")
    with pytest.raises(ValueError, match="completion_solver"):
        Bifurcation(completion_solver="rk4")
    with pytest.raises(ValueError, match="completion_steps"):
        Bifurcation(completion_steps=0)

    class WithSolver:  # a full-SDE layout with a solver asked for: it has no ODE completion to apply it to
        def layout(self):
            from dataclasses import replace

            return replace(FullSDE(num_steps=4, samples_per_prompt=2).layout(), completion_solver="heun")

    with pytest.raises(ValueError, match="ODE completions"):
        rollout(counting_model, PROMPTS[:1], WithSolver(), seed=0)


def test_tweedie_shortcut_is_x0_hat_at_the_first_state(tiny_model):
    """completion_solver=tweedie, one step: the image of x̂0 = x - σ·v at index k+1, one call per branch."""
    T = 6
    plan = Bifurcation(num_steps=T, seeds_per_prompt=1, branches=2, bifurcation_steps=(1,), completion_solver="tweedie")
    res = rollout(tiny_model, PROMPTS[:1], plan, seed=5)
    assert res.stats.nfe["completion"] == 2
    s = res.sigmas[2].item()
    cond = {k: t.expand(2, *t.shape[1:]) for k, t in res.cond.items()}
    with torch.no_grad():
        v = tiny_model.velocity(res.samples.sample, torch.full((2,), s), cond)
    torch.testing.assert_close(res.final_latents[1], res.samples.sample - s * v, rtol=0, atol=1e-5)
    assert math.isclose(s, float(np.float32(res.sigmas[2])))


def test_config_reaches_the_plan():
    """`sampling.completion_solver` / `completion_steps` (and `schedule_from_model`) reach the plan the trainer gets
    from algorithms.from_config; a method without ODE completions refuses them by field name."""
    from tempflow_fast import algorithms
    from tempflow_fast.config import load_config
    from tempflow_fast.training.train_config import Config

    cfg = load_config(Config, None, ["method=tempflow", "sampling.completion_solver=dpmpp_2m",
                                     "sampling.completion_steps=3", "sampling.schedule_from_model=true"])
    layout = algorithms.from_config(cfg).plan().layout()
    assert (layout.completion_solver, layout.completion_steps, layout.shift, layout.dynamic_shift) == \
        ("dpmpp_2m", 3, None, None)
    cfg = load_config(Config, None, ["method=g2rpo", "g2rpo.granularities=[1]", "sampling.completion_solver=heun"])
    assert algorithms.from_config(cfg).plan().layout().completion_solver == "heun"
    for method in ("flow_grpo", "stepwise"):
        with pytest.raises(ValueError, match="sampling.completion_solver"):
            algorithms.from_config(load_config(Config, None, [f"method={method}", "sampling.completion_steps=2"]))
    with pytest.raises(ValueError, match="completion_steps"):
        load_config(Config, None, ["sampling.completion_steps=0"])
    with pytest.raises(ValueError, match="completion_solver"):
        load_config(Config, None, ["sampling.completion_solver=rk4"])
