"""Drop-in replacements for Flow-GRPO's functions (github.com/yifan123/flow_grpo), backed by our
fused ops. Swap the import and keep the call sites:

    from tempflow_fast.compat.flow_grpo import sde_step_with_logprob

Only Flow-GRPO's default SDE ("sde" type) is covered; its arguments, 4-tuple and numbers are
reproduced for a diffusers FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from tempflow_fast.ops import flow_sde_coefficients, flow_sde_step


def _timestep_list(timestep, batch: int) -> list:
    """Flow-GRPO iterates over a (B,) timestep tensor; a float or 0-d tensor is taken for all rows."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
        steps = list(timestep.reshape(-1))
    else:
        steps = [timestep]
    if len(steps) == 1 and batch > 1:
        steps = steps * batch
    if len(steps) != batch:
        raise ValueError(f"timestep must be a scalar or hold one value per batch row ({batch}), got "
                         f"{len(steps)} values")
    return steps


def sde_step_with_logprob(scheduler, model_output: torch.Tensor, timestep: Union[float, torch.Tensor],
                          sample: torch.Tensor, noise_level: float = 0.7, prev_sample: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None):
    """One Flow-GRPO SDE step of `scheduler` (a FlowMatchEulerDiscreteScheduler after
    `set_timesteps`) from `timestep` to the next scheduled σ, with the log-prob of the result.

    As in Flow-GRPO: inputs are upcast to fp32; σ = sigmas[index_for_timestep(t)], σ' the next
    one, σ==1 guarded with sigmas[1]; ξ is drawn with diffusers' `randn_tensor(generator=...)`
    unless `prev_sample` is given (then it is scored); the log-prob is averaged over all non-batch
    dims. Returns (prev_sample, log_prob (B,), prev_sample_mean, std_dev_t) where std_dev_t is the
    noise scale s = η·sqrt(σ/(1-σ̃)) shaped (B, 1, ..., 1) — without the sqrt(-dt) factor, exactly
    what Flow-GRPO returns (its KL term divides by it).
    """
    from diffusers.utils.torch_utils import randn_tensor

    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    batch = sample.shape[0]
    step_index = [scheduler.index_for_timestep(t) for t in _timestep_list(timestep, batch)]
    sigmas = scheduler.sigmas.to(device=sample.device, dtype=torch.float32)
    sigma = sigmas[step_index]
    sigma_next = sigmas[[i + 1 for i in step_index]]
    sigma_max = sigmas[1].expand(batch)

    noise = None
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
    step = flow_sde_step(sample, model_output, sigma, sigma_next, noise_level, sigma_max=sigma_max,
                         noise=noise, prev_sample=prev_sample)
    eta = torch.full_like(sigma, float(noise_level))
    std_dev_t, _, _, _ = flow_sde_coefficients(sigma, sigma_next, eta, sigma_max)
    std_dev_t = std_dev_t.view(-1, *([1] * (sample.dim() - 1)))
    return step.prev_sample, step.log_prob, step.mean, std_dev_t
