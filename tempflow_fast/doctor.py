"""`tempflow-fast doctor`: the GPU check of this machine's production path, in a few minutes, random weights only.

    tempflow-fast doctor [--out DIR] [--stages env,sdpa,...] [--budget-s 330]
    tempflow-fast doctor --smoke          # the same code paths at toy sizes on the CPU (part of the tests)

Each stage runs in its own process (a CUDA fault — an illegal memory access in one attention kernel — ends that
process's CUDA context, not the check), within its own time limit and the overall budget:

- env: versions, device, SMs, memory, cuDNN, plain copy bandwidth.
- sdpa: torch SDPA forward+backward at FLUX-1024's attention shape (1 × 24 heads × 4608 tokens × 128, bf16, the
  (B, S, H, D) → (B, H, S, D) permuted layout diffusers hands it), once per SDPA kernel (cuDNN, flash,
  memory-efficient, math, and torch's own pick), each in a fresh process: finite gradients, time.
- attention: the same through diffusers' dispatcher on a one-block full-width FLUX at 1024 px, for every
  attention backend of models/attention.py installed here, forward+backward, each in a fresh process.
- kernels: the fused Flow-GRPO loss at FLUX-1024 sizes (fp32, bf16) against the PyTorch reference: error,
  time, GB/s and % of the copy bandwidth; against the eager unfused formula.
- graphs: a TempFlow rollout of a reduced-depth full-width FLUX-1024 through the CUDA-graph runner (ODE
  segments, one shared pool) against the eager runner: equal latents, capture / replay seconds, pool size.
- train: a full-depth random FLUX-1024 (bf16 weights, LoRA r64 fp32 masters, gradient checkpointing, the
  trainer's default attention backends): rollout seconds per image-step and MFU at 1 / 8 rows per call on the
  rollout backend, then one TempFlow update (2 states × K = 6) and AdamW step on the update backend: seconds,
  peak memory against the --dry-run estimate.
- vae: peak memory of a 1024 px FLUX VAE decode per image, against the memory model's constant.

Writes report.md, results.csv and results.jsonl into --out and prints the report. Exit 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Dict, List, Optional

from tempflow_fast.outputs import check_output_file

STAGES = ("env", "sdpa", "train", "graphs", "attention", "kernels", "vae")  # most telling first
LIMITS_S = {"env": 40, "sdpa": 30, "attention": 45, "kernels": 60, "graphs": 60, "train": 120, "vae": 40}
SDPA_KERNELS = ("default", "cudnn", "flash", "efficient", "math")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
SMOKE_FLUX = dict(FLUX_CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
PREFIX = "DOCTOR "


# --- the child side: one stage, rows on stdout ---------------------------------------------------------------

class _Stage:
    """What a stage child needs: device, sizes, timing and memory helpers, and `emit`."""

    def __init__(self, name: str, smoke: bool):
        import torch

        self.name, self.smoke, self.torch = name, smoke, torch
        self.dev = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
        self.res = 64 if smoke else 1024
        self.txt = 4 if smoke else 512

    def emit(self, **row) -> None:
        print(PREFIX + json.dumps({"stage": self.name, **row}, default=str), flush=True)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def ms(self, fn, reps: int = 5, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    def peak_gib(self, fn) -> Optional[float]:
        """Peak memory above what was allocated before `fn` (CUDA), None on the CPU."""
        torch = self.torch
        if self.dev.type != "cuda":
            fn()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    def flux(self, num_layers: int, num_single_layers: int, *, full_width: bool = True):
        """A FluxAdapter around a random FluxTransformer2DModel at the doctor's resolution (no pipeline, no VAE)."""
        torch = self.torch
        from diffusers import FluxTransformer2DModel

        from tempflow_fast.models.flux import FluxAdapter

        cfg = dict(SMOKE_FLUX if self.smoke else FLUX_CONFIG, num_layers=num_layers,
                   num_single_layers=num_single_layers)
        dtype = torch.float32 if self.smoke else torch.bfloat16
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(self.dev):
                t = FluxTransformer2DModel(**cfg)
        finally:
            torch.set_default_dtype(prev)
        t.requires_grad_(False).eval()
        with torch.no_grad():  # keep a random deep residual stream bounded (random init, not trained weights)
            for n, mod in t.named_modules():
                if isinstance(mod, torch.nn.Linear) and n.endswith(("to_out.0", "to_add_out", "ff.net.2",
                                                                    "ff_context.net.2", "proj_out")):
                    mod.weight.mul_(0.1)
        from diffusers import FlowMatchEulerDiscreteScheduler

        vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
        # FLUX.1-dev's scheduler config: resolution-dependent shift between 256 and 4096 image tokens
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        ad = FluxAdapter(types.SimpleNamespace(transformer=t, vae=vae, scheduler=scheduler), resolution=self.res,
                         max_sequence_length=self.txt)
        ad.vae = None  # the doctor decodes nothing through it
        ad.decode = lambda x: torch.zeros(x.shape[0], 3, 8, 8, device=x.device)
        ad.flux_config = cfg
        return ad

    def cond(self, ad, prompts: int = 1):
        torch = self.torch
        g = torch.Generator(device=self.dev).manual_seed(0)
        cfg = ad.flux_config
        return {"prompt_embeds": (0.5 * torch.randn(prompts, self.txt, cfg["joint_attention_dim"], generator=g,
                                                    device=self.dev)).to(ad.dtype),
                "pooled_projections": torch.randn(prompts, cfg["pooled_projection_dim"], generator=g,
                                                  device=self.dev).to(ad.dtype)}


