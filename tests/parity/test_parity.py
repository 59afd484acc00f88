"""Parity with the official codes on a fixed batch (issue 17; docs/parity.md): one rollout from the engine, a
policy moved away from the rollout's (so ratios leave 1 and some clip) and a reference, then the advantages,
step weights, log-probs, ratios, clipped loss, KL and the parameter gradient, once by this project's path
(algorithm credit → build_update_batch → one forward per shared state → fused loss) and once by the official
formulas (tests/parity/official_math.py: one forward per sample and step, as the official scripts run it).
Gradients agree to a relative error ≤ 1e-5."""

import copy

import numpy as np
import pytest
import torch

from tempflow_fast.algorithms import FlowGRPO, G2RPO, TempFlowGRPO
from tempflow_fast.algorithms.base import Rewards
from tempflow_fast.algorithms.step_weights import flow_sde_noise_std
from tempflow_fast.models.base import select_cond
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.training.update import build_update_batch, policy_loss
from tests.parity.official_math import (clipped_loss, g2rpo_advantages, kl_term, relative_error, sde_step,
                                        stat_tracker)

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)
PROMPTS = ["two red squares", "a blue square left of a green square"]
GRAD_TOL = 1e-5
CLIP = 3e-4  # the perturbed policy's ratios leave 1 by 1e-5 .. 2e-3: some samples clip, some do not
G2RPO_CLIP = 4e-5  # its steps k <= 2 are all high-noise ones: ratios within 2e-4 of 1


def models(perturb: float = 0.02):
    """(rollout policy, current policy = rollout policy moved by `perturb`·std of each weight, reference)."""
    old = new_model(seed=0, transformer_config=SMALL)
    policy = copy.deepcopy(old)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.module.parameters():
            if p.numel() > 1:
                p.add_(perturb * p.std() * torch.randn(p.shape, generator=gen))
    return old, policy, copy.deepcopy(old)


def brightness(images):
    return images.float().mean(dim=(1, 2, 3))


def ours(policy, result, credit, *, clip_range, adv_clip, beta=0.0, kl_convention="flow_grpo", reference=None):
    """This project's loss and gradient: every state group in one forward, losses scaled to the sample mean."""
    groups = build_update_batch(result, credit)
    total = sum(g.num_samples for g in groups)
    policy.module.zero_grad(set_to_none=True)
    outs, loss = [], 0.0
    for g in groups:
        part, out = policy_loss(policy, g, cond=result.cond, sde=result.sde, noise_level=result.noise_level,
                                sigma_max=float(result.sigmas[1]), total_samples=total, clip_range=clip_range,
                                adv_clip=adv_clip, beta=beta, kl_convention=kl_convention,
                                reference=None if reference is None else reference.velocity)
        part.backward()
        loss += float(part.detach())
        outs.append((g, out))
    return loss, flat_grad(policy), outs


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.module.parameters() if p.grad is not None]).clone()


def official(policy, result, advantages, trained, *, eta, clip_range, adv_clip, weight_of_step=None, beta=0.0,
             kl_std="s", reference=None):
    """The official loss and gradient: one forward per sample, mean over the trained samples of
    max(-w·A·r, -w·A·clip(r)) + β·KL. `advantages` (M,) per sample; `trained` (M,) bool."""
    st, smp = result.states, result.samples
    sig_max = float(result.sigmas[1])
    policy.module.zero_grad(set_to_none=True)
    index = trained.nonzero().squeeze(1).tolist()
    total, per_sample = 0.0, {}
    for m in index:
        s = int(smp.state[m])
        x, sigma, sigma_next = st.latents[s:s + 1], st.sigma[s:s + 1], st.sigma_next[s:s + 1]
        cond = select_cond(result.cond, st.prompt[s:s + 1])
        v = policy.velocity(x, sigma, cond).float()
        log_prob, mean, s_t, std = sde_step(x, v, sigma, sigma_next, sig_max, eta, smp.sample[m:m + 1])
        w = None if weight_of_step is None else weight_of_step(int(st.step[s]), std)
        loss, ratio = clipped_loss(log_prob, smp.old_log_prob[m:m + 1], advantages[m:m + 1],
                                   clip_range=clip_range, adv_clip=adv_clip, weight=w)
        if beta > 0:
            with torch.no_grad():
                v_ref = reference.velocity(x, sigma, cond).float()
                _, mean_ref, _, _ = sde_step(x, v_ref, sigma, sigma_next, sig_max, eta, smp.sample[m:m + 1])
            loss = loss + beta * kl_term(mean, mean_ref, s_t if kl_std == "s" else std)
        (loss.sum() / len(index)).backward()
        total += float(loss.detach().sum()) / len(index)
        per_sample[m] = (float(log_prob.detach()), float(ratio.detach()))
    return total, flat_grad(policy), per_sample


