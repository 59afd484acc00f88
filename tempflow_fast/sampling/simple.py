"""Plain batched sampling: every row follows the whole schedule (no branching, no accounting).

Used for evaluation, for the embedded task's data/pre-training checks, and as the reference the
rollout engine's trunks are tested against. The rollout engine (`engine.py`) is the fast path
for training rollouts.
"""

from __future__ import annotations

from typing import Optional

import torch

from tempflow_fast.models.base import Cond, cond_batch_size
from tempflow_fast.sampling.steppers import check_sde_kind, ode_step, sde_step


def _model_device_dtype(model):
    p = next(model.module.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype if p.dtype.is_floating_point else torch.float32


def initial_noise(model, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x at σ = 1: standard normal (n, *model.latent_shape), fp32, on the generator's (else the model's) device."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    device = generator.device if generator is not None else _model_device_dtype(model)[0]
    return torch.randn((n, *model.latent_shape), generator=generator, device=device, dtype=torch.float32)


@torch.no_grad()
def sample(model, cond: Cond, noise: torch.Tensor, sigmas: torch.Tensor, *, sde: Optional[str] = None,
           noise_level: float = 0.7, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Integrate every row of `noise` from sigmas[0] to sigmas[-1]; returns final latents (fp32).

    sde: None = ODE Euler, "flow" = Flow-GRPO SDE, "ddim" = DDIM-style SDE, with η = noise_level.
    One batched model call per step; cond must have one row per noise row.
    """
    check_sde_kind(sde)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
    if cond_batch_size(cond) != noise.shape[0]:
        raise ValueError(f"cond has batch {cond_batch_size(cond)} but noise has {noise.shape[0]} rows")
    x = noise.float()
    n = x.shape[0]
    # the schedule's values on the host once (no device sync per step), its tensor on the latents' device
    host = sigmas.detach().to("cpu", torch.float32).tolist()
    sig = sigmas.to(device=x.device, dtype=torch.float32)
    sigma_max = host[1]
    for i in range(sig.numel() - 1):
        s, s_next = sig[i].expand(n), sig[i + 1].expand(n)
        v = model.velocity(x, s, cond).float()
        # The DDIM-style SDE has std = σ'·sin(ηπ/2) = 0 on the step to σ' = 0, where it is exactly
        # the Euler step to x̂0; take that step directly rather than ask ops for a zero-std Gaussian.
        if sde is None or (sde == "ddim" and host[i + 1] == 0.0):
            x = ode_step(x, v, s, s_next)
        else:
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = sde_step(sde, x, v, s, s_next, noise_level, sigma_max=sigma_max, noise=xi).prev_sample
    return x