def stage_env(s: _Stage) -> None:
    torch = s.torch
    import tempflow_fast
    import tempflow_fast.ops as ops

    row = {"torch": torch.__version__, "cuda": torch.version.cuda, "tempflow_fast": tempflow_fast.__version__,
           "ops_backend": ops.active_backend(s.dev), "device": str(s.dev)}
    for mod in ("triton", "diffusers", "transformers", "peft"):
        try:
            row[mod] = __import__(mod).__version__
        except ImportError:
            row[mod] = None
    if s.dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        row.update(name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version(),
                   cudnn_sdp_enabled=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)())
        src = torch.empty(2**28, device=s.dev)
        dst = torch.empty_like(src)
        ms = s.ms(lambda: dst.copy_(src), reps=10)
        row["copy_gbs"] = round(2 * src.numel() * 4 / ms / 1e6, 1)
    s.emit(ok=True, **row)


def _sdpa_inputs(s: _Stage):
    torch = s.torch
    B, S, H, D = (1, 64, 2, 32) if s.smoke else (1, 4608, 24, 128)
    dtype = torch.float32 if s.smoke else torch.bfloat16
    g = torch.Generator(device=s.dev).manual_seed(0)
    # diffusers' native backend gets (B, S, H, D) and permutes to (B, H, S, D): non-contiguous views
    return [torch.randn(B, S, H, D, generator=g, device=s.dev, dtype=dtype).requires_grad_() for _ in range(3)]


def stage_sdpa(s: _Stage, kernel: str) -> None:
    torch = s.torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _sdpa_inputs(s)
    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

    def run():
        for t in (q, k, v):
            t.grad = None
        with contextlib.nullcontext() if kernel == "default" else sdpa_kernel([which[kernel]]):
            out = F.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (q, k, v)))
        out.permute(0, 2, 1, 3).float().square().mean().backward()
        return out

    out = run()
    s.sync()
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
    picked = None
    if kernel == "default" and s.dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            s.sync()
        names = [e.key for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        picked = [n[:90] for n in names if any(w in n.lower() for w in ("fmha", "flash", "attention", "sdpa",
                                                                         "cudnn", "mha"))][:3]
    s.emit(kernel=kernel, ok=finite, finite=finite, fwd_bwd_ms=round(s.ms(run, reps=3), 3), kernels=picked)


def stage_attention(s: _Stage, backend: str) -> None:
    torch = s.torch
    from tempflow_fast.models.attention import check_attention_backend, set_attention_backend

    try:
        check_attention_backend(backend)
    except ValueError as err:
        s.emit(backend=backend, available=False, ok=None, why=str(err)[:160])
        return
    ad = s.flux(1, 1)
    ad.module.requires_grad_(True)
    set_attention_backend(ad.module, backend)
    cond = s.cond(ad)
    x = torch.randn(1, *ad.latent_shape, device=s.dev)
    sig = torch.full((1,), 0.6, device=s.dev)

    def run():
        ad.module.zero_grad(set_to_none=True)
        out = ad.velocity(x, sig, cond)
        out.square().mean().backward()
        return out

    out = run()
    s.sync()
    grads = [p.grad for p in ad.module.parameters() if p.grad is not None]
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    s.emit(backend=backend, available=True, ok=finite, finite=finite, fwd_bwd_ms=round(s.ms(run, reps=3), 2))


def _unfused_loss(mean, samples, std, old, adv, w, ref, kl_std, clip, adv_clip, beta):
    """Flow-GRPO's loss in eager PyTorch, one log-prob per element of every sample (what the fused op replaces)."""
    import torch

    s = std[:, None, None]
    logp = (-((samples.float() - mean.float()[:, None]) ** 2) / (2 * s**2) - torch.log(s)
            - 0.5 * math.log(2 * math.pi)).mean(-1)
    ratio = torch.exp(logp - old)
    a = adv.clamp(-adv_clip, adv_clip)
    policy = (w[:, None] * torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))).mean()
    return policy + beta * ((mean.float() - ref.float()).square().mean(-1) / (2 * kl_std**2)).mean()