def clip_fraction(per_sample, clip: float = CLIP) -> float:
    ratios = torch.tensor([r for _, r in per_sample.values()])
    return float(((ratios - 1).abs() > clip).float().mean())


def check_per_state(outs, per_sample, result):
    """Our fused op's log-prob and ratio of every (state, branch) equal the official per-sample ones."""
    smp = result.samples
    lookup = {}
    for m, vals in per_sample.items():
        lookup[(int(smp.state[m]), round(float(smp.old_log_prob[m]), 6))] = vals
    worst_lp = worst_r = 0.0
    for g, out in outs:
        for s_i in range(len(g)):
            sid = int((result.states.latents.flatten(1) == g.latents[s_i].flatten()).all(1).nonzero()[0])
            for k in range(g.samples.shape[1]):
                lp, r = lookup[(sid, round(float(g.old_log_prob[s_i, k]), 6))]
                worst_lp = max(worst_lp, abs(float(out.log_prob[s_i, k]) - lp) / max(1.0, abs(lp)))
                worst_r = max(worst_r, abs(float(out.ratio[s_i, k]) - r))
    return worst_lp, worst_r


# --- Flow-GRPO ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_batch():
    old, policy, ref = models()
    algo = FlowGRPO(num_steps=10, group_size=4)
    result = rollout(old, PROMPTS, algo.plan(), seed=3)
    rewards = brightness(result.images[1])
    return old, policy, ref, algo, result, rewards


@pytest.mark.parametrize("global_std", [False, True])
def test_flow_grpo_advantages_are_the_stat_trackers(flow_batch, global_std):
    _, _, _, algo, result, rewards = flow_batch
    credit = algo.credit(result, Rewards({1: rewards}), global_std=global_std)
    prompts = [PROMPTS[i] for i in result.trajectories.prompt.tolist()]
    want = stat_tracker(prompts, rewards.numpy()[:, None].repeat(9, 1), global_std=global_std)  # columns: steps
    got = credit.advantages.double()
    traj = result.samples.trajectory
    assert float((got - torch.from_numpy(want[:, 0])[traj]).abs().max()) < 1e-5


def test_flow_grpo_gradient_matches_the_official_with_the_last_step_left_out(flow_batch):
    old, policy, ref, algo, result, rewards = flow_batch
    credit = algo.credit(result, Rewards({1: rewards}), global_std=True)
    kw = dict(clip_range=CLIP, adv_clip=5.0)
    loss, g_ours, outs = ours(policy, result, credit, beta=0.04, kl_convention="flow_grpo", reference=ref, **kw)
    prompts = [PROMPTS[i] for i in result.trajectories.prompt.tolist()]
    adv = torch.from_numpy(stat_tracker(prompts, rewards.numpy()[:, None], global_std=True)[:, 0])
    adv = adv[result.samples.trajectory]
    step = result.states.step[result.samples.state]
    off_loss, g_off, per = official(policy, result, adv, step < 9, eta=0.7, beta=0.04, kl_std="s", reference=ref, **kw)
    assert relative_error(g_ours, g_off) <= GRAD_TOL
    assert abs(loss - off_loss) < 1e-5  # per-sample terms are O(|A|) ~ 1 and cancel within groups
    lp_err, r_err = check_per_state(outs, per, result)
    assert lp_err < 1e-6 and r_err < 1e-6
    assert 0.05 < clip_fraction(per) < 0.95  # clipping binds for some samples, not all
    # all ten steps: the last one (σ_9 → 0) alone changes the gradient by more than half
    _, g_all, _ = official(policy, result, adv, torch.ones_like(step, dtype=torch.bool), eta=0.7, beta=0.04,
                           kl_std="s", reference=ref, **kw)
    assert relative_error(g_all, g_off) > 0.3  # 0.52 on this batch


