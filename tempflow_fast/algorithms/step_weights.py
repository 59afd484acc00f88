"""TempFlow-GRPO's noise-aware step weights: w_k ∝ s_k·sqrt(-dt_k), normalised to mean 1 over the trained
steps (so the loss scale matches Flow-GRPO's uniform weights, as the paper does for a fair comparison), or
c·s_k·sqrt(-dt_k) with the constant of TempFlow's code (scripts/train_sd3_pr.py: 2.25, scripts/train_flux_pr.py:
1.73, `unclipped_loss = -c * std_dev_t * advantages * ratio`). 2.25 is 1/mean of the std over k = 0..8 on SD3's
schedule (shift 3, T = 10, η = 0.7), so there both agree to 0.1%; 1.73 is that mean on FLUX-1024 at η = 0.9,
while the code samples with η = 0.7 (mean weight 0.78 there).

s_k = η·sqrt(σ_k / (1 - σ̃_k)) is the Flow-GRPO SDE's noise scale with σ̃ = sigmas[1] at σ = 1 (design.md §1);
s_k·sqrt(-dt_k) is the std of the noise the SDE injects at step k.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def flow_sde_noise_std(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-step injected-noise std s_k·sqrt(-dt_k) for k = 0..T-1 (the last step, to σ=0, included)."""
    sigmas = sigmas.double()
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_safe = torch.where(sigma >= 1.0, sigmas[1].expand_as(sigma), sigma)
    s = noise_level * torch.sqrt(sigma / (1.0 - sigma_safe))
    return (s * torch.sqrt(sigma - sigma_next)).float()


def ddim_sde_noise_std(sigmas: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Per-step injected-noise std σ_{k+1}·sin(η·π/2) of the DDIM-style SDE (`ops.ddim_sde_step`), k = 0..T-1
    (0 at the last step, to σ = 0)."""
    return (sigmas.double()[1:] * math.sin(noise_level * math.pi / 2)).float()


def noise_aware_weights(sigmas: torch.Tensor, noise_level: float, trained_steps: Sequence[int],
                        scale: Optional[float] = None) -> torch.Tensor:
    """Weights for `trained_steps` (indices k into the schedule): mean 1 over those steps, or `scale`·std."""
    if len(trained_steps) == 0:
        raise ValueError("trained_steps is empty")
    T = sigmas.numel() - 1
    bad = [k for k in trained_steps if not 0 <= k < T]
    if bad:
        raise ValueError(f"trained_steps must be in 0..{T - 1}, got {bad}")
    std = flow_sde_noise_std(sigmas, noise_level)[list(trained_steps)]
    return std / std.mean() if scale is None else scale * std