def stage_kernels(s: _Stage) -> None:
    torch = s.torch
    import tempflow_fast.ops as ops

    D = 64 if s.smoke else 4096 * 64
    backend = ops.active_backend(s.dev)
    shapes = [(2, 3)] if s.smoke else [(4, 6), (64, 6), (4, 12)]
    copy_gbs = None
    if s.dev.type == "cuda":
        src = torch.empty(2**28, device=s.dev)
        dst = torch.empty_like(src)
        copy_gbs = 2 * src.numel() * 4 / s.ms(lambda: dst.copy_(src), reps=10) / 1e6
        del src, dst
    for N, K in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=s.dev).manual_seed(0)
            std = 0.05 + 0.3 * torch.rand(N, generator=g, device=s.dev)
            mean = torch.randn(N, D, generator=g, device=s.dev)
            samples = (mean[:, None] + std[:, None, None] * torch.randn(N, K, D, generator=g, device=s.dev)).to(dtype)
            mean = (mean + 0.02 * std[:, None] * torch.randn(N, D, generator=g, device=s.dev)).to(dtype)
            from tempflow_fast.ops import reference as R

            old = R.gaussian_log_prob_fwd(samples, mean, std) + 1e-6 * torch.randn(N, K, generator=g, device=s.dev)
            adv = 2 * torch.randn(N, K, generator=g, device=s.dev)
            w = 0.5 + torch.rand(N, generator=g, device=s.dev)
            ref = (mean.float() + 0.01 * torch.randn(N, D, generator=g, device=s.dev)).to(dtype)
            kl_std = 0.5 + 0.1 * torch.rand(N, generator=g, device=s.dev)
            args = dict(clip_range=1e-4, weights=w, adv_clip=5.0, ref_mean=ref, beta=0.004, kl_std=kl_std)

            def fused(be):
                m = mean.detach().clone().requires_grad_()
                with ops.use_backend(be):
                    out = ops.fused_flow_grpo_loss(m, samples, std, old, adv, **args)
                    out.loss.backward()
                return out.loss.detach(), m.grad

            def unfused():
                m = mean.detach().clone().requires_grad_()
                loss = _unfused_loss(m, samples, std, old, adv, w, ref, kl_std, 1e-4, 5.0, 0.004)
                loss.backward()
                return loss.detach(), m.grad

            got, want = fused(backend), fused("torch")
            err = max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
                      for a, b in zip(got, want))
            tol = 2e-5 if dtype == torch.float32 else 1.6e-2
            e = torch.finfo(dtype).bits // 8
            moved = e * (2 * (N * D + N * K * D + N * D) + N * D)  # read mean, samples, ref twice; write dmean
            t_fused = s.ms(lambda: fused(backend), reps=5 if s.smoke else 10, warmup=2)
            t_unfused = s.ms(unfused, reps=3 if s.smoke else 5, warmup=1)
            gbs = moved / t_fused / 1e6
            s.emit(shape=f"{N}x{K}x{D}", dtype=str(dtype)[6:], backend=backend, ok=err <= tol, err_vs_reference=err,
                   fused_ms=round(t_fused, 3), unfused_eager_ms=round(t_unfused, 3),
                   speedup_vs_unfused=round(t_unfused / t_fused, 2), gbs=round(gbs, 1),
                   pct_copy_bandwidth=round(100 * gbs / copy_gbs, 1) if copy_gbs else None)
            del samples, mean, ref