# --- TempFlow-GRPO -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tempflow_batch():
    old, policy, ref = models()
    algo = TempFlowGRPO(num_steps=10, num_seeds=2, branches=3, step_weight_scale=2.25)
    result = rollout(old, PROMPTS[:1], algo.plan(), seed=5)
    rewards = brightness(result.images[1])
    return old, policy, ref, algo, result, rewards


def tempflow_official_advantages(result, rewards):
    """The stat tracker on one (prompt, seed)'s rows (branch i) × columns (k), as each GPU runs it."""
    traj = result.trajectories
    adv = torch.zeros(len(traj), dtype=torch.float64)
    for p in traj.prompt.unique().tolist():
        for s in traj.seed.unique().tolist():
            sel = (traj.prompt == p) & (traj.seed == s)
            ks = sorted(traj.branch_step[sel].unique().tolist())
            K = int(traj.branch[sel].max()) + 1
            table = np.zeros((K, len(ks)))
            for t in sel.nonzero().squeeze(1).tolist():
                table[int(traj.branch[t]), ks.index(int(traj.branch_step[t]))] = float(rewards[t])
            a = stat_tracker([PROMPTS[p]] * K, table)
            for t in sel.nonzero().squeeze(1).tolist():
                adv[t] = a[int(traj.branch[t]), ks.index(int(traj.branch_step[t]))]
    return adv


def test_tempflow_advantages_are_the_trackers_seed_groups(tempflow_batch):
    _, _, _, algo, result, rewards = tempflow_batch
    credit = algo.credit(result, Rewards({1: rewards}))
    want = tempflow_official_advantages(result, rewards)[result.samples.trajectory]
    assert float((credit.advantages.double() - want).abs().max()) < 1e-5


def test_tempflow_step_weights_are_the_official_constant_times_std(tempflow_batch):
    _, _, _, algo, result, rewards = tempflow_batch
    credit = algo.credit(result, Rewards({1: rewards}))
    std = flow_sde_noise_std(result.sigmas.cpu(), 0.7)
    torch.testing.assert_close(credit.state_weights.cpu(), 2.25 * std[result.states.step.cpu()])


def test_tempflow_gradient_matches_the_official(tempflow_batch):
    old, policy, ref, algo, result, rewards = tempflow_batch
    credit = algo.credit(result, Rewards({1: rewards}))
    kw = dict(clip_range=CLIP, adv_clip=5.0)
    loss, g_ours, outs = ours(policy, result, credit, beta=0.1, kl_convention="gaussian", reference=ref, **kw)
    adv = tempflow_official_advantages(result, rewards)[result.samples.trajectory]
    trained = torch.ones(len(result.samples), dtype=torch.bool)
    off_loss, g_off, per = official(policy, result, adv, trained, eta=0.7, beta=0.1, kl_std="std", reference=ref,
                                    weight_of_step=lambda k, std: 2.25 * std, **kw)
    assert relative_error(g_ours, g_off) <= GRAD_TOL and 0.05 < clip_fraction(per) < 0.95
    assert abs(loss - off_loss) < 1e-5  # per-sample terms are O(|A|) ~ 1 and cancel within groups
    lp_err, r_err = check_per_state(outs, per, result)
    assert lp_err < 1e-6 and r_err < 1e-6


def test_tempflow_mean_one_weights_are_the_official_gradient_over_a_constant(tempflow_batch):
    """Our default Norm(std) weights (mean 1 over the trained steps) give the official gradient divided by
    c·mean(std) when β = 0: the same direction, which AdamW's per-weight normalisation makes the same step while
    gradient clipping does not bind."""
    old, policy, ref, _, result, rewards = tempflow_batch
    algo = TempFlowGRPO(num_steps=10, num_seeds=2, branches=3)
    credit = algo.credit(result, Rewards({1: rewards}))
    kw = dict(clip_range=CLIP, adv_clip=5.0)
    _, g_norm, _ = ours(policy, result, credit, **kw)
    adv = tempflow_official_advantages(result, rewards)[result.samples.trajectory]
    trained = torch.ones(len(result.samples), dtype=torch.bool)
    _, g_off, _ = official(policy, result, adv, trained, eta=0.7, weight_of_step=lambda k, std: 2.25 * std, **kw)
    scale = 2.25 * float(flow_sde_noise_std(result.sigmas.cpu(), 0.7)[:9].mean())
    assert relative_error(g_norm * scale, g_off) <= GRAD_TOL


# --- G²RPO -------------------------------------------------------------------------------------------

