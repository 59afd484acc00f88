"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
arXiv:2509.16117; NVlabs/DiffusionNFT scripts/train_nft_sd3.py, config/nft.py): online RL on the forward process.
No SDE, no likelihood: the rollout is any ODE sampler, and the update is flow matching on the clean images,
pulled towards the good ones and pushed from the bad ones through two implicit policies.

One iteration (the paper's Algorithm 1; the trainer's `_forward_process_iteration` runs it):

1. Rollout with the old policy v_old: K images x0 per prompt c from independent noises, Euler ODE on the rollout
   schedule (the paper allows any solver; its code samples with a 2nd-order DPM solver), rewards r_raw.
2. Optimality probability (the paper's r(x0, c), its normaliser Z_c here A_max·std_c):
   r = ½ + ½·clip(A / A_max, -1, 1), with A = (r_raw - mean_c) / (std_c + 1e-4) the group-normalised advantage
   (Flow-GRPO's per-prompt stat tracker, its code's `advantages`) and A_max = train.adv_clip (its `adv_clip_max`
   = 5): r ∈ [0, 1], ½ at the prompt's mean reward (`optimality`).
3. Forward process: for every image, m = int(T·timestep_fraction) of the rollout schedule's noise levels
   σ_0 … σ_{T-1}, drawn without replacement (its code: a permutation of the sampler's timesteps, the first
   num_train_timesteps), each with fresh ε ~ N(0, I): x_t = (1 - t)·x0 + t·ε (`train_times`).
4. Implicit policies (the paper's positive and negative policies): v⁺_θ = (1 - β)·v_old + β·v_θ and
   v⁻_θ = (1 + β)·v_old - β·v_θ, v_old without gradient, β = `guidance_strength`.
5. Loss (the paper's objective L = E[r·‖v⁺_θ - v‖² + (1 - r)·‖v⁻_θ - v‖²], v = ε - x0), in the form its code
   computes (`nft_loss`): each term in x0-prediction, x̂0± = x_t - t·v±_θ, with the paper's adaptive weight, the
   squared error divided by the stop-gradient mean absolute error of the same prediction:
       ℓ± = mean_d((x̂0± - x0)²) / sg(max(mean_d|x̂0± - x0|, 1e-5)),
       ℓ  = (A_max / β)·[r·ℓ⁺ + (1 - r)·ℓ⁻] + β_KL·mean_d((v_θ - v_ref)²),
   averaged over images and noise levels; β_KL = train.beta against the reference (the initial policy; its code
   1e-4; 0 here by default, as the other methods).
6. After the iteration's optimizer steps, the old policy moves towards the new one (the paper's soft update):
   θ_old ← η·θ_old + (1 - η)·θ with η = min(old_decay_rate·i, old_decay_max), i the optimizer steps so far (its
   decay_type 1: 0.001·i, at most 0.5) (`old_decay`).

Defaults (config/nft.py: `_get_config`, sd3_geneval / sd3_pickscore): K = 24 images per prompt, T = 10, β = 1
(0.1 for OCR and multi-reward), decay type 1, A_max = 5, CFG-free (guidance 1). Not taken: its EMA of the
trained weights is train.ema_decay here (off by default), its DPM solver (Euler here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from tempflow_fast.algorithms.advantages import GroupStats, normalize_in_groups

WEIGHT_FLOOR = 1e-5  # its code's clip(min=0.00001) of the adaptive weight


@dataclass
class DiffusionNFT:
    num_steps: int = 10  # T of the rollout's ODE, and the noise levels the update draws from
    group_size: int = 24  # K images per prompt
    guidance_strength: float = 1.0  # β
    timestep_fraction: float = 0.99  # m = int(T·fraction) noise levels per image
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    shift: Optional[float] = 1.0  # None = the model's scheduler config
    dynamic_shift: Optional[bool] = False
    name: str = "diffusion_nft"
    forward_process = True  # the trainer runs `_forward_process_iteration`: ODE rollout, this module's loss

    def __post_init__(self):
        if self.group_size < 1 or self.guidance_strength <= 0:
            raise ValueError(f"group_size must be >= 1 and guidance_strength (β) > 0, got {self.group_size}, "
                             f"{self.guidance_strength}")
        if self.times_per_image < 1:
            raise ValueError(f"timestep_fraction {self.timestep_fraction} of T = {self.num_steps} trains no noise level")

    def plan(self) -> None:
        """No rollout plan: the rollout is plain ODE sampling (`rollout_nfe` counts it)."""
        return None

    @property
    def times_per_image(self) -> int:
        return int(self.num_steps * self.timestep_fraction)

    def rollout_nfe(self, num_prompts: int, cfg_batches: int = 1) -> Dict[str, int]:
        """Model calls of one rollout (models.memory.nfe_per_iteration's keys): K·T per prompt, all trunk."""
        total = num_prompts * self.group_size * self.num_steps
        return {"nfe/trunk": total, "nfe/branch": 0, "nfe/completion": 0, "nfe/granularity": 0, "nfe_total": total,
                "transformer_rows": total * cfg_batches}

    def old_decay(self, optimizer_steps: int) -> float:
        """η of the soft update after `optimizer_steps` optimizer steps."""
        return min(self.old_decay_rate * optimizer_steps, self.old_decay_max)


def optimality(rewards: torch.Tensor, prompt: torch.Tensor, adv_clip: float,
               global_std: bool = False) -> Tuple[torch.Tensor, GroupStats]:
    """(r ∈ [0, 1] per image, the group statistics): r = ½ + ½·clip(A / adv_clip, -1, 1), A the per-prompt
    normalised reward (module doc, step 2)."""
    stats = normalize_in_groups(rewards, prompt, global_std=global_std)
    r = 0.5 + 0.5 * (stats.advantages / adv_clip).clamp(-1.0, 1.0)
    return r, stats


def train_times(sigmas: torch.Tensor, num_images: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """(num_images, per_image) noise levels t: for each image `per_image` of σ_0 … σ_{T-1} without replacement."""
    T = sigmas.numel() - 1
    if not 1 <= per_image <= T:
        raise ValueError(f"per_image must be in 1..T = 1..{T}, got {per_image}")
    index = torch.stack([torch.randperm(T, generator=generator)[:per_image] for _ in range(num_images)])
    return sigmas.detach().float().cpu()[:T][index]


def forward_process(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε, t (B,)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise


class NFTLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean over the batch of ℓ (module doc, step 5)
    policy: torch.Tensor  # the (A_max/β)·[r·ℓ⁺ + (1 - r)·ℓ⁻] part, no gradient
    kl: torch.Tensor  # mean_d((v_θ - v_ref)²), no gradient (0 without a reference)
    old_deviation: torch.Tensor  # mean_d((v_θ - v_old)²): how far the policy is from the old one, no gradient


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, *, beta: float, adv_clip: float, v_ref: Optional[torch.Tensor] = None,
             kl_beta: float = 0.0) -> NFTLoss:
    """The negative-aware flow-matching loss of a batch (module doc, steps 4-5). Gradient flows through v_theta
    only; every other input is data. Math in fp32."""
    v = v_theta.float()
    old = v_old.detach().float()
    x_t, x0 = x_t.detach().float(), x0.detach().float()
    tt = t.detach().float().view(-1, *([1] * (x0.dim() - 1)))
    dims = tuple(range(1, x0.dim()))

    def weighted(x0_hat: torch.Tensor) -> torch.Tensor:
        err = x0_hat - x0
        with torch.no_grad():
            weight = err.abs().double().mean(dim=dims).clamp(min=WEIGHT_FLOOR).float()
        return (err ** 2).mean(dim=dims) / weight

    positive = (1 - beta) * old + beta * v
    negative = (1 + beta) * old - beta * v
    per_image = (r.float() * weighted(x_t - tt * positive) + (1 - r.float()) * weighted(x_t - tt * negative)) / beta
    policy = adv_clip * per_image.mean()
    loss = policy
    kl = torch.zeros((), device=v.device)
    if v_ref is not None and kl_beta > 0:
        kl_per = ((v - v_ref.detach().float()) ** 2).mean(dim=dims).mean()
        loss = loss + kl_beta * kl_per
        kl = kl_per.detach()
    return NFTLoss(loss, policy.detach(), kl, ((v - old) ** 2).mean().detach())
