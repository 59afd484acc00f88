"""Benchmark of the fused Flow-GRPO loss (forward + backward) against the unfused eager PyTorch a
user would write. Not a test: it prints a markdown table and writes bench/results/ops.csv.

    python bench/ops.py                      # the GPU when there is one (triton), else the CPU (cpp)
    python bench/ops.py --device all         # CPU and GPU
    python bench/ops.py --threads 1          # on a shared machine: OpenMP barriers wait out other processes
    python bench/ops.py --reps 30 --csv out.csv --shapes small

Progress (shape, provider, what it is doing) goes to stderr as it happens; the table to stdout at
the end. The C++ providers run on CPU tensors only, so the extension is loaded (and built on
first use, about a minute, with a message) only when a CPU device is benchmarked.

Providers
- `fused-cpp` / `fused-triton`: `tempflow_fast.ops.fused_flow_grpo_loss` with the backend forced
  (`use_backend`), loss.backward() into mean.grad.
- `cpp-kernels`: the C++ forward and backward primitives called directly, to separate the kernels'
  time from the public API's per-call overhead (validation, custom-op dispatch, autograd).
- `fused-torch`: the same public call on the PyTorch reference backend (the fallback users get
  without a compiler), for context.
- `unfused-eager`: Flow-GRPO's formulas written in eager PyTorch: a per-element log-prob over
  (N, K, D) with the mean broadcast to every sample, ratio, clipped surrogate, KL to the reference
  mean, autograd backward. This is the baseline the targets refer to.

Metrics (one CSV row each: subject, provider, shape, dtype, metric, unit, p50, p20, p80, device,
version, timestamp)
- `fwd_bwd_time` (ms): median and 20/80 % quantiles over --reps timed runs after warm-up. The
  providers and the copy below run round-robin, one call each per round, so that on a shared
  machine they all see the same load.
- `bandwidth` (GB/s): bytes that must move / time. A forward+backward must read mean, the K
  samples and ref_mean twice (the backward needs the forward's log-probs before it can weight the
  samples) and write dmean once: 2·(|mean| + |samples| + |ref_mean|) + |dmean|.
- `pct_copy_bandwidth` (%): bandwidth relative to this machine's plain copy bandwidth, measured in
  the same rounds: torch `copy_` of a 25 MB fp32 tensor with the same threads, read+write bytes.
  The small shape fits in cache and can exceed it.
- `peak_extra_memory` (MB), CPU: resident-set high-water mark of one forward+backward above the
  resident set just before it, in a fresh child process per provider and shape (Linux
  /proc/self/clear_refs resets VmHWM; the child runs with a fixed glibc mmap threshold, so blocks
  freed earlier are returned to the OS instead of being reused unseen). Inputs are allocated before
  the baseline; mean.grad is part of the extra. CUDA: torch.cuda.max_memory_allocated above the
  allocation before the call.
- `pct_nominal_bandwidth` (%), CUDA only: bandwidth relative to the datasheet value of known GPUs.
- `speedup_vs_unfused` (x): unfused-eager p50 time / provider p50 time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

from tempflow_fast import ops
from tempflow_fast.bench.results import device_name, version
from tempflow_fast.outputs import check_output_arg

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
SHAPES = {"flux-1024": (4, 6, 4096 * 64), "small": (4, 6, 4096)}  # (N shared means, K samples, D)
CLIP_RANGE, ADV_CLIP, BETA = 1e-4, 5.0, 0.004  # Flow-GRPO's ε, adv clip and a TempFlow-sized β
# Nominal peak memory bandwidth (GB/s) of GPUs we may be lent, to report % of the datasheet value.
NOMINAL_GPU_BANDWIDTH = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


# inputs -----------------------------------------------------------------------------------------

def make_inputs(shape, device, dtype=torch.float32, seed=0):
    """A training step's tensors: policy mean, K samples around it, old log-probs equal to the
    current ones up to 1e-6 (the first update after a rollout: every ratio inside 1±ε, so no sample
    is clipped and the backward must read all K samples: the worst case for the fused kernel, which
    skips clipped ones), advantages, step weights, reference mean."""
    N, K, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    std = 0.2 + 0.1 * torch.rand(N, generator=g)
    mean = torch.randn(N, D, generator=g)
    samples = mean[:, None] + std[:, None, None] * torch.randn(N, K, D, generator=g)
    logp = (-((samples - mean[:, None]) ** 2).mean(-1) / (2 * std[:, None] ** 2) - torch.log(std)[:, None]
            - HALF_LOG_2PI)
    old = logp + 1e-6 * torch.randn(N, K, generator=g)
    adv = torch.randn(N, K, generator=g)
    weights = 0.5 + torch.rand(N, generator=g)
    ref_mean = mean + 0.01 * torch.randn(N, D, generator=g)
    kl_std = 0.5 + 0.1 * torch.rand(N, generator=g)
    t = dict(mean=mean, samples=samples, std=std, old=old, adv=adv, weights=weights, ref_mean=ref_mean,
             kl_std=kl_std)
    out = {k: v.to(device) for k, v in t.items()}
    for k in ("mean", "samples", "ref_mean"):
        out[k] = out[k].to(dtype).contiguous()
    out["mean"].requires_grad_(True)
    return out


def bytes_moved(shape, dtype=torch.float32):
    N, K, D = shape
    e = torch.finfo(dtype).bits // 8
    mean, samples, ref_mean, dmean = N * D * e, N * K * D * e, N * D * e, N * D * e
    return 2 * (mean + samples + ref_mean) + dmean


# providers --------------------------------------------------------------------------------------

def unfused_eager(t):
    """Flow-GRPO's loss as written in eager PyTorch (one log-prob per element of every sample)."""
    mean, samples, std = t["mean"], t["samples"], t["std"]
    mu = mean[:, None].expand_as(samples)
    s = std[:, None, None]
    log_prob = (-((samples.detach() - mu) ** 2) / (2 * s**2) - torch.log(s) - HALF_LOG_2PI).mean(-1)
    ratio = torch.exp(log_prob - t["old"])
    adv = torch.clamp(t["adv"], -ADV_CLIP, ADV_CLIP)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE)
    policy = (t["weights"][:, None] * torch.maximum(unclipped, clipped)).mean()
    kl = (((mean - t["ref_mean"]) ** 2).mean(-1) / (2 * t["kl_std"] ** 2)).mean()
    return policy + BETA * kl


