"""Triton kernels of the fused Flow-GRPO ops (forward and backward). Host launchers live in
tempflow_fast.ops.triton_backend; the PyTorch reference of every kernel is
tempflow_fast.ops.reference (same function names without `_kernel`).

Layout: rows n of D contiguous elements; the K samples sharing mean[n] are rows n*K..n*K+K-1 of
samples. Row reductions over D are split in two so a GPU has enough programs even for N = 4 rows
of D = 262144: a (N, S) grid where program (n, s) reduces its chunk of D to one partial per sample
(`partial[n, s, k]`, deterministic, no atomics), then a small kernel combines the S partials and
finishes the per-sample and whole-batch math. Backward kernels are elementwise over (n, D-block)
and recompute μ / g[n,k] instead of storing anything of size (N, K, D).

Every value is loaded and immediately converted to ACC (fp32, or fp64 for fp64 gradcheck): the
interpreter has no bf16 arithmetic and fp16/bf16 inputs must accumulate in fp32 anyway. Per-step
values (std, a, b, weights) are tensors; only the hyper-parameters CLIP (ε), ADV_CLIP and BETA
and the block sizes are constexpr, so a new σ never triggers a recompile. No libdevice calls.

Non-finite inputs poison the loss (the contract of tempflow_fast.ops.reference): every min/max/clamp
propagates NaN (`tl.minimum`/`tl.maximum` drop it by default, which turned a NaN advantage into
-ADV_CLIP), and a per-sample term adds `_nonfinite_to_nan` of its log-prob, old log-prob, advantage
and weight, so that ±inf there (an infinitely far sample gives logp = -inf, r = 0, a finite
surrogate) also makes the loss and the gradient NaN and the trainer skips the update.
"""

import triton
import triton.language as tl

HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # ½·log(2π); kernels may read only constexpr globals


@triton.jit
def _max_nan(x, y):
    """max that returns NaN when either side is NaN (tl.maximum's default drops it)."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_nan(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nonfinite_to_nan(x):
    """0 for finite x, NaN for NaN or ±inf."""
    return x * 0.0


@triton.jit
def _ppo_terms(logp, old, adv, CLIP: tl.constexpr, ADV_CLIP: tl.constexpr):
    """r, -A·r (unclipped) and -A·clip(r, 1-ε, 1+ε) (clipped) of the GRPO surrogate."""
    r = tl.exp(logp - old)
    a = _clamp_nan(adv, -ADV_CLIP, ADV_CLIP)
    unclipped = -a * r
    clipped = -a * _clamp_nan(r, 1.0 - CLIP, 1.0 + CLIP)
    return r, unclipped, clipped


@triton.jit
def _ppo_poison(logp, old, adv, w):
    """0, or NaN when any of the sample's scalars is NaN or ±inf."""
    return _nonfinite_to_nan(logp) + _nonfinite_to_nan(old) + _nonfinite_to_nan(adv) + _nonfinite_to_nan(w)


@triton.jit
def _ppo_loss(logp, old, adv, w, CLIP: tl.constexpr, ADV_CLIP: tl.constexpr):
    """r and the per-sample loss w·max(unclipped, clipped) (NaN for any non-finite input)."""
    r, unclipped, clipped = _ppo_terms(logp, old, adv, CLIP, ADV_CLIP)
    return r, w * _max_nan(unclipped, clipped) + _ppo_poison(logp, old, adv, w)


@triton.jit
def _ppo_grad(logp, old, adv, w, CLIP: tl.constexpr, ADV_CLIP: tl.constexpr):
    """∂(w·max(unclipped, clipped))/∂logp: -w·A·r, or 0 where the clipped term strictly wins
    (NaN for any non-finite input, as the loss)."""
    r, unclipped, clipped = _ppo_terms(logp, old, adv, CLIP, ADV_CLIP)
    return tl.where(clipped > unclipped, 0.0, w * unclipped) + _ppo_poison(logp, old, adv, w)


