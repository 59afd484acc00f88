"""Triton backend: host launchers for the kernels in tempflow_fast.kernels.flow_grpo, one per
primitive of the contract (see tempflow_fast.ops.reference for the math and the signatures).

Inputs arrive validated and contiguous from the public layer. On CPU tensors the kernels run
only through the Triton interpreter, which must be enabled (TRITON_INTERPRET=1) before the kernel
module is imported: `interpreted()` reports whether it was.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from tempflow_fast.kernels import flow_grpo as K_

# Elements of one [BLOCK_K, BLOCK_D] tile: 2048 fp32 values are 16 registers a thread at 4 warps
# for the accumulator (and as many for the loaded tile). At 4096 the AOT report showed 122
# registers for sq_dist_partial_kernel on sm_90, which halves occupancy of a memory-bound kernel.
_TILE = 2048
_MAX_BLOCK_D = 1024
_REDUCE_BLOCK = 1024


def interpreted() -> bool:
    """True when the kernels were built by the interpreter (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K_.sq_dist_partial_kernel, InterpretedFunction)


def _acc(t: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck) inputs."""
    return (torch.float64, tl.float64) if t.dtype == torch.float64 else (torch.float32, tl.float32)


def _blocks(k: int, d: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(max(k, 1))
    block_d = max(16, min(_MAX_BLOCK_D, _TILE // block_k, triton.next_power_of_2(d)))
    return block_k, block_d


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on a GPU; a few on the interpreter, which keeps
    the split-D path exercised by the CPU tests."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _splits(n: int, d: int, block_d: int, device: torch.device) -> tuple[int, int]:
    """(S, chunk): split each row's D into S chunks (multiples of block_d) so that N·S programs
    fill the device."""
    return split_sizes(n, d, block_d, _target_programs(device))


def split_sizes(n: int, d: int, block_d: int, target: int) -> tuple[int, int]:
    """(S, chunk) for `target` programs (kernels/aot.py reproduces the launches of a given GPU)."""
    blocks = triton.cdiv(d, block_d)
    s = max(1, min(blocks, triton.cdiv(target, n)))
    chunk = triton.cdiv(blocks, s) * block_d
    return triton.cdiv(d, chunk), chunk


def _sq_dist_partials(samples, mean, ref_mean=None):
    """(part[N,S,K], kl_part[N,S] or None, S) for samples (N,K,D), mean (N,D)."""
    n, k, d = samples.shape
    acc_t, acc_tl = _acc(mean)
    block_k, block_d = _blocks(k, d)
    s, chunk = _splits(n, d, block_d, mean.device)
    part = torch.empty((n, s, k), dtype=acc_t, device=mean.device)
    kl_part = torch.empty((n, s), dtype=acc_t, device=mean.device) if ref_mean is not None else part
    K_.sq_dist_partial_kernel[(n, s)](
        samples, mean, ref_mean if ref_mean is not None else mean, part, kl_part, k, d, chunk, s,
        HAS_REF=ref_mean is not None, ACC=acc_tl, BLOCK_K=block_k, BLOCK_D=block_d)
    return part, (kl_part if ref_mean is not None else None), s


def _finalize_logp(part, std, n, k, s, d, acc_t, acc_tl):
    logp = torch.empty((n, k), dtype=acc_t, device=part.device)
    K_.logp_finalize_kernel[(triton.cdiv(n * k, _REDUCE_BLOCK),)](
        part, std, logp, n * k, k, s, d, ACC=acc_tl, BLOCK=_REDUCE_BLOCK)
    return logp


def _on_tensor_device(fn):
    """Launch on the inputs' GPU, not the current one (Triton launches on the current device)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)
    return wrapper


# 1. Gaussian log-prob --------------------------------------------------------------------------

@_on_tensor_device
def gaussian_log_prob_fwd(samples, mean, std):
    n, k, d = samples.shape
    acc_t, acc_tl = _acc(mean)
    part, _, s = _sq_dist_partials(samples, mean)
    return _finalize_logp(part, std, n, k, s, d, acc_t, acc_tl)


@_on_tensor_device
def gaussian_log_prob_bwd(grad_logp, samples, mean, std):
    n, k, d = samples.shape
    _, acc_tl = _acc(mean)
    block_k, block_d = _blocks(k, d)
    dmean = torch.empty_like(mean)
    K_.gaussian_log_prob_bwd_kernel[(n, triton.cdiv(d, block_d))](
        grad_logp.contiguous(), samples, mean, std, dmean, k, d, ACC=acc_tl, BLOCK_K=block_k, BLOCK_D=block_d)
    return dmean


# 2. SDE step -----------------------------------------------------------------------------------