def fused(backend):
    def run(t):
        with ops.use_backend(backend):
            return ops.fused_flow_grpo_loss(t["mean"], t["samples"], t["std"], t["old"], t["adv"],
                                            clip_range=CLIP_RANGE, weights=t["weights"], adv_clip=ADV_CLIP,
                                            ref_mean=t["ref_mean"], beta=BETA, kl_std=t["kl_std"]).loss
    return run


def cpp_kernels(t):
    """The C++ forward and backward primitives called directly: the kernels' own time, without the
    public API's validation, custom-op dispatch and autograd bookkeeping. Sets mean.grad like
    backward() would and returns the loss."""
    from tempflow_fast.ops import cpp_backend

    mean = t["mean"].detach()
    common = (t["old"], t["adv"], t["weights"], t["ref_mean"], t["kl_std"], CLIP_RANGE, ADV_CLIP, BETA)
    out = cpp_backend.flow_grpo_loss_fwd(mean, t["samples"], t["std"], *common)
    t["mean"].grad = cpp_backend.flow_grpo_loss_bwd(torch.ones((), dtype=out[0].dtype), mean, t["samples"],
                                                    t["std"], out[1], *common)
    return out[0]


def providers(device):
    """Providers for `device`: the C++ ones (a CPU backend) on CPU only, Triton on CUDA only."""
    names = ["fused-triton"] if device.type == "cuda" else ["fused-cpp", "cpp-kernels"]
    names += ["fused-torch", "unfused-eager"]
    return names