def stage_graphs(s: _Stage) -> None:
    torch = s.torch
    from tempflow_fast.sampling.engine import rollout
    from tempflow_fast.sampling.plans import Bifurcation
    from tempflow_fast.sampling.runners import CudaGraphRunner, EagerRunner

    ad = s.flux(1, 2)
    cond = s.cond(ad)
    plan = Bifurcation(num_steps=4, seeds_per_prompt=2, branches=3, bifurcation_steps=(0, 1))
    buckets = (4, 8)
    t0 = time.perf_counter()
    a = rollout(ad, ["p"], plan, seed=0, runner=EagerRunner(ad, buckets=buckets, segments=True), cond=cond)
    s.sync()
    eager_s = time.perf_counter() - t0
    b = rollout(ad, ["p"], plan, seed=0, runner=EagerRunner(ad, buckets=buckets), cond=cond)
    per_step_diff = float((a.final_latents[1] - b.final_latents[1]).abs().max())
    if s.dev.type != "cuda":
        s.emit(runner="eager-segments", ok=per_step_diff <= 1e-4, segments_vs_per_step_max_abs=per_step_diff,
               eager_s=round(eager_s, 3))
        return
    reserved0 = torch.cuda.memory_reserved()
    graph = CudaGraphRunner(ad, buckets=buckets)
    t0 = time.perf_counter()
    c = rollout(ad, ["p"], plan, seed=0, runner=graph, cond=cond)
    s.sync()
    capture_s = time.perf_counter() - t0
    pool = (torch.cuda.memory_reserved() - reserved0) / 2**30
    t0 = time.perf_counter()
    d = rollout(ad, ["p"], plan, seed=0, runner=graph, cond=cond)
    s.sync()
    replay_s = time.perf_counter() - t0
    diff = float((a.final_latents[1] - c.final_latents[1]).abs().max())
    s.emit(runner="cuda_graph", ok=diff <= 1e-2 and torch.equal(c.final_latents[1], d.final_latents[1]),
           replay_vs_eager_max_abs=diff, replay_deterministic=bool(torch.equal(c.final_latents[1], d.final_latents[1])),
           segments_vs_per_step_max_abs=per_step_diff, graphs=len(graph._graphs),
           segment_graphs=sum(k[0] == "segment" for k in graph._graphs), eager_s=round(eager_s, 3),
           capture_rollout_s=round(capture_s, 3), replay_rollout_s=round(replay_s, 3), pool_gib=round(pool, 3))


def _flux_flops_per_row(cfg: dict, tokens: int) -> float:
    """Forward FLOPs of one FLUX row: 2 × (block linear parameters) × tokens + attention (QKᵀ and AV)."""
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    double = 12 * hidden * hidden * 2 + 2 * 4 * hidden * hidden * 2  # q,k,v,out ×2 streams + 2 MLPs (4×)
    single = 4 * hidden * hidden + 4 * hidden * hidden + 5 * hidden * hidden  # qkv+mlp in, out of (hidden + 4h)
    linear = cfg["num_layers"] * double + cfg["num_single_layers"] * single
    return 2.0 * linear * tokens + blocks * 4.0 * tokens * tokens * hidden


