"""Group-normalised advantages (design.md §1) and the method-specific ways of feeding them.

All functions are pure tensor maths on flat per-sample values with an integer group id per sample, so
any grouping (prompt; prompt+seed+k; prompt+k; step across a group) is just a different id vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

ADV_EPS = 1e-4  # Flow-GRPO's (std + 1e-4)


@dataclass(frozen=True)
class GroupStats:
    advantages: torch.Tensor  # (M,) fp32
    zero_std: torch.Tensor  # (M,) bool: the sample's group had all-equal values (no signal)
    group_mean: torch.Tensor  # (G,) fp32
    group_std: torch.Tensor  # (G,) fp32
    zero_std_ratio: float  # fraction of groups with zero spread


def normalize_in_groups(
    values: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = False, eps: float = ADV_EPS,
    unbiased: bool = False,
) -> GroupStats:
    """A = (r - mean_group) / (std + eps); std per group, or over all values when `global_std`.

    Groups are given by `group_ids` (any integers). std is the population std (unbiased=False), as in
    Flow-GRPO's per-prompt stat tracker, or with `unbiased` the sample std (n - 1), as G²RPO's code takes
    it (`torch.std` with eps 1e-8). Groups whose values are all equal get A = 0 and are flagged.
    """
    if values.dim() != 1 or group_ids.shape != values.shape:
        raise ValueError(
            f"values and group_ids must be 1-D of the same length, got {tuple(values.shape)} and {tuple(group_ids.shape)}"
        )
    if values.numel() == 0:
        raise ValueError("values is empty")
    values = values.double()  # statistics in float64, as the stat tracker's numpy: rewards ~22 ± 0.1 lose digits in fp32
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    total = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
    mean = total / count
    centred = values - mean[inverse]
    sq = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, centred * centred)
    # a group of one has no spread: its zero variance (not 0/0) leaves it flagged below
    std = (sq / (count - 1).clamp(min=1) if unbiased else sq / count).sqrt()
    group_max = torch.full((num_groups,), -float("inf"), dtype=torch.float64, device=values.device).scatter_reduce(0, inverse, values, "amax")
    group_min = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=values.device).scatter_reduce(0, inverse, values, "amin")
    zero_group = group_max == group_min
    scale = values.std(unbiased=unbiased and values.numel() > 1) if global_std else std[inverse]
    adv = (centred / (scale + eps)).float()
    zero_std = zero_group[inverse]
    adv = torch.where(zero_std, torch.zeros_like(adv), adv)
    return GroupStats(adv, zero_std, mean.float(), std.float(), float(zero_group.float().mean()))


def multi_granularity_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, global_std: bool = False, eps: float = ADV_EPS,
    unbiased: bool = False, weights: Optional[Sequence[float]] = None,
) -> GroupStats:
    """G²RPO's MGAI: rewards (J, M) — one row per granularity λ_j (per reward component too, with per-component
    advantages) — normalised row by row within the group, then summed: A_mix = Σ_j w_j·A_j (w_j = 1 unless
    `weights` gives them). A sample is zero-signal only if every row had zero spread."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (granularities, samples), got shape {tuple(rewards.shape)}")
    if weights is not None and len(weights) != rewards.shape[0]:
        raise ValueError(f"weights must have one entry per row of rewards ({rewards.shape[0]}), got {len(weights)}")
    per = [normalize_in_groups(r, group_ids, global_std=global_std, eps=eps, unbiased=unbiased) for r in rewards]
    rows = [p.advantages if weights is None else float(w) * p.advantages for p, w in zip(per, weights or per)]
    adv = torch.stack(rows).sum(0)
    zero = torch.stack([p.zero_std for p in per]).all(0)
    ratio = float(sum(p.zero_std_ratio for p in per) / len(per))
    return GroupStats(adv, zero, per[0].group_mean, per[0].group_std, ratio)


def stepwise_gain_advantages(
    tweedie_rewards: torch.Tensor,
    final_rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    steps: Optional[Sequence[int]] = None,
    eps: float = ADV_EPS,
) -> GroupStats:
    """Stepwise-Flow-GRPO: per trajectory, r_t = R(x̂0(x_t)) for t = 0..T-1 and r_T = R(x_0).

    The gain of step t is r_{t+1} - r_t; advantages are the gains normalised per step across the group
    (same group id, same t). Only the trained `steps` (default all T) are normalised and returned — a
    deterministic step (the DDIM-style SDE's last one) has no sample and its zero gain is no group.
    tweedie_rewards (B, T), final_rewards (B,), group_ids (B,) -> advantages (B, len(steps)) flattened
    row-major (trajectory-major).
    """
    if tweedie_rewards.dim() != 2 or final_rewards.shape != tweedie_rewards.shape[:1]:
        raise ValueError(
            f"tweedie_rewards must be (B, T) and final_rewards (B,), got {tuple(tweedie_rewards.shape)} and {tuple(final_rewards.shape)}"
        )
    B, T = tweedie_rewards.shape
    steps = list(range(T)) if steps is None else list(steps)
    if not steps or min(steps) < 0 or max(steps) >= T:
        raise ValueError(f"steps must be non-empty indices in 0..{T - 1}, got {steps}")
    after = torch.cat([tweedie_rewards[:, 1:], final_rewards[:, None]], dim=1).float()
    gains = (after - tweedie_rewards.float())[:, steps]
    col = torch.arange(len(steps), device=gains.device).expand(B, len(steps))
    ids = group_ids.to(gains.device)[:, None] * len(steps) + col
    return normalize_in_groups(gains.reshape(-1), ids.reshape(-1), eps=eps)
