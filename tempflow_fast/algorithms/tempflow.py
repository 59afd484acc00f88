"""TempFlow-GRPO: trajectory bifurcation (process rewards), noise-aware step weights, seed grouping.

Per prompt, N initial noises ("seeds"); each runs one ODE trunk; at every bifurcation step k, K SDE
children leave x_k and finish by ODE, so the reward of child i scores step k alone. Advantages are
normalised within (prompt, seed, k) with seed grouping, or within (prompt, k) without. Step weights
are Norm(s_k·sqrt(-dt_k)), mean 1 over the trained steps, or c·s_k·sqrt(-dt_k) with `step_weight_scale` = c
(the constant of TempFlow's code: 2.25 SD3, 1.73 FLUX; step_weights.py). Each of the three parts can be switched off
for ablations; with `bifurcation=False` the rollout is Flow-GRPO's full SDE with N·K trajectories per
prompt (weights and grouping still apply: the seed of a full-SDE trajectory is its own noise).

Adaptive bifurcation (`adaptive_bifurcation=True`, beyond the paper): each iteration branches at
`adaptive_budget` of the candidate steps (`bifurcation_steps`, None = all), drawn without replacement with
probability p_k = (1 - floor)·s_k / Σ s + floor / |candidates|, where s_k is the running (EMA) within-group
reward spread at step k (steps not yet observed get the largest spread seen, or 1 before any). The running
spread lives in the caller's state dict (the trainer's checkpointed `counters.extra`) and the draw uses a
generator seeded by the caller, so a resumed run picks the same steps as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from tempflow_fast.algorithms.advantages import multi_granularity_advantages, normalize_in_groups
from tempflow_fast.algorithms.base import Credit, Rewards, group_key, reward_rows
from tempflow_fast.algorithms.step_weights import noise_aware_weights
from tempflow_fast.sampling.plans import Bifurcation, FullSDE


@dataclass
class TempFlowGRPO:
    num_steps: int = 10  # T
    num_seeds: int = 4  # N
    branches: int = 6  # K
    bifurcation_steps: Optional[Sequence[int]] = None  # None = every k in 0..T-2
    noise_level: float = 0.7  # η
    shift: Optional[float] = 1.0  # None = the model's scheduler config
    dynamic_shift: Optional[bool] = False  # FLUX's resolution-dependent shift; None = the model's
    completion_solver: str = "euler"  # how branches finish after their SDE step (sampling/solvers.py)
    completion_steps: Optional[int] = None  # None = the schedule's remaining steps
    bifurcation: bool = True
    noise_aware_weights: bool = True
    step_weight_scale: Optional[float] = None  # None: weights mean 1 over the trained steps; c: c·std (official)
    seed_grouping: bool = True
    adaptive_bifurcation: bool = False
    adaptive_floor: float = 0.2  # share of the probability spread uniformly over the candidate steps
    adaptive_budget: int = 4  # branch steps per iteration
    adaptive_ema: float = 0.8  # decay of the running spread per step
    advantage_mode: str = "composite"  # or "per_component": each reward component normalised, then summed
    name: str = "tempflow"

    SPREAD_KEY = "adaptive_spread/k{}"

    def candidate_steps(self) -> List[int]:
        return list(range(self.num_steps - 1)) if self.bifurcation_steps is None else sorted(set(self.bifurcation_steps))

    def step_probabilities(self, state: Dict[str, float]) -> Dict[int, float]:
        """{k: probability} of each candidate step, from the running spreads in `state`."""
        cand = self.candidate_steps()
        seen = [float(state[self.SPREAD_KEY.format(k)]) for k in cand if self.SPREAD_KEY.format(k) in state]
        prior = max(seen) if seen else 1.0
        s = torch.tensor([float(state.get(self.SPREAD_KEY.format(k), prior)) for k in cand], dtype=torch.float64)
        s = s.clamp(min=0.0)
        u = torch.full_like(s, 1.0 / len(cand))
        share = s / s.sum() if float(s.sum()) > 0 else u
        p = (1.0 - self.adaptive_floor) * share + self.adaptive_floor * u
        return {k: float(v) for k, v in zip(cand, p.tolist())}

    def choose_steps(self, state: Dict[str, float], seed: int) -> List[int]:
        """`adaptive_budget` distinct steps drawn with `step_probabilities` (deterministic given state and seed)."""
        probs = self.step_probabilities(state)
        cand = list(probs)
        n = min(self.adaptive_budget, len(cand))
        p = torch.tensor([probs[k] for k in cand], dtype=torch.float64)
        idx = torch.multinomial(p, n, replacement=False, generator=torch.Generator().manual_seed(seed))
        return sorted(cand[i] for i in idx.tolist())

    def plan_for(self, iteration: int, state: Dict[str, float], seed: int):
        """The plan of one iteration: the fixed plan, or with adaptive bifurcation the steps drawn for it."""
        if not (self.adaptive_bifurcation and self.bifurcation):
            return self.plan()
        return Bifurcation(self.num_steps, self.num_seeds, self.branches, tuple(self.choose_steps(state, seed)), "flow",
                           self.noise_level, trunk_images=True, shift=self.shift, dynamic_shift=self.dynamic_shift,
                           completion_solver=self.completion_solver, completion_steps=self.completion_steps)

    def observe(self, result, rewards: Rewards, state: Dict[str, float]) -> None:
        """Fold this iteration's within-group reward spread per branch step into the running spread in `state`."""
        if not (self.adaptive_bifurcation and self.bifurcation):
            return
        for k, spread in step_reward_std(rewards.final[1], result).items():
            key = self.SPREAD_KEY.format(k)
            state[key] = spread if key not in state else self.adaptive_ema * float(state[key]) + (1 - self.adaptive_ema) * spread

    def __post_init__(self):
        if self.adaptive_bifurcation:
            if not 0.0 <= self.adaptive_floor <= 1.0:
                raise ValueError(f"tempflow.adaptive_floor: must be in [0, 1], got {self.adaptive_floor}")
            if self.adaptive_budget < 1:
                raise ValueError(f"tempflow.adaptive_budget: must be >= 1, got {self.adaptive_budget}")

    def plan(self):
        if not self.bifurcation:
            return FullSDE(self.num_steps, self.num_seeds * self.branches, "flow", self.noise_level, shift=self.shift, dynamic_shift=self.dynamic_shift)
        steps = None if self.bifurcation_steps is None else tuple(self.bifurcation_steps)
        return Bifurcation(self.num_steps, self.num_seeds, self.branches, steps, "flow", self.noise_level,
                           trunk_images=True, shift=self.shift, dynamic_shift=self.dynamic_shift,
                           completion_solver=self.completion_solver, completion_steps=self.completion_steps)

    def credit(self, result, rewards: Rewards, *, global_std: bool = False) -> Credit:
        traj = result.trajectories
        if self.bifurcation:
            cols = (traj.prompt, traj.seed, traj.branch_step) if self.seed_grouping else (traj.prompt, traj.branch_step)
        else:
            cols = (traj.prompt,)
        if self.advantage_mode == "composite":
            stats = normalize_in_groups(rewards.final[1], group_key(*cols), global_std=global_std)
        else:
            rows, w = reward_rows(rewards, (1,), self.advantage_mode)
            stats = multi_granularity_advantages(rows, group_key(*cols), global_std=global_std, weights=w)
        per_sample = result.samples.trajectory
        steps = result.states.step
        if self.noise_aware_weights:
            trained = sorted(set(steps.tolist()))
            table = torch.zeros(self.num_steps, device=steps.device)
            table[trained] = noise_aware_weights(result.sigmas.cpu(), self.noise_level, trained,
                                                 self.step_weight_scale).to(steps.device)
            weights = table[steps]
        else:
            weights = torch.ones(len(result.states), device=steps.device)
        return Credit(stats.advantages[per_sample], stats.zero_std[per_sample], weights,
                      {"zero_std_ratio": stats.zero_std_ratio})


def step_reward_std(r: torch.Tensor, result) -> Dict[int, float]:
    """{k: mean over (prompt, seed, k) groups of the population std of rewards `r`} for a branching rollout."""
    traj = result.trajectories
    key = group_key(traj.prompt, traj.seed, traj.branch_step)
    out: Dict[int, List[float]] = {}
    for g in key.unique().tolist():
        sel = key == g
        k = int(traj.branch_step[sel][0])
        out.setdefault(k, []).append(float(r[sel].float().std(unbiased=False)))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}
