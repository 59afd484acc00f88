"""Confidence intervals and pass@k for the tasks' evaluations (issue 19: measurements that tell methods apart).

An evaluation samples a fixed set of prompts from fixed noises; what varies from one eval to the next (another
eval seed, a few more images) is which images each prompt gets. The intervals below are that sampling noise,
with the prompts held fixed, at 95% (z = 1.96):

- `wilson_interval(k, n)`: a share of n images (one category's accuracy): Wilson's score interval, which stays
  inside [0, 1] and is not empty at k = 0 or k = n (Wilson 1927; Brown, Cai & DasGupta 2001).
- `mean_interval(values, groups)`: the mean of per-image scores over prompts (a mean reward; the mean of several
  categories' accuracies): mean ± z·se with se² = Σ_g n_g²·s_g²/n_g / N², the variance of a stratified mean where
  each prompt g keeps its own images n_g and sample variance s_g² (the prompts are strata, not resampled).
- `mean_of_intervals(rows)`: the mean of R independent estimates each with its interval (GenEval's overall
  accuracy, the mean of the category accuracies): mean ± sqrt(Σ h_r²) / R, h_r the half-width of row r.

`pass_at_k(n, c, k)`: the chance that at least one of k images drawn without replacement from the n sampled
for a prompt is correct, c of them correct: 1 - C(n-c, k) / C(n, k) (the unbiased estimator of Chen et al.
2021, "Evaluating Large Language Models Trained on Code", eq. 1). RL sharpens what a model can sometimes do:
pass@k far above the accuracy is the headroom.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> Tuple[float, float]:
    """(low, high) of Wilson's score interval for k successes in n trials; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..n = 0..{n}, got {k}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: the float sum leaves ~1e-17 there
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> Tuple[float, float]:
    """(low, high) for p1 − p2 (k1 of n1 against k2 of n2): Newcombe's hybrid score interval (1998, method 10),
    built from the two Wilson intervals; (−1, 1) when either side has no trials."""
    if n1 <= 0 or n2 <= 0:
        return -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (max(-1.0, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
            min(1.0, d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)))


def mean_interval(values: torch.Tensor, groups: Optional[Sequence] = None, z: float = Z95) -> Tuple[float, float, float]:
    """(mean, low, high) of the per-image `values` with the prompts `groups` (one label per value) held fixed;
    without groups every value is its own stratum of one (se from the pooled sample variance)."""
    v = values.detach().double().flatten().cpu()
    n = v.numel()
    if n == 0:
        raise ValueError("values is empty")
    mean = float(v.mean())
    if groups is None:
        var = float(v.var(unbiased=True)) / n if n > 1 else 0.0
    else:
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} labels for {n} values")
        rows: Dict[object, List[int]] = {}
        for i, g in enumerate(groups):
            rows.setdefault(g, []).append(i)
        var = 0.0
        for idx in rows.values():
            if len(idx) > 1:
                var += len(idx) * float(v[idx].var(unbiased=True))  # n_g² · s_g² / n_g
        var /= n * n
    half = z * math.sqrt(var)
    return mean, mean - half, mean + half


def mean_of_intervals(rows: Sequence[Tuple[float, float, float]]) -> Tuple[float, float, float]:
    """(mean, low, high) of the mean of independent estimates given as (estimate, low, high)."""
    if not rows:
        raise ValueError("rows is empty")
    mean = sum(r[0] for r in rows) / len(rows)
    half = math.sqrt(sum(((r[2] - r[1]) / 2) ** 2 for r in rows)) / len(rows)
    return mean, mean - half, mean + half


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (module doc); needs k <= n."""
    if not 0 <= c <= n:
        raise ValueError(f"c must be in 0..n = 0..{n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n = 1..{n} (pass@k needs at least k images per prompt), got {k}")
    if n - c < k:
        return 1.0
    # 1 - Π_{i=n-c+1}^{n} (1 - k/i): C(n-c, k)/C(n, k) without large binomials
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
