"""Public fused-op API (design.md §5): SDE steps with log-probs, Gaussian log-probs, the GRPO
clipped surrogate and the fused Flow-GRPO loss. Needs torch only; triton and the C++ extension are
optional backends picked per device (see `tempflow_fast.ops.backends`).

Conventions (design.md §1): the log-prob of x under N(μ, σ²) is the MEAN over all non-batch
elements of -(x-μ)²/(2σ²), minus log σ + ½log 2π, computed in fp32 whatever the input dtype.
Latent-shaped outputs keep the input dtype; log-probs, ratios and statistics are fp32.

Every function validates its input and raises ValueError naming the argument and what it saw.
Shapes, dtypes and devices are host metadata and always checked. Python floats (σ, η, std,
hyper-parameters) are range-checked on the host, always. Values held in tensors (std > 0, σ ranges,
σ' < σ) are checked only when value checks are on (`TEMPFLOW_FAST_CHECK_VALUES=1` or
`set_value_checks(True)`, a debugging aid): reading a CUDA tensor's data from Python synchronises
the host with the device, which the training hot path must never do. Off (the default), bad values
are not silent either: NaN or ±inf in any input gives a NaN (or infinite) loss and gradient on
every backend, which the trainer counts and skips. Value checks never run under `torch.compile`
tracing or CUDA-graph capture.

Per-step scalars (`sigma`, `sigma_next`, `noise_level`, `std`, `kl_std`) may be Python floats,
0-d tensors or (N,) tensors (one value per row, e.g. rows at different steps).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from tempflow_fast.ops import custom_ops as _ops
from tempflow_fast.ops.backends import BackendUnavailable, active_backend, use_backend

__all__ = [
    "SdeStep", "LossOutput", "ClipLossOutput", "flow_sde_step", "flow_sde_coefficients", "ddim_sde_step",
    "gaussian_log_prob",
    "grpo_clip_loss", "fused_flow_grpo_loss", "active_backend", "use_backend", "BackendUnavailable",
    "set_value_checks", "value_checks_enabled", "CHECK_VALUES_ENV",
]

Scalar = Union[float, Tensor]
_LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SdeStep(NamedTuple):
    """One stochastic step: prev_sample (N,*D, input dtype), log_prob (N,) fp32 = log-prob of
    prev_sample, mean (N,*D) μ of the step, std (N,) fp32 total standard deviation."""
    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


class ClipLossOutput(NamedTuple):
    """grpo_clip_loss: loss (scalar, differentiable), ratio (log_prob's shape), clip_frac, approx_kl
    (detached diagnostics)."""
    loss: Tensor
    ratio: Tensor
    clip_frac: Tensor
    approx_kl: Tensor


class LossOutput(NamedTuple):
    """fused_flow_grpo_loss: loss (scalar, differentiable w.r.t. mean), log_prob (N,K), ratio (N,K),
    clip_frac, approx_kl = mean(½(logp-old)²), kl (the unscaled KL term; loss = policy + β·kl).
    Only `loss` carries gradient; the other fields are detached diagnostics."""
    loss: Tensor
    log_prob: Tensor
    ratio: Tensor
    clip_frac: Tensor
    approx_kl: Tensor
    kl: Tensor


# value checks (a debug flag) -------------------------------------------------------------------

CHECK_VALUES_ENV = "TEMPFLOW_FAST_CHECK_VALUES"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_value_checks: Optional[bool] = None  # set_value_checks' setting; None = the environment decides


def set_value_checks(enabled: Optional[bool]) -> Optional[bool]:
    """Check values held in tensors (std > 0, σ ranges, σ' < σ) in every op call of this process
    (True), never (False), or as `TEMPFLOW_FAST_CHECK_VALUES` says (None, the default: off unless
    it is 1). Each check reads tensor data on the host, a device synchronisation on CUDA: a
    debugging aid, not for the training loop. Returns the previous setting."""
    global _value_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_value_checks: enabled must be True, False or None, got {enabled!r}")
    previous, _value_checks = _value_checks, enabled
    return previous


def value_checks_enabled() -> bool:
    """Whether op calls check values held in tensors (see `set_value_checks`)."""
    if _value_checks is not None:
        return _value_checks
    raw = os.environ.get(CHECK_VALUES_ENV, "").strip().lower()
    if raw not in _ON + _OFF:
        raise ValueError(f"{CHECK_VALUES_ENV} must be 1 or 0, got {raw!r}")
    return raw in _ON


def _eager() -> bool:
    """Whether value checks may read tensor data: only when they are on, not while torch.compile
    traces, and not while a CUDA graph is being captured (a host sync there is an error)."""
    if not value_checks_enabled() or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# validation helpers ----------------------------------------------------------------------------


def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _tensor(name: str, t, min_dim: int = 1) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got {_desc(t)}")
    if t.dim() > 0 and t.numel() == 0:
        raise ValueError(f"{name} is empty, got {_desc(t)}")
    return t


def _latent(name: str, t, min_dim: int = 2) -> Tensor:
    _tensor(name, t, min_dim)
    if t.dtype not in _LATENT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (fp32/fp16/bf16), got {_desc(t)}")
    return t


def _same(name: str, t: Tensor, ref_name: str, ref: Tensor, shape: bool = True, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype} (no dtype mixing)")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _per_row(name: str, value, n: int, like: Tensor, valid: Optional[tuple] = None) -> Tensor:
    """A float, 0-d tensor or (N,) tensor as a contiguous (N,) tensor in the accumulation dtype,
    range-checked with `valid` = (low, high, low_open, high_open) when given (floats on the host,
    tensors through `_check_values`)."""
    dtype = _acc_dtype(like)
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a float or a tensor of shape () or ({n},), got {type(value).__name__}")
    if not isinstance(value, Tensor):
        if valid is not None and _out_of_range(float(value), *valid):
            raise ValueError(f"{name} must lie in {_interval(*valid)} and be finite, got {value!r}")
        return torch.full((n,), float(value), dtype=dtype, device=like.device)
    if value.dim() == 0:
        rows = value.to(device=like.device, dtype=dtype).expand(n).contiguous()
    elif value.shape != (n,):
        raise ValueError(f"{name} must have shape () or ({n},) to match {n} rows, got {_desc(value)}")
    elif value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the latents are on {like.device}")
    else:
        rows = value.to(dtype).contiguous()
    if valid is not None:
        _check_values(name, rows, *valid)
    return rows


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"


def _out_of_range(v: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    return (not math.isfinite(v) or (v <= low if low_open else v < low) or (v >= high if high_open else v > high))


def _check_values(name: str, t: Tensor, low: float, high: float = math.inf, low_open: bool = True,
                  high_open: bool = False) -> None:
    """Range check; it reads the data, so it runs only when value checks are on (see `_eager`)."""
    if not _eager():
        return
    bad = ~torch.isfinite(t) if high == math.inf else torch.isnan(t)
    bad = bad | ((t <= low) if low_open else (t < low)) | ((t >= high) if high_open else (t > high))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in {_interval(low, high, low_open, high_open)} and be finite, got "
                         f"{t[bad][:4].tolist()} (shape {tuple(t.shape)})")


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).contiguous()


_POSITIVE = (0.0, math.inf, True, False)


def _steps_forward_violated(sigma, sigma_next, sig: Tensor, sig_next: Tensor) -> bool:
    """σ' < σ must hold (sampling runs from noise to data); floats are compared on the host,
    tensors only when value checks are on."""
    if not isinstance(sigma, Tensor) and not isinstance(sigma_next, Tensor):
        return float(sigma_next) >= float(sigma)
    return _eager() and bool((sig_next >= sig).any())


# SDE steps -------------------------------------------------------------------------------------

def _check_step_inputs(sample, velocity, noise, prev_sample):
    _latent("sample", sample)
    _latent("velocity", velocity)
    _same("velocity", velocity, "sample", sample)
    if noise is not None and prev_sample is not None:
        raise ValueError("pass at most one of noise / prev_sample (prev_sample is scored, noise draws a new one)")
    if noise is not None:
        _tensor("noise", noise)
        _same("noise", noise, "sample", sample, dtype=False)
    if prev_sample is not None:
        _latent("prev_sample", prev_sample)
        _same("prev_sample", prev_sample, "sample", sample)


def _run_step(sample, velocity, a, b, std, noise, prev_sample, generator) -> SdeStep:
    shape = sample.shape
    if noise is None and prev_sample is None:
        gen_device = generator.device if generator is not None else sample.device
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=_acc_dtype(sample))
        noise = noise.to(sample.device)
    if noise is not None:
        noise = _rows(noise.to(sample.dtype))
    prev, mean, logp = _ops.sde_step(_rows(sample), _rows(velocity), a, b, std, noise,
                                     None if prev_sample is None else _rows(prev_sample))
    return SdeStep(prev.reshape(shape), logp, mean.reshape(shape), std)


def flow_sde_step(sample: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar, *,
                  sigma_max: Optional[Scalar] = None, noise: Optional[Tensor] = None,
                  prev_sample: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> SdeStep:
    """Flow-GRPO's SDE step from σ = `sigma` to σ' = `sigma_next` (dt = σ' - σ < 0), noise level η:

        s = η·sqrt(σ / (1 - σ̃)),  σ̃ = sigma_max where σ == 1 else σ
        μ = x·(1 + s²·dt/(2σ)) + v·(1 + s²·(1-σ)/(2σ))·dt,   std = s·sqrt(-dt),   x' = μ + std·ξ

    `sigma_max` is the σ==1 guard (s would be infinite at σ = 1): Flow-GRPO passes the scheduler's
    `sigmas[1]` there, and so should callers whose schedule starts at σ = 1; it is required when
    any σ equals 1 (checked for a float σ, and for a tensor σ when value checks are on; without it
    such a row's outputs are NaN) and unused otherwise. Give `noise` (ξ, shape of sample) to fix the draw, or
    `prev_sample` to score an existing x' (e.g. the training pass re-scoring a rollout), or
    neither to draw ξ ~ N(0, I) with `generator`. Returns SdeStep(prev_sample, log_prob, mean, std);
    gradients flow to sample and velocity (through mean, prev_sample when drawn, and log_prob).
    """
    _check_step_inputs(sample, velocity, noise, prev_sample)
    n = sample.shape[0]
    sig = _per_row("sigma", sigma, n, sample, valid=(0.0, 1.0, True, False))
    sig_next = _per_row("sigma_next", sigma_next, n, sample, valid=(0.0, 1.0, False, True))
    eta = _per_row("noise_level", noise_level, n, sample, valid=(0.0, math.inf, True, False))
    if _steps_forward_violated(sigma, sigma_next, sig, sig_next):
        raise ValueError(f"sigma_next must be < sigma (sampling runs σ from 1 down to 0), got sigma "
                         f"{sig[:4].tolist()} and sigma_next {sig_next[:4].tolist()}")
    if sigma_max is None:
        at_one = (_eager() and bool((sig == 1.0).any())) if isinstance(sigma, Tensor) else float(sigma) == 1.0
        if at_one:
            raise ValueError("sigma == 1 needs sigma_max (σ̃ of the σ==1 guard; Flow-GRPO passes the "
                             "scheduler's sigmas[1]), got sigma_max=None")
        sig_max = None
    else:
        sig_max = _per_row("sigma_max", sigma_max, n, sample, valid=(0.0, 1.0, True, True))
    _, a, b, std = flow_sde_coefficients(sig, sig_next, eta, sig_max)
    _check_values("std (from sigma, sigma_next, noise_level)", std, 0.0)
    return _run_step(sample, velocity, a, b, std, noise, prev_sample, generator)


def flow_sde_coefficients(sigma: Tensor, sigma_next: Tensor, noise_level: Tensor, sigma_max: Optional[Tensor]):
    """(s, a, b, std) of Flow-GRPO's SDE step for (N,) tensors: the noise scale
    s = η·sqrt(σ/(1-σ̃)) (Flow-GRPO's `std_dev_t`), μ = a·x + b·v, std = s·sqrt(-dt). No validation."""
    sig_guard = sigma if sigma_max is None else torch.where(sigma == 1.0, sigma_max, sigma)
    s = noise_level * torch.sqrt(sigma / (1.0 - sig_guard))
    dt = sigma_next - sigma
    a = 1.0 + s**2 * dt / (2.0 * sigma)
    b = (1.0 + s**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    return s, a.contiguous(), b.contiguous(), std.contiguous()


def ddim_sde_step(sample: Tensor, velocity: Tensor, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar, *,
                  noise: Optional[Tensor] = None, prev_sample: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> SdeStep:
    """DDIM-style SDE step (Stepwise-Flow-GRPO; Flow-GRPO's "CPS" variant) from σ to σ':

        x̂0 = x - σ·v,  x̂1 = x + (1-σ)·v,  std = σ'·sin(η·π/2),
        μ = (1-σ')·x̂0 + sqrt(σ'² - std²)·x̂1,   x' = μ + std·ξ

    std is 0 at σ' = 0, where no log-prob exists: take the last step with the ODE instead
    (sigma_next must be > 0). Arguments and return as in `flow_sde_step`.
    """
    _check_step_inputs(sample, velocity, noise, prev_sample)
    n = sample.shape[0]
    sig = _per_row("sigma", sigma, n, sample, valid=(0.0, 1.0, True, False))
    sig_next = _per_row("sigma_next", sigma_next, n, sample, valid=(0.0, 1.0, True, True))
    eta = _per_row("noise_level", noise_level, n, sample, valid=(0.0, 1.0, True, False))
    if _steps_forward_violated(sigma, sigma_next, sig, sig_next):
        raise ValueError(f"sigma_next must be < sigma, got sigma {sig[:4].tolist()} and sigma_next "
                         f"{sig_next[:4].tolist()}")
    std = (sig_next * torch.sin(eta * (math.pi / 2))).contiguous()
    c = torch.sqrt(torch.clamp(sig_next**2 - std**2, min=0.0))
    a = (1.0 - sig_next + c).contiguous()
    b = (-(1.0 - sig_next) * sig + c * (1.0 - sig)).contiguous()
    return _run_step(sample, velocity, a, b, std, noise, prev_sample, generator)


# log-probs and losses --------------------------------------------------------------------------

def gaussian_log_prob(samples: Tensor, mean: Tensor, std: Scalar) -> Tensor:
    """log N(samples | mean, std²), mean over all non-batch elements: (N,K) for samples (N,K,*D),
    (N,) for samples (N,*D). `std` is a float, 0-d or (N,) tensor, > 0. Gradient flows to mean."""
    _latent("mean", mean)
    _latent("samples", samples)
    _same("samples", samples, "mean", mean, shape=False)
    n = mean.shape[0]
    if samples.shape == mean.shape:
        flat = _rows(samples)[:, None, :]
        squeeze = True
    elif samples.dim() == mean.dim() + 1 and samples.shape[0] == n and samples.shape[2:] == mean.shape[1:]:
        flat = samples.reshape(n, samples.shape[1], -1).contiguous()
        squeeze = False
    else:
        raise ValueError(f"samples must have shape (N, K, *D) or (N, *D) for mean of shape (N, *D) = "
                         f"{tuple(mean.shape)}, got {tuple(samples.shape)}")
    std_rows = _per_row("std", std, n, mean, valid=_POSITIVE)
    logp = _ops.gaussian_log_prob(flat, _rows(mean), std_rows)
    return logp[:, 0] if squeeze else logp


def _scored(name: str, t, like: Tensor) -> Tensor:
    """old_log_prob / advantages / weights: float tensors of `like`'s shape, upcast to fp32."""
    _tensor(name, t, min_dim=0)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {_desc(t)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but log_prob/mean is on {like.device}")
    return t.to(_acc_dtype(like))


def grpo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float,
                   weights: Optional[Tensor] = None, adv_clip: float = 5.0) -> ClipLossOutput:
    """GRPO clipped surrogate: r = exp(log_prob - old_log_prob), A = clamp(advantages, ±adv_clip),
    loss = mean(w·max(-A·r, -A·clip(r, 1-ε, 1+ε))), ε = clip_range. All three tensors share one
    shape (any); `weights` broadcasts to it (default 1). Gradient flows to log_prob only.
    Returns ClipLossOutput(loss, ratio, clip_frac = mean(|r-1| > ε), approx_kl = mean(½(Δlogp)²))."""
    _tensor("log_prob", log_prob, min_dim=1)
    if not log_prob.is_floating_point():
        raise ValueError(f"log_prob must be a floating tensor, got {_desc(log_prob)}")
    shape = log_prob.shape
    old = _scored("old_log_prob", old_log_prob, log_prob)
    adv = _scored("advantages", advantages, log_prob)
    for name, t in (("old_log_prob", old), ("advantages", adv)):
        if t.shape != shape:
            raise ValueError(f"{name} must have log_prob's shape {tuple(shape)}, got {tuple(t.shape)}")
    if weights is None:
        w = torch.ones(shape, dtype=_acc_dtype(log_prob), device=log_prob.device)
    else:
        w = _scored("weights", weights, log_prob)
        try:
            w = w.expand(shape)
        except RuntimeError:
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to log_prob's "
                             f"shape {tuple(shape)}") from None
    _check_hparams(clip_range, adv_clip)
    # log-probs enter the primitives in fp32 (the contract); autograd casts the gradient back
    flat = [t.reshape(-1).contiguous() for t in (log_prob.to(_acc_dtype(log_prob)), old, adv, w)]
    loss, ratio, clip_frac, approx_kl = _ops.grpo_clip_loss(*flat, float(clip_range), float(adv_clip))
    return ClipLossOutput(loss, ratio.reshape(shape), clip_frac, approx_kl)


def _check_hparams(clip_range, adv_clip, beta=0.0) -> None:
    for name, v, low in (("clip_range", clip_range, 0.0), ("adv_clip", adv_clip, 0.0), ("beta", beta, None)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (low is not None and v <= low) or v < 0:
            raise ValueError(f"{name} must be a finite Python float{' > 0' if low is not None else ' >= 0'} "
                             f"(a hyper-parameter, compiled into the kernels), got {v!r}")


def fused_flow_grpo_loss(mean: Tensor, samples: Tensor, std: Scalar, old_log_prob: Tensor, advantages: Tensor, *,
                         clip_range: float, weights: Optional[Tensor] = None, adv_clip: float = 5.0,
                         ref_mean: Optional[Tensor] = None, beta: float = 0.0,
                         kl_std: Optional[Scalar] = None) -> LossOutput:
    """Flow-GRPO loss for K samples sharing one policy mean, in one pass:

        logp[n,k] = log N(samples[n,k] | mean[n], std_n²)  (mean over D)
        policy    = mean over N·K of w_n·max(-A·r, -A·clip(r, 1-ε, 1+ε)),  r = exp(logp - old_log_prob)
        kl        = mean_n[ mean_d((mean - ref_mean)²) / (2·kl_std_n²) ]   (0 without ref_mean)
        loss      = policy + β·kl

    mean (N,*D); samples (N,K,*D); std, kl_std floats / 0-d / (N,); old_log_prob, advantages (N,K);
    weights (N,) step weights w_n (default 1). kl_std defaults to std (the exact Gaussian KL between
    the two step distributions); pass the SDE's s (without sqrt(-dt)) for Flow-GRPO's convention.
    Gradient flows to mean only. Returns LossOutput(loss, log_prob, ratio, clip_frac, approx_kl, kl).
    """
    _latent("mean", mean)
    _latent("samples", samples, min_dim=3)
    _same("samples", samples, "mean", mean, shape=False)
    n = mean.shape[0]
    if samples.dim() != mean.dim() + 1 or samples.shape[0] != n or samples.shape[2:] != mean.shape[1:]:
        raise ValueError(f"samples must have shape (N, K, *D) for mean of shape (N, *D) = {tuple(mean.shape)}, "
                         f"got {tuple(samples.shape)}")
    k = samples.shape[1]
    old = _scored("old_log_prob", old_log_prob, mean)
    adv = _scored("advantages", advantages, mean)
    for name, t in (("old_log_prob", old), ("advantages", adv)):
        if t.shape != (n, k):
            raise ValueError(f"{name} must have shape (N, K) = ({n}, {k}) to match samples "
                             f"{tuple(samples.shape)}, got {tuple(t.shape)}")
    if weights is None:
        w = torch.ones(n, dtype=_acc_dtype(mean), device=mean.device)
    else:
        w = _per_row("weights", weights, n, mean)
    if ref_mean is not None:
        _latent("ref_mean", ref_mean)
        _same("ref_mean", ref_mean, "mean", mean)
    _check_hparams(clip_range, adv_clip, beta)
    if beta != 0.0 and ref_mean is None:
        raise ValueError(f"beta = {beta} needs ref_mean (the reference policy's mean), got None")
    std_rows = _per_row("std", std, n, mean, valid=_POSITIVE)
    kl_rows = std_rows if kl_std is None else _per_row("kl_std", kl_std, n, mean, valid=_POSITIVE)
    out = _ops.flow_grpo_loss(
        _rows(mean), samples.reshape(n, k, -1).contiguous(), std_rows, old.contiguous(), adv.contiguous(), w,
        None if ref_mean is None else _rows(ref_mean), kl_rows, float(clip_range), float(adv_clip), float(beta))
    return LossOutput(*out)
