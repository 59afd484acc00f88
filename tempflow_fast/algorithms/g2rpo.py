"""G²RPO: singular stochastic sampling (G branches from one SDE step at each k in M, ODE elsewhere) and
multi-granularity advantage integration: each branch is finished at every granularity λ in Λ, its
advantage is computed per λ within the (prompt, seed, k) group and summed (A_mix = Σ_λ A_λ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from tempflow_fast.algorithms.advantages import multi_granularity_advantages
from tempflow_fast.algorithms.base import Credit, Rewards, group_key
from tempflow_fast.sampling.plans import SingularSDE


@dataclass
class G2RPO:
    num_steps: int = 16  # T
    branches: int = 12  # G
    branch_steps: Optional[Sequence[int]] = None  # M; None = first half
    granularities: Sequence[int] = field(default_factory=lambda: (1, 2, 3))  # Λ
    noise_level: float = 0.7
    shift: Optional[float] = 1.0  # None = the model's scheduler config
    dynamic_shift: Optional[bool] = False  # FLUX's resolution-dependent shift; None = the model's
    completion_solver: str = "euler"  # ODE completions (sampling/solvers.py); not Euler only with Λ = (1,)
    completion_steps: Optional[int] = None
    name: str = "g2rpo"

    def plan(self) -> SingularSDE:
        steps = None if self.branch_steps is None else tuple(self.branch_steps)
        return SingularSDE(self.num_steps, self.branches, steps, tuple(self.granularities), 1, "flow",
                           self.noise_level, trunk_images=True, shift=self.shift, dynamic_shift=self.dynamic_shift,
                           completion_solver=self.completion_solver, completion_steps=self.completion_steps)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        traj = result.trajectories
        stacked = torch.stack([rewards.final[lam] for lam in self.granularities])
        stats = multi_granularity_advantages(stacked, group_key(traj.prompt, traj.seed, traj.branch_step),
                                             global_std=global_std)
        per_sample = result.samples.trajectory
        return Credit(stats.advantages[per_sample], stats.zero_std[per_sample],
                      torch.ones(len(result.states), device=per_sample.device),
                      {"zero_std_ratio": stats.zero_std_ratio})
