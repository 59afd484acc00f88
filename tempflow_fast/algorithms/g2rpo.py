"""G²RPO: singular stochastic sampling (G branches from one SDE step at each k in M, ODE elsewhere) and
multi-granularity advantage integration: each branch is finished at every granularity λ in Λ, its
advantage is computed per λ within the (prompt, seed, k) group and summed (A_mix = Σ_λ A_λ).

Options that reproduce G²RPO's code (bcmi/Granular-GRPO, fastvideo/train_g2rpo_hps_clip.py):
- `sigma_schedule="linspace"`: σ = shift(linspace(1, 0, T+1)) (`sample_reference_model`, `sd3_time_shift`) instead
  of diffusers' FlowMatchEulerDiscrete schedule;
- `completion_stride="official"`: a branch at k takes one step k+1 → k+2, then every λ-th step, the remainder folded
  into the last step (`sigma_schedule[:k+2]` + `sigma_schedule[k+2::g]`, image = x̂0 of the last state visited;
  schedules.granularity_indices);
- `unbiased_std=True, std_eps=1e-8`: group std as `torch.std` + 1e-8 (`train_one_step`);
- `advantage_mode="per_component"`: each reward component's advantages normalised on their own and summed, as the
  code does for HPS and CLIP (`hps_advantages + clip_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from tempflow_fast.algorithms.advantages import ADV_EPS, multi_granularity_advantages
from tempflow_fast.algorithms.base import Credit, Rewards, group_key, reward_rows
from tempflow_fast.sampling.plans import SingularSDE
from tempflow_fast.sampling.schedules import linspace_sigmas

SIGMA_SCHEDULES = ("diffusers", "linspace")


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
    sigma_schedule: str = "diffusers"  # or "linspace": σ = shift(linspace(1, 0, T+1)), G²RPO's code
    completion_stride: str = "uniform"  # or "official": k+1 → k+2, then every λ-th step (schedules.py)
    unbiased_std: bool = False  # group std with n - 1 (G²RPO's code) instead of n (Flow-GRPO's)
    std_eps: float = ADV_EPS  # A = (r - mean) / (std + eps); G²RPO's code: 1e-8
    advantage_mode: str = "composite"  # or "per_component": each reward component normalised, then summed
    name: str = "g2rpo"

    def __post_init__(self):
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}")
        if self.sigma_schedule == "linspace" and (self.shift is None or self.dynamic_shift):
            raise ValueError("sigma_schedule 'linspace' takes a static shift (sampling.shift, "
                             "sampling.dynamic_shift false, sampling.schedule_from_model false)")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")

    def plan(self) -> SingularSDE:
        steps = None if self.branch_steps is None else tuple(self.branch_steps)
        return SingularSDE(self.num_steps, self.branches, steps, tuple(self.granularities), 1, "flow",
                           self.noise_level, trunk_images=True, shift=self.shift, dynamic_shift=self.dynamic_shift,
                           completion_solver=self.completion_solver, completion_steps=self.completion_steps,
                           completion_stride=self.completion_stride)

    def rollout_sigmas(self) -> Optional[torch.Tensor]:
        """The schedule the rollouts run on when it is not the plan's own (None): σ = shift(linspace(1, 0, T+1))."""
        return linspace_sigmas(self.num_steps, self.shift) if self.sigma_schedule == "linspace" else None

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        traj = result.trajectories
        rows, weights = reward_rows(rewards, tuple(self.granularities), self.advantage_mode)
        stats = multi_granularity_advantages(rows, group_key(traj.prompt, traj.seed, traj.branch_step),
                                             global_std=global_std, eps=self.std_eps, unbiased=self.unbiased_std,
                                             weights=None if self.advantage_mode == "composite" else weights)
        per_sample = result.samples.trajectory
        return Credit(stats.advantages[per_sample], stats.zero_std[per_sample],
                      torch.ones(len(result.states), device=per_sample.device),
                      {"zero_std_ratio": stats.zero_std_ratio})
