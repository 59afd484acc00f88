"""The primitives as `torch.library` custom ops: backend dispatch at run time, fake (meta)
implementations for tracing, and autograd through the explicit backward primitives.

Registering them this way (instead of plain autograd.Functions) lets `torch.compile(fullgraph=True)`
trace code that calls the ops without graph breaks: the compiler sees an opaque op with known
output shapes, and the backend is chosen when the compiled graph runs.

Inputs here are already validated and flattened by the public layer (tempflow_fast.ops); see the
primitive contract in tempflow_fast.ops.reference. Only the `loss` output of the two loss ops and
the latent-shaped outputs / log-prob of the step and log-prob ops carry gradients; the loss ops'
other outputs (log-probs, ratios, statistics, the KL term) are marked non-differentiable: they
are diagnostics, and a silent zero gradient through them would hide a mistake.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tempflow_fast.ops.backends import backend_for

_NS = "tempflow_fast"


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# 1. gaussian log-prob -------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::gaussian_log_prob", mutates_args=())
def gaussian_log_prob(samples: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return backend_for(samples.device).gaussian_log_prob_fwd(samples, mean, std)


@gaussian_log_prob.register_fake
def _(samples, mean, std):
    return samples.new_empty(samples.shape[:2], dtype=_acc(samples))


@torch.library.custom_op(f"{_NS}::gaussian_log_prob_bwd", mutates_args=())
def gaussian_log_prob_bwd(grad_logp: Tensor, samples: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return backend_for(samples.device).gaussian_log_prob_bwd(grad_logp.contiguous(), samples, mean, std)


@gaussian_log_prob_bwd.register_fake
def _(grad_logp, samples, mean, std):
    return torch.empty_like(mean)


def _glp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _glp_backward(ctx, grad_logp):
    samples, mean, std = ctx.saved_tensors
    dmean = gaussian_log_prob_bwd(grad_logp, samples, mean, std) if ctx.needs_input_grad[1] else None
    return None, dmean, None


gaussian_log_prob.register_autograd(_glp_backward, setup_context=_glp_setup)


# 2. SDE step -----------------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::sde_step", mutates_args=())
def sde_step(sample: Tensor, velocity: Tensor, a: Tensor, b: Tensor, std: Tensor,
             noise: Optional[Tensor], prev_sample: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return backend_for(sample.device).sde_step_fwd(sample, velocity, a, b, std, noise, prev_sample)


@sde_step.register_fake
def _(sample, velocity, a, b, std, noise, prev_sample):
    return (torch.empty_like(sample), torch.empty_like(sample),
            sample.new_empty(sample.shape[:1], dtype=_acc(sample)))


@torch.library.custom_op(f"{_NS}::sde_step_bwd", mutates_args=())
def sde_step_bwd(grad_prev: Optional[Tensor], grad_mean: Optional[Tensor], grad_logp: Optional[Tensor],
                 sample: Tensor, velocity: Tensor, prev_sample: Tensor, a: Tensor, b: Tensor, std: Tensor,
                 prev_given: bool) -> tuple[Tensor, Tensor]:
    grads = [g if g is None else g.contiguous() for g in (grad_prev, grad_mean, grad_logp)]
    return backend_for(sample.device).sde_step_bwd(*grads, sample, velocity, prev_sample, a, b, std, prev_given)


@sde_step_bwd.register_fake
def _(grad_prev, grad_mean, grad_logp, sample, velocity, prev_sample, a, b, std, prev_given):
    return torch.empty_like(sample), torch.empty_like(velocity)


def _sde_setup(ctx, inputs, output):
    sample, velocity, a, b, std, noise, prev_sample = inputs
    ctx.prev_given = prev_sample is not None
    ctx.save_for_backward(sample, velocity, output[0], a, b, std)


def _sde_backward(ctx, grad_prev, grad_mean, grad_logp):
    sample, velocity, prev, a, b, std = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return (None,) * 7
    dsample, dvelocity = sde_step_bwd(grad_prev, grad_mean, grad_logp, sample, velocity, prev, a, b, std,
                                      ctx.prev_given)
    return dsample, dvelocity, None, None, None, None, None


sde_step.register_autograd(_sde_backward, setup_context=_sde_setup)


# 3. GRPO clipped surrogate ---------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::grpo_clip_loss", mutates_args=())
def grpo_clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, weights: Tensor, clip_range: float,
                   adv_clip: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backend_for(logp.device).grpo_clip_loss_fwd(logp, old_logp, adv, weights, clip_range, adv_clip)


@grpo_clip_loss.register_fake
def _(logp, old_logp, adv, weights, clip_range, adv_clip):
    dt = _acc(logp)
    scalar = logp.new_empty((), dtype=dt)
    return scalar, logp.new_empty(logp.shape, dtype=dt), scalar.clone(), scalar.clone()


@torch.library.custom_op(f"{_NS}::grpo_clip_loss_bwd", mutates_args=())
def grpo_clip_loss_bwd(grad_loss: Tensor, logp: Tensor, old_logp: Tensor, adv: Tensor, weights: Tensor,
                       clip_range: float, adv_clip: float) -> Tensor:
    return backend_for(logp.device).grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, clip_range,
                                                        adv_clip)


@grpo_clip_loss_bwd.register_fake
def _(grad_loss, logp, old_logp, adv, weights, clip_range, adv_clip):
    return logp.new_empty(logp.shape, dtype=_acc(logp))


def _clip_setup(ctx, inputs, output):
    logp, old_logp, adv, weights, clip_range, adv_clip = inputs
    ctx.clip_range, ctx.adv_clip = clip_range, adv_clip
    ctx.save_for_backward(logp, old_logp, adv, weights)
    ctx.mark_non_differentiable(*output[1:])


def _clip_backward(ctx, grad_loss, grad_ratio, grad_clip_frac, grad_approx_kl):
    logp, old_logp, adv, weights = ctx.saved_tensors
    dlogp = None
    if ctx.needs_input_grad[0]:
        dlogp = grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, ctx.clip_range, ctx.adv_clip)
        dlogp = dlogp.to(logp.dtype)
    return dlogp, None, None, None, None, None


grpo_clip_loss.register_autograd(_clip_backward, setup_context=_clip_setup)


# 4. fused Flow-GRPO loss -----------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::flow_grpo_loss", mutates_args=())
def flow_grpo_loss(mean: Tensor, samples: Tensor, std: Tensor, old_logp: Tensor, adv: Tensor, weights: Tensor,
                   ref_mean: Optional[Tensor], kl_std: Tensor, clip_range: float, adv_clip: float,
                   beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backend_for(mean.device).flow_grpo_loss_fwd(mean, samples, std, old_logp, adv, weights, ref_mean,
                                                       kl_std, clip_range, adv_clip, beta)


@flow_grpo_loss.register_fake
def _(mean, samples, std, old_logp, adv, weights, ref_mean, kl_std, clip_range, adv_clip, beta):
    dt = _acc(mean)
    scalar = mean.new_empty((), dtype=dt)
    nk = mean.new_empty(old_logp.shape, dtype=dt)
    return scalar, nk, nk.clone(), scalar.clone(), scalar.clone(), scalar.clone()


@torch.library.custom_op(f"{_NS}::flow_grpo_loss_bwd", mutates_args=())
def flow_grpo_loss_bwd(grad_loss: Tensor, mean: Tensor, samples: Tensor, std: Tensor, logp: Tensor,
                       old_logp: Tensor, adv: Tensor, weights: Tensor, ref_mean: Optional[Tensor], kl_std: Tensor,
                       clip_range: float, adv_clip: float, beta: float) -> Tensor:
    return backend_for(mean.device).flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights,
                                                       ref_mean, kl_std, clip_range, adv_clip, beta)


@flow_grpo_loss_bwd.register_fake
def _(grad_loss, mean, samples, std, logp, old_logp, adv, weights, ref_mean, kl_std, clip_range, adv_clip, beta):
    return torch.empty_like(mean)


def _flow_setup(ctx, inputs, output):
    mean, samples, std, old_logp, adv, weights, ref_mean, kl_std, clip_range, adv_clip, beta = inputs
    ctx.hparams = (clip_range, adv_clip, beta)
    ctx.has_ref = ref_mean is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(mean, samples, std, output[1], old_logp, adv, weights, kl_std,
                          *((ref_mean,) if ref_mean is not None else ()))


def _flow_backward(ctx, grad_loss, grad_logp, grad_ratio, grad_clip_frac, grad_approx_kl, grad_kl):
    mean, samples, std, logp, old_logp, adv, weights, kl_std, *ref = ctx.saved_tensors
    dmean = None
    if ctx.needs_input_grad[0]:
        dmean = flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights,
                                   ref[0] if ctx.has_ref else None, kl_std, *ctx.hparams)
    return (dmean,) + (None,) * 10


flow_grpo_loss.register_autograd(_flow_backward, setup_context=_flow_setup)
