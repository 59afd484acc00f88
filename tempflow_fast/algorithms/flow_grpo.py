"""Flow-GRPO (baseline): G SDE trajectories per prompt; the terminal advantage, normalised within the
prompt's group, is broadcast to every step; every step weighs 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tempflow_fast.algorithms.advantages import normalize_in_groups
from tempflow_fast.algorithms.base import Credit, Rewards
from tempflow_fast.sampling.plans import FullSDE


@dataclass
class FlowGRPO:
    num_steps: int = 10  # T
    group_size: int = 24  # G
    noise_level: float = 0.7  # η
    shift: float = 1.0
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift
    name: str = "flow_grpo"

    def plan(self) -> FullSDE:
        return FullSDE(self.num_steps, self.group_size, "flow", self.noise_level, shift=self.shift, dynamic_shift=self.dynamic_shift)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        traj = result.trajectories
        stats = normalize_in_groups(rewards.final[1], traj.prompt, global_std=global_std)
        per_sample = result.samples.trajectory
        return Credit(
            stats.advantages[per_sample],
            stats.zero_std[per_sample],
            torch.ones(len(result.states), device=per_sample.device),
            {"zero_std_ratio": stats.zero_std_ratio},
        )
