import math
from dataclasses import replace

import pytest
import torch

from tempflow_fast import ops
from tempflow_fast.sampling.accounting import min_nfe
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, FullSDE, SingularSDE, SlidingWindowSDE
from tempflow_fast.sampling.runners import EagerRunner
from tempflow_fast.sampling.schedules import flow_sigmas, interval_sigmas
from tempflow_fast.sampling.simple import sample

PROMPTS = ["a red square left of a blue square", "two green squares"]


class _WithTweedie:
    """A Bifurcation whose layout also asks for x̂0 at every state: the engine takes any plan with
    `.layout()`, and the Tweedie estimates expose every intermediate state of every branch."""

    def __init__(self, plan):
        self.plan = plan

    def layout(self):
        return replace(self.plan.layout(), tweedie=True)


def test_same_seed_identical_other_seed_differs(tiny_model):
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=3)
    a = rollout(tiny_model, PROMPTS, plan, seed=7)
    b = rollout(tiny_model, PROMPTS, plan, seed=7, runner=EagerRunner(tiny_model))
    c = rollout(tiny_model, PROMPTS, plan, seed=8)
    for field in ("latents", "sigma", "sigma_next", "std", "step", "prompt", "seed"):
        assert torch.equal(getattr(a.states, field), getattr(b.states, field))
    assert torch.equal(a.samples.sample, b.samples.sample)
    assert torch.equal(a.samples.old_log_prob, b.samples.old_log_prob)
    assert torch.equal(a.images[1], b.images[1]) and torch.equal(a.trunk_images, b.trunk_images)
    assert not torch.allclose(a.images[1], c.images[1])


def test_branches_identical_before_k_and_differ_from_k(tiny_model):
    T, N, K = 6, 2, 3
    plan = Bifurcation(num_steps=T, seeds_per_prompt=N, branches=K, bifurcation_steps=(0, 2, 4))
    res = rollout(tiny_model, PROMPTS, _WithTweedie(plan), seed=0)
    tr = res.trajectories
    tw = res.tweedie_images
    assert tw.shape[:2] == (len(PROMPTS) * N * K * 3, T)
    groups = {}
    for b in range(len(tr)):
        groups.setdefault((int(tr.prompt[b]), int(tr.seed[b]), int(tr.branch_step[b])), []).append(b)
    assert len(groups) == len(PROMPTS) * N * 3 and all(len(g) == K for g in groups.values())
    for (p, s, k), members in groups.items():
        first = members[0]
        for b in members[1:]:
            for i in range(T):
                if i <= k:
                    assert torch.equal(tw[b, i], tw[first, i]), (p, s, k, i)
                else:
                    assert not torch.allclose(tw[b, i], tw[first, i]), (p, s, k, i)
            assert not torch.allclose(res.images[1][b], res.images[1][first])
        # The K samples of a group hang off one trained state, the trunk's x_k.
        rows = (res.samples.trajectory[:, None] == torch.tensor(members)).any(1)
        assert res.samples.state[rows].unique().numel() == 1


def test_trunk_state_and_old_log_prob_recomputable(tiny_model):
    """x_k is the ODE trunk from the initial noise, and the stored old log-prob is what the
    trainer gets by re-scoring the stored sample against μ(x_k, v(x_k))."""
    T = 5
    plan = Bifurcation(num_steps=T, seeds_per_prompt=1, branches=4, bifurcation_steps=(0, 3), shift=3.0)
    res = rollout(tiny_model, PROMPTS[:1], plan, seed=3)
    sig = res.sigmas
    assert torch.equal(sig, flow_sigmas(T, 3.0))
    st = res.states
    x0 = st.latents[st.step == 0]
    x3 = sample(tiny_model, res.cond, x0, sig[:4])
    torch.testing.assert_close(st.latents[st.step == 3], x3, rtol=0, atol=1e-5)
    trunk = sample(tiny_model, res.cond, x0, sig)
    torch.testing.assert_close(res.trunk_latents, trunk, rtol=0, atol=1e-5)
    smp = res.samples
    x = st.latents[smp.state]
    with torch.no_grad():
        v = tiny_model.velocity(x, st.sigma[smp.state], {k: t[st.prompt[smp.state]] for k, t in res.cond.items()})
    step = ops.flow_sde_step(x, v, st.sigma[smp.state], st.sigma_next[smp.state], res.noise_level,
                             sigma_max=float(sig[1]), prev_sample=smp.sample)
    torch.testing.assert_close(step.log_prob, smp.old_log_prob, rtol=0, atol=1e-4)
    torch.testing.assert_close(step.std, st.std[smp.state], rtol=1e-6, atol=0)


