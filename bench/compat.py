"""Benchmark of the drop-in `tempflow_fast.compat.flow_grpo.sde_step_with_logprob` against the same step written
the way Flow-GRPO's own function computes it (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: per-element fp32
tensor ops, the log-prob of every element, then its mean), at equal numbers. Not a test: prints a markdown table
and writes CSV.

    python bench/compat.py                       # CPU: SD3 latents at 512 px, a group of 24
    python bench/compat.py --device cuda --batch 24 --side 128
    python bench/compat.py --reps 30 --csv out.csv

Two uses are timed: `rollout` (draw x' and score it: no gradient) and `train` (score given samples, then the
backward of the mean log-prob into the velocity, as the update does). Progress goes to stderr as it happens.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time

import torch

from tempflow_fast.outputs import check_output_arg


def eager_step(scheduler, v, timestep, x, noise_level=0.7, prev=None, noise=None):
    """The Flow-GRPO SDE step as its function computes it, elementwise in fp32 (same math as design.md §1)."""
    v, x = v.float(), x.float()
    index = [scheduler.index_for_timestep(t) for t in timestep]
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    sigma_next = scheduler.sigmas[[i + 1 for i in index]].view(-1, 1, 1, 1)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_next - sigma
    s = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    if prev is None:
        prev = mean + std * noise
    logp = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev, logp.mean(dim=tuple(range(1, logp.ndim))), mean, s


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/compat.py",
                                description="Time the drop-in sde_step_with_logprob against the step written as "
                                            "Flow-GRPO's function computes it: rollout (draw and score) and train "
                                            "(score and backward), equal numbers checked.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, default=24, help="rows per call (default 24: one Flow-GRPO group)")
    p.add_argument("--side", type=int, default=64, help="latent side: 64 = SD3 at 512 px (default), 128 = 1024 px")
    p.add_argument("--reps", type=int, default=20, help="timed runs per provider (default 20)")
    p.add_argument("--csv", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    check_output_arg(p, args.csv, "--csv")  # before minutes of timing, not after them
    if args.batch < 1 or args.side < 1 or args.reps < 1:
        print("bench/compat.py: --batch, --side and --reps must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/compat.py: --device cuda but no CUDA device here", file=sys.stderr)
        return 2
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tempflow_fast.compat.flow_grpo import sde_step_with_logprob
    from tempflow_fast.ops import active_backend

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, 16, args.side, args.side)
    x = torch.randn(shape, generator=g, device=device)
    v = torch.randn(shape, generator=g, device=device)
    xi = torch.randn(shape, generator=g, device=device)
    t = sched.timesteps[torch.full((args.batch,), 3, dtype=torch.long)].to(device)
    prev = eager_step(sched, v, t, x, noise=xi)[0].detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours_rollout():
        return sde_step_with_logprob(sched, v, t, x, noise_level=0.7, prev_sample=None,
                                     generator=torch.Generator(device=device).manual_seed(1))

    def eager_rollout():
        return eager_step(sched, v, t, x, noise=torch.randn(shape, generator=torch.Generator(device=device)
                                                            .manual_seed(1), device=device))

    def train(fn):
        def run():
            vv = v.detach().clone().requires_grad_()
            logp = fn(vv)
            logp.mean().backward()
            return logp.detach(), vv.grad
        return run

    ours_train = train(lambda vv: sde_step_with_logprob(sched, vv, t, x, noise_level=0.7, prev_sample=prev)[1])
    eager_train = train(lambda vv: eager_step(sched, vv, t, x, prev=prev)[1])
    # equal numbers: same log-probs (scored samples) and gradients
    a, b = ours_train(), eager_train()
    err_logp = float((a[0] - b[0]).abs().max())
    err_grad = float((a[1] - b[1]).abs().max() / b[1].abs().max())
    rows = []
    for use, ours, eager in (("rollout", ours_rollout, eager_rollout), ("train", ours_train, eager_train)):
        times = {"tempflow_fast": [], "flow_grpo_eager": []}
        for fn in (ours, eager):
            fn()
        for r in range(args.reps):
            for name, fn in (("tempflow_fast", ours), ("flow_grpo_eager", eager)):  # round-robin: same load
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
            if r % max(1, args.reps // 4) == 0:
                print(f"[bench/compat] {use}: round {r + 1}/{args.reps}", file=sys.stderr, flush=True)
        base = _median(times["flow_grpo_eager"])
        for name, ts in times.items():
            rows.append({"use": use, "provider": name, "ms_p50": round(_median(ts), 3),
                         "speedup_vs_flow_grpo": round(base / _median(ts), 2), "shape": "x".join(map(str, shape)),
                         "device": str(device), "backend": active_backend(device)})
    print(f"\n| use | provider | ms p50 | speedup vs Flow-GRPO's formulation |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['use']} | {r['provider']} | {r['ms_p50']} | {r['speedup_vs_flow_grpo']}x |")
    print(f"\nshape {shape}, {device}, backend {rows[0]['backend']}; equal numbers: max |Δ log-prob| {err_logp:.2e}, "
          f"max |Δ dlogp/dv| / max |dlogp/dv| {err_grad:.2e}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