def progress(message):
    print(f"[bench/ops {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def provider_fn(name):
    if name == "cpp-kernels":
        return cpp_kernels
    return unfused_eager if name == "unfused-eager" else fused(name.split("-", 1)[1])


def fwd_bwd(fn, t):
    t["mean"].grad = None
    loss = fn(t)
    if loss.requires_grad:
        loss.backward()
    return loss


# measurements -----------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def quantiles(times):
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return [float(v) for v in q]


COPY = "torch.copy_"
COPY_NUMEL = 6_553_600  # 25 MB of fp32


def time_interleaved(names, t, device, reps, warmup):
    """Per-call times (ms) of each provider's fwd+bwd and of a plain 25 MB copy_, measured round-robin
    (one call of each per round), so that all of them see the same load on a shared machine."""
    src = torch.randn(COPY_NUMEL, device=device)
    dst = torch.empty_like(src)
    calls = {name: (lambda fn=provider_fn(name): fwd_bwd(fn, t)) for name in names}
    calls[COPY] = lambda: dst.copy_(src)
    for name, call in calls.items():  # the first call compiles Triton kernels / loads the C++ ops
        progress(f"  warm-up {name} ({warmup} calls)")
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        sync(device)
        progress(f"  warm-up {name} done in {time.perf_counter() - start:.1f} s")
    times = {name: [] for name in calls}
    for rep in range(reps):
        if rep % max(1, reps // 3) == 0:
            progress(f"  timing round {rep + 1}/{reps}")
        for name, call in calls.items():
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: quantiles(ts) for name, ts in times.items()}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_memory_child(provider, shape_name):
    """Run in a fresh process: RSS high-water mark of one fwd+bwd above the RSS just before it (MB)."""
    device = torch.device("cpu")
    fn = provider_fn(provider)
    fwd_bwd(fn, make_inputs((1, 2, 64), device))  # load the extension, start the OpenMP threads
    t = make_inputs(SHAPES[shape_name], device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fwd_bwd(fn, t)
    return (_status_kb("VmHWM") - before) / 1024.0


def peak_extra_memory(provider, shape_name, device, t):
    if device.type == "cuda":
        fwd_bwd(provider_fn(provider), t)
        t["mean"].grad = None
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fwd_bwd(provider_fn(provider), t)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", provider, shape_name,
           "--threads", str(torch.get_num_threads())]
    # glibc raises its mmap threshold after large frees (up to 32 MB) and then serves later blocks
    # from already-resident heap pages, which would hide them from the RSS high-water mark. A fixed
    # threshold keeps every block >= 128 KB a fresh mapping that is returned to the OS on free.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def max_grad_difference(t, name, baseline_grad, baseline_loss):
    loss = fwd_bwd(provider_fn(name), t).detach()
    return (abs(float(loss) - float(baseline_loss)),
            float((t["mean"].grad.float() - baseline_grad.float()).abs().max()))


# main -------------------------------------------------------------------------------------------

def bench_device(device, args, rows, stamp):
    dev_name, ver = device_name(device), version()
    nominal = next((v for k, v in NOMINAL_GPU_BANDWIDTH.items() if device.type == "cuda" and k in dev_name), None)

    def row(provider, shape, metric, unit, p50, p20=None, p80=None):
        rows.append(dict(subject="fused_flow_grpo_loss", provider=provider, shape=shape, dtype="float32",
                         metric=metric, unit=unit, p50=f"{p50:.6g}", p20=f"{(p50 if p20 is None else p20):.6g}",
                         p80=f"{(p50 if p80 is None else p80):.6g}", device=dev_name, version=ver, timestamp=stamp))

    table = [f"\n### {dev_name}" + (f" (nominal memory bandwidth {nominal:.0f} GB/s)" if nominal else ""), "",
             "| shape (N,K,D) | provider | fwd+bwd ms p50 [p20, p80] | speedup vs unfused | peak extra MB | GB/s | "
             "% of copy BW |" + (" % of nominal |" if nominal else "") + " max abs Δ vs unfused (loss / dmean) |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if nominal else "")]
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        shape_str, label, moved = "x".join(map(str, shape)), f"{shape_name} {shape}", bytes_moved(shape)
        t = make_inputs(shape, device)
        names = providers(device)
        progress(f"{dev_name}: shape {label}, providers {', '.join(names)}")
        timing = time_interleaved(names, t, device, args.reps, args.warmup)
        copy_ms = timing.pop(COPY)
        copy_gbs = [2 * COPY_NUMEL * 4 / (ms * 1e-3) / 1e9 for ms in copy_ms]  # read + write bytes
        row(COPY, f"25MB-during-{shape_str}", "copy_bandwidth", "GB/s", copy_gbs[0], copy_gbs[2], copy_gbs[1])
        # Agreement check so that a fast wrong kernel cannot look good: loss and dmean vs unfused.
        base_loss = fwd_bwd(unfused_eager, t).detach()
        base_grad = t["mean"].grad.clone()
        base_p50 = timing["unfused-eager"][0]
        for name in names:
            p50, p20, p80 = timing[name]
            progress(f"  {name}: fwd+bwd p50 {p50:.2f} ms; measuring peak memory and agreement")
            mem = peak_extra_memory(name, shape_name, device, t)
            dloss, dgrad = max_grad_difference(t, name, base_grad, base_loss)
            gbs = moved / (p50 * 1e-3) / 1e9
            row(name, shape_str, "fwd_bwd_time", "ms", p50, p20, p80)
            row(name, shape_str, "bandwidth", "GB/s", gbs, moved / (p80 * 1e-3) / 1e9, moved / (p20 * 1e-3) / 1e9)
            row(name, shape_str, "pct_copy_bandwidth", "%", 100 * gbs / copy_gbs[0])
            if nominal:
                row(name, shape_str, "pct_nominal_bandwidth", "%", 100 * gbs / nominal)
            row(name, shape_str, "peak_extra_memory", "MB", mem)
            row(name, shape_str, "speedup_vs_unfused", "x", base_p50 / p50)
            table.append(f"| {label} | {name} | {p50:.2f} [{p20:.2f}, {p80:.2f}] | {base_p50 / p50:.1f}x | "
                         f"{mem:.1f} | {gbs:.2f} | {100 * gbs / copy_gbs[0]:.0f}% |"
                         + (f" {100 * gbs / nominal:.1f}% |" if nominal else "") + f" {dloss:.1e} / {dgrad:.1e} |")
        table.append(f"| {label} | {COPY} 25 MB (same rounds) | {copy_ms[0]:.2f} [{copy_ms[1]:.2f}, {copy_ms[2]:.2f}] "
                     f"| | | {copy_gbs[0]:.2f} | 100% |" + (" |" if nominal else "") + " |")
        del t
    table.append("\nbytes that must move per fwd+bwd: "
                 + ", ".join(f"{s} {bytes_moved(SHAPES[s]) / 1e6:.1f} MB" for s in args.shapes)
                 + "; peak extra memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                               else "RSS high-water (VmHWM) in a child process per provider"))
    print("\n".join(table))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15, help="timed rounds (one call of every provider per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                   help="(N, K, D) shapes to run: flux-1024 = TempFlow's FLUX-1024 update, small = a quick one "
                        "(default: both)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                   help="auto: the GPU when there is one, else the CPU; all: CPU then GPU")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ops.csv"),
                   help="where the CSV goes (default bench/results/ops.csv)")
    p.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "SHAPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_output_arg(p, args.csv, "--csv")  # before minutes of timing, not after them
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps({"peak_extra_mb": peak_extra_memory_child(*args.memory_child)}))
        return 0

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        print("bench/ops.py: --device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    names = {"auto": ["cuda" if has_cuda else "cpu"], "all": ["cpu"] + (["cuda"] if has_cuda else [])}
    for device in names.get(args.device, [args.device]):
        bench_device(torch.device(device), args, rows, stamp)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
