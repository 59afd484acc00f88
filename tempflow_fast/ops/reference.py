"""Pure-PyTorch reference of the fused-op primitives (design.md §1 and the backend contract).

This module is the oracle every other backend (Triton, C++) is tested against and the `torch`
fallback backend. Every function is written for clarity, not speed: inputs are upcast to fp32,
the math is the formula of the contract, and each backward is the *explicit* gradient formula
(not autograd), so a backend's backward kernel is checked against the same closed form.

Shapes: N rows (one mean each), K samples sharing a mean, D flattened latent elements, M scored
samples. Per-row scalars (a, b, std, weights, kl_std) are fp32 tensors; only the true
hyper-parameters clip_range (ε), adv_clip and beta (β) are Python floats.

Outputs: log-probs, ratios, losses and statistics are fp32 (fp64 for fp64 inputs, which exist
only for gradcheck); latent-shaped outputs (prev_sample,
mean, gradients) are in the input dtype.

Non-finite inputs poison the result: NaN or ±inf in any input of the two losses (log-probs, old
log-probs, advantages, weights, latents, std, ref_mean, kl_std) makes the loss and the gradient
NaN (or ±inf), on every backend. IEEE arithmetic alone does not give that here: a sample infinitely
far from the mean has logp = -inf, r = 0 and a finite surrogate, and clamping an infinite advantage
gives ±adv_clip. So each per-sample term adds `_nonfinite_to_nan` of its scalars (0 when finite),
and every min/max/clamp propagates NaN (torch's do; C++'s std::min/max and Triton's
tl.minimum/maximum by default do not, and their backends say so where they differ).

One choice the contract leaves open and that every backend must share: `sde_step_fwd` scores the
prev_sample it *returns*, i.e. after rounding to the input dtype (identical for fp32). The
trainer later re-scores the stored low-precision sample, so this keeps the first-iteration ratio
at exactly the number the rollout recorded.
"""

from __future__ import annotations

import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 math for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 so fp64 gradcheck is exact."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _nonfinite_to_nan(t: torch.Tensor) -> torch.Tensor:
    """0 where t is finite, NaN where it is NaN or ±inf."""
    return t * 0.0


# 1. Gaussian log-prob (mean over D) ------------------------------------------------------------