class Channel:
    def __init__(self, c):
        self.c = c

    def __call__(self, images):
        return images[:, self.c].float().mean(dim=(1, 2))


@pytest.fixture(scope="module")
def g2rpo_batch():
    old, policy, _ = models()
    algo = G2RPO(num_steps=6, branches=4, branch_steps=[0, 1, 2], granularities=(1, 2), shift=3.0,
                 sigma_schedule="linspace", completion_stride="official", unbiased_std=True, std_eps=1e-8,
                 advantage_mode="per_component")
    result = rollout(old, PROMPTS[:1], algo.plan(), seed=7, sigmas=algo.rollout_sigmas())
    comps = {lam: {"hps": Channel(0)(result.images[lam]), "clip": Channel(1)(result.images[lam])} for lam in (1, 2)}
    rewards = Rewards({lam: comps[lam]["hps"] + comps[lam]["clip"] for lam in (1, 2)}, final_components=comps,
                      component_weights={"hps": 1.0, "clip": 1.0})
    return old, policy, algo, result, rewards


def test_g2rpo_schedule_and_completions_are_the_official(g2rpo_batch):
    """σ = sd3_time_shift(3, linspace(1, 0, T+1)); a branch from k is finished on sigma[:k+2] ++ sigma[k+2::g],
    the image being x̂0 = z - σ·v of the last state the ODE leaves (sample_reference_model, run_ode_sample_step)."""
    old, _, _, result, _ = g2rpo_batch
    t = torch.linspace(1, 0, 7)
    sig = 3.0 * t / (1 + 2.0 * t)
    assert torch.equal(result.sigmas.cpu(), sig)
    traj, smp = result.trajectories, result.samples
    cond = select_cond(result.cond, torch.zeros(1, dtype=torch.long))
    worst = 0.0
    for m in range(len(smp)):
        k = int(result.states.step[smp.state[m]])
        for g in (1, 2):
            schedule = torch.cat([sig[:k + 2], sig[k + 2::g]])
            z = smp.sample[m:m + 1]
            with torch.no_grad():
                for i in range(k + 1, len(schedule) - 1):
                    v = old.velocity(z, schedule[i:i + 1], cond).float()
                    image = z - schedule[i] * v
                    z = z + v * (schedule[i + 1] - schedule[i])
            worst = max(worst, float((result.final_latents[g][smp.trajectory[m]] - image[0]).abs().max()))
    assert worst < 1e-5


def g2rpo_official_advantages(result, rewards):
    traj = result.trajectories
    ks = sorted(traj.branch_step.unique().tolist())
    G = int(traj.branch.max()) + 1
    tables = {}
    for name in ("hps", "clip"):
        tables[name] = []
        for lam in (1, 2):
            table = torch.zeros(G, len(ks))
            table[traj.branch, torch.tensor([ks.index(int(k)) for k in traj.branch_step])] = \
                rewards.final_components[lam][name]
            tables[name].append(table)
    adv = g2rpo_advantages(tables, G)
    return adv[traj.branch, torch.tensor([ks.index(int(k)) for k in traj.branch_step])]


def test_g2rpo_advantages_are_per_reward_per_granularity_sums(g2rpo_batch):
    _, _, algo, result, rewards = g2rpo_batch
    credit = algo.credit(result, rewards)
    want = g2rpo_official_advantages(result, rewards)[result.samples.trajectory]
    assert float((credit.advantages.double() - want).abs().max()) < 1e-5


def test_g2rpo_gradient_matches_the_official(g2rpo_batch):
    _, policy, algo, result, rewards = g2rpo_batch
    credit = algo.credit(result, rewards)
    kw = dict(clip_range=G2RPO_CLIP, adv_clip=5.0)
    loss, g_ours, outs = ours(policy, result, credit, **kw)
    adv = g2rpo_official_advantages(result, rewards)[result.samples.trajectory]
    trained = torch.ones(len(result.samples), dtype=torch.bool)
    off_loss, g_off, per = official(policy, result, adv, trained, eta=0.7, **kw)
    assert relative_error(g_ours, g_off) <= GRAD_TOL and 0.05 < clip_fraction(per, G2RPO_CLIP) < 0.95
    assert abs(loss - off_loss) < 1e-5  # per-sample terms are O(|A|) ~ 1 and cancel within groups
    lp_err, r_err = check_per_state(outs, per, result)
    assert lp_err < 1e-6 and r_err < 1e-6
