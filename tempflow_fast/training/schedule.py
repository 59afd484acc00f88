"""The learning rate of each iteration (`train.lr_schedule`, `train.lr_warmup_iterations`, `train.lr_min_ratio`).

A function of the iteration index alone, set on the optimizer before each iteration's update, so a resumed run
gets the same rates as an uninterrupted one without any scheduler state in the checkpoint. Every inner epoch of
an iteration uses that iteration's rate.

- warm-up: iterations 0 … W−1 ramp linearly to the peak, `lr · (i + 1) / W` (the first is not 0);
- then `constant`, or `cosine` / `linear` decay from `lr` at iteration W to `lr · lr_min_ratio` at the last
  iteration (`train.iterations − 1`).
"""

from __future__ import annotations

import math


def learning_rate_at(train_cfg, iteration: int) -> float:
    """The learning rate of iteration `iteration` (0-based) under `train_cfg` (a TrainConfig)."""
    peak = train_cfg.learning_rate
    warmup = train_cfg.lr_warmup_iterations
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    if train_cfg.lr_schedule == "constant":
        return peak
    span = train_cfg.iterations - 1 - warmup
    progress = min(1.0, (iteration - warmup) / span) if span > 0 else 1.0
    low = peak * train_cfg.lr_min_ratio
    if train_cfg.lr_schedule == "cosine":
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if train_cfg.lr_schedule == "linear":
        return peak + (low - peak) * progress
    raise ValueError(f"config field 'train.lr_schedule': must be constant, cosine or linear, "
                     f"got {train_cfg.lr_schedule!r}")


def set_learning_rate(param_groups, lr: float) -> None:
    for group in param_groups:
        group["lr"] = lr