def stage_train(s: _Stage) -> None:
    torch = s.torch
    import tempflow_fast.ops as ops
    from diffusers import FluxTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from tempflow_fast.models.attention import default_attention_backends, set_attention_backend
    from tempflow_fast.models.flux import FLUX_LORA_TARGETS
    from tempflow_fast.models.memory import GIB, estimate_memory, rollout_bytes_per_row, transformer_spec_from_module
    from tempflow_fast.sampling.schedules import flow_sigmas
    from tempflow_fast.training.update import StateGroup, policy_loss

    t0 = time.perf_counter()
    ad = s.flux(1, 1) if s.smoke else s.flux(19, 38)
    t = ad.module
    backend, rollout_backend = default_attention_backends(s.dev, ad.dtype)  # what the trainer picks
    if rollout_backend is not None:
        set_attention_backend(t, rollout_backend)
    rank = 4 if s.smoke else 64
    t.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(FLUX_LORA_TARGETS),
                             init_lora_weights="gaussian"))
    cast_training_params(t, dtype=torch.float32)
    lora = [p for p in t.parameters() if p.requires_grad]
    s.sync()
    weights_gib = torch.cuda.memory_allocated() / GIB if s.dev.type == "cuda" else None
    s.emit(part="model", ok=True, build_s=round(time.perf_counter() - t0, 2), attention_backend=backend,
           rollout_attention_backend=rollout_backend,
           params_b=round(sum(p.numel() for p in t.parameters()) / 1e9, 3),
           lora_params_m=round(sum(p.numel() for p in lora) / 1e6, 2), lora_dtype=str(lora[0].dtype),
           weights_gib=weights_gib)
    cond = s.cond(ad)
    cfg = ad.flux_config
    tokens = ad.image_seq_len + s.txt
    with torch.device("meta"):
        spec = transformer_spec_from_module(FluxTransformer2DModel(**cfg), ad.image_seq_len, s.txt)
    name = torch.cuda.get_device_name() if s.dev.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = _flux_flops_per_row(cfg, tokens)
    for b in ((1, 2) if s.smoke else (1, 8)):
        x = torch.randn(b, *ad.latent_shape, device=s.dev)
        cc = {k: v.expand(b, *v.shape[1:]).contiguous() for k, v in cond.items()}
        sig = torch.full((b,), 0.7, device=s.dev)
        with torch.no_grad():
            mem = s.peak_gib(lambda: ad.velocity(x, sig, cc))
            ms = s.ms(lambda: ad.velocity(x, sig, cc), reps=2 if not s.smoke else 1, warmup=1)
        est = rollout_bytes_per_row(spec, ad.dtype) * b / GIB
        s.emit(part="rollout_forward", ok=True, rows=b, ms=round(ms, 2), s_per_image_step=round(ms / b / 1e3, 4),
               tflops_per_row=round(flops / 1e12, 2),
               mfu_pct=round(100 * flops * b / (ms / 1e3) / (peak_tflops * 1e12), 1) if peak_tflops else None,
               peak_gib=mem, estimate_gib=round(est, 3))
    # one TempFlow update: 2 states (k = 2 and 12 of a 16-step FLUX-1024 schedule) × K = 6 samples
    sigmas = flow_sigmas(16, image_seq_len=ad.image_seq_len, dynamic_shift=True).tolist()
    K, idx = 6, (2, 12)
    n = len(idx)
    g = torch.Generator(device=s.dev).manual_seed(0)
    xs = torch.randn(n, *ad.latent_shape, generator=g, device=s.dev)
    s_i = torch.tensor([sigmas[i] for i in idx], device=s.dev)
    s_n = torch.tensor([sigmas[i + 1] for i in idx], device=s.dev)
    prompt = torch.zeros(n, dtype=torch.long, device=s.dev)
    with torch.no_grad():
        v = ad.velocity(xs, s_i, {k: v.index_select(0, prompt) for k, v in cond.items()})
        step = ops.flow_sde_step(xs.repeat_interleave(K, 0), v.repeat_interleave(K, 0), s_i.repeat_interleave(K),
                                 s_n.repeat_interleave(K), 0.7, sigma_max=sigmas[1],
                                 noise=torch.randn(n * K, *ad.latent_shape, generator=g, device=s.dev))
    group = StateGroup(latents=xs, sigma=s_i, sigma_next=s_n, std=step.std.view(n, K)[:, 0].contiguous(),
                       prompt=prompt, weights=torch.ones(n, device=s.dev),
                       samples=step.prev_sample.view(n, K, *ad.latent_shape), old_log_prob=step.log_prob.view(n, K),
                       advantages=torch.randn(n, K, generator=g, device=s.dev))
    if backend is not None:
        set_attention_backend(t, backend)
    t.enable_gradient_checkpointing()
    t.train()
    opt = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-4)
    with torch.no_grad():
        _, first = policy_loss(ad, group, cond=cond, sde="flow", noise_level=0.7, sigma_max=sigmas[1],
                               total_samples=n * K, clip_range=1e-4, adv_clip=5.0)
    ratio_dev = float((first.ratio - 1).abs().max())

    def update():
        opt.zero_grad(set_to_none=True)
        loss, out = policy_loss(ad, group, cond=cond, sde="flow", noise_level=0.7, sigma_max=sigmas[1],
                                total_samples=n * K, clip_range=1e-4, adv_clip=5.0)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt.step()
        return loss.detach(), norm

    if s.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss, norm = update()
    s.sync()
    first_s = time.perf_counter() - t0
    steady = s.ms(update, reps=1, warmup=0)
    peak = torch.cuda.max_memory_allocated() / GIB if s.dev.type == "cuda" else None
    est = estimate_memory(spec, dtype=ad.dtype, lora_rank=rank, lora_targets=FLUX_LORA_TARGETS, states_per_forward=n,
                          gradient_checkpointing=True)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
    s.emit(part="update", ok=finite and ratio_dev < 1e-2, states=n, K=K, first_ratio_max_abs_dev=ratio_dev,
           loss_finite=finite, grad_norm=float(norm), first_s=round(first_s, 2), steady_s=round(steady / 1e3, 2),
           peak_gib=peak, estimate_update_gib=round(est.phases()["update forward+backward"] / GIB, 2))


