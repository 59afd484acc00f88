"""`tempflow-fast demo-ops`: one Flow-GRPO SDE step and one fused loss update on random data,
printing the backend that ran and the numbers a trainer would log."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tempflow_fast.ops as ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="tempflow-fast demo-ops",
        description="One Flow-GRPO SDE step and one fused loss update on random data, printing the backend that "
                    "ran and the numbers a trainer would log.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the tensors live: cpu, cuda, cuda:N, auto (default: cuda when available, else cpu)")
    parser.add_argument("--backend", choices=ops.backends.BACKENDS, default=None,
                        help="force a backend (default: $TEMPFLOW_FAST_BACKEND or auto)")
    parser.add_argument("--n", type=int, default=4, help="N: shared states (policy means)")
    parser.add_argument("--k", type=int, default=6, help="K: branches scored against each mean")
    parser.add_argument("--tokens", type=int, default=1024, help="latent tokens per sample")
    parser.add_argument("--channels", type=int, default=64, help="channels per token")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    args = parser.parse_args(argv)
    for name in ("n", "k", "tokens", "channels"):
        if getattr(args, name) < 1:
            return _fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return _fail(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return _fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        if args.backend is not None:
            with ops.use_backend(args.backend):
                ops.active_backend(device)  # a backend that cannot run here fails before any work
                return _demo(args)
        return _demo(args)
    except ops.BackendUnavailable as exc:
        return _fail(str(exc))


def _fail(message: str) -> int:
    print(f"tempflow-fast demo-ops: {message}", file=sys.stderr)
    return 2


def _demo(args) -> int:
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    n, k, shape = args.n, args.k, (args.tokens, args.channels)
    print(f"backend: {ops.active_backend(device)} on {device}  "
          f"(N={n} means x K={k} branches, latents {shape[0]}x{shape[1]})")

    # rollout: from one shared state x at σ=0.6, K branches of one SDE step (η = 0.7)
    x = torch.randn(n, *shape, generator=g, device=device)
    v = torch.randn(n, *shape, generator=g, device=device)
    xs, vs = x.repeat_interleave(k, 0), v.repeat_interleave(k, 0)
    step = ops.flow_sde_step(xs, vs, 0.6, 0.5, 0.7, generator=g)
    print(f"flow_sde_step   σ 0.6 -> 0.5: std {step.std[0].item():.4f}, "
          f"log_prob mean {step.log_prob.mean().item():+.4f} (nats per element)")
    advantages = torch.randn(n, k, generator=g, device=device)

    # update: the policy's new mean (a small perturbation stands in for a model update); the
    # K branches share it, so the fused loss reads it once and writes dL/dmean directly
    mean = (step.mean.view(n, k, *shape)[:, 0] + 0.01 * torch.randn(n, *shape, generator=g, device=device))
    mean.requires_grad_()
    samples = step.prev_sample.view(n, k, *shape)
    old = step.log_prob.view(n, k)
    start = time.perf_counter()
    out = ops.fused_flow_grpo_loss(mean, samples, step.std.view(n, k)[:, 0], old, advantages, clip_range=1e-4,
                                   ref_mean=step.mean.view(n, k, *shape)[:, 0], beta=0.04)
    out.loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed_ms = 1e3 * (time.perf_counter() - start)
    print(f"fused_flow_grpo_loss: loss {out.loss.item():+.5f}, clip_frac {out.clip_frac.item():.3f}, "
          f"approx_kl {out.approx_kl.item():.3e}, kl {out.kl.item():.3e}, ratio mean {out.ratio.mean().item():.4f}")
    print(f"  dL/dmean norm {mean.grad.norm().item():.3e}; forward+backward {elapsed_ms:.1f} ms (first call)")
    return 0