def test_granularity_tails_match_ode_on_interval_schedule(tiny_model):
    T = 7
    plan = SingularSDE(num_steps=T, branches=2, sde_steps=(0, 2, 5), granularities=(1, 2, 3))
    res = rollout(tiny_model, PROMPTS[:1], plan, seed=1)
    smp, tr = res.samples, res.trajectories
    k_of_sample = tr.branch_step[smp.trajectory]
    for lam in (1, 2, 3):
        for k in (0, 2, 5):
            sel = k_of_sample == k
            cond = {name: t.expand(int(sel.sum()), *t.shape[1:]) for name, t in res.cond.items()}
            expect = sample(tiny_model, cond, smp.sample[sel], interval_sigmas(res.sigmas, k + 1, lam))
            torch.testing.assert_close(res.final_latents[lam][smp.trajectory[sel]], expect, rtol=0, atol=1e-5)
    # Steps left after k=5 is 1: every granularity ends on the same single Euler step.
    last = tr.branch_step == 5
    assert torch.equal(res.final_latents[1][last], res.final_latents[3][last])


def test_nfe_tempflow_4x6_t10_is_design_minimum(counting_model):
    model = counting_model
    res = rollout(model, PROMPTS[:1], Bifurcation(num_steps=10, seeds_per_prompt=4, branches=6), seed=0)
    # design.md §3.1: N·T trunks + N·K·Σ_{k=0}^{T-2} (T-k-1) completions.
    N, K, T = 4, 6, 10
    trunk, completion = N * T, N * K * sum(T - k - 1 for k in range(T - 1))
    assert (trunk, completion) == (40, 1080)
    assert res.stats.nfe == {"trunk": trunk, "branch": 0, "completion": completion, "granularity": 0}
    assert model.rows == trunk + completion
    assert len(res.states) == N * (T - 1) and len(res.samples) == N * K * (T - 1)
    assert res.stats.images == {"trunk": N, "completion": N * K * (T - 1), "granularity": 0, "tweedie": 0}


