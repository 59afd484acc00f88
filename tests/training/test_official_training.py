"""The trainer with the official codes' settings (issue 17): Flow-GRPO's last-step exclusion as the log shows it,
two optimizer steps per epoch on disjoint parts, EMA every n steps with warm-up (exact resume), per-step KL and
velocity movement, G²RPO's per-component advantages and schedule, per-component eval means."""

import json

import pytest
import torch

from tempflow_fast.algorithms.advantages import multi_granularity_advantages, normalize_in_groups
from tempflow_fast.algorithms.base import group_key
from tempflow_fast.rewards.composite import CompositeReward
from tempflow_fast.sampling.schedules import linspace_sigmas
from tempflow_fast.tasks.reward_eval import mean_reward_eval
from tempflow_fast.training.trainer import eval_metrics
from tempflow_fast.training.update import build_update_batch, split_parts


class Channel:
    """Mean of one colour channel: a continuous reward with a name, for composites."""

    def __init__(self, name, channel):
        self.name, self.channel = name, channel

    def __call__(self, images, prompts):
        return images[:, self.channel].float().mean(dim=(1, 2))


def composite():
    return CompositeReward([(Channel("red", 0), 1.0), (Channel("green", 1), 0.5)], normalize="none")


COMPOSITE_CFG = ("reward.name=composite", "reward.components=[{name: jpeg_compressibility}]")


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_flow_grpo_t10_trains_nine_steps_per_trajectory_in_the_log(tmp_path, make_trainer):
    tr = make_trainer(tmp_path / "a", "flow_grpo", "sampling.num_steps=10", "flow_grpo.group_size=4",
                      "train.iterations=1", "train.inner_epochs=1")
    tr.train()
    row = [r for r in _rows(tmp_path / "a" / "metrics.jsonl") if "loss" in r][0]
    # 2 prompts × 4 trajectories, 10 SDE steps each sampled, 9 trained: one pass per (trajectory, step k < 9)
    assert row["nfe/completion"] + row["nfe/trunk"] == 2 * 4 * 10
    assert row["policy_passes"] == row["trained_states"] == row["trained_samples"] == 2 * 4 * 9
    assert sorted(k for k in row if k.startswith("approx_kl/k")) == [f"approx_kl/k{k}" for k in range(9)]
    every = make_trainer(tmp_path / "b", "flow_grpo", "sampling.num_steps=10", "flow_grpo.group_size=4",
                         "train.iterations=1", "flow_grpo.timestep_fraction=1.0")
    assert every.run_iteration(0)["policy_passes"] == 2 * 4 * 10  # all 10 steps


def test_stepwise_ddim_with_a_continuous_reward_leaves_the_near_deterministic_step_untrained(tmp_path, make_trainer):
    # A continuous reward gives step 8 (σ 0.112 → 0.001, DDIM std 9e-4) tiny nonzero gains that normalise to unit
    # advantages; trained, its exact log-prob ratio exploded (approx-KL ~100 after one update) and its gradient
    # swamped the rest. It is left out; the 8 steps before it are trained, each once per trajectory.
    tr = make_trainer(tmp_path / "s", "stepwise", "sampling.num_steps=10", "train.iterations=1",
                      "train.inner_epochs=2")
    tr.train()
    row = [r for r in _rows(tmp_path / "s" / "metrics.jsonl") if "loss" in r][0]
    assert sorted(k for k in row if k.startswith("approx_kl/k")) == [f"approx_kl/k{k}" for k in range(8)]
    assert row["trained_states"] == 2 * 3 * 8
    assert row["approx_kl"] < 1e-2
    assert row["zero_std_ratio"] == 0.0
    with_step8 = make_trainer(tmp_path / "t", "stepwise", "sampling.num_steps=10", "stepwise.min_std=0.0")
    assert with_step8.run_iteration(0)["trained_states"] == 2 * 3 * 9