def stage_vae(s: _Stage) -> None:
    torch = s.torch
    from diffusers import AutoencoderKL

    from tempflow_fast.models.memory import GIB, decode_bytes_per_image

    with torch.device(s.dev):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 8, 8, 8) if s.smoke else (128, 256, 512, 512),
                            layers_per_block=2, norm_num_groups=4 if s.smoke else 32,
                            use_quant_conv=False, use_post_quant_conv=False).eval()
    side = s.res // 8
    for b in (1, 2):
        z = torch.randn(b, 16, side, side, device=s.dev)
        with torch.no_grad():
            mem = s.peak_gib(lambda: vae.decode(z))
            ms = s.ms(lambda: vae.decode(z), reps=1 if s.smoke else 2, warmup=1)
        s.emit(batch=b, ok=True, ms=round(ms, 1), peak_gib=mem,
               model_gib=round(b * decode_bytes_per_image(s.res) / GIB, 2))


def _child(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="tempflow-fast doctor (stage)")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--variant", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    s = _Stage(args.stage, args.smoke)
    s.torch.manual_seed(0)
    fn = globals()[f"stage_{args.stage}"]
    fn(s, args.variant) if args.variant is not None else fn(s)
    return 0


# --- the parent side: stages in child processes, the report --------------------------------------------------

def _plan(stages, smoke: bool, rows: List[Dict]):
    """(stage, variant) pairs to run, one child process each; attention backends not installed here are reported
    into `rows` at once instead (no process to start for them)."""
    out = []
    for st in stages:
        if st == "sdpa":
            out += [(st, k) for k in (("default", "math") if smoke else SDPA_KERNELS)]
        elif st == "attention":
            from tempflow_fast.models.attention import ATTENTION_BACKENDS, check_attention_backend

            for name in (("native",) if smoke else tuple(n for n in ATTENTION_BACKENDS if n != "flex")):
                try:
                    check_attention_backend(name)
                except ValueError as err:
                    rows.append({"stage": st, "backend": name, "available": False, "ok": None, "why": str(err)[:160]})
                    continue
                out.append((st, name))
        else:
            out.append((st, None))
    return out


