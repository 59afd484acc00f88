"""MixGRPO (Li et al. 2025, "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE", arXiv:2507.21802):
the rollout is an ODE except inside a sliding window of w steps, where it is Flow-GRPO's SDE, and only the window's
steps are trained. Per prompt, the G samples share one initial noise (its code's `init_same_noise`), so the ODE
prefix before the window is computed once and the G samples leave its last state as K = G branches: the plan is
`SlidingWindowSDE` (sampling/plans.py) with N = 1 seed and K = G.

The window moves with training (its code, fastvideo/utils/grpo_states.py, "progressive" with `prog_overlap` and
`roll_back`): it starts at step 0, moves by s steps every τ iterations, and after its last position starts over.
Its code trains the steps range(k, min(k + w, T - 2)) (`max_timesteps = sampling_steps - 2`): the last two steps
are never SDE, and its start k runs 0, s, 2s, ... while k <= T - 2. We take the same windows but skip a start
where that range is empty (k = T - 2), so every iteration trains. Defaults from its finetune_flux_grpo_MixGRPO.sh:
w = 4, τ = 25, s = 1, G = 12, η = 0.7, advantages (r - mean) / (std + 1e-8) with the unbiased std of the
prompt's group, every window step weighted 1 in the clipped loss (ε = 1e-4 there; train.clip_range here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from tempflow_fast.algorithms.advantages import multi_granularity_advantages, normalize_in_groups
from tempflow_fast.algorithms.base import Credit, Rewards, reward_rows
from tempflow_fast.sampling.plans import SlidingWindowSDE


@dataclass
class MixGRPO:
    num_steps: int = 10  # T
    group_size: int = 12  # G, samples per prompt from one initial noise
    window_size: int = 4  # w
    shift_interval: int = 25  # τ, iterations per window position
    window_stride: int = 1  # s
    noise_level: float = 0.7  # η
    shift: float = 1.0
    dynamic_shift: bool = False
    unbiased_std: bool = True
    std_eps: float = 1e-8
    advantage_mode: str = "composite"  # or "per_component": each reward component normalised, then summed
    name: str = "mixgrpo"

    def __post_init__(self):
        if self.num_steps < 3:
            raise ValueError(f"num_steps (T) must be >= 3 for a window that ends before step T - 2, got {self.num_steps}")
        for field_name in ("group_size", "window_size", "shift_interval", "window_stride"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be >= 1, got {getattr(self, field_name)}")

    def window_starts(self) -> List[int]:
        """The window's start positions in order: 0, s, 2s, ... below T - 2."""
        return list(range(0, self.num_steps - 2, self.window_stride))

    def window(self, iteration: int) -> Tuple[int, int]:
        """(start k, size) of the window at `iteration` (0-based): position ⌊iteration / τ⌋ of `window_starts`,
        cyclically; size min(w, T - 2 - k)."""
        starts = self.window_starts()
        k = starts[(iteration // self.shift_interval) % len(starts)]
        return k, min(self.window_size, self.num_steps - 2 - k)

    def plan_for(self, iteration: int, state: Dict[str, float] = None, seed: int = 0) -> SlidingWindowSDE:
        k, size = self.window(iteration)
        return SlidingWindowSDE(self.num_steps, window_start=k, window_size=size, seeds_per_prompt=1,
                                samples_per_seed=self.group_size, sde="flow", noise_level=self.noise_level,
                                shift=self.shift, dynamic_shift=self.dynamic_shift)

    def plan(self) -> SlidingWindowSDE:
        """The first iteration's plan (what --dry-run counts; the trainer asks `plan_for` each iteration)."""
        return self.plan_for(0)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        prompt = result.trajectories.prompt
        if self.advantage_mode == "composite":
            stats = normalize_in_groups(rewards.final[1], prompt, global_std=global_std, eps=self.std_eps,
                                        unbiased=self.unbiased_std)
        else:
            rows, weights = reward_rows(rewards, (1,), self.advantage_mode)
            stats = multi_granularity_advantages(rows, prompt, global_std=global_std, eps=self.std_eps,
                                                 unbiased=self.unbiased_std, weights=weights)
        per_sample = result.samples.trajectory
        return Credit(stats.advantages[per_sample], stats.zero_std[per_sample],
                      torch.ones(len(result.states), device=per_sample.device),
                      {"zero_std_ratio": stats.zero_std_ratio})
