"""Flow-matching sigma schedules and the interval sub-schedules of G²RPO.

`flow_sigmas` returns `sigmas[0] = 1 … sigmas[T] = 0` (T+1 values, fp32) equal to what diffusers'
`FlowMatchEulerDiscreteScheduler` holds in `.sigmas` after `set_timesteps`, reproduced here so the
sampler needs torch only:

- static shift (SD3, Flow-GRPO): a scheduler built with `shift=s` and `set_timesteps(T)`. Note that
  diffusers shifts twice in this path: the construction-time table is shifted, its smallest value
  `shift(1/num_train_timesteps)` bounds the `linspace`, and that linspace is shifted again. We
  copy that exactly, because Flow-GRPO's numbers come from it.
- dynamic shift (FLUX): a scheduler built with `use_dynamic_shifting=True`, driven the way
  `FluxPipeline` drives it: `sigmas = linspace(1, 1/T, T)` and
  `mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)`,
  exponential time shift `e^mu / (e^mu + (1/t - 1))`.

Interval sub-schedules (G²RPO granularities): after the SDE step at index k the branch sits at
index k+1 and has T-k-1 steps left. At granularity λ it visits indices k+1, k+1+λ, k+1+2λ, … and
always ends on index T (σ = 0): when (T-k-1) is not a multiple of λ, the last step is the short
remainder from the last multiple to T. It therefore takes ceil((T-k-1)/λ) model calls, and the
first of them (at index k+1) is the same for every λ.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps (T) must be an int >= 2, got {num_steps!r}")


def flux_shift_mu(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift `mu` (diffusers' `calculate_shift`), linear in seq length."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    b = base_shift - m * base_image_seq_len
    return image_seq_len * m + b


def flow_sigmas(num_steps: int, shift: float = 1.0, *, image_seq_len: Optional[int] = None,
                dynamic_shift: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas (T+1,) fp32 from 1 down to 0, equal to diffusers' for the same settings (see module doc)."""
    _check_num_steps(num_steps)
    if dynamic_shift:
        if image_seq_len is None or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive int with dynamic_shift, got {image_seq_len!r}")
        mu = flux_shift_mu(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
        # diffusers casts the pipeline's linspace to fp32 before shifting, and numpy keeps fp32
        # through the shift expression; follow the same dtype path to get identical bits.
        t = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        sig = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** 1.0)
    else:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        train = torch.from_numpy(
            np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        ) / num_train_timesteps
        train = shift * train / (1 + (shift - 1) * train)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
        sig = t / num_train_timesteps
        sig = shift * sig / (1 + (shift - 1) * sig)
    out = torch.from_numpy(np.asarray(sig)).to(torch.float32)
    return torch.cat([out, torch.zeros(1, dtype=torch.float32)])


def interval_indices(num_steps: int, start: int, granularity: int) -> List[int]:
    """Indices visited from `start` to T at granularity λ: start, start+λ, …, then T (see module doc)."""
    _check_num_steps(num_steps)
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity (λ) must be an int >= 1, got {granularity!r}")
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in 0..{num_steps}, got {start!r}")
    return list(range(start, num_steps, granularity)) + [num_steps]


def interval_sigmas(sigmas: torch.Tensor, start: int, granularity: int) -> torch.Tensor:
    """The sub-schedule of `sigmas` (T+1,) from index `start` at granularity λ, ending on σ = 0."""
    idx = interval_indices(sigmas.numel() - 1, start, granularity)
    return sigmas[torch.tensor(idx, device=sigmas.device)]


def interval_calls(num_steps: int, start: int, granularity: int) -> int:
    """Model calls to finish from index `start` at granularity λ: ceil((T - start)/λ)."""
    return len(interval_indices(num_steps, start, granularity)) - 1
