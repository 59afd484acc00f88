"""The official codes' update math, written out independently of this project's code path (per sample, one
transformer call per sample and trained step, as those scripts run it), to check our batched, fused path against.

Sources (read, not copied; the citations say which function each formula restates):
- Flow-GRPO, yifan123/flow_grpo: flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: sde_step_with_logprob (SDE mean,
  std_dev_t = η·sqrt(σ / (1 - σ̃)) with σ̃ = sigmas[1] at σ = 1, log-prob averaged over the non-batch dims);
  flow_grpo/stat_tracking.py: PerPromptStatTracker.update (per-prompt mean, population std + 1e-4, or the std of
  all rewards with global_std); scripts/train_sd3.py: main (steps j < int(T·timestep_fraction), clipped loss
  max(-A·r, -A·clip(r)), A clamped to ±adv_clip_max, KL ((μ - μ_ref)²).mean() / (2·std_dev_t²), loss averaged over
  rows per (batch, j) and over the gradient-accumulation units).
- TempFlow-GRPO, Shredded-Pork/TempFlow-GRPO: flow_grpo/diffusers_patch/sd3_sde_with_logprob_perstep.py:
  sde_step_with_logprob (as above, but it returns std_dev_t·sqrt(-dt)); scripts/train_flux_pr.py and
  train_sd3_pr.py: main (loss -c·std·A·r with c = 1.73 / 2.25, KL divided by 2·(std_dev_t·sqrt(-dt))², rewards of
  the K branches of one (prompt, seed) tracked per column k, not gathered over GPUs: "seed group").
- G²RPO, bcmi/Granular-GRPO: fastvideo/train_g2rpo_hps_clip.py: flow_grpo_step (the same SDE), train_one_step
  (per reward and granularity, advantages within each block of num_generations rows per column k with
  torch.std (n - 1) + 1e-8, summed over granularities, HPS + CLIP; loss per trained step
  mean(max(...)) / len(eta_step_list), summed over steps).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import torch


def sde_step(x, v, sigma, sigma_next, sigma_max, eta, prev_sample):
    """(log_prob per row, mean, std_dev_t = s, std = s·sqrt(-dt)) of the Flow-GRPO SDE step x → prev_sample."""
    x, v, prev_sample = x.double(), v.double(), prev_sample.double()
    shape = (-1,) + (1,) * (x.dim() - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(shape)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64).reshape(shape)
    dt = sigma_next - sigma
    guarded = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
    s = torch.sqrt(sigma / (1 - guarded)) * eta
    mean = x * (1 + s ** 2 / (2 * sigma) * dt) + v * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    log_prob = -((prev_sample - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.dim()))), mean, s.flatten(), std.flatten()


def clipped_loss(log_prob, old_log_prob, adv, *, clip_range, adv_clip, weight=None):
    """Per-sample max(-w·A·r, -w·A·clip(r, 1 ± ε)) with A clamped to ±adv_clip; also the ratio."""
    adv = torch.clamp(adv.double(), -adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob.double())
    w = 1.0 if weight is None else weight
    unclipped = -w * adv * ratio
    clipped = -w * adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def kl_term(mean, mean_ref, denominator_std):
    """((μ - μ_ref)²).mean over non-batch dims / (2·d²): d = s (Flow-GRPO) or s·sqrt(-dt) (TempFlow)."""
    sq = ((mean - mean_ref.double()) ** 2).mean(dim=tuple(range(1, mean.dim())))
    return sq / (2 * denominator_std ** 2)


def stat_tracker(prompts: Sequence[str], rewards: np.ndarray, *, global_std: bool = False) -> np.ndarray:
    """PerPromptStatTracker.update: rewards (rows, columns); per prompt, mean and population std along the rows
    of that prompt, per column; std + 1e-4; or the std of every row with global_std."""
    prompts = np.asarray(prompts)
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        rows = rewards[prompts == p]
        mean = rows.mean(axis=0, keepdims=True)
        std = (rewards.std(axis=0, keepdims=True) if global_std else rows.std(axis=0, keepdims=True)) + 1e-4
        out[prompts == p] = (rows - mean) / std
    return out


def g2rpo_advantages(rewards_per_reward: Dict[str, List[torch.Tensor]], generations: int) -> torch.Tensor:
    """train_one_step: for every reward and granularity, (r - mean) / (std + 1e-8) within each block of
    `generations` rows (per column), torch.std with n - 1; summed over granularities and rewards."""
    total = None
    for per_granularity in rewards_per_reward.values():
        for r in per_granularity:
            r = r.double()
            adv = torch.zeros_like(r)
            for start in range(0, r.shape[0], generations):
                block = r[start:start + generations]
                adv[start:start + generations] = (block - block.mean(dim=0)) / (block.std(dim=0) + 1e-8)
            total = adv if total is None else total + adv
    return total


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())
