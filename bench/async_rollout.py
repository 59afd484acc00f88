"""Benchmark of `train.async_rollout` (the next rollout samples while this update runs, one step off-policy)
against the synchronous loop: seconds per iteration, in alternating blocks of consecutive iterations, and, given
two finished runs, what it did to learning. Not a test: prints markdown tables and writes CSV.

    python bench/async_rollout.py                                   # the main job's preset, 3 rounds of 4 iterations
    python bench/async_rollout.py --config configs/shapes_flow_grpo.yaml --rounds 5 --block 3
    python bench/async_rollout.py --rounds 0 --runs runs/main runs/main_async   # learning only: two runs' summaries

Timing: a sync trainer and an async trainer (same config, same seed, each its own copy of the model) take turns,
one block of `--block` consecutive iterations at a time (the async loop only overlaps across consecutive
iterations). An async block ends by waiting for the rollout its last iteration launched to finish (its result
serves the next block's first iteration), and that wait counts: every block holds B rollouts and B updates, and no
block runs beside another. Reported per provider: the median over blocks of seconds per iteration, and the
ratio. The overlap hides min(update, rollout) per iteration at best: on a CPU both phases share the same cores,
on one GPU the same SMs, so the gain is bounded by how much of each phase leaves the device idle (launch gaps,
host work, reward models on another device); the learning effect is the price (one-step-stale samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from tempflow_fast.outputs import check_output_arg


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timing(config: str, rounds: int, block: int, extra) -> list:
    from tempflow_fast import Config, Trainer

    rows = []
    with tempfile.TemporaryDirectory(prefix="tempflow-async-") as tmp:
        trainers = {}
        for name, flag in (("sync", "false"), ("async_rollout", "true")):
            cfg = Config.from_yaml(config, [f"output_dir={tmp}/{name}", f"train.async_rollout={flag}",
                                            f"train.iterations={rounds * block + 1}", "log.progress=false",
                                            "log.tensorboard=false", "eval.probe_prompts=0", *extra])
            trainers[name] = Trainer(cfg, eval_fn=lambda m: None)
        per_block = {name: [] for name in trainers}
        position = {name: 0 for name in trainers}
        def drain(t):  # the rollout the last iteration launched, finished (kept for the next block's first iteration)
            if t._background is not None and t._background.pending is not None:
                t._background.pending[1].result()

        for name, t in trainers.items():  # warm-up: one iteration each (first-call costs), not timed
            t.run_iteration(0)
            drain(t)
            position[name] = 1
        for r in range(rounds):
            for name, t in trainers.items():
                start = time.perf_counter()
                for _ in range(block):
                    t.run_iteration(position[name])
                    position[name] += 1
                drain(t)  # counted here, so no block runs beside another; each block holds B rollouts and B updates
                seconds = (time.perf_counter() - start) / block
                per_block[name].append(seconds)
                print(f"[async] round {r + 1}/{rounds} {name}: {seconds:.2f} s/iteration", file=sys.stderr, flush=True)
        for t in trainers.values():
            t.close()
    sync = _median(per_block["sync"])
    for name, xs in per_block.items():
        rows.append({"table": "timing", "provider": name, "config": config, "block": block, "rounds": rounds,
                     "median_s_per_iteration": round(_median(xs), 4), "min": round(min(xs), 4),
                     "max": round(max(xs), 4), "speedup_vs_sync": round(sync / _median(xs), 3)})
    return rows


def learning(runs) -> list:
    rows = []
    for run in runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        before, after = s["before"]["overall"], s["after"]["overall"]
        change = s.get("probe_change") or {}
        rows.append({"table": "learning", "run": run, "iterations": s["iterations"],
                     "heldout_before": round(before["accuracy"], 3), "heldout_after": round(after["accuracy"], 3),
                     "heldout_change": round(after["accuracy"] - before["accuracy"], 3),
                     "heldout_after_ci95": (f"[{after['ci95'][0]:.3f}, {after['ci95'][1]:.3f}]"
                                            if "ci95" in after else None),
                     "probe_before": round(s["probe_before"]["mean"], 3) if s.get("probe_before") else None,
                     "probe_after": round(s["probe_after"]["mean"], 3) if s.get("probe_after") else None,
                     "probe_change": round(change["mean"], 3) if "mean" in change else None,
                     "probe_change_ci95": (f"[{change['ci95'][0]:+.3f}, {change['ci95'][1]:+.3f}]"
                                           if "ci95" in change else None),
                     "wall_s": round(s["counters"]["wall_seconds"], 1)})
    return rows


def _table(rows) -> str:
    keys = [k for k in rows[0] if k != "table"]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/async_rollout.py",
                                description="Seconds per iteration with train.async_rollout against the synchronous "
                                            "loop, and the learning of two finished runs.")
    p.add_argument("--config", default="configs/shapes_tempflow.yaml", help="preset (default: the main job's)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (0: learning table only)")
    p.add_argument("--block", type=int, default=4, help="consecutive iterations per provider and round")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--runs", nargs="*", default=[], help="finished run folders (summary.json) to tabulate")
    p.add_argument("--csv", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    check_output_arg(p, args.csv, "--csv")  # before minutes of timing, not after them
    if args.rounds < 0 or args.block < 1:
        print("bench/async_rollout.py: --rounds must be >= 0 and --block >= 1", file=sys.stderr)
        return 2
    rows = timing(args.config, args.rounds, args.block, args.set) if args.rounds else []
    if rows:
        print(_table(rows))
    learned = learning(args.runs)
    if learned:
        print()
        print(_table(learned))
    if args.csv and (rows or learned):
        with open(args.csv, "w", newline="") as f:
            keys = list(dict.fromkeys(k for r in rows + learned for k in r))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows + learned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
