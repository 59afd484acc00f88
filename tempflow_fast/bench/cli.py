"""`tempflow-fast bench [SUBJECT ...] [options]`: the bench suite (subjects.py) in one command.

    tempflow-fast bench                                  # every subject, papers' plans, shipped tiny model
    tempflow-fast bench rollout iteration --model-path runs/try/final
    tempflow-fast bench rollout iteration --model-kind flux --model-path black-forest-labs/FLUX.1-dev
    tempflow-fast bench --quick --reps 2                 # small plans and model: a smoke run

    tempflow-fast bench official --prompts 4             # the trainer vs the public codes' structure

Prints one markdown table (and the `official` subject's "<phase> vs official structure" lines), writes
`<out>/bench.csv` (columns: results.COLUMNS, one schema for every subject), `<out>/bench.md` (the table, the lines
and the FLUX.1-dev 1024 px extrapolation) and `<out>/<subject>.png` (timings, p50 with p20–p80 whiskers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tempflow_fast.bench.subjects import DEFAULT_SOLVER, SUBJECTS, Settings, run
from tempflow_fast.outputs import check_output_file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempflow-fast bench",
        description="Run the bench suite (tempflow_fast/bench/subjects.py): ops, rollout, train_step, iteration and "
                    "official subjects in one command, printing a markdown table and writing bench.csv, bench.md "
                    "and a plot per subject. Progress goes to stderr.")
    p.add_argument("subjects", nargs="*", metavar="SUBJECT",
                   help=f"any of {', '.join(SUBJECTS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small plans, op shapes and model (a smoke run)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before them")
    p.add_argument("--prompts", type=int, default=1, help="prompts (groups) per rollout and iteration")
    p.add_argument("--method", default="tempflow", choices=["flow_grpo", "tempflow", "g2rpo", "stepwise"],
                   help="trainer method of train_step / iteration")
    p.add_argument("--model-path", default=None,
                   help="the model to bench instead of the shipped tiny one: a folder or hub id for --model-kind")
    p.add_argument("--model-kind", default="tiny_flux", choices=["tiny_flux", "flux", "sd3", "qwen_image"],
                   help="adapter that loads --model-path")
    p.add_argument("--dtype", default=None, help="flux / sd3 weights dtype: bf16 (default), fp16, fp32")
    p.add_argument("--resolution", type=int, default=None, help="flux / sd3 image size (default: the adapter's)")
    p.add_argument("--reward", default="brightness", choices=["brightness", "shapes"],
                   help="brightness: continuous, every sample trained (full update cost); shapes: the task's detector")
    p.add_argument("--ops-providers", default=None,
                   help="comma-separated ops providers (default: bench/ops.py's for the device)")
    p.add_argument("--plans", default=None, help="comma-separated rollout plans (default: all of the set in use)")
    p.add_argument("--completion-solver", default=DEFAULT_SOLVER[0],
                   help="official subject: also run the trainer with this completion solver (euler with no "
                        f"--completion-steps: not run; default {DEFAULT_SOLVER[0]})")
    p.add_argument("--completion-steps", type=int, default=DEFAULT_SOLVER[1],
                   help=f"steps of that solver per completion (default {DEFAULT_SOLVER[1]})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu or auto (default auto: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="bench/results/suite", help="folder for bench.csv and the plots")
    p.add_argument("--no-plots", action="store_true", help="write no <subject>.png plots (no matplotlib needed)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    subjects = list(dict.fromkeys(args.subjects)) or list(SUBJECTS)
    try:
        unknown = [x for x in subjects if x not in SUBJECTS]
        if unknown:
            raise ValueError(f"SUBJECT: unknown {unknown[0]!r}; known: {', '.join(SUBJECTS)}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        from tempflow_fast.rewards.base import resolve_device
        from tempflow_fast.training.trainer import check_device

        if args.device is not None:
            check_device(args.device, "--device")
        check_output_file(Path(args.out) / "bench.csv", "--out")  # before the timing, not after it

        device = resolve_device(args.device or "auto")
        settings = Settings(device=device, reps=args.reps, warmup=args.warmup, quick=args.quick, prompts=args.prompts,
                            method=args.method, model_kind=args.model_kind, model_path=args.model_path, dtype=args.dtype,
                            resolution=args.resolution, reward=args.reward,
                            ops_providers=[x for x in args.ops_providers.split(",") if x] if args.ops_providers
                            else None,
                            plans=[x for x in args.plans.split(",") if x] if args.plans else None,
                            completion_solver=args.completion_solver, completion_steps=args.completion_steps)
        results = run(subjects, settings)
    except ValueError as err:
        print(f"tempflow-fast bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    csv_path = results.write_csv(out / "bench.csv")
    md_path = results.write_markdown(out / "bench.md")
    print(results.markdown())
    print(f"\nCSV: {csv_path}\nreport: {md_path}")
    if not args.no_plots:
        for subject in results.subjects():
            path = results.plot(subject, out / f"{subject}.png")
            if path is not None:
                print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
