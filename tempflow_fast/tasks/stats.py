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

Across run seeds (bench/methods.py), what varies is the whole training run; with a handful of seeds the
interval is Student's t: `seed_interval(xs)`, mean ± t_{0.975, n-1}·s/√n, and `paired_interval(a, b)`, the
same on the differences a_i − b_i of two methods run with the same seeds (same base model, prompt order and
noises per seed), which removes what the seeds share. For quantities that live on a grid and cannot go below it
(the model calls at which a run first reaches a target, counted at eval points) `bootstrap_interval(xs)` gives
the percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13), which stays inside the range
of the values instead of a t interval's negative calls.

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


# t_{0.975, df} for df = 1..30 (two-sided 95%), from the standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table to 30; beyond, the Cornish-Fisher
    expansion about z, within 2e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


def _values(xs: Sequence[float]) -> Tuple[List[float], float]:
    """xs as floats and their mean; ValueError when empty or not all finite."""
    xs = [float(x) for x in xs]
    if not xs or not all(math.isfinite(x) for x in xs):
        raise ValueError(f"xs must be non-empty and finite, got {xs}")
    return xs, sum(xs) / len(xs)


def seed_interval(xs: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, low, high): Student's t 95% interval of the mean of independent runs' values (module doc); with one
    value the interval is (nan, nan), not a zero-width claim."""
    xs, mean = _values(xs)
    n = len(xs)
    if n == 1:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_interval(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, low, high) of a_i − b_i over runs paired by seed: `seed_interval` of the differences."""
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up run by run, got {len(a)} and {len(b)} values")
    return seed_interval([x - y for x, y in zip(a, b)])


def bootstrap_interval(xs: Sequence[float], resamples: int = 20000, seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): the 2.5% and 97.5% percentiles of the mean of `resamples` resamples with replacement of
    `xs` (fixed `seed`: the same numbers every time); (nan, nan) interval with one value."""
    import random

    xs, mean = _values(xs)
    n = len(xs)
    if n == 1:
        return mean, float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(resamples))
    return mean, means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]


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
