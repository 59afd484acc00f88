"""The options that reproduce the official codes' settings (issue 17): Flow-GRPO's timestep_fraction, G²RPO's
unbiased std, per-component advantages, schedule and completion stride, TempFlow's step-weight constant, EMA."""

import math
import warnings

import pytest
import torch

from tempflow_fast.algorithms import FlowGRPO, G2RPO, StepwiseFlowGRPO, TempFlowGRPO
from tempflow_fast.algorithms.advantages import multi_granularity_advantages, normalize_in_groups
from tempflow_fast.algorithms.base import Rewards, reward_rows, trained_step_count
from tempflow_fast.algorithms.step_weights import flow_sde_noise_std, noise_aware_weights
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.schedules import flow_sigmas, granularity_calls, granularity_indices, linspace_sigmas
from tempflow_fast.training.ema import EMA

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


@pytest.fixture(scope="module")
def model():
    return new_model(seed=0, transformer_config=SMALL)


@pytest.mark.parametrize("T, fraction, n", [(10, 0.99, 9), (10, 1.0, 10), (16, 0.99, 15), (10, 0.5, 5)])
def test_trained_step_count_is_flow_grpos_int(T, fraction, n):
    assert trained_step_count(T, fraction) == n == int(T * fraction)
    with pytest.raises(ValueError, match="timestep_fraction"):
        trained_step_count(T, 0.0)


