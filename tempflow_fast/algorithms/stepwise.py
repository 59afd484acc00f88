"""Stepwise-Flow-GRPO: SDE trajectories (DDIM-style SDE by default) with Tweedie estimates x̂0 = x - σ·v
at every state; the reward of x̂0 before and after a step gives that step's gain; advantages are the
gains normalised per step across the prompt's group. Like Flow-GRPO, only the first int(T·timestep_fraction)
steps are trained (0.99: 9 of 10; with the DDIM-style SDE the last step is deterministic and untrained anyway)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tempflow_fast.algorithms.advantages import stepwise_gain_advantages
from tempflow_fast.algorithms.base import Credit, Rewards, trained_step_count
from tempflow_fast.sampling.plans import FullSDE


@dataclass
class StepwiseFlowGRPO:
    num_steps: int = 10
    group_size: int = 24
    sde: str = "ddim"
    noise_level: float = 0.7
    shift: float = 1.0
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift
    timestep_fraction: float = 0.99  # trains steps 0 .. int(T·fraction) - 1
    name: str = "stepwise"

    def __post_init__(self):
        trained_step_count(self.num_steps, self.timestep_fraction)

    def plan(self) -> FullSDE:
        return FullSDE(self.num_steps, self.group_size, self.sde, self.noise_level, tweedie=True, shift=self.shift, dynamic_shift=self.dynamic_shift)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        if rewards.tweedie is None:
            raise ValueError("stepwise credit needs rewards.tweedie (B, T): the rollout must decode Tweedie estimates")
        traj = result.trajectories
        smp = result.samples
        step_of_sample = result.states.step[smp.state]
        last = trained_step_count(self.num_steps, self.timestep_fraction)
        trained = sorted(k for k in set(step_of_sample.tolist()) if k < last)
        stats = stepwise_gain_advantages(rewards.tweedie, rewards.final[1], traj.prompt, steps=trained)
        column = torch.full((rewards.tweedie.shape[1],), -1, dtype=torch.long, device=step_of_sample.device)
        column[trained] = torch.arange(len(trained), device=step_of_sample.device)
        adv = stats.advantages.view(-1, len(trained))
        zero = stats.zero_std.view(-1, len(trained))
        col = column[step_of_sample].clamp(min=0)  # untrained steps read column 0, and are masked out below
        return Credit(adv[smp.trajectory, col], zero[smp.trajectory, col],
                      torch.ones(len(result.states), device=adv.device),
                      {"zero_std_ratio": stats.zero_std_ratio}, trained=step_of_sample < last)
