"""Composite reward: a weighted sum of rewards, each normalised first so that the weights, not the
rewards' native scales (PickScore ≈ 20, HPS ≈ 0.3, CLIP ≈ 30), set their influence:

    r(x, p) = Σ_i w_i · (r_i(x, p) - μ_i) / max(σ_i, ε)

normalize="running" (default): μ_i, σ_i are the running mean and std of every score component i has
  produced so far (Welford, this batch included before normalising, NaNs skipped). The scale stays
  fixed as training goes, batches of any size (tweedie, trunk, eval) are treated alike, and one
  batch's spread does not inflate another's. Save `state_dict()` with checkpoints for exact resumes.
normalize="batch": μ_i, σ_i of this call's scores only (per-batch z-score; no state).
normalize="none": μ_i = 0, σ_i = 1 (plain weighted sum, as Flow-GRPO's multi_score).

After each call `last_components` holds every component's raw (B,) scores and `last_means` their
means, for logging.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

from .base import check_batch

NORMALIZE = ("running", "batch", "none")


class _RunningStats:
    """Welford mean/variance over a stream of scores."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x[torch.isfinite(x)].double()
        n = x.numel()
        if n == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


class CompositeReward:
    def __init__(self, components: Sequence[Tuple[object, float]], normalize: str = "running", eps: float = 1e-6,
                 name: str = "composite"):
        if not components:
            raise ValueError("components must hold at least one (reward, weight) pair, got none")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        names = [getattr(r, "name", None) for r, _ in components]
        if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(f"components must have distinct string names (set a label), got {names}")
        self.components: List[Tuple[object, float]] = [(r, float(w)) for r, w in components]
        self.normalize, self.eps, self.name = normalize, eps, name
        self.stats: Dict[str, _RunningStats] = {n: _RunningStats() for n in names}
        self.last_components: Dict[str, torch.Tensor] = {}

    @property
    def accepts_uint8(self) -> bool:
        return all(getattr(r, "accepts_uint8", False) for r, _ in self.components)

    @property
    def last_means(self) -> Dict[str, float]:
        """{component name: mean raw score of the last call} (NaN-skipping)."""
        return {n: float(v[torch.isfinite(v)].mean()) if torch.isfinite(v).any() else float("nan")
                for n, v in self.last_components.items()}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        raw: Dict[str, torch.Tensor] = {}
        for reward, weight in self.components:
            r = reward(images, prompts).detach().float().to(images.device)
            if r.shape != total.shape:
                raise ValueError(f"component {reward.name!r} returned shape {tuple(r.shape)}, "
                                 f"expected {tuple(total.shape)}")
            raw[reward.name] = r
            total += weight * self._normalise(reward.name, r)
        self.last_components = raw
        return total

    def _normalise(self, name: str, r: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none":
            return r
        if self.normalize == "running":
            st = self.stats[name]
            st.update(r)
            mean, std = st.mean, st.std
        else:
            finite = r[torch.isfinite(r)]
            mean = float(finite.mean()) if finite.numel() else 0.0
            std = float(finite.std(unbiased=False)) if finite.numel() else 0.0
        return (r - mean) / max(std, self.eps)

    def state_dict(self) -> Dict[str, Dict[str, float]]:
        return {n: {"count": s.count, "mean": s.mean, "m2": s.m2} for n, s in self.stats.items()}

    def load_state_dict(self, state: Dict[str, Dict[str, float]]) -> None:
        if set(state) != set(self.stats):
            raise ValueError(f"state has components {sorted(state)}, this reward has {sorted(self.stats)}")
        for n, s in state.items():
            st = self.stats[n]
            st.count, st.mean, st.m2 = int(s["count"]), float(s["mean"]), float(s["m2"])