def test_flow_grpo_with_t10_trains_nine_steps_per_trajectory(model):
    algo = FlowGRPO(num_steps=10, group_size=3)
    result = rollout(model, ["two red squares", "a blue square"], algo.plan(), seed=0)
    assert sorted(set(result.states.step.tolist())) == list(range(10))  # the rollout is SDE at every step
    rewards = Rewards({1: torch.arange(6, dtype=torch.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.99 leaves the near-deterministic last step out: no warning
        credit = algo.credit(result, rewards)
    steps = result.states.step[result.samples.state]
    assert credit.trained.tolist() == (steps < 9).tolist()
    per_traj = torch.zeros(6, dtype=torch.long).index_add_(0, result.samples.trajectory, credit.trained.long())
    assert per_traj.tolist() == [9] * 6
    with pytest.warns(RuntimeWarning, match=r"trained step\(s\) \[9\] have a transition std of 7\.0e-04"):
        everything = FlowGRPO(num_steps=10, group_size=3, timestep_fraction=1.0).credit(result, rewards)
    assert bool(everything.trained.all())


def test_stepwise_flow_sde_leaves_the_last_step_out_ddim_already_does(model):
    for sde, steps in (("flow", 10), ("ddim", 9)):
        algo = StepwiseFlowGRPO(num_steps=10, group_size=3, sde=sde, min_std=0.0)
        result = rollout(model, ["two red squares"], algo.plan(), seed=0)
        assert len(set(result.states.step.tolist())) == steps
        tw = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
        credit = algo.credit(result, Rewards({1: torch.rand(3)}, tweedie=tw))
        trained = result.states.step[result.samples.state][credit.trained]
        assert sorted(set(trained.tolist())) == list(range(9))


def test_stepwise_ddim_does_not_train_the_near_deterministic_step_into_the_last_sigma(model):
    # diffusers' schedule ends at σ_9 = 0.001: the DDIM-style step 8 has std σ_9·sin(η·π/2) = 9e-4
    sig = flow_sigmas(10)
    algo = StepwiseFlowGRPO(num_steps=10, group_size=3, sde="ddim", noise_level=0.7)
    std = algo.transition_std(sig)
    torch.testing.assert_close(std, (sig[1:] * math.sin(0.35 * math.pi)).float())
    assert float(std[8]) < 1e-3 < 0.09 < float(std[7])
    assert algo.trained_steps(sig) == list(range(8))
    assert algo.trained_steps(linspace_sigmas(10)) == list(range(9))  # σ_9 = 0.1: step 8's std 0.089 is kept
    assert StepwiseFlowGRPO(num_steps=10, group_size=3, min_std=0.0).trained_steps(sig) == list(range(9))
    flow = StepwiseFlowGRPO(num_steps=10, group_size=3, sde="flow")
    torch.testing.assert_close(flow.transition_std(sig), flow_sde_noise_std(sig, 0.7))
    assert flow.trained_steps(sig) == list(range(9))  # Flow-GRPO's SDE: step 8's std is 0.083

    result = rollout(model, ["two red squares"], algo.plan(), seed=0)
    tw = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    credit = algo.credit(result, Rewards({1: torch.rand(3)}, tweedie=tw))
    step = result.states.step[result.samples.state]
    assert sorted(set(step[credit.trained].tolist())) == list(range(8))
    assert not credit.trained[step == 8].any() and credit.trained[step < 8].all()
    # the steps left in are normalised among themselves: per step, the group's advantages have mean 0
    for k in range(8):
        assert abs(float(credit.advantages[step == k].mean())) < 1e-5

    with pytest.raises(ValueError, match="min_std"):
        StepwiseFlowGRPO(num_steps=10, group_size=3, min_std=1.5)
    with pytest.raises(ValueError, match="no step to train"):
        StepwiseFlowGRPO(num_steps=10, group_size=3, min_std=0.99).credit(
            result, Rewards({1: torch.rand(3)}, tweedie=tw))


def test_unbiased_std_is_torch_std_plus_eps():
    r = torch.tensor([0.3, 0.9, 0.1, 0.5, 2.0, 1.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    out = normalize_in_groups(r, g, unbiased=True, eps=1e-8)
    for gid in (0, 1):
        m = g == gid
        torch.testing.assert_close(out.advantages[m], (r[m] - r[m].mean()) / (r[m].std() + 1e-8))
    glob = normalize_in_groups(r, g, unbiased=True, eps=1e-8, global_std=True)
    torch.testing.assert_close(glob.advantages[g == 1], (r[g == 1] - r[g == 1].mean()) / (r.std() + 1e-8))
    single = normalize_in_groups(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1]), unbiased=True)
    assert single.zero_std.tolist() == [True, False, False] and single.advantages[0] == 0


def test_per_component_advantages_sum_each_components_normalised_rows():
    gen = torch.Generator().manual_seed(1)
    comps = {lam: {"hps": torch.rand(8, generator=gen) * 0.3, "clip": torch.rand(8, generator=gen) * 30}
             for lam in (1, 2)}
    rewards = Rewards({1: torch.rand(8), 2: torch.rand(8)}, final_components=comps,
                      component_weights={"hps": 1.0, "clip": 0.5})
    g = torch.tensor([0] * 4 + [1] * 4)
    rows, weights = reward_rows(rewards, (1, 2), "per_component")
    out = multi_granularity_advantages(rows, g, weights=weights, unbiased=True, eps=1e-8)
    want = sum(w * normalize_in_groups(comps[lam][n], g, unbiased=True, eps=1e-8).advantages
               for n, w in (("hps", 1.0), ("clip", 0.5)) for lam in (1, 2))
    torch.testing.assert_close(out.advantages, want)
    composite_rows, _ = reward_rows(rewards, (1, 2), "composite")
    torch.testing.assert_close(composite_rows, torch.stack([rewards.final[1], rewards.final[2]]))
    with pytest.raises(ValueError, match="per-component scores"):
        reward_rows(Rewards({1: torch.rand(8)}), (1,), "per_component")


def _official_path(T: int, k: int, g: int):
    """Indices G²RPO's code evaluates the model at for a branch from k, and the index of the state whose x̂0 is
    the image: schedule_j = sigma[:k+2] ++ sigma[k+2::g]; the ODE runs positions k+1 .. len-2 of schedule_j and
    returns pred_original of its last step (fastvideo/train_g2rpo_hps_clip.py: sample_reference_model,
    run_ode_sample_step)."""
    idx = list(range(k + 2)) + list(range(T + 1))[k + 2::g]
    evaluated = [idx[p] for p in range(k + 1, len(idx) - 1)]
    return evaluated


@pytest.mark.parametrize("T", [10, 16])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_official_stride_evaluates_where_g2rpos_code_does(T, g):
    for k in range(T - 1):
        path = granularity_indices(T, k, g, "official")
        assert path[0] == k + 1 and path[-1] == T
        assert path[:-1] == _official_path(T, k, g), (k, path)
        assert granularity_calls(T, k, g, "official") == len(_official_path(T, k, g))
        assert granularity_indices(T, k, g) == list(range(k + 1, T, g)) + [T]


def test_official_stride_rollout_follows_the_path(model):
    T, k, lam = 8, 1, 3
    plan = G2RPO(num_steps=T, branches=2, branch_steps=[k], granularities=(1, lam), completion_stride="official").plan()
    result = rollout(model, ["two red squares"], plan, seed=0)
    sig = result.sigmas.tolist()
    cond = model.encode_prompts(["two red squares"])
    x = result.samples.sample[:2].clone()  # x_{k+1} of the two branches
    path = granularity_indices(T, k, lam, "official")
    with torch.no_grad():
        for a, b in zip(path[:-1], path[1:]):
            v = model.velocity(x, torch.full((2,), sig[a]), {n: t.expand(2, *t.shape[1:]) for n, t in cond.items()})
            x = x + v.float() * (sig[b] - sig[a])
    torch.testing.assert_close(result.final_latents[lam], x, atol=1e-5, rtol=1e-5)
    uniform = rollout(model, ["two red squares"], G2RPO(num_steps=T, branches=2, branch_steps=[k],
                                                         granularities=(1, lam)).plan(), seed=0)
    torch.testing.assert_close(uniform.final_latents[1], result.final_latents[1])
    assert not torch.allclose(uniform.final_latents[lam], result.final_latents[lam])


def test_linspace_schedule_is_shifted_linspace(model):
    s = linspace_sigmas(16, 3.0)
    t = torch.linspace(1, 0, 17)
    assert torch.equal(s, 3.0 * t / (1 + 2.0 * t))
    algo = G2RPO(num_steps=16, branches=2, branch_steps=[0], granularities=(1,), shift=3.0, sigma_schedule="linspace")
    assert torch.equal(algo.rollout_sigmas(), s)
    assert G2RPO(num_steps=16).rollout_sigmas() is None
    with pytest.raises(ValueError, match="static shift"):
        G2RPO(sigma_schedule="linspace", dynamic_shift=True)


def test_tempflow_step_weight_scale_is_the_official_constant(model):
    sig = flow_sigmas(10, 3.0)
    std = flow_sde_noise_std(sig, 0.7)
    w = noise_aware_weights(sig, 0.7, list(range(9)), scale=2.25)
    torch.testing.assert_close(w, 2.25 * std[:9])
    # SD3.5-M: the official 2.25 is 1/mean(std) over the nine trained steps, i.e. our Norm to 0.1%
    torch.testing.assert_close(w, noise_aware_weights(sig, 0.7, list(range(9))), rtol=2e-3, atol=0)
    # FLUX-1024: 1.73 is 1/mean(std) at η = 0.9; at the η = 0.7 the code samples with, its weights average 0.78
    flux = flow_sigmas(10, image_seq_len=4096, dynamic_shift=True)
    assert float(1 / flow_sde_noise_std(flux, 0.9)[:9].mean()) == pytest.approx(1.73, abs=0.005)
    assert float(noise_aware_weights(flux, 0.7, list(range(9)), scale=1.73).mean()) == pytest.approx(0.78, abs=0.005)
    algo = TempFlowGRPO(num_steps=4, num_seeds=1, branches=2, step_weight_scale=1.73)
    result = rollout(model, ["two red squares"], algo.plan(), seed=0)
    credit = algo.credit(result, Rewards({1: torch.arange(6, dtype=torch.float32)}))
    want = 1.73 * flow_sde_noise_std(result.sigmas.cpu(), 0.7)[result.states.step.cpu()]
    torch.testing.assert_close(credit.state_weights.cpu(), want)


def test_ema_every_eighth_step_with_warmup_as_flow_grpos_wrapper():
    """flow_grpo/ema.py: EMAModuleWrapper(decay=0.9, update_step_interval=8).step(params, n): moves when
    (n + 1) % 8 == 0 with decay min((1 + n) / (10 + n), 0.9)."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("p", p)], 0.9, update_every=8, warmup=True)
    shadow = torch.zeros(3, dtype=torch.float64)
    for n in range(1, 40):
        with torch.no_grad():
            p.fill_(float(n))
        moved = ema.update(n)
        assert moved == ((n + 1) % 8 == 0)
        if moved:
            d = min((1 + n) / (10 + n), 0.9)
            shadow += (1 - d) * (float(n) - shadow)
        torch.testing.assert_close(ema.shadow["p"].double(), shadow, rtol=1e-6, atol=1e-5)
    assert ema.decay_at(7) == pytest.approx(8 / 17) and ema.decay_at(1000) == 0.9
    plain = EMA([("p", p)], 0.5)
    assert plain.update(3) and plain.decay_at(0) == 0.5