def test_nfe_g2rpo_is_minimum(counting_model):
    model = counting_model
    T, G, lams = 16, 12, (1, 2, 3)
    plan = SingularSDE(num_steps=T, branches=G, granularities=lams)
    res = rollout(model, PROMPTS[:1], plan, seed=0)
    M = range(T // 2)
    # Per branch from k: the first completion call at k+1 is shared by all λ; then λ takes
    # ceil((T-k-1)/λ) - 1 more calls. Trunk: T calls (it is finished for its image).
    # NFE = T + G·Σ_{k∈M} [1 + Σ_λ (ceil((T-k-1)/λ) - 1)]
    completion = G * sum(T - k - 1 for k in M)
    granularity = G * sum(math.ceil((T - k - 1) / lam) - 1 for k in M for lam in lams[1:])
    assert res.stats.nfe == {"trunk": T, "branch": 0, "completion": completion, "granularity": granularity}
    assert model.rows == T + G * sum(1 + sum(math.ceil((T - k - 1) / lam) - 1 for lam in lams) for k in M)
    assert res.stats.nfe == min_nfe(plan.layout(), 1)


@pytest.mark.parametrize("kind", ["flow", "ddim"])
def test_full_sde_and_stepwise_tweedie(tiny_model, counting_model, kind):
    T, G = 4, 3
    model = counting_model
    res = rollout(model, PROMPTS, FullSDE(num_steps=T, samples_per_prompt=G, sde=kind, tweedie=True), seed=2)
    assert model.rows == len(PROMPTS) * G * T       # Tweedie costs no calls
    trained = T - 1 if kind == "ddim" else T         # the DDIM step to σ = 0 has std 0: not trained
    assert len(res.states) == len(res.samples) == len(PROMPTS) * G * trained
    assert torch.equal(res.samples.state, torch.arange(len(res.samples)))
    st = res.states
    # x̂0 = x - σ·v at every stored state, decoded.
    with torch.no_grad():
        v = tiny_model.velocity(st.latents, st.sigma, {k: t[st.prompt] for k, t in res.cond.items()})
    est = tiny_model.decode(st.latents - st.sigma[:, None, None] * v)
    got = res.tweedie_images[res.samples.trajectory, st.step]
    torch.testing.assert_close(got, est, rtol=0, atol=1e-5)


def test_sliding_window_shares_prefix(counting_model):
    plan = SlidingWindowSDE(num_steps=6, window_start=2, window_size=2, seeds_per_prompt=1, samples_per_seed=3)
    model = counting_model
    res = rollout(model, PROMPTS[:1], plan, seed=0)
    # Trunk to v(x_2): 3 calls, shared by the 3 samples; each sample then calls at steps 3, 4, 5.
    assert res.stats.nfe["trunk"] == 3 and res.stats.nfe["completion"] == 3 * 3
    assert model.rows == 3 + 3 * 3
    assert sorted(res.states.step.tolist()) == [2, 3, 3, 3]
    assert len(res.samples) == 3 + 3


def test_bucketed_runner_pads_without_changing_results(tiny_model):
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=3)
    a = rollout(tiny_model, PROMPTS, plan, seed=0)
    runner = EagerRunner(tiny_model, buckets=(4, 16))
    b = rollout(tiny_model, PROMPTS, plan, seed=0, runner=runner)
    assert b.stats.padded_rows > 0 and a.stats.padded_rows == 0
    assert b.stats.nfe == a.stats.nfe
    torch.testing.assert_close(a.images[1], b.images[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.samples.old_log_prob, b.samples.old_log_prob, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, name", [
    (lambda: Bifurcation(num_steps=1), "num_steps"),
    (lambda: Bifurcation(num_steps=10, bifurcation_steps=(9,)), "bifurcation_steps"),
    (lambda: Bifurcation(num_steps=10, bifurcation_steps=(-1,)), "bifurcation_steps"),
    (lambda: Bifurcation(branches=0), "branches"),
    (lambda: Bifurcation(seeds_per_prompt=0), "seeds_per_prompt"),
    (lambda: Bifurcation(sde="euler"), "sde"),
    (lambda: SingularSDE(granularities=(1, 0)), "granularities"),
    (lambda: SingularSDE(num_steps=8, sde_steps=(7,)), "sde_steps"),
    (lambda: SingularSDE(branches=0), "branches"),
    (lambda: FullSDE(num_steps=1), "num_steps"),
    (lambda: FullSDE(noise_level=0.0), "noise_level"),
    (lambda: SlidingWindowSDE(num_steps=6, window_start=4, window_size=3), "window"),
])
def test_bad_plans(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_rollout_args(tiny_model):
    plan = Bifurcation(num_steps=3, seeds_per_prompt=1, branches=1)
    with pytest.raises(ValueError, match="prompts"):
        rollout(tiny_model, [], plan, seed=0)
    with pytest.raises(ValueError, match="seed"):
        rollout(tiny_model, PROMPTS, plan)
    with pytest.raises(ValueError, match="plan"):
        rollout(tiny_model, PROMPTS, "tempflow", seed=0)
    with pytest.raises(ValueError, match="sigmas"):
        rollout(tiny_model, PROMPTS, plan, seed=0, sigmas=torch.linspace(1, 0, 3))
