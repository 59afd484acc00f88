"""What every method answers (design.md §4): which rollout plan to run, how rewards become per-sample
advantages, and how the trained states are weighted. Adding a method touches only this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from tempflow_fast.sampling.engine import RolloutResult


@dataclass
class Rewards:
    """Rewards of one rollout, as the trainer scored them.

    final: {λ: (B,)} reward of each trajectory's final image at granularity λ (λ=1 is the full schedule).
    tweedie: (B, T) reward of x̂0 at every state (Stepwise-Flow-GRPO), else None.
    trunk: (P·N,) reward of each ODE trunk's own image, when the plan finished its trunks, else None.
    final_components: {λ: {name: (B,)}} a composite reward's raw per-component scores of the final images at
        every granularity λ (empty for a single reward); `components` is the λ = min Λ entry, for logging.
    component_weights: {name: w} the composite's weights, for per-component advantages.
    """

    final: Dict[int, torch.Tensor]
    tweedie: Optional[torch.Tensor] = None
    trunk: Optional[torch.Tensor] = None
    final_components: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    component_weights: Dict[str, float] = field(default_factory=dict)

    @property
    def components(self) -> Dict[str, torch.Tensor]:
        return self.final_components[min(self.final_components)] if self.final_components else {}


@dataclass
class Credit:
    """Per-sample advantages (M,) aligned with `result.samples`, per-state weights (S,) aligned with
    `result.states`, and statistics to log."""

    advantages: torch.Tensor
    zero_std: torch.Tensor  # (M,) bool: the sample's group carried no signal
    state_weights: torch.Tensor
    stats: Dict[str, float] = field(default_factory=dict)
    # (M,) bool: the samples the update scores (Flow-GRPO's timestep_fraction leaves the last steps out); None = all
    trained: Optional[torch.Tensor] = None


ADVANTAGE_MODES = ("composite", "per_component")


def reward_rows(rewards: Rewards, granularities: Sequence[int], mode: str) -> Tuple[torch.Tensor, List[float]]:
    """(J, B) rewards to normalise row by row and their weights: one row per granularity λ of the (composite)
    reward, or with mode "per_component" one row per (component, λ), weighted by the component's weight, so
    A = Σ_c w_c Σ_λ A_{c,λ} (G²RPO's code normalises HPS and CLIP separately and sums them)."""
    if mode == "composite":
        return torch.stack([rewards.final[lam] for lam in granularities]), [1.0] * len(granularities)
    if mode != "per_component":
        raise ValueError(f"reward.advantage_mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    missing = [lam for lam in granularities if not rewards.final_components.get(lam)]
    if missing:
        raise ValueError("reward.advantage_mode 'per_component' needs a composite reward's per-component scores "
                         f"at every granularity; none for λ = {missing}")
    names = list(rewards.final_components[granularities[0]])
    rows = [rewards.final_components[lam][name] for name in names for lam in granularities]
    weights = [float(rewards.component_weights.get(name, 1.0)) for name in names for _ in granularities]
    return torch.stack(rows), weights


def trained_step_count(num_steps: int, timestep_fraction: float) -> int:
    """Flow-GRPO's `num_train_timesteps = int(num_steps * timestep_fraction)` (scripts/train_sd3.py: main): the
    first that many steps of every trajectory are trained; 0.99 of T = 10 trains 9, never the last (σ → 0)."""
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    n = int(num_steps * timestep_fraction)
    if n < 1:
        raise ValueError(f"timestep_fraction {timestep_fraction} of T = {num_steps} trains no step")
    return n


class Algorithm(Protocol):
    name: str

    def plan(self):
        """The rollout plan (tempflow_fast.sampling.plans) for one prompt batch."""

    def credit(self, result: RolloutResult, rewards: Rewards, *, global_std: bool = False) -> Credit:
        """Advantages per sample and weights per trained state."""


def group_key(*columns: torch.Tensor) -> torch.Tensor:
    """One integer id per row from several small non-negative integer columns."""
    key = torch.zeros_like(columns[0], dtype=torch.long)
    for col in columns:
        col = col.long()
        key = key * (int(col.max()) + 1 if col.numel() else 1) + col
    return key
