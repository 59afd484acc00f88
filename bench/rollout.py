"""Benchmark of the rollout engine: NFE by phase, wall time and images/s for the papers' plans.
Not a test: it prints a markdown table and writes bench/results/rollout.csv.

    python bench/rollout.py                       # eager and torch.compile runners
    python bench/rollout.py --no-compile --reps 3 --prompts 2

Plans (one group per prompt):
- flow_grpo_24x10: FullSDE, G = 24 trajectories, T = 10
- tempflow_4x6:    Bifurcation, N = 4 seeds × K = 6 branches at every k in 0..8, T = 10
- g2rpo_12xL123:   SingularSDE, G = 12 branches at each k in M = 0..7, Λ = {1, 2, 3}, T = 16

Metrics (CSV row: subject, plan, provider, metric, unit, value, device, version, timestamp)
- `nfe_<phase>` / `nfe_total` (calls = latent rows through the model): provider `engine` is what
  the engine counted; `min` the analytical minimum of design.md §3.1 (accounting.min_nfe);
  `recompute-prefix` a per-branch plan with no trunk sharing (each branch integrates its own
  prefix and finishes each granularity separately, accounting.recompute_prefix_nfe).
- `wall_time` (s): median over --reps rollouts after one warm-up rollout, per runner: `eager`
  (unpadded batches unless --bucket-eager) and `compile` (torch.compile, padded to --buckets).
  `compile_time` (s): the warm-up rollout of the compiled runner, compile included.
  `images_per_s` (images/s): final images (all granularities and trunk images) / wall_time.
  `padded_rows` (rows): bucket padding the model also evaluated.

Model: the shipped tiny FLUX (tempflow_fast/models/tiny_flux.py) when its weights are installed,
else the same architecture with random weights (timings are the same; images are noise).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tempflow_fast.outputs import check_output_arg
from tempflow_fast.sampling.accounting import min_nfe, recompute_prefix_nfe
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, FullSDE, SingularSDE
from tempflow_fast.sampling.runners import CompiledRunner, EagerRunner

PLANS = {
    "flow_grpo_24x10": FullSDE(num_steps=10, samples_per_prompt=24),
    "tempflow_4x6": Bifurcation(num_steps=10, seeds_per_prompt=4, branches=6),
    "g2rpo_12xL123": SingularSDE(num_steps=16, branches=12, granularities=(1, 2, 3)),
}
PROMPTS = ["a red square left of a blue square", "two blue squares", "a green square above a yellow square"]


def say(message: str) -> None:
    """A progress line on stderr (stdout keeps the table)."""
    print(f"  {message}", file=sys.stderr, flush=True)


def load_model(device):
    from tempflow_fast.models import tiny_flux
    from tempflow_fast.tasks.shapes.task import new_model

    try:
        return tiny_flux.load_shipped(device), "tiny_flux (shipped weights)"
    except (ValueError, FileNotFoundError, ModuleNotFoundError):
        model = new_model(seed=0)
        model.module.to(device)
        return model, "tiny_flux (random weights)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1, help="prompts (groups) per rollout")
    ap.add_argument("--reps", type=int, default=2, help="timed rollouts per plan and runner")
    ap.add_argument("--buckets", type=str, default="32",
                    help="bucket sizes (rows) of the compiled runner, and of the eager one with --bucket-eager; "
                         "one size = one Inductor compile, which dominates the run time on a CPU")
    ap.add_argument("--bucket-eager", action="store_true",
                    help="pad eager batches to the same buckets (eager needs no fixed shapes; off by default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile runner")
    ap.add_argument("--plans", type=str, default=",".join(PLANS), help="comma-separated subset of " + ",".join(PLANS))
    ap.add_argument("--csv", type=str, default=str(Path(__file__).parent / "results" / "rollout.csv"),
                    help="where the CSV goes (default bench/results/rollout.csv)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch CPU threads (default: 2, or the cores there are when fewer)")
    args = ap.parse_args(argv)
    check_output_arg(ap, args.csv, "--csv")  # before minutes of timing, not after them
    if not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"--prompts must be in 1..{len(PROMPTS)}, got {args.prompts}")
    plans = [p for p in args.plans.split(",") if p]
    for p in plans:
        if p not in PLANS:
            raise ValueError(f"--plans: unknown plan {p!r}; known: {', '.join(PLANS)}")
    buckets = tuple(int(b) for b in args.buckets.split(","))

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, model_name = load_model(device)
    prompts = PROMPTS[:args.prompts]
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(0)
    else:
        dev_name = f"{platform.processor() or 'cpu'} ({args.threads} threads)"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []

    def emit(plan, provider, metric, unit, value):
        rows.append(dict(subject="rollout", plan=plan, provider=provider, metric=metric, unit=unit, value=value,
                         device=dev_name, version=torch.__version__, timestamp=stamp))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runners = [("eager", lambda: EagerRunner(model, buckets if args.bucket_eager else None))]
    if not args.no_compile:
        runners.append(("compile", lambda: CompiledRunner(model, buckets)))
    table = []
    for name in plans:
        plan = PLANS[name]
        layout = plan.layout()
        want_min = min_nfe(layout, len(prompts))
        want_rec = recompute_prefix_nfe(layout, len(prompts))
        for provider, counts in (("min", want_min), ("recompute-prefix", want_rec)):
            for phase, n in counts.items():
                emit(name, provider, f"nfe_{phase}", "calls", n)
            emit(name, provider, "nfe_total", "calls", sum(counts.values()))
        line = {"plan": name}
        for rname, make in runners:
            runner = make()
            say(f"{name} [{rname}]: warm-up rollout{' (torch.compile: minutes on a CPU)' if rname == 'compile' else ''}")
            t0 = time.perf_counter()
            res = rollout(model, prompts, plan, seed=0, runner=runner)
            sync()
            warm = time.perf_counter() - t0
            say(f"{name} [{rname}]: warm-up {warm:.1f} s; {args.reps} timed rollout(s)")
            times = []
            for rep in range(args.reps):
                t0 = time.perf_counter()
                res = rollout(model, prompts, plan, seed=rep + 1, runner=runner)
                sync()
                times.append(time.perf_counter() - t0)
                say(f"{name} [{rname}]: rollout {rep + 1}/{args.reps} {times[-1]:.2f} s")
            wall = statistics.median(times)
            if res.stats.nfe != want_min:
                raise RuntimeError(f"{name}: engine NFE {res.stats.nfe} != analytical minimum {want_min}")
            images = res.stats.images["trunk"] + res.stats.images["completion"] + res.stats.images["granularity"]
            if rname == "eager":
                for phase, n in res.stats.nfe.items():
                    emit(name, "engine", f"nfe_{phase}", "calls", n)
                emit(name, "engine", "nfe_total", "calls", res.stats.total_nfe)
                emit(name, "engine", "images", "images", images)
                line.update(nfe=res.stats.nfe, nfe_total=res.stats.total_nfe, rec_total=sum(want_rec.values()),
                            images=images, padded=res.stats.padded_rows)
            else:
                emit(name, rname, "compile_time", "s", round(warm, 3))
            emit(name, rname, "wall_time", "s", round(wall, 4))
            emit(name, rname, "images_per_s", "images/s", round(images / wall, 2))
            emit(name, rname, "padded_rows", "rows", res.stats.padded_rows)
            line[f"{rname}_s"] = wall
            line[f"{rname}_ips"] = images / wall
            if rname == "compile":
                line["compile_warm_s"] = warm
            say(f"{name} [{rname}]: median {wall:.3f} s, {images / wall:.1f} images/s")
        table.append(line)

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    print(f"\n### Rollout engine — {model_name}, {dev_name}, torch {torch.__version__}, "
          f"{len(prompts)} prompt(s), compiled buckets {buckets}\n")
    head = ("| plan | NFE trunk | NFE completion | NFE granularity | NFE total (calls) | recompute-prefix NFE (calls) "
            "| images | eager (s) | eager (images/s) |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if not args.no_compile:
        head += " compiled (s) | compiled (images/s) | compile warm-up (s) |"
        sep += "---:|---:|---:|"
    print(head)
    print(sep)
    for ln in table:
        n = ln["nfe"]
        s = (f"| {ln['plan']} | {n['trunk']} | {n['completion']} | {n['granularity']} | {ln['nfe_total']} | "
             f"{ln['rec_total']} | {ln['images']} | {ln['eager_s']:.3f} | {ln['eager_ips']:.1f} |")
        if not args.no_compile:
            s += f" {ln['compile_s']:.3f} | {ln['compile_ips']:.1f} | {ln['compile_warm_s']:.1f} |"
        print(s)
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
