"""Flow-GRPO (baseline): G SDE trajectories per prompt; the terminal advantage, normalised within the
prompt's group, is broadcast to every trained step; every step weighs 1. As in Flow-GRPO's code
(scripts/train_sd3.py: main, `num_train_timesteps = int(num_steps * timestep_fraction)`), the rollout is SDE at
every step but only the first int(T·timestep_fraction) steps are trained: 0.99 trains 9 of 10, never the last
step to σ = 0."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tempflow_fast.algorithms.advantages import multi_granularity_advantages, normalize_in_groups
from tempflow_fast.algorithms.base import Credit, Rewards, reward_rows, trained_step_count
from tempflow_fast.algorithms.step_weights import flow_sde_noise_std
from tempflow_fast.sampling.plans import FullSDE


@dataclass
class FlowGRPO:
    num_steps: int = 10  # T
    group_size: int = 24  # G
    noise_level: float = 0.7  # η
    shift: float = 1.0
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift
    timestep_fraction: float = 0.99  # trains steps 0 .. int(T·fraction) - 1
    advantage_mode: str = "composite"  # or "per_component": each reward component normalised, then summed
    name: str = "flow_grpo"
    _checked_std: bool = field(default=False, init=False, repr=False, compare=False)  # the warning below, once

    def __post_init__(self):
        trained_step_count(self.num_steps, self.timestep_fraction)

    @property
    def trained_steps(self) -> int:
        return trained_step_count(self.num_steps, self.timestep_fraction)

    def plan(self) -> FullSDE:
        return FullSDE(self.num_steps, self.group_size, "flow", self.noise_level, shift=self.shift, dynamic_shift=self.dynamic_shift)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        if not self._checked_std:
            self._checked_std = True
            std = flow_sde_noise_std(result.sigmas.detach().cpu(), self.noise_level)[:self.trained_steps]
            tiny = [k for k in range(len(std)) if float(std[k]) < 0.01]
            if tiny:
                warnings.warn(f"flow_grpo: trained step(s) {tiny} have a transition std of {float(std[tiny[0]]):.1e} "
                              f"(timestep_fraction = {self.timestep_fraction}): a near-deterministic step's exact "
                              "log-prob ratio moves ~1/std per change of the velocity and can swamp the other steps' "
                              "gradient with a continuous reward; the official 0.99 leaves the last step out",
                              RuntimeWarning, stacklevel=2)
        traj = result.trajectories
        if self.advantage_mode == "composite":
            stats = normalize_in_groups(rewards.final[1], traj.prompt, global_std=global_std)
        else:
            rows, weights = reward_rows(rewards, (1,), self.advantage_mode)
            stats = multi_granularity_advantages(rows, traj.prompt, global_std=global_std, weights=weights)
        smp = result.samples
        per_sample = smp.trajectory
        return Credit(
            stats.advantages[per_sample],
            stats.zero_std[per_sample],
            torch.ones(len(result.states), device=per_sample.device),
            {"zero_std_ratio": stats.zero_std_ratio},
            trained=result.states.step[smp.state] < self.trained_steps,
        )