@triton.jit
def sq_dist_partial_kernel(samples_ptr, mean_ptr, ref_ptr, part_ptr, kl_part_ptr, K, D, chunk, S,
                           HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """part[n,s,k] = Σ_{d in chunk s} (x[n,k,d] - μ[n,d])²; kl_part[n,s] = Σ (μ - μ_ref)².
    mean (and ref_mean) is read once per chunk and shared by the K samples of the row."""
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    acc = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    kl_acc = tl.zeros([BLOCK_D], ACC)
    d_start = s * chunk
    for d0 in range(d_start, d_start + chunk, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        mu = tl.load(mean_ptr + n * D + offs_d, mask=d_mask, other=0.0).to(ACC)
        mask = k_mask[:, None] & d_mask[None, :]
        x = tl.load(samples_ptr + (n * K + offs_k[:, None]) * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        diff = tl.where(mask, x - mu[None, :], 0.0)
        acc += diff * diff
        if HAS_REF:
            ref = tl.load(ref_ptr + n * D + offs_d, mask=d_mask, other=0.0).to(ACC)
            kl_acc += (mu - ref) * (mu - ref)
    tl.store(part_ptr + (n * S + s) * K + offs_k, tl.sum(acc, axis=1), mask=k_mask)
    if HAS_REF:
        tl.store(kl_part_ptr + n * S + s, tl.sum(kl_acc, axis=0))


@triton.jit
def _logp_from_partials(part_ptr, std_ptr, offs, mask, K, S, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """logp of flat sample index m = n*K + k from its S partial sums."""
    n = offs // K
    k = offs % K
    sq = tl.zeros([BLOCK], ACC)
    for s in range(0, S):
        sq += tl.load(part_ptr + (n * S + s) * K + k, mask=mask, other=0.0)
    sigma = tl.load(std_ptr + n, mask=mask, other=1.0).to(ACC)
    return -sq / (2.0 * sigma * sigma * D) - tl.log(sigma) - HALF_LOG_2PI


@triton.jit
def logp_finalize_kernel(part_ptr, std_ptr, logp_ptr, NK, K, S, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """logp[n,k] = -Σ_s part[n,s,k] / (2σ_n²·D) - log σ_n - ½log 2π."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NK
    logp = _logp_from_partials(part_ptr, std_ptr, offs, mask, K, S, D, ACC, BLOCK)
    tl.store(logp_ptr + offs, logp, mask=mask)


@triton.jit
def gaussian_log_prob_bwd_kernel(grad_ptr, samples_ptr, mean_ptr, std_ptr, dmean_ptr, K, D,
                                 ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dmean[n,d] = Σ_k grad_logp[n,k]·(x[n,k,d] - μ[n,d]) / (σ_n²·D) (NaN for a non-finite σ_n)."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    d_mask = offs_d < D
    coef = tl.load(grad_ptr + n * K + offs_k, mask=k_mask, other=0.0).to(ACC)
    sigma = tl.load(std_ptr + n).to(ACC)
    mu = tl.load(mean_ptr + n * D + offs_d, mask=d_mask, other=0.0).to(ACC)
    mask = k_mask[:, None] & d_mask[None, :]
    x = tl.load(samples_ptr + (n * K + offs_k[:, None]) * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    diff = tl.where(mask, x - mu[None, :], 0.0)
    dmean = tl.sum(coef[:, None] * diff, axis=0) / (sigma * sigma * D) + _nonfinite_to_nan(sigma)
    tl.store(dmean_ptr + n * D + offs_d, dmean.to(dmean_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def sde_step_fwd_kernel(sample_ptr, velocity_ptr, noise_ptr, prev_in_ptr, a_ptr, b_ptr, std_ptr,
                        prev_ptr, mean_ptr, part_ptr, D, chunk, S, PREV_GIVEN: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """μ = a·x + b·v; prev = μ + std·ξ (rounded to the output dtype) or the given prev_sample;
    part[n,s] = Σ_{chunk s} (prev - μ)², finished into logp by logp_finalize_kernel (K = 1)."""
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    a = tl.load(a_ptr + n).to(ACC)
    b = tl.load(b_ptr + n).to(ACC)
    sigma = tl.load(std_ptr + n).to(ACC)
    acc = tl.zeros([BLOCK_D], ACC)
    d_start = s * chunk
    for d0 in range(d_start, d_start + chunk, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(sample_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(velocity_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
        mu = a * x + b * v
        if PREV_GIVEN:
            prev_out = tl.load(prev_in_ptr + n * D + offs, mask=mask, other=0.0)
        else:
            xi = tl.load(noise_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
            prev_out = (mu + sigma * xi).to(prev_ptr.dtype.element_ty)
        tl.store(prev_ptr + n * D + offs, prev_out, mask=mask)
        tl.store(mean_ptr + n * D + offs, mu.to(mean_ptr.dtype.element_ty), mask=mask)
        diff = tl.where(mask, prev_out.to(ACC) - mu, 0.0)
        acc += diff * diff
    tl.store(part_ptr + n * S + s, tl.sum(acc, axis=0))


@triton.jit
def sde_step_bwd_kernel(grad_prev_ptr, grad_mean_ptr, grad_logp_ptr, sample_ptr, velocity_ptr, prev_ptr,
                        a_ptr, b_ptr, std_ptr, dsample_ptr, dvelocity_ptr, D,
                        HAS_GRAD_PREV: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """dμ = grad_mean + grad_prev + grad_logp·(prev - μ)/(std²·D); dsample = a·dμ, dvelocity = b·dμ.
    (The launcher drops grad_prev when prev_sample was given: it then does not depend on μ.)"""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    a = tl.load(a_ptr + n).to(ACC)
    b = tl.load(b_ptr + n).to(ACC)
    dmu = tl.zeros([BLOCK_D], ACC)
    if HAS_GRAD_MEAN:
        dmu += tl.load(grad_mean_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    if HAS_GRAD_PREV:
        dmu += tl.load(grad_prev_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    if HAS_GRAD_LOGP:
        sigma = tl.load(std_ptr + n).to(ACC)
        g = tl.load(grad_logp_ptr + n).to(ACC)
        x = tl.load(sample_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(velocity_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
        prev = tl.load(prev_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
        dmu += g * (prev - (a * x + b * v)) / (sigma * sigma * D)
    tl.store(dsample_ptr + n * D + offs, (a * dmu).to(dsample_ptr.dtype.element_ty), mask=mask)
    tl.store(dvelocity_ptr + n * D + offs, (b * dmu).to(dvelocity_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grpo_clip_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, w_ptr, ratio_ptr, stats_ptr, M,
                              CLIP: tl.constexpr, ADV_CLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ratio[m]; stats = (loss, clip_frac, approx_kl) means over the M samples."""
    loss = tl.zeros([BLOCK], ACC)
    clipped_count = tl.zeros([BLOCK], ACC)
    akl = tl.zeros([BLOCK], ACC)
    for m0 in range(0, M, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        mask = offs < M
        logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC)
        old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(ACC)
        adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
        r, per = _ppo_loss(logp, old, adv, w, CLIP, ADV_CLIP)
        tl.store(ratio_ptr + offs, r, mask=mask)
        loss += tl.where(mask, per, 0.0)
        clipped_count += tl.where(mask & (tl.abs(r - 1.0) > CLIP), 1.0, 0.0)
        akl += tl.where(mask, 0.5 * (logp - old) * (logp - old), 0.0)
    tl.store(stats_ptr + 0, tl.sum(loss, axis=0) / M)
    tl.store(stats_ptr + 1, tl.sum(clipped_count, axis=0) / M)
    tl.store(stats_ptr + 2, tl.sum(akl, axis=0) / M)


@triton.jit
def grpo_clip_loss_bwd_kernel(grad_loss_ptr, logp_ptr, old_ptr, adv_ptr, w_ptr, dlogp_ptr, M,
                              CLIP: tl.constexpr, ADV_CLIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dlogp[m] = grad_loss · g[m] / M."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad_loss = tl.load(grad_loss_ptr).to(ACC)
    tl.store(dlogp_ptr + offs, grad_loss * _ppo_grad(logp, old, adv, w, CLIP, ADV_CLIP) / M, mask=mask)


@triton.jit
def flow_grpo_loss_finalize_kernel(part_ptr, kl_part_ptr, std_ptr, old_ptr, adv_ptr, w_ptr, kl_std_ptr,
                                   logp_ptr, ratio_ptr, stats_ptr, N, K, S, D,
                                   CLIP: tl.constexpr, ADV_CLIP: tl.constexpr, BETA: tl.constexpr,
                                   HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program after sq_dist_partial_kernel: logp[n,k], ratio[n,k] and
    stats = (loss, clip_frac, approx_kl, kl), loss = policy + β·kl."""
    NK = N * K
    loss = tl.zeros([BLOCK], ACC)
    clipped_count = tl.zeros([BLOCK], ACC)
    akl = tl.zeros([BLOCK], ACC)
    for m0 in range(0, NK, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        mask = offs < NK
        logp = _logp_from_partials(part_ptr, std_ptr, offs, mask, K, S, D, ACC, BLOCK)
        old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(ACC)
        adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs // K, mask=mask, other=0.0).to(ACC)
        r, per = _ppo_loss(logp, old, adv, w, CLIP, ADV_CLIP)
        tl.store(logp_ptr + offs, logp, mask=mask)
        tl.store(ratio_ptr + offs, r, mask=mask)
        loss += tl.where(mask, per, 0.0)
        clipped_count += tl.where(mask & (tl.abs(r - 1.0) > CLIP), 1.0, 0.0)
        akl += tl.where(mask, 0.5 * (logp - old) * (logp - old), 0.0)
    policy = tl.sum(loss, axis=0) / NK
    kl = 0.0
    if HAS_REF:
        kl_acc = tl.zeros([BLOCK], ACC)
        for n0 in range(0, N, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            mask_n = offs_n < N
            sq = tl.zeros([BLOCK], ACC)
            for s in range(0, S):
                sq += tl.load(kl_part_ptr + offs_n * S + s, mask=mask_n, other=0.0)
            kl_sigma = tl.load(kl_std_ptr + offs_n, mask=mask_n, other=1.0).to(ACC)
            kl_acc += tl.where(mask_n, sq / (D * 2.0 * kl_sigma * kl_sigma) + _nonfinite_to_nan(kl_sigma), 0.0)
        kl = tl.sum(kl_acc, axis=0) / N
    tl.store(stats_ptr + 0, policy + BETA * kl)
    tl.store(stats_ptr + 1, tl.sum(clipped_count, axis=0) / NK)
    tl.store(stats_ptr + 2, tl.sum(akl, axis=0) / NK)
    tl.store(stats_ptr + 3, kl)


@triton.jit
def flow_grpo_loss_bwd_kernel(grad_loss_ptr, samples_ptr, mean_ptr, ref_ptr, std_ptr, kl_std_ptr, logp_ptr,
                              old_ptr, adv_ptr, w_ptr, dmean_ptr, N, K, D,
                              CLIP: tl.constexpr, ADV_CLIP: tl.constexpr, BETA: tl.constexpr,
                              HAS_REF: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """dmean[n,d] = grad_loss·(Σ_k g[n,k]·(x-μ)/(σ_n²·D) + β·(μ-μ_ref)/(N·kl_std_n²·D)), with
    g[n,k] = ∂loss/∂logp[n,k] recomputed here from the saved logp (K values per program)."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    d_mask = offs_d < D
    grad_loss = tl.load(grad_loss_ptr).to(ACC)
    logp = tl.load(logp_ptr + n * K + offs_k, mask=k_mask, other=0.0).to(ACC)
    old = tl.load(old_ptr + n * K + offs_k, mask=k_mask, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + n * K + offs_k, mask=k_mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + n).to(ACC)
    coef = tl.where(k_mask, _ppo_grad(logp, old, adv, w, CLIP, ADV_CLIP), 0.0) / (N * K)
    sigma = tl.load(std_ptr + n).to(ACC)
    mu = tl.load(mean_ptr + n * D + offs_d, mask=d_mask, other=0.0).to(ACC)
    mask = k_mask[:, None] & d_mask[None, :]
    x = tl.load(samples_ptr + (n * K + offs_k[:, None]) * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    diff = tl.where(mask, x - mu[None, :], 0.0)
    dmean = tl.sum(coef[:, None] * diff, axis=0) / (sigma * sigma * D)
    if HAS_REF:
        ref = tl.load(ref_ptr + n * D + offs_d, mask=d_mask, other=0.0).to(ACC)
        kl_sigma = tl.load(kl_std_ptr + n).to(ACC)
        dmean += BETA * (mu - ref) / (N * kl_sigma * kl_sigma * D) + _nonfinite_to_nan(kl_sigma)
    tl.store(dmean_ptr + n * D + offs_d, (grad_loss * dmean).to(dmean_ptr.dtype.element_ty), mask=d_mask)
