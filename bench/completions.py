"""Cheaper completions: what each completion solver saves and what it changes, against the schedule's Euler steps.
Not a test: it prints a markdown table and writes CSV (docs/completions.md holds a run).

    OMP_NUM_THREADS=1 python bench/completions.py                      # 13 prompts, every setting in CONFIGS
    python bench/completions.py --prompts 4 --configs euler:3,tweedie:1

For each setting (`solver:steps`, sampling/solvers.py) one TempFlow rollout of the shipped shapes model (T = 10,
4 seeds × 6 branches, branch steps k = 0..8, the same seed for every setting: trunks and branch samples are
identical, only the completions after the branch step differ) is compared with the Euler-T completion:

- completion calls (latent rows through the model after the branch step) and the share saved, for all k = 0..8
  (TempFlow's FLUX preset) and for k = 0..3 (the shapes preset, configs/shapes_tempflow.yaml; its branches are
  the same rows of the same rollout, because the engine draws the noise of k = 0..3 first);
- image difference: mean |Δ| per pixel (images in [0, 1]) and the largest per-image mean;
- within-group rank agreement with the Euler-T rewards: per (prompt, seed, k) group of K = 6 branches, the Spearman
  correlation of the rewards (average ranks for ties), averaged over the groups where the Euler-T rewards differ
  (the others carry no signal; a group the setting flattens counts 0); and the Pearson correlation of the
  group-normalised advantages over those groups' samples (what the update sees). Rewards: the shapes detector's
  partial score (the preset's training reward), JPEG compressibility (rewards/jpeg.py), brightness.
- the same agreement against an accurate completion (--accurate, default Heun with all 2·(T-k-1)-1 calls, second
  order on every step): Euler-T is itself an approximation, and this says how far it is from the ODE's own image
  (the row `euler:T`) and whether a cheaper solver is as close as it.

CSV columns: solver, steps, scope (k range), completion_calls, calls_saved, image_mae, image_mae_max, seconds, then
per reward spearman_<reward>, adv_corr_<reward>, signal_kept_<reward> (share of signal groups that keep a spread)
against Euler-T, and spearman_acc_<reward>, adv_corr_acc_<reward> against the accurate completion.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from tempflow_fast.algorithms.advantages import normalize_in_groups
from tempflow_fast.algorithms.base import group_key
from tempflow_fast.images import to_unit_float
from tempflow_fast.outputs import check_output_arg
from tempflow_fast.rewards.jpeg import COMPRESSIBILITY_SCALE, JpegReward
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation
from tempflow_fast.sampling.solvers import completion_calls

CONFIGS = ("euler:2", "euler:3", "euler:4", "euler:5", "heun:2", "heun:3", "dpmpp_2m:2", "dpmpp_2m:3", "dpmpp_2m:4",
           "dpmpp_2m:5", "dpmpp_2m:T", "tweedie:1", "tweedie:2", "tweedie:3")
SCOPES = {"k=0..8": range(9), "k=0..3": range(4)}
T, SEEDS, BRANCHES = 10, 4, 6


def rewards_of(images, prompts):
    from tempflow_fast.tasks.shapes.detector import ShapesReward

    return {"shapes": ShapesReward("partial")(images, prompts),
            "jpeg": JpegReward("jpeg_compressibility", COMPRESSIBILITY_SCALE)(images, prompts),
            "brightness": to_unit_float(images).mean(dim=(1, 2, 3))}


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dim, ties sharing their average rank."""
    order = x.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(x)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x).contiguous())
    equal = x[..., :, None] == x[..., None, :]
    return (equal * ranks[..., None, :]).sum(-1) / equal.sum(-1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    den = (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp(min=1e-30), torch.zeros_like(den))


def agreement(ref: torch.Tensor, got: torch.Tensor, key: torch.Tensor):
    """(mean within-group Spearman, pooled advantage correlation, share of signal groups keeping a spread) over the
    groups of `key` whose reference rewards differ."""
    groups = [key == g for g in key.unique().tolist()]
    r = torch.stack([ref[g] for g in groups]).double()
    x = torch.stack([got[g] for g in groups]).double()
    signal = r.std(-1) > 0
    rho = _pearson(average_ranks(r[signal]), average_ranks(x[signal]))
    adv_r = normalize_in_groups(ref.double(), key).advantages
    adv_x = normalize_in_groups(got.double(), key).advantages
    keep = torch.cat([g.nonzero().squeeze(1) for g, s in zip(groups, signal.tolist()) if s])
    return float(rho.mean()), float(_pearson(adv_r[keep], adv_x[keep])), float((x[signal].std(-1) > 0).double().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=13, help="shapes training prompts, spread over the list")
    p.add_argument("--seed", type=int, default=0, help="seed of the rollout every setting shares (default 0)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated solver:steps settings")
    p.add_argument("--accurate", default="heun:9", help="solver:steps of the accurate reference completion")
    p.add_argument("--out", default="bench/results/completions.csv", help="where the CSV goes (default %(default)s)")
    args = p.parse_args(argv)
    check_output_arg(p, args.out, "--out")  # before minutes of timing, not after them
    from tempflow_fast.models.tiny_flux import load_shipped
    from tempflow_fast.tasks.shapes.grammar import TRAIN_PROMPTS

    def parse(c):
        solver, _, steps = c.partition(":")
        return solver, (None if steps in ("", "T") else int(steps))

    configs = [parse(c) for c in args.configs.split(",") if c]
    step = max(1, len(TRAIN_PROMPTS) // args.prompts)
    prompts = list(TRAIN_PROMPTS[::step][:args.prompts])
    model = load_shipped()

    def run(solver, steps):
        plan = Bifurcation(num_steps=T, seeds_per_prompt=SEEDS, branches=BRANCHES, completion_solver=solver,
                           completion_steps=steps)
        t0 = time.perf_counter()
        res = rollout(model, prompts, plan, seed=args.seed)
        texts = [prompts[i] for i in res.trajectories.prompt.tolist()]
        return res, rewards_of(res.images[1], texts), time.perf_counter() - t0

    ref, ref_rewards, ref_s = run("euler", None)
    _, acc_rewards, _ = run(*parse(args.accurate))
    tr = ref.trajectories
    key = group_key(tr.prompt, tr.seed, tr.branch_step)
    images_ref = to_unit_float(ref.images[1])
    print(f"{len(prompts)} prompts × {SEEDS} seeds × {BRANCHES} branches, T = {T}; Euler-T rollout {ref_s:.1f} s",
          file=sys.stderr)
    rows = []
    for solver, steps in [("euler", None)] + configs:
        res, rew, secs = (ref, ref_rewards, ref_s) if (solver, steps) == ("euler", None) else run(solver, steps)
        assert torch.equal(res.samples.sample, ref.samples.sample)  # only the completions differ
        diff = (to_unit_float(res.images[1]) - images_ref).abs().flatten(1).mean(1)
        for scope, ks in SCOPES.items():
            sel = torch.isin(tr.branch_step, torch.tensor(list(ks)))
            euler = len(prompts) * SEEDS * BRANCHES * sum(completion_calls(T, k + 1) for k in ks)
            calls = len(prompts) * SEEDS * BRANCHES * sum(completion_calls(T, k + 1, solver, steps) for k in ks)
            row = {"solver": solver, "steps": steps, "scope": scope, "completion_calls": calls,
                   "calls_saved": 1 - calls / euler, "image_mae": float(diff[sel].mean()),
                   "image_mae_max": float(diff[sel].max()), "seconds": secs}
            for name in ref_rewards:
                rho, adv, kept = agreement(ref_rewards[name][sel], rew[name][sel], key[sel])
                row.update({f"spearman_{name}": rho, f"adv_corr_{name}": adv, f"signal_kept_{name}": kept})
            for name in ref_rewards:
                rho, adv, _ = agreement(acc_rewards[name][sel], rew[name][sel], key[sel])
                row.update({f"spearman_acc_{name}": rho, f"adv_corr_acc_{name}": adv})
            rows.append(row)
        print(f"  {solver}:{steps} done ({secs:.1f} s)", file=sys.stderr)

    names = list(ref_rewards)
    head = ["solver", "steps", "scope", "calls", "saved", "image MAE", "max"] + \
        [f"ρ {n}" for n in names] + [f"adv r {n}" for n in names] + [f"ρ* {n}" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for r in rows:
        cells = [r["solver"], "T" if r["steps"] is None else str(r["steps"]), r["scope"], str(r["completion_calls"]),
                 f"{100 * r['calls_saved']:.0f}%", f"{r['image_mae']:.4f}", f"{r['image_mae_max']:.3f}"] + \
            [f"{r[f'spearman_{n}']:.3f}" for n in names] + [f"{r[f'adv_corr_{n}']:.3f}" for n in names] + \
            [f"{r[f'spearman_acc_{n}']:.3f}" for n in names]
        print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nρ: within-group Spearman vs Euler-T; adv r: advantage correlation vs Euler-T; ρ*: Spearman vs the "
          f"accurate completion ({args.accurate}). Command: python bench/completions.py {' '.join(argv or sys.argv[1:])}")
    print(f"CSV: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