def gaussian_log_prob_fwd(samples: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """logp[n,k] = mean_d[-(x[n,k,d]-μ[n,d])² / (2σ_n²)] - log σ_n - ½log 2π.  (N,K,D),(N,D),(N,) -> (N,K)"""
    x, mu, s = _f32(samples), _f32(mean)[:, None, :], _f32(std)[:, None]
    return -((x - mu) ** 2).mean(-1) / (2 * s**2) - torch.log(s) - HALF_LOG_2PI


def gaussian_log_prob_bwd(grad_logp, samples, mean, std) -> torch.Tensor:
    """dmean[n,d] = Σ_k grad_logp[n,k]·(x[n,k,d]-μ[n,d]) / (σ_n²·D).  Gradient reaches the mean only.
    NaN for a non-finite σ_n (σ = inf alone would give 0)."""
    x, mu, s = _f32(samples), _f32(mean)[:, None, :], _f32(std)[:, None]
    D = samples.shape[-1]
    dmean = (_f32(grad_logp)[:, :, None] * (x - mu)).sum(1) / (s**2 * D) + _nonfinite_to_nan(s)
    return dmean.to(mean.dtype)


# 2. One SDE step, linear in (x, v): μ = a·x + b·v --------------------------------------------

def sde_step_fwd(sample, velocity, a, b, std, noise=None, prev_sample=None):
    """(prev_sample[N,D], mean[N,D], logp[N]).  Exactly one of noise / prev_sample is given:
    prev = μ + std·noise, or the given prev_sample is scored."""
    if (noise is None) == (prev_sample is None):
        raise ValueError("sde_step_fwd: pass exactly one of noise / prev_sample")
    dtype = sample.dtype
    mu = _f32(a)[:, None] * _f32(sample) + _f32(b)[:, None] * _f32(velocity)
    if prev_sample is None:
        prev = (mu + _f32(std)[:, None] * _f32(noise)).to(dtype)
    else:
        prev = prev_sample.clone()
    logp = gaussian_log_prob_fwd(prev[:, None, :], mu, std)[:, 0]
    return prev, mu.to(dtype), logp


def sde_step_bwd(grad_prev, grad_mean, grad_logp, sample, velocity, prev_sample, a, b, std, prev_given: bool):
    """(dsample, dvelocity). dμ = grad_mean + grad_prev (only when prev came from noise, where
    ∂prev/∂μ = 1) + grad_logp·(prev-μ)/(std²·D) (prev treated as data, as Flow-GRPO detaches it);
    dsample = a·dμ, dvelocity = b·dμ. A given prev_sample receives no gradient."""
    D = sample.shape[-1]
    a32, b32, s = _f32(a)[:, None], _f32(b)[:, None], _f32(std)[:, None]
    dmu = torch.zeros_like(_f32(sample))
    if grad_mean is not None:
        dmu = dmu + _f32(grad_mean)
    if grad_prev is not None and not prev_given:
        dmu = dmu + _f32(grad_prev)
    if grad_logp is not None:
        mu = a32 * _f32(sample) + b32 * _f32(velocity)
        dmu = dmu + _f32(grad_logp)[:, None] * (_f32(prev_sample) - mu) / (s**2 * D)
    return (a32 * dmu).to(sample.dtype), (b32 * dmu).to(velocity.dtype)


# 3. GRPO clipped surrogate -------------------------------------------------------------------

def _ppo_poison(logp, old_logp, adv, weights):
    """0 per sample, or NaN where any of its scalars is non-finite (see the module docstring)."""
    return sum(_nonfinite_to_nan(_f32(t)) for t in (logp, old_logp, adv, weights))


def _ppo_terms(logp, old_logp, adv, clip_range: float, adv_clip: float):
    r = torch.exp(_f32(logp) - _f32(old_logp))
    A = _f32(adv).clamp(-adv_clip, adv_clip)  # torch.clamp keeps NaN
    unclipped = -A * r
    clipped = -A * r.clamp(1.0 - clip_range, 1.0 + clip_range)
    return r, A, unclipped, clipped


def grpo_clip_loss_fwd(logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    """(loss[], ratio[M], clip_frac[], approx_kl[]). per = w·max(-A·r, -A·clip(r, 1-ε, 1+ε)),
    loss = mean(per), clip_frac = mean(|r-1| > ε), approx_kl = mean(½(logp-old)²)."""
    r, _, unclipped, clipped = _ppo_terms(logp, old_logp, adv, clip_range, adv_clip)
    per = _f32(weights) * torch.maximum(unclipped, clipped)  # torch.maximum keeps NaN
    loss = (per + _ppo_poison(logp, old_logp, adv, weights)).mean()
    clip_frac = ((r - 1.0).abs() > clip_range).float().mean()
    approx_kl = (0.5 * (_f32(logp) - _f32(old_logp)) ** 2).mean()
    return loss, r, clip_frac, approx_kl


def _dloss_dlogp(logp, old_logp, adv, weights, clip_range, adv_clip):
    """g = ∂loss/∂logp before the 1/M of the mean: -w·A·r where the unclipped term is active,
    0 where the clipped (constant) term strictly wins (the PPO rule; ties take the unclipped side)."""
    r, A, unclipped, clipped = _ppo_terms(logp, old_logp, adv, clip_range, adv_clip)
    g = torch.where(clipped > unclipped, torch.zeros_like(r), -_f32(weights) * A * r)
    return g + _ppo_poison(logp, old_logp, adv, weights)


def grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    """dlogp[M] = grad_loss · g / M."""
    g = _dloss_dlogp(logp, old_logp, adv, weights, clip_range, adv_clip)
    return _f32(grad_loss) * g / logp.numel()


# 4. Fused Flow-GRPO loss: K samples scored against one mean, + KL to the reference mean ------

def flow_grpo_loss_fwd(mean, samples, std, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    """(loss[], logp[N,K], ratio[N,K], clip_frac[], approx_kl[], kl[]).
    policy = mean over N·K of w_n·max(-A·r, -A·clip(r)); kl = mean_n[mean_d((μ-μ_ref)²)/(2·kl_std_n²)]
    (0 without ref_mean); loss = policy + β·kl."""
    N, K = old_logp.shape
    logp = gaussian_log_prob_fwd(samples, mean, std)
    w = _f32(weights)[:, None].expand(N, K)
    policy, ratio, clip_frac, approx_kl = grpo_clip_loss_fwd(
        logp.reshape(-1), _f32(old_logp).reshape(-1), _f32(adv).reshape(-1), w.reshape(-1), clip_range, adv_clip)
    if ref_mean is None:
        kl = _f32(mean).new_zeros(())
    else:
        sq = ((_f32(mean) - _f32(ref_mean)) ** 2).mean(-1)
        kl = (sq / (2 * _f32(kl_std) ** 2) + _nonfinite_to_nan(_f32(kl_std))).mean()
    loss = policy + beta * kl
    return loss, logp, ratio.reshape(N, K), clip_frac, approx_kl, kl


def flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    """dmean[n,d] = grad_loss·( Σ_k g[n,k]·(x-μ)/(σ_n²·D) + β·(μ-μ_ref)/(N·kl_std_n²·D) ),
    g[n,k] = -w_n·A·r/(N·K) where the unclipped term is active, else 0."""
    N, K = old_logp.shape
    D = mean.shape[-1]
    w = _f32(weights)[:, None].expand(N, K)
    g = _dloss_dlogp(logp, old_logp, adv, w, clip_range, adv_clip) / (N * K)
    dmean = _f32(gaussian_log_prob_bwd(g, samples, _f32(mean), std))
    if ref_mean is not None and beta != 0.0:
        ks = _f32(kl_std)[:, None]
        dmean = dmean + beta * (_f32(mean) - _f32(ref_mean)) / (N * ks**2 * D) + _nonfinite_to_nan(ks)
    return (_f32(grad_loss) * dmean).to(mean.dtype)
