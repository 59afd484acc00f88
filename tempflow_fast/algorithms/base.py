"""What every method answers (design.md §4): which rollout plan to run, how rewards become per-sample
advantages, and how the trained states are weighted. Adding a method touches only this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol

import torch

from tempflow_fast.sampling.engine import RolloutResult


@dataclass
class Rewards:
    """Rewards of one rollout, as the trainer scored them.

    final: {λ: (B,)} reward of each trajectory's final image at granularity λ (λ=1 is the full schedule).
    tweedie: (B, T) reward of x̂0 at every state (Stepwise-Flow-GRPO), else None.
    trunk: (P·N,) reward of each ODE trunk's own image, when the plan finished its trunks, else None.
    components: a composite reward's raw per-component scores of the final images (λ = min Λ), for logging.
    """

    final: Dict[int, torch.Tensor]
    tweedie: Optional[torch.Tensor] = None
    trunk: Optional[torch.Tensor] = None
    components: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Credit:
    """Per-sample advantages (M,) aligned with `result.samples`, per-state weights (S,) aligned with
    `result.states`, and statistics to log."""

    advantages: torch.Tensor
    zero_std: torch.Tensor  # (M,) bool: the sample's group carried no signal
    state_weights: torch.Tensor
    stats: Dict[str, float] = field(default_factory=dict)


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
