"""TempFlow-GRPO: trajectory bifurcation (process rewards), noise-aware step weights, seed grouping.

Per prompt, N initial noises ("seeds"); each runs one ODE trunk; at every bifurcation step k, K SDE
children leave x_k and finish by ODE, so the reward of child i scores step k alone. Advantages are
normalised within (prompt, seed, k) with seed grouping, or within (prompt, k) without. Step weights
are Norm(s_k·sqrt(-dt_k)), mean 1 over the trained steps. Each of the three parts can be switched off
for ablations; with `bifurcation=False` the rollout is Flow-GRPO's full SDE with N·K trajectories per
prompt (weights and grouping still apply: the seed of a full-SDE trajectory is its own noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tempflow_fast.algorithms.advantages import normalize_in_groups
from tempflow_fast.algorithms.base import Credit, Rewards, group_key
from tempflow_fast.algorithms.step_weights import noise_aware_weights
from tempflow_fast.sampling.plans import Bifurcation, FullSDE


@dataclass
class TempFlowGRPO:
    num_steps: int = 10  # T
    num_seeds: int = 4  # N
    branches: int = 6  # K
    bifurcation_steps: Optional[Sequence[int]] = None  # None = every k in 0..T-2
    noise_level: float = 0.7  # η
    shift: float = 1.0
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift
    bifurcation: bool = True
    noise_aware_weights: bool = True
    seed_grouping: bool = True
    name: str = "tempflow"

    def plan(self):
        if not self.bifurcation:
            return FullSDE(self.num_steps, self.num_seeds * self.branches, "flow", self.noise_level, shift=self.shift, dynamic_shift=self.dynamic_shift)
        steps = None if self.bifurcation_steps is None else tuple(self.bifurcation_steps)
        return Bifurcation(self.num_steps, self.num_seeds, self.branches, steps, "flow", self.noise_level,
                           trunk_images=True, shift=self.shift, dynamic_shift=self.dynamic_shift)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        traj = result.trajectories
        if self.bifurcation:
            cols = (traj.prompt, traj.seed, traj.branch_step) if self.seed_grouping else (traj.prompt, traj.branch_step)
        else:
            cols = (traj.prompt,)
        stats = normalize_in_groups(rewards.final[1], group_key(*cols), global_std=global_std)
        per_sample = result.samples.trajectory
        steps = result.states.step
        if self.noise_aware_weights:
            trained = sorted(set(steps.tolist()))
            table = torch.zeros(self.num_steps, device=steps.device)
            table[trained] = noise_aware_weights(result.sigmas.cpu(), self.noise_level, trained).to(steps.device)
            weights = table[steps]
        else:
            weights = torch.ones(len(result.states), device=steps.device)
        return Credit(stats.advantages[per_sample], stats.zero_std[per_sample], weights,
                      {"zero_std_ratio": stats.zero_std_ratio})
