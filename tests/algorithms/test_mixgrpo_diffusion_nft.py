"""MixGRPO and DiffusionNFT (issue 19, item 5): each method's defining property, and a short training run whose
loss is finite and whose weights move. MixGRPO: SDE (and training) only inside the sliding window, which moves as
its code moves it. DiffusionNFT: ODE rollouts of the old policy, the negative-aware loss as the paper writes it,
the soft update of the old policy, and an exact resume of it."""

import pytest
import torch

from tempflow_fast.algorithms.diffusion_nft import DiffusionNFT, forward_process, nft_loss, optimality, train_times
from tempflow_fast.algorithms.mixgrpo import MixGRPO
from tempflow_fast.config import load_config
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.schedules import model_sigmas
from tempflow_fast.sampling.simple import initial_noise, sample
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer, _seed_for
from tests.training.conftest import SMALL, BrightnessReward, no_eval, small_overrides


def _trainer(out, method, *extra, resume=False):
    cfg = load_config(Config, None, small_overrides(method, out, "mixgrpo.group_size=4", "diffusion_nft.group_size=3",
                                                    *extra))
    return Trainer(cfg, model=new_model(seed=0, transformer_config=SMALL), reward=BrightnessReward(), eval_fn=no_eval,
                   resume=resume)


def test_mixgrpo_window_moves_as_its_code_moves_it():
    alg = MixGRPO(num_steps=10, window_size=4, shift_interval=25, window_stride=1)
    # grpo_states.py: range(k, min(k + w, T - 2)), k += s every τ iterations, back to 0 after T - 2 (whose range is
    # empty: skipped here)
    windows = [alg.window(i) for i in range(0, 8 * 25 + 1, 25)]
    assert windows == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (5, 3), (6, 2), (7, 1), (0, 4)]
    assert alg.window(24) == (0, 4) and alg.window(25) == (1, 4)
    assert MixGRPO(num_steps=10, window_stride=3, shift_interval=1).window_starts() == [0, 3, 6]
    with pytest.raises(ValueError, match="num_steps"):
        MixGRPO(num_steps=2)


def test_mixgrpo_samples_sde_only_inside_the_window():
    model = new_model(seed=0, transformer_config=SMALL)
    alg = MixGRPO(num_steps=6, group_size=3, window_size=2, shift_interval=1)
    for it in range(3):
        k, size = alg.window(it)
        result = rollout(model, ["a red square", "two blue squares"], alg.plan_for(it), seed=it)
        steps = result.states.step
        assert sorted(set(steps.tolist())) == list(range(k, k + size))  # SDE states: the window's steps only
        assert len(result.samples) == 2 * 3 * size  # every sample of the window is a trained SDE transition
        # one initial noise per prompt: the 3 samples share the ODE prefix and the window's first state
        first = result.states.latents[steps == k]
        assert first.shape[0] == 2 and (result.samples.state[result.states.step[result.samples.state] == k]).numel() == 6
        # outside the window the path is the ODE: the sample count and model calls say so
        assert result.stats.nfe["trunk"] == 2 * (k + 1)


def test_mixgrpo_trains_and_moves_its_window(tmp_path):
    tr = _trainer(tmp_path, "mixgrpo", "mixgrpo.window_size=2", "mixgrpo.shift_interval=1", "train.iterations=3")
    before = {n: p.detach().clone() for n, p in tr.named_params}
    ms = [tr.run_iteration(i) for i in range(3)]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0 for m in ms)
    assert [m["trained_samples"] for m in ms] == [2 * 4 * 2, 2 * 4 * 1, 2 * 4 * 2]  # windows (0,2), (1,1), (0,2)
    assert all(not torch.equal(before[n], p.detach()) for n, p in tr.named_params)
    tr.close()


def test_optimality_probability():
    rewards = torch.tensor([0.0, 1.0, 2.0, 10.0, 10.0, 10.0])
    r, stats = optimality(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), adv_clip=1.0)
    a = (rewards[:3] - 1.0) / (torch.tensor([0.0, 1.0, 2.0]).std(unbiased=False) + 1e-4)
    assert r[:3].tolist() == pytest.approx((0.5 + 0.5 * a.clamp(-1, 1)).tolist(), abs=1e-6)
    assert r[1] == 0.5 and r[3:].tolist() == [0.5] * 3 and stats.zero_std_ratio == 0.5  # no spread: r = ½