@_on_tensor_device
def sde_step_fwd(sample, velocity, a, b, std, noise=None, prev_sample=None):
    if (noise is None) == (prev_sample is None):
        raise ValueError("sde_step_fwd: pass exactly one of noise / prev_sample")
    n, d = sample.shape
    acc_t, acc_tl = _acc(sample)
    _, block_d = _blocks(1, d)
    s, chunk = _splits(n, d, block_d, sample.device)
    prev = torch.empty_like(sample)
    mean = torch.empty_like(sample)
    part = torch.empty((n, s, 1), dtype=acc_t, device=sample.device)
    given = prev_sample is not None
    K_.sde_step_fwd_kernel[(n, s)](
        sample, velocity, sample if given else noise, prev_sample if given else sample, a, b, std,
        prev, mean, part, d, chunk, s, PREV_GIVEN=given, ACC=acc_tl, BLOCK_D=block_d)
    logp = _finalize_logp(part, std, n, 1, s, d, acc_t, acc_tl)[:, 0]
    return prev, mean, logp


@_on_tensor_device
def sde_step_bwd(grad_prev, grad_mean, grad_logp, sample, velocity, prev_sample, a, b, std, prev_given: bool):
    n, d = sample.shape
    _, acc_tl = _acc(sample)
    _, block_d = _blocks(1, d)
    if prev_given:
        grad_prev = None
    dsample = torch.empty_like(sample)
    dvelocity = torch.empty_like(velocity)
    K_.sde_step_bwd_kernel[(n, triton.cdiv(d, block_d))](
        grad_prev if grad_prev is not None else sample, grad_mean if grad_mean is not None else sample,
        grad_logp if grad_logp is not None else a, sample, velocity, prev_sample, a, b, std, dsample, dvelocity, d,
        HAS_GRAD_PREV=grad_prev is not None, HAS_GRAD_MEAN=grad_mean is not None,
        HAS_GRAD_LOGP=grad_logp is not None, ACC=acc_tl, BLOCK_D=block_d)
    return dsample, dvelocity


# 3. GRPO clipped surrogate ---------------------------------------------------------------------

@_on_tensor_device
def grpo_clip_loss_fwd(logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    m = logp.numel()
    acc_t, acc_tl = _acc(logp)
    ratio = torch.empty(m, dtype=acc_t, device=logp.device)
    stats = torch.empty(3, dtype=acc_t, device=logp.device)
    K_.grpo_clip_loss_fwd_kernel[(1,)](
        logp, old_logp, adv, weights, ratio, stats, m,
        CLIP=float(clip_range), ADV_CLIP=float(adv_clip), ACC=acc_tl, BLOCK=_REDUCE_BLOCK)
    # separate tensors: custom-op outputs must not alias each other
    return stats[0].clone(), ratio, stats[1].clone(), stats[2].clone()


@_on_tensor_device
def grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    m = logp.numel()
    acc_t, acc_tl = _acc(logp)
    dlogp = torch.empty(m, dtype=acc_t, device=logp.device)
    K_.grpo_clip_loss_bwd_kernel[(triton.cdiv(m, _REDUCE_BLOCK),)](
        grad_loss.to(acc_t).contiguous(), logp, old_logp, adv, weights, dlogp, m,
        CLIP=float(clip_range), ADV_CLIP=float(adv_clip), ACC=acc_tl, BLOCK=_REDUCE_BLOCK)
    return dlogp


# 4. fused Flow-GRPO loss -----------------------------------------------------------------------

@_on_tensor_device
def flow_grpo_loss_fwd(mean, samples, std, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    n, k, d = samples.shape
    acc_t, acc_tl = _acc(mean)
    part, kl_part, s = _sq_dist_partials(samples, mean, ref_mean)
    logp = torch.empty((n, k), dtype=acc_t, device=mean.device)
    ratio = torch.empty((n, k), dtype=acc_t, device=mean.device)
    stats = torch.empty(4, dtype=acc_t, device=mean.device)
    has_ref = ref_mean is not None
    K_.flow_grpo_loss_finalize_kernel[(1,)](
        part, kl_part if has_ref else part, std, old_logp, adv, weights, kl_std, logp, ratio, stats, n, k, s, d,
        CLIP=float(clip_range), ADV_CLIP=float(adv_clip), BETA=float(beta), HAS_REF=has_ref, ACC=acc_tl,
        BLOCK=_REDUCE_BLOCK)
    return stats[0].clone(), logp, ratio, stats[1].clone(), stats[2].clone(), stats[3].clone()


@_on_tensor_device
def flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    n, k, d = samples.shape
    acc_t, acc_tl = _acc(mean)
    block_k, block_d = _blocks(k, d)
    dmean = torch.empty_like(mean)
    has_ref = ref_mean is not None
    K_.flow_grpo_loss_bwd_kernel[(n, triton.cdiv(d, block_d))](
        grad_loss.to(acc_t).contiguous(), samples, mean, ref_mean if has_ref else mean, std, kl_std,
        logp.contiguous(), old_logp, adv, weights, dmean, n, k, d,
        CLIP=float(clip_range), ADV_CLIP=float(adv_clip), BETA=float(beta), HAS_REF=has_ref, ACC=acc_tl,
        BLOCK_K=block_k, BLOCK_D=block_d)
    return dmean