def test_split_parts_are_disjoint_and_keep_units_whole(tmp_path, make_trainer):
    for method, unit_is_trajectory in (("flow_grpo", True), ("tempflow", False)):
        tr = make_trainer(tmp_path / method, method)
        prompts = tr.prompts_for(0)
        result, rewards, _ = tr._rollout(prompts, 0)
        groups = build_update_batch(result, tr.algorithm.credit(result, rewards))
        parts = split_parts(groups, 2, torch.Generator().manual_seed(0))
        assert len(parts) == 2
        keys = [set() for _ in parts]
        for j, part in enumerate(parts):
            for g in part:
                keys[j] |= {(int(u), int(k), float(s)) for u, k, s in zip(g.unit, g.step, g.sigma)}
        every = {(int(u), int(k), float(s)) for g in groups for u, k, s in zip(g.unit, g.step, g.sigma)}
        assert keys[0] and keys[1] and not keys[0] & keys[1] and keys[0] | keys[1] == every
        units = [{u for u, _, _ in ks} for ks in keys]
        assert not units[0] & units[1]  # a full-SDE trajectory's steps never straddle two parts
        sizes = [sum(g.num_samples for g in p) for p in parts]
        assert sum(sizes) == sum(g.num_samples for g in groups)
        if unit_is_trajectory:
            assert len(units[0]) == len(units[1])
        else:  # a shared state's K branches stay in one part
            assert all(g.samples.shape[1] == 3 for p in parts for g in p)


def test_two_optimizer_steps_per_inner_epoch(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, "tempflow", "train.optimizer_steps_per_epoch=2", "train.inner_epochs=2")
    m = tr.run_iteration(0)
    assert tr.counters.optimizer_steps == 4
    # every state is scored once per inner epoch, whatever the split
    assert m["policy_passes"] == 2 * m["trained_states"]
    one = make_trainer(tmp_path / "one", "tempflow", "train.inner_epochs=2").run_iteration(0)
    assert one["trained_samples"] == m["trained_samples"] and one["policy_passes"] == m["policy_passes"]


OFFICIAL_EMA = ("train.ema_decay=0.9", "train.ema_update_every=2", "train.ema_warmup=true",
                "train.optimizer_steps_per_epoch=2", "train.inner_epochs=2", "checkpoint.every=1", "train.iterations=3")


def test_official_ema_resumes_exactly(tmp_path, make_trainer):
    full = make_trainer(tmp_path / "a", "flow_grpo", *OFFICIAL_EMA)
    for i in range(3):
        full.run_iteration(i)
    part = make_trainer(tmp_path / "b", "flow_grpo", *OFFICIAL_EMA)
    for i in range(2):
        part.run_iteration(i)
        part.iteration = i + 1
        part.save()
    resumed = make_trainer(tmp_path / "b", "flow_grpo", *OFFICIAL_EMA, resume=True)
    assert resumed.counters.optimizer_steps == 8  # 2 iterations × 2 inner epochs × 2 parts
    resumed.run_iteration(2)
    assert resumed.counters.optimizer_steps == full.counters.optimizer_steps == 12
    for n, shadow in full.ema.shadow.items():
        assert torch.equal(shadow, resumed.ema.shadow[n]), n
        assert not torch.equal(shadow, dict(full.named_params)[n].detach())
    for (n, p), (_, q) in zip(full.named_params, resumed.named_params):
        assert torch.equal(p, q), n


def test_per_step_kl_and_velocity_movement(tmp_path, make_trainer):
    still = make_trainer(tmp_path / "still", "tempflow", "train.learning_rate=1e-12", "train.weight_decay=0",
                         "train.inner_epochs=1").run_iteration(0)
    assert set(k for k in still if k.startswith("velocity_change/k")) == {"velocity_change/k0", "velocity_change/k1",
                                                                         "velocity_change/k2"}
    assert still["velocity_change"] < 1e-6
    moved = make_trainer(tmp_path / "moved", "tempflow", "log.movement_states=3", "train.inner_epochs=2").run_iteration(0)
    assert moved["velocity_change"] > 1e-4
    assert all(moved[f"approx_kl/k{k}"] > 0 for k in range(3))  # the second inner epoch sees a moved policy
    pooled = sum(moved[f"approx_kl/k{k}"] for k in range(3)) / 3  # equal samples per step here
    assert moved["approx_kl"] == pytest.approx(pooled, rel=1e-5)
    off = make_trainer(tmp_path / "off", "tempflow", "log.movement_states=0").run_iteration(0)
    assert "velocity_change" not in off