def _run_child(stage: str, variant: Optional[str], smoke: bool, limit: float) -> List[Dict]:
    cmd = [sys.executable, "-m", "tempflow_fast.doctor", "--stage", stage] + (["--smoke"] if smoke else [])
    if variant is not None:
        cmd += ["--variant", variant]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if smoke:
        env.setdefault("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {limit:.0f} s", None
    seconds = round(time.perf_counter() - t0, 1)
    rows = [json.loads(line[len(PREFIX):]) for line in out.splitlines() if line.startswith(PREFIX)]
    tag = {"variant": variant} if variant is not None else {}
    if rc != 0:
        tail = [l for l in err.strip().splitlines() if l.strip()]
        rows.append({"stage": stage, **tag, "ok": False, "error": (tail[-1] if tail else f"exit {rc}")[:300]})
    for r in rows:
        r.setdefault("seconds", seconds)
    return rows


def _report(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# tempflow-fast doctor — {meta['date']}", "",
             f"`{meta['command']}` on {meta.get('device', 'cpu')}; total {meta['total_s']:.0f} s.", ""]
    env = next((r for r in rows if r["stage"] == "env" and "torch" in r), None)
    if env:
        lines += ["versions: " + ", ".join(f"{k} {env.get(k)}" for k in ("torch", "cuda", "triton", "diffusers",
                                                                          "transformers", "peft", "tempflow_fast")), ""]
    for st in STAGES:
        sub = [r for r in rows if r["stage"] == st]
        if not sub:
            continue
        keys = []
        for r in sub:
            keys += [k for k in r if k not in keys and k not in ("stage",)]
        lines += [f"## {st}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in sub:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
        lines.append("")
    bad = [r for r in rows if r.get("ok") is False]
    lines.append(f"{len(bad)} failed row(s)" + (": " + "; ".join(f"{r['stage']} {r.get('variant') or r.get('kernel') or r.get('backend') or r.get('part') or ''} {r.get('error', '')}".strip() for r in bad) if bad else "."))
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--stage" in argv:
        return _child(argv)
    p = argparse.ArgumentParser(prog="tempflow-fast doctor",
                                description="GPU check of the production path (fused kernels, SDPA and attention "
                                            "backends, CUDA-graph segments, a full-depth FLUX-1024 LoRA update, VAE "
                                            "decode memory) with random weights; writes report.md and results.csv.")
    p.add_argument("--out", default=None, help="folder for report.md, results.csv, results.jsonl "
                                              "(default runs/doctor-<UTC time>)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the same code paths, in seconds")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting stages after this many seconds")
    args = p.parse_args(argv)
    stages = [st.strip() for st in args.stages.split(",") if st.strip()]
    unknown = [st for st in stages if st not in STAGES]
    if unknown or not stages:
        print(f"tempflow-fast doctor: --stages must name some of {', '.join(STAGES)}; got {args.stages!r}",
              file=sys.stderr)
        return 2
    if not args.budget_s > 0:
        print(f"tempflow-fast doctor: --budget-s must be > 0, got {args.budget_s}", file=sys.stderr)
        return 2
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("tempflow-fast doctor: no CUDA device here; run `tempflow-fast doctor --smoke` for the CPU check of "
              "the code paths", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or f"runs/doctor-{stamp:%Y%m%d-%H%M%S}")
    try:
        check_output_file(out / "report.md", "--out")
    except ValueError as err:
        print(f"tempflow-fast doctor: {err}", file=sys.stderr)
        return 2
    rows: List[Dict] = []
    t0 = time.perf_counter()
    plan = _plan(stages, args.smoke, rows)
    for i, (stage, variant) in enumerate(plan):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 5:
            rows.append({"stage": stage, "variant": variant, "ok": None, "skipped": "budget spent"})
            continue
        limit = min(LIMITS_S[stage] * (3 if args.smoke else 1), left)
        print(f"[doctor] {stage}{' ' + variant if variant else ''} ({i + 1}/{len(plan)}, limit {limit:.0f} s)",
              file=sys.stderr, flush=True)
        got = _run_child(stage, variant, args.smoke, limit)
        rows += got
        with open(out / "results.jsonl", "a") as f:  # as it goes: a killed check keeps what it measured
            for r in got:
                f.write(json.dumps(r, default=str) + "\n")
    meta = {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "command": "tempflow-fast doctor" + (" --smoke" if args.smoke else ""),
            "total_s": time.perf_counter() - t0,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"}
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    report = _report(rows, meta)
    (out / "report.md").write_text(report)
    print(report, end="")
    print(f"wrote {out / 'report.md'}, {out / 'results.csv'}")
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