def test_nft_loss_is_the_papers_objective_with_its_adaptive_weights():
    torch.manual_seed(0)
    B, D = 5, (4, 3)
    x0, eps, v_old = torch.randn(B, *D), torch.randn(B, *D), torch.randn(B, *D)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1])
    r = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
    x_t = forward_process(x0, t, eps)
    v = (v_old + 0.1 * torch.randn(B, *D)).requires_grad_(True)
    beta, a_max = 0.5, 5.0
    out = nft_loss(v, v_old, x_t, x0, t, r, beta=beta, adv_clip=a_max)
    # L = r‖v⁺ - v*‖² + (1 - r)‖v⁻ - v*‖² with v* = ε - x0: in x0-prediction each error is t·(v* - v±)
    target = eps - x0
    pos, neg = (1 - beta) * v_old + beta * v, (1 + beta) * v_old - beta * v
    tt = t.view(-1, 1, 1)

    def term(vv):
        err = tt * (target - vv)
        return (err ** 2).mean(dim=(1, 2)) / err.abs().mean(dim=(1, 2)).detach()

    want = a_max * ((r * term(pos) + (1 - r) * term(neg)) / beta).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    g, = torch.autograd.grad(out.loss, v)
    g_want, = torch.autograd.grad(want, v)
    torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-7)
    # at v_θ = v_old the gradient is ∝ (1 - 2r): r = ½ carries none, better images pull, worse push
    v0 = v_old.clone().requires_grad_(True)
    g0, = torch.autograd.grad(nft_loss(v0, v_old, x_t, x0, t, r, beta=beta, adv_clip=a_max).loss, v0)
    x0_hat = x_t - tt * v_old
    w = (x0_hat - x0).abs().mean(dim=(1, 2))
    expect = a_max * 2 / 12 * (x0_hat - x0) * tt * (1 - 2 * r).view(-1, 1, 1) / w.view(-1, 1, 1) / B
    torch.testing.assert_close(g0, expect, rtol=1e-5, atol=1e-7)
    assert g0[2].abs().max() < 1e-7 < g0[0].abs().max()


def test_train_times_draw_schedule_levels_without_replacement():
    sigmas = torch.linspace(1, 0, 11)
    t = train_times(sigmas, 6, 9, torch.Generator().manual_seed(0))
    assert t.shape == (6, 9) and all(len(set(row.tolist())) == 9 for row in t)
    assert set(t.flatten().tolist()) <= set(sigmas[:10].tolist())  # σ_T = 0 is never a training level


def test_diffusion_nft_rolls_out_the_old_policy_by_ode_and_soft_updates_it(tmp_path):
    tr = _trainer(tmp_path, "diffusion_nft", "train.iterations=2")
    alg = tr.algorithm
    assert alg.forward_process and alg.plan() is None and alg.times_per_image == 3  # int(4 · 0.99)
    start = [p.detach().clone() for _, p in tr.named_params]
    m = tr.run_iteration(0)
    # the rollout: Euler ODE images of the old policy (= the initial weights at iteration 0), the rollout's seed
    ref = new_model(seed=0, transformer_config=SMALL)
    prompts = tr.prompts_for(0)
    per_image = [p for p in prompts for _ in range(3)]
    noise = initial_noise(ref, len(per_image), torch.Generator().manual_seed(_seed_for(tr.cfg.seed, 2, 0)))
    x0 = sample(ref, ref.encode_prompts(per_image), noise, model_sigmas(ref, 4, 1.0, False))
    torch.testing.assert_close(tr._last_images[0], ref.decode(x0), rtol=0, atol=1e-6)
    assert m["nfe_total"] == len(per_image) * 4 and m["trained_samples"] == len(per_image) * 3
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    # θ_old ← η·θ_old + (1 - η)·θ, η = min(0.001 · steps, 0.5)
    eta = alg.old_decay(tr.counters.optimizer_steps)
    assert eta == pytest.approx(0.001) and m["old_decay"] == eta
    for (n, p), old, s in zip(tr.named_params, tr._old_weights, start):
        assert not torch.equal(p.detach(), s), n
        torch.testing.assert_close(old, eta * s + (1 - eta) * p.detach(), rtol=1e-6, atol=1e-6)
    tr.close()


def test_diffusion_nft_resumes_exactly_with_its_old_policy(tmp_path):
    full = _trainer(tmp_path / "a", "diffusion_nft", "train.iterations=3", "checkpoint.every=1")
    losses = [full.run_iteration(i)["loss"] for i in range(3)]
    part = _trainer(tmp_path / "b", "diffusion_nft", "train.iterations=3", "checkpoint.every=1")
    for i in range(2):
        part.run_iteration(i)
        part.iteration = i + 1
        part.save()
    part.close()
    resumed = _trainer(tmp_path / "b", "diffusion_nft", "train.iterations=3", "checkpoint.every=1", resume=True)
    assert resumed.run_iteration(2)["loss"] == losses[2]
    for a, b in zip(full._old_weights, resumed._old_weights):
        assert torch.equal(a, b)
    full.close()
    resumed.close()


def test_dry_run_counts_the_new_methods(capsys):
    from tempflow_fast.training.cli import main

    assert main(["--set", "method=diffusion_nft", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: diffusion_nft" in out and "960 rows" in out  # 4 prompts × 24 images × 10 steps
    assert main(["--set", "method=mixgrpo", "--dry-run"]) == 0
    assert "method: mixgrpo" in capsys.readouterr().out