def test_g2rpo_official_options_in_the_trainer(tmp_path, make_trainer):
    from tempflow_fast.config import load_config
    from tempflow_fast.tasks.shapes.task import new_model
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer
    from tests.training.conftest import SMALL, no_eval, small_overrides

    cfg = load_config(Config, None, small_overrides(
        "g2rpo", tmp_path, "g2rpo.sigma_schedule=linspace", "sampling.shift=3.0", "g2rpo.completion_stride=official",
        "g2rpo.unbiased_std=true", "g2rpo.std_eps=1e-8", "reward.advantage_mode=per_component", *COMPOSITE_CFG))
    tr = Trainer(cfg, model=new_model(seed=0, transformer_config=SMALL), reward=composite(),
                 eval_fn=no_eval)
    prompts = tr.prompts_for(0)
    result, rewards, _ = tr._rollout(prompts, 0)
    assert torch.equal(result.sigmas.cpu(), linspace_sigmas(4, 3.0))
    assert set(rewards.final_components) == {1, 2} and rewards.component_weights == {"red": 1.0, "green": 0.5}
    credit = tr.algorithm.credit(result, rewards)
    traj = result.trajectories
    g = group_key(traj.prompt, traj.seed, traj.branch_step)
    want = sum(w * normalize_in_groups(rewards.final_components[lam][n], g, unbiased=True, eps=1e-8).advantages
               for n, w in (("red", 1.0), ("green", 0.5)) for lam in (1, 2))
    torch.testing.assert_close(credit.advantages, want[result.samples.trajectory])
    m = tr.run_iteration(0)
    assert m["trained_samples"] > 0 and {"reward_component/red", "reward_component/green"} <= set(m)


def test_per_component_needs_a_composite(capsys):
    from tempflow_fast.training.cli import main as train_main

    assert train_main(["--set", "reward.advantage_mode=per_component", "--print-config"]) == 2
    assert "reward.advantage_mode" in capsys.readouterr().err


def test_reward_eval_logs_each_component(tmp_path, make_trainer):
    tr = make_trainer(tmp_path, "tempflow", "eval.images_per_prompt=2", "eval.num_steps=3")
    table = mean_reward_eval(tr.model, ["two red squares", "a blue square"], composite(), tr.cfg)
    assert set(table) == {"overall", "reward/red", "reward/green"} and table["overall"]["count"] == 4
    assert table["overall"]["accuracy"] == pytest.approx(table["reward/red"]["accuracy"]
                                                         + 0.5 * table["reward/green"]["accuracy"], rel=1e-5)
    low, high = table["overall"]["ci95"]
    assert low < table["overall"]["accuracy"] < high
    assert eval_metrics(table) == {"heldout_accuracy": table["overall"]["accuracy"],
                                   "heldout_accuracy_ci_low": low, "heldout_accuracy_ci_high": high,
                                   "heldout/reward/red": table["reward/red"]["accuracy"],
                                   "heldout/reward/green": table["reward/green"]["accuracy"]}


def test_eval_and_export_use_the_ema_weights(tmp_path, make_trainer):
    """As the official eval and save_ckpt (ema.copy_ema_to(..., store_temp=True), then copy_temp_to)."""
    tr = make_trainer(tmp_path, "flow_grpo", "train.ema_decay=0.5", "train.iterations=1")
    tr.run_iteration(0)
    name, live = tr.named_params[0]
    seen = {}

    def eval_fn(model):
        seen["w"] = live.detach().clone()
        return {"overall": {"accuracy": 0.0}}

    tr.eval_fn = eval_fn
    before = live.detach().clone()
    tr._evaluate()
    assert torch.equal(seen["w"], tr.ema.shadow[name].to(live.dtype)) and not torch.equal(seen["w"], before)
    assert torch.equal(live.detach(), before)  # the live weights are back after the eval
    tr.eval_fn = None
    tr.iteration = 1
    tr.train()
    from tempflow_fast.models.tiny_flux import TinyFluxAdapter

    exported = dict(TinyFluxAdapter.from_pretrained(tmp_path / "final").module.named_parameters())[name]
    assert torch.equal(exported.detach(), tr.ema.shadow[name].to(exported.dtype))
