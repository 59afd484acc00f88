"""One sampling step from σ to σ' (design.md §1): ODE Euler, Flow-GRPO SDE, DDIM-style SDE.

The SDE math lives in `tempflow_fast.ops` (one implementation, fused on GPU); this module only
chooses between them and draws the noise ξ itself, from the caller's generator, so a rollout's
randomness never depends on which op backend runs. `sigma` / `sigma_next` are per-row (B,) fp32
tensors because one batched call may mix rows at different steps (trunks and branches).
"""

from __future__ import annotations

from typing import Optional

import torch

SDE_KINDS = ("flow", "ddim")


def check_sde_kind(sde: Optional[str], *, allow_none: bool = True) -> None:
    if sde is None and allow_none:
        return
    if sde not in SDE_KINDS:
        raise ValueError(f"sde must be one of {SDE_KINDS}{' or None' if allow_none else ''}, got {sde!r}")


def _rows(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) so it broadcasts against latents x (B, *L)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def ode_step(x: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler: x' = x + v·(σ' - σ), computed in fp32 and returned in x's dtype.

    σ, σ' are Python floats (one step for the whole batch) or per-row (B,) tensors."""
    if isinstance(sigma, torch.Tensor) or isinstance(sigma_next, torch.Tensor):
        dt = _rows(torch.as_tensor(sigma_next - sigma, dtype=torch.float32, device=x.device).expand(x.shape[0]), x)
    else:
        dt = sigma_next - sigma
    return (x.float() + velocity.float() * dt).to(x.dtype)


def sde_step(sde: str, x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             noise_level: float, *, sigma_max: float, noise: torch.Tensor):
    """One SDE step through the ops API; returns `SdeStep(prev_sample, log_prob, mean, std)`.

    sigma_max is σ̃ = sigmas[1] of the schedule, used by the Flow-GRPO SDE where σ == 1 (its
    s = η·sqrt(σ/(1-σ)) would divide by zero there); the DDIM-style SDE ignores it.
    """
    from tempflow_fast import ops  # imported here so ODE-only sampling needs no op backend

    check_sde_kind(sde, allow_none=False)
    if sde == "flow":
        return ops.flow_sde_step(x, velocity, sigma, sigma_next, noise_level, sigma_max=sigma_max, noise=noise)
    return ops.ddim_sde_step(x, velocity, sigma, sigma_next, noise_level, noise=noise)
