"""The methods compared on the shapes task and the JPEG compressibility task, with the TempFlow ablations and
adaptive bifurcation, MixGRPO and DiffusionNFT.

Trains every method from the shipped base model at equal group size (24 images per prompt group where the
method allows) and equal iterations, over several run seeds (Flow-GRPO and Stepwise, whose whole-trajectory
groups cost about a third of TempFlow's model calls per iteration, run 3x the iterations so that both equal
iterations and about equal model calls are on their curves), with the trainer in-process; evaluates held-out
accuracy (overall and by category) every E iterations and records, per eval point, the iteration, the
cumulative rollout model calls (NFE) and the cumulative train-loop wall seconds. Then writes a report:
markdown tables (mean ± std over seeds) against iterations, model calls and wall seconds, the model calls
each method needs to reach a target accuracy and the ratio to Flow-GRPO, each method's last point against
Flow-GRPO at equal model calls and at equal wall seconds (paired by seed), the TempFlow ablation chain, PNG
curves, and the reward spread per bifurcation step of the TempFlow runs.

Resumable per run: each (method, seed) trains in OUT/runs/<method>/seed<s>; a run with summary.json is
skipped, a run with a checkpoint resumes from it (checkpoints every E iterations), and a finished run
shorter than asked (a grid rerun with more --iterations) continues from its last checkpoint. Several processes
may run over one folder (one per core): each run is locked before its files are touched, and a process skips a
run another live process holds ("busy"), so the same command started twice splits the grid between the two.

Tasks (--tasks): shapes (held-out accuracy; OUT itself) and compressibility (the same prompts and presets with
reward.name jpeg_compressibility, held-out mean reward; OUT/compressibility). Every run also logs the probe reward
(the trained reward on fixed train prompts × fixed noises, with its 95% interval) at each eval point; the report
tabulates it against model calls. Every eval row also records the machine the run trained on (host, CPU, a
calibration timing), and the report says what those records show about the wall seconds.

    python bench/methods.py --out runs/methods                     # the full grid on shapes (hours on 2 CPU cores)
    python bench/methods.py --out runs/methods --tasks compressibility
    python bench/methods.py --quick --out /tmp/methods_quick       # CI: every method on both tasks, reports written

docs/results.md is made from the logs committed in docs/results-data (each finished run's summary.json, evals.jsonl
and metrics.jsonl; .gitignore keeps its checkpoints and images out): rebuild it with
    python bench/methods.py --out docs/results-data --seeds 5 --tasks shapes,compressibility --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tempflow_fast.tasks.stats import bootstrap_interval, paired_interval, seed_interval  # noqa: E402  (after the path fix above)

PRESETS = {
    "flow_grpo": ROOT / "configs" / "shapes_flow_grpo.yaml",
    "tempflow": ROOT / "configs" / "shapes_tempflow.yaml",
    "g2rpo": ROOT / "configs" / "shapes_g2rpo.yaml",
    "stepwise": ROOT / "configs" / "shapes_stepwise.yaml",
    "mixgrpo": ROOT / "configs" / "shapes_mixgrpo.yaml",
    "diffusion_nft": ROOT / "configs" / "shapes_diffusion_nft.yaml",
}

# task -> (overrides on every method's preset, label of the held-out metric, sub-folder of OUT, what its cells are)
TASKS: Dict[str, tuple] = {
    "shapes": ([], "held-out accuracy", "", "accuracy"),
    "compressibility": (["data.task=compressibility", "reward.name=jpeg_compressibility", "reward.shapes_score=strict"],
                        "held-out reward (-kB of the JPEG)", "compressibility", "reward"),
}

# name -> (label, preset method, overrides). Group size 24 per prompt group where the method has one.
METHODS: Dict[str, tuple] = {
    "flow_grpo": ("Flow-GRPO", "flow_grpo", ["flow_grpo.group_size=24"]),
    "tempflow": ("TempFlow-GRPO", "tempflow", ["tempflow.num_seeds=4", "tempflow.branches=6"]),
    "tempflow_no_weights": ("TempFlow w/o noise-aware weights", "tempflow",
                            ["tempflow.num_seeds=4", "tempflow.branches=6", "tempflow.noise_aware_weights=false"]),
    "tempflow_no_seed_grouping": ("TempFlow w/o seed grouping", "tempflow",
                                  ["tempflow.num_seeds=4", "tempflow.branches=6", "tempflow.seed_grouping=false"]),
    "tempflow_bifurcation_only": ("TempFlow bifurcation only", "tempflow",
                                  ["tempflow.num_seeds=4", "tempflow.branches=6", "tempflow.noise_aware_weights=false",
                                   "tempflow.seed_grouping=false"]),
    "g2rpo_l1": ("G²RPO Λ={1}", "g2rpo", ["g2rpo.branches=24", "g2rpo.granularities=[1]"]),
    "g2rpo_l123": ("G²RPO Λ={1,2,3}", "g2rpo", ["g2rpo.branches=24", "g2rpo.granularities=[1,2,3]"]),
    "stepwise": ("Stepwise-Flow-GRPO", "stepwise", ["stepwise.group_size=24"]),
    # candidates: every step; budget 4 = as many branch steps as the preset's fixed k in {0,1,2,3}
    "tempflow_adaptive": ("TempFlow adaptive bifurcation", "tempflow",
                          ["tempflow.num_seeds=4", "tempflow.branches=6", "tempflow.bifurcation_steps=null",
                           "tempflow.adaptive_bifurcation=true", "tempflow.adaptive_budget=4",
                           "tempflow.adaptive_floor=0.2"]),
    # the papers' window (w = 4, moved by 1 every 25 iterations) and β, decay; groups of 24 as the rows above
    "mixgrpo": ("MixGRPO", "mixgrpo", ["mixgrpo.group_size=24"]),
    "diffusion_nft": ("DiffusionNFT", "diffusion_nft", ["diffusion_nft.group_size=24"]),
}

# Iterations relative to --iterations. Model calls per iteration on the shapes presets (4 prompts, T = 10):
# Flow-GRPO and Stepwise 24 x 10 x 4 = 960; TempFlow 4 x 6 branches at k in {0..3} = 3040; G2RPO 3400 (L={1})
# and 5512 (L={1,2,3}); MixGRPO (1 + 24 x 9) x 4 = 868 with its first window; DiffusionNFT 24 x 10 x 4 = 960. At
# 3x, Flow-GRPO, Stepwise, MixGRPO and DiffusionNFT spend 2600-2880 per --iterations step, about TempFlow's budget.
ITERATION_SCALE: Dict[str, int] = {"flow_grpo": 3, "stepwise": 3, "mixgrpo": 3, "diffusion_nft": 3}

# --quick: small groups, few steps, a tiny eval; only checks that every method runs and the report is made
QUICK_OVERRIDES = [
    "train.prompts_per_iteration=2", "sampling.num_steps=4", "eval.num_steps=4", "eval.images_per_prompt=1",
    "flow_grpo.group_size=4", "tempflow.num_seeds=2", "tempflow.branches=2", "tempflow.bifurcation_steps=[0,1]",
    "tempflow.adaptive_budget=1", "g2rpo.branches=2", "g2rpo.branch_steps=null", "stepwise.group_size=4",
    "mixgrpo.group_size=4", "diffusion_nft.group_size=4", "eval.probe_prompts=2", "eval.probe_images=1",
]


# --- one run ------------------------------------------------------------------------------------------

def machine_record() -> dict:
    """Where this run's wall seconds come from: host, CPU model, torch threads and a calibration, the median
    milliseconds of a fixed CPU workload (10 float32 512 x 512 matmuls, 5 repeats) timed now, under the load the
    run sees. A grid resumes across sittings and machines; this tells its wall seconds apart (model calls need not)."""
    import platform
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, a)
        times.append(time.perf_counter() - start)
    return {"host": platform.node(), "cpu": cpu, "threads": torch.get_num_threads(),
            "calibration_ms": round(sorted(times)[2] * 1e3, 2)}


class EvalRecorder:
    """Wraps the trainer's eval: records every eval point (iteration, NFE, wall seconds, accuracy table, and the
    machine record of the process that trained up to it)."""

    def __init__(self, inner, path: Path, machine: Optional[dict] = None):
        self.inner, self.path, self.trainer, self.machine = inner, path, None, machine

    def __call__(self, model):
        table = self.inner(model)
        t = self.trainer
        row = {"iteration": t.iteration, "nfe": t.counters.nfe, "wall_seconds": t.counters.wall_seconds,
               "accuracy": table["overall"]["accuracy"], "ci95": table["overall"].get("ci95"),
               "categories": {k: v["accuracy"] for k, v in table.items() if k != "overall"}}
        if self.machine is not None:
            row["machine"] = self.machine
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return table


def method_overrides(name: str, *, seed: int, iterations: int, eval_every: int, out: Path,
                     quick: bool = False, extra: Sequence[str] = (), task: str = "shapes") -> List[str]:
    _, method, overrides = METHODS[name]
    return [f"method={method}", f"output_dir={out}", f"seed={seed}", f"train.iterations={iterations}",
            f"eval.every={eval_every}", f"checkpoint.every={eval_every}", "checkpoint.keep_last=1",
            "log.tensorboard=false", "log.progress=false", "log.sample_every=0",
            *TASKS[task][0], *overrides, *(QUICK_OVERRIDES if quick else []), *extra]


def run_one(name: str, seed: int, out: Path, *, iterations: int, eval_every: int, quick: bool = False,
            extra: Sequence[str] = (), model_factory: Optional[Callable] = None, reward=None,
            eval_fn=None, task: str = "shapes") -> str:
    """Train (method, seed) into `out`, resuming when a checkpoint exists. Returns 'done', 'resumed', 'skipped' or
    'busy (...)': another live process trains this run (the run's lock, taken before any of its files is read or
    removed, so grid processes over one folder never clear each other's logs; each skips what another holds)."""
    from tempflow_fast.training.run_dir import RunInUse, RunLock

    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        lock.acquire()
    except RunInUse as err:
        return f"busy ({err.holder})"
    try:
        return _run_locked(name, seed, out, iterations=iterations, eval_every=eval_every, quick=quick, extra=extra,
                           model_factory=model_factory, reward=reward, eval_fn=eval_fn, task=task)
    finally:
        lock.release()


def _run_locked(name: str, seed: int, out: Path, *, iterations: int, eval_every: int, quick: bool,
                extra: Sequence[str], model_factory: Optional[Callable], reward, eval_fn, task: str) -> str:
    from tempflow_fast.config import load_config
    from tempflow_fast.training import checkpoint as ckpt
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    summary = out / "summary.json"
    if summary.exists():
        if json.loads(summary.read_text())["iterations"] >= iterations:
            return "skipped"
        summary.unlink()  # finished, but shorter than asked: continue from its last checkpoint
    preset = PRESETS[METHODS[name][1]]
    cfg = load_config(Config, preset, method_overrides(name, seed=seed, iterations=iterations, eval_every=eval_every,
                                                       out=out, quick=quick, extra=extra, task=task))
    resume = ckpt.latest_checkpoint(out / "checkpoints") is not None
    evals = out / "evals.jsonl"
    if not resume:  # a fresh start: no logs from an attempt that never reached a checkpoint
        for stale in (evals, out / "metrics.jsonl"):
            if stale.exists():
                stale.unlink()
    model = model_factory() if model_factory is not None else None
    # a fresh start replaces what an attempt that never reached a checkpoint left in `out`
    trainer = Trainer(cfg, model=model, reward=reward, eval_fn=eval_fn, resume=resume, overwrite=not resume)
    if resume:  # keep only the eval points up to the checkpoint (later ones are recomputed)
        kept = [l for l in evals.read_text().splitlines() if l and json.loads(l)["iteration"] <= trainer.iteration] \
            if evals.exists() else []
        evals.write_text("".join(l + "\n" for l in kept))
    if trainer.eval_fn is None:
        raise ValueError(f"{name}: the trainer has no held-out eval for this config")
    recorder = EvalRecorder(trainer.eval_fn, evals, machine=machine_record())
    recorder.trainer = trainer
    trainer.eval_fn = recorder
    trainer.train()
    return "resumed" if resume else "done"


# --- report -------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> List[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _mean_std(xs: Sequence[float]):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _fmt(m: float, s: float, digits: int = 3) -> str:
    return "—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def collect(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> Dict[str, dict]:
    """{method: {"points": [{iteration, nfe, wall, acc (mean,std), categories {c: (mean,std)}, n}], "metrics": [...],
    "unfinished": [seeds]}}. Finished runs only (summary.json written): a run still training, or cut off before
    its end, would put a different set of seeds behind each eval point's mean; its seeds are listed instead."""
    data = {}
    for name in methods:
        folders = {s: out / "runs" / name / f"seed{s}" for s in seeds}
        runs = {s: _read_jsonl(f / "evals.jsonl") for s, f in folders.items() if (f / "summary.json").exists()}
        runs = {s: r for s, r in runs.items() if r}
        unfinished = [s for s, f in folders.items() if s not in runs and (f / "evals.jsonl").exists()]
        metrics = {s: _read_jsonl(folders[s] / "metrics.jsonl") for s in runs}
        by_it: Dict[int, List[dict]] = {}
        for rows in runs.values():
            last = {}
            for row in rows:  # the final eval repeats the last iteration when it is an eval point: keep the last
                last[row["iteration"]] = row
            for it, row in last.items():
                by_it.setdefault(it, []).append(row)
        points = []
        for it in sorted(by_it):
            rows = by_it[it]
            cats = sorted({c for r in rows for c in r["categories"]})
            points.append({
                "iteration": it, "n": len(rows),
                "nfe": _mean_std([r["nfe"] for r in rows])[0],
                "wall": _mean_std([r["wall_seconds"] for r in rows])[0],
                "acc": _mean_std([r["accuracy"] for r in rows]),
                "categories": {c: _mean_std([r["categories"].get(c, float("nan")) for r in rows]) for c in cats},
            })
        probes: Dict[int, List[tuple]] = {}
        for rows in metrics.values():
            for it, (nfe, value) in probe_points(rows).items():
                probes.setdefault(it, []).append((nfe, value))
        probe = [{"iteration": it, "n": len(v), "nfe": _mean_std([n for n, _ in v])[0],
                  "reward": _mean_std([x for _, x in v])} for it, v in sorted(probes.items())]
        per_seed = {s: sorted({r["iteration"]: r for r in rows}.values(), key=lambda r: r["iteration"])
                    for s, rows in runs.items()}
        probe_per_seed = {s: {it: v for it, (_, v) in probe_points(rows).items()} for s, rows in metrics.items()}
        data[name] = {"points": points, "metrics": [m for ms in metrics.values() for m in ms], "seeds": sorted(runs),
                      "probe": probe, "per_seed": per_seed, "probe_per_seed": probe_per_seed,
                      "unfinished": unfinished}
    return data


def seed_calls_to_target(per_seed: Dict[int, List[dict]], target: float, key: str = "nfe") -> List[Optional[float]]:
    """Per seed, the model calls (key="wall_seconds": the train-loop seconds) at its first eval point whose
    accuracy reaches `target` (None: never)."""
    out = []
    for rows in per_seed.values():
        hit = next((r[key] for r in rows if r["accuracy"] >= target - 1e-12), None)
        out.append(hit)
    return out


def _ci(mean: float, lo: float, hi: float, digits: int = 3, sign: bool = False) -> str:
    """'m [lo, hi]'; with one seed (no interval) 'm (1 seed)'."""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    if math.isnan(lo):
        return f.format(mean) + " (1 seed)"
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def final_by_seed(d: dict) -> tuple:
    """(iteration, {seed: eval row}, {seed: probe reward}) at the last iteration every seed of the method reached;
    (None, {}, {}) when the method has no eval."""
    its = [max(r["iteration"] for r in rows) for rows in d["per_seed"].values() if rows]
    if not its:
        return None, {}, {}
    last = min(its)
    rows = {s: next(r for r in rs if r["iteration"] == last) for s, rs in d["per_seed"].items()
            if any(r["iteration"] == last for r in rs)}
    probes = {s: p[last] for s, p in d.get("probe_per_seed", {}).items() if last in p}
    return last, rows, probes


# The TempFlow ablation chain of the paper (bifurcation -> + noise-aware weights -> + seed grouping), each step
# one method of the grid against the one before it, plus the weights' effect with seed grouping on
ABLATION_STEPS = (
    ("+ noise-aware weights", "tempflow_no_seed_grouping", "tempflow_bifurcation_only"),
    ("+ seed grouping", "tempflow", "tempflow_no_seed_grouping"),
    ("noise-aware weights, with seed grouping", "tempflow", "tempflow_no_weights"),
)


def ablation_table(data: Dict[str, dict], metric: str) -> List[str]:
    """Markdown lines: each step of ABLATION_STEPS as the paired difference (by seed) of the held-out metric and
    of the probe reward at the last iteration both methods reached, with 95% t intervals and a verdict."""
    needed = {m for _, a, b in ABLATION_STEPS for m in (a, b)}
    if not needed <= set(data):
        return []
    lines = ["| step | methods (a − b) | seeds | iteration | Δ " + metric + " [95%] | Δ probe reward [95%] | reading |",
             "|---|---|---|---|---|---|---|"]
    for label, a, b in ABLATION_STEPS:
        ia, ra, pa = final_by_seed(data[a])
        ib, rb, pb = final_by_seed(data[b])
        if ia is None or ib is None or ia != ib:
            lines.append(f"| {label} | {METHODS[a][0]} − {METHODS[b][0]} | — | — | — | — | not comparable (iterations "
                         f"{ia} vs {ib}) |")
            continue
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        acc = paired_interval([ra[s]["accuracy"] for s in seeds], [rb[s]["accuracy"] for s in seeds])
        ps = [s for s in seeds if s in pa and s in pb]
        probe = paired_interval([pa[s] for s in ps], [pb[s] for s in ps]) if ps else None
        verdicts = []
        for name, ci in (("held-out", acc), ("probe", probe)):
            if ci is None or math.isnan(ci[1]):
                continue
            verdicts.append(f"{name} {'helps' if ci[1] > 0 else 'hurts' if ci[2] < 0 else 'not resolved'}")
        lines.append(f"| {label} | {METHODS[a][0]} − {METHODS[b][0]} | {len(seeds)} | {ia} | {_ci(*acc, sign=True)} | "
                     f"{_ci(*probe, sign=True) if probe else '—'} | {', '.join(verdicts) or 'one seed'} |")
    return lines


def versus_reference(data: Dict[str, dict], metric: str, ref: str = "flow_grpo") -> List[str]:
    """Markdown lines: each method's last eval point against the reference (Flow-GRPO) at equal model calls and at
    equal train-loop wall seconds. Per seed, the reference's eval point nearest in calls (in wall seconds) to the
    method's last point is taken; the difference of the held-out metric (and of the probe reward at equal calls) is
    paired by seed, 95% t interval. The matched reference points are shown, so a match that lies far away (a run
    longer than the reference's) is visible."""
    if ref not in data or not data[ref]["per_seed"]:
        return []
    ref_rows, ref_probe = data[ref]["per_seed"], data[ref].get("probe_per_seed", {})
    lines = [f"| method | seeds | iteration | model calls | Flow-GRPO's nearest point: iteration, calls | "
             f"Δ {metric} [95%] | Δ probe reward [95%] | wall s | Flow-GRPO's nearest point: iteration, wall s | "
             f"Δ {metric} [95%] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        if name == ref:
            continue
        last, rows, probes = final_by_seed(d)
        seeds = sorted(s for s in rows if ref_rows.get(s))
        if last is None or not seeds:
            continue
        by_calls = {s: min(ref_rows[s], key=lambda q: abs(q["nfe"] - rows[s]["nfe"])) for s in seeds}
        by_wall = {s: min(ref_rows[s], key=lambda q: abs(q["wall_seconds"] - rows[s]["wall_seconds"])) for s in seeds}
        acc_c = paired_interval([rows[s]["accuracy"] for s in seeds], [by_calls[s]["accuracy"] for s in seeds])
        acc_w = paired_interval([rows[s]["accuracy"] for s in seeds], [by_wall[s]["accuracy"] for s in seeds])
        ps = [s for s in seeds if s in probes and by_calls[s]["iteration"] in ref_probe.get(s, {})]
        probe = paired_interval([probes[s] for s in ps], [ref_probe[s][by_calls[s]["iteration"]] for s in ps]) \
            if ps else None

        def where(match, key, digits):
            its = sorted({match[s]["iteration"] for s in seeds})
            return f"{'/'.join(map(str, its))}, {_mean_std([match[s][key] for s in seeds])[0]:.{digits}f}"

        lines.append(f"| {METHODS[name][0]} | {len(seeds)} | {last} | "
                     f"{_mean_std([rows[s]['nfe'] for s in seeds])[0]:.0f} | {where(by_calls, 'nfe', 0)} | "
                     f"{_ci(*acc_c, sign=True)} | {_ci(*probe, sign=True) if probe else '—'} | "
                     f"{_mean_std([rows[s]['wall_seconds'] for s in seeds])[0]:.0f} | "
                     f"{where(by_wall, 'wall_seconds', 0)} | {_ci(*acc_w, sign=True)} |")
    return lines


def probe_points(rows: List[dict]) -> Dict[int, tuple]:
    """{iteration: (cumulative model calls, probe_reward)} of one run's metrics.jsonl rows: the probe before training
    (iteration 0, no calls yet), at every eval point and after the last iteration (its calls from that iteration's
    row)."""
    nfe = {0: 0}
    for r in rows:
        if "total_nfe" in r:
            nfe[r["iteration"]] = r["total_nfe"]
    return {r["iteration"]: (nfe.get(r["iteration"], float("nan")), r["probe_reward"]) for r in rows
            if "probe_reward" in r}


def calls_to_target(points: List[dict], target: float) -> Optional[float]:
    """Mean model calls at the first eval point whose seed-mean accuracy reaches `target` (None: not reached)."""
    for p in points:
        if not math.isnan(p["acc"][0]) and p["acc"][0] >= target - 1e-12:
            return p["nfe"]
    return None


def _diagnostics(metrics: List[dict]) -> Dict[str, float]:
    out = {}
    for key in ("zero_std_ratio", "clip_frac", "reward_group_std", "reward_mean"):
        vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def step_spread(metrics: List[dict], prefix: str = "reward_std/k") -> Dict[int, float]:
    """{k: mean over logged iterations of <prefix>{k}} (reward_std/k, approx_kl/k, velocity_change/k)."""
    acc: Dict[int, List[float]] = {}
    for m in metrics:
        for key, v in m.items():
            if key.startswith(prefix):
                acc.setdefault(int(key[len(prefix):]), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


def write_plots(out: Path, data: Dict[str, dict], metric: str = "held-out accuracy") -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # one colour per method (tab10 has ten: black for the eleventh); TempFlow and its variants solid, others dashed
    colours = list(plt.get_cmap("tab10").colors) + [(0.0, 0.0, 0.0)]

    def style(name):
        i = list(METHODS).index(name)
        return dict(color=colours[i % len(colours)], linestyle="-" if name.startswith("tempflow") else "--",
                    marker="o", ms=3, label=METHODS[name][0])

    def save(fig, axes, labels, ylabel, name):
        """Axis labels, grid, a legend on the first axes that has lines; written to OUT/name and closed."""
        for ax, label in zip(axes, labels):
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        if axes[0].lines:  # below the axes, out of the curves' way: the figure grows by the legend's rows
            ncol = 4 if fig.get_figwidth() >= 10 else 2
            rows = -(-len(axes[0].lines) // ncol)
            legend_h = 0.2 * rows + 0.15  # inches
            height = fig.get_figheight()
            fig.set_figheight(height + legend_h)
            fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
            fig.tight_layout(rect=(0, legend_h / (height + legend_h), 1, 1))
        else:
            fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, d in data.items():
        pts = d["points"]
        if not pts:
            continue
        acc = [p["acc"][0] for p in pts]
        std = [p["acc"][1] for p in pts]
        for ax, key in zip(axes, ("iteration", "nfe", "wall")):
            xs = [p[key] for p in pts]
            st = style(name)
            ax.plot(xs, acc, **st)
            ax.fill_between(xs, [a - s for a, s in zip(acc, std)], [a + s for a, s in zip(acc, std)],
                            color=st["color"], alpha=0.07)
    save(fig, axes, ("iterations", "model calls (rollout NFE)", "train-loop wall seconds"), metric,
         "accuracy_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in data.items():
        if d["probe"]:
            xs = [p["nfe"] for p in d["probe"]]
            mean = [p["reward"][0] for p in d["probe"]]
            std = [p["reward"][1] for p in d["probe"]]
            st = style(name)
            ax.plot(xs, mean, **st)
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=st["color"], alpha=0.07)
    save(fig, [ax], ["model calls (rollout NFE)"], "probe reward (fixed train prompts × noises)",
         "probe_reward_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in data.items():
        spread = step_spread(d["metrics"])
        if spread:
            ax.plot(list(spread), list(spread.values()), **style(name))
    save(fig, [ax], ["bifurcation step k"], "within-group reward std (mean over iterations)",
         "reward_std_per_step.png")
    return paths


def machines_note(data: Dict[str, dict]) -> str:
    """What the runs' machine records (eval rows' "machine", see machine_record) say about their wall seconds."""
    runs = [rows for d in data.values() for rows in d["per_seed"].values()]
    records = [[r["machine"] for r in rows if "machine" in r] for rows in runs]
    recorded = [rec for rec in records if rec]
    text = ("Wall seconds are the train loop's as each run measured them; a grid resumes across sittings, so its "
            "runs (and the parts of a resumed run) may have trained on different machines or under different load. "
            "Model calls do not depend on either.")
    if not recorded:
        return text + " These logs record no machine: read wall seconds as indicative."
    cal = [m["calibration_ms"] for rec in recorded for m in rec]
    hosts = {(m["host"], m["cpu"]) for rec in recorded for m in rec}
    resumed = sum(len({json.dumps(m, sort_keys=True) for m in rec}) > 1 for rec in recorded)
    return (text + f" Machine records (a fixed CPU workload timed at each run's start, bench/methods.py "
            f"machine_record): {len(recorded)} of {len(runs)} runs carry one, on {len(hosts)} host/CPU "
            f"pair{'s' if len(hosts) != 1 else ''}, calibration {min(cal):.1f}–{max(cal):.1f} ms "
            f"({max(cal) / min(cal):.2f}×){f'; {resumed} resumed under a different record' if resumed else ''}: "
            "wall seconds compare between runs whose calibrations agree.")


def report(out: Path, methods: Sequence[str], seeds: Sequence[int], *, target: Optional[float] = None,
           command: str = "", task: str = "shapes") -> str:
    """The markdown report (also written to OUT/report.md) and the PNGs next to it."""
    data = collect(out, methods, seeds)
    metric, word = TASKS[task][1], TASKS[task][3]  # word: what the table cells are ("accuracy", "reward")
    lines = [f"# Methods on the {task} task", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [f"Seeds: {', '.join(map(str, seeds))}. Cells: {metric}, mean ± std over seeds "
              f"(sample std; 0 with one seed). {machines_note(data)}", ""]
    left_out = [f"{METHODS[name][0]} seed {s}" for name, d in data.items() for s in d["unfinished"]]
    if left_out:
        lines += [f"Left out, not finished (no summary.json): {', '.join(left_out)}.", ""]

    its = sorted({p["iteration"] for d in data.values() for p in d["points"]})
    lines += [f"## {metric[0].upper() + metric[1:]} vs iterations", "",
              "| method | seeds run | " + " | ".join(str(i) for i in its) + " |", "|---|---|" + "---|" * len(its)]
    for name, d in data.items():
        by = {p["iteration"]: p for p in d["points"]}
        lines.append(f"| {METHODS[name][0]} | {len(d['seeds'])} | " + " | ".join(_fmt(*by[i]["acc"]) if i in by else "—" for i in its) + " |")

    lines += ["", f"## {metric[0].upper() + metric[1:]} vs model calls and wall seconds", "",
              "Model calls: cumulative rollout NFE; wall: cumulative train-loop seconds (eval excluded); both "
              "means over seeds.", "",
              f"| method | iteration | model calls | wall s | {metric} |", "|---|---|---|---|---|"]
    for name, d in data.items():
        for p in d["points"]:
            lines.append(f"| {METHODS[name][0]} | {p['iteration']} | {p['nfe']:.0f} | {p['wall']:.1f} | {_fmt(*p['acc'])} |")

    cats = sorted({c for d in data.values() for p in d["points"][-1:] for c in p["categories"]})
    if cats:  # a task without categories (compressibility) has no such table
        lines += ["", "## By category at the last eval point", "",
                  "| method | iteration | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
        for name, d in data.items():
            if d["points"]:
                p = d["points"][-1]
                lines.append(f"| {METHODS[name][0]} | {p['iteration']} | "
                             + " | ".join(_fmt(*p["categories"].get(c, (float('nan'),) * 2)) for c in cats) + " |")

    base = data.get("flow_grpo", {}).get("points", [])
    start = [p["acc"][0] for d in data.values() for p in d["points"] if p["iteration"] == 0]
    start_acc = sum(start) / len(start) if start else float("nan")
    trained = [p for p in base if p["iteration"] > 0]
    if target is None and trained:
        best = max(p["acc"][0] for p in trained)
        targets = [start_acc + (best - start_acc) / 2, best] if best > start_acc else [best]
        target_note = (f"half of Flow-GRPO's best gain and its best seed-mean {word} after iteration 0"
                       if len(targets) == 2 else f"the best seed-mean {word} Flow-GRPO reached after iteration 0")
    else:
        targets = [target] if target is not None else []
        target_note = "given with --target"
    lines += ["", f"## Headline: model calls to reach the target {word}", ""]
    if not targets or math.isnan(targets[-1]):
        lines.append("No target: Flow-GRPO has no trained eval points and no --target was given.")
    else:
        lines += [f"Targets: {', '.join(f'{t:.3f}' for t in targets)} {metric} ({target_note}); the base "
                  f"model starts at {start_acc:.3f}. Model calls: mean cumulative rollout NFE at the first eval point "
                  f"whose seed-mean {word} reaches the target.", ""]
        if not math.isnan(start_acc) and targets[-1] <= start_acc:
            lines += [f"**The target is not above the base model's {word}: Flow-GRPO did not improve the held-out "
                      f"{word} here, so calls-to-target compares nothing** (see the diagnostics below).", ""]
        lines += ["| method | " + " | ".join(f"calls to {t:.3f} | ratio to Flow-GRPO" for t in targets) + " |",
                  "|---|" + "---|---|" * len(targets)]
        refs = [calls_to_target(base, t) for t in targets]
        for name, d in data.items():
            cells = []
            for t, ref in zip(targets, refs):
                c = calls_to_target(d["points"], t)
                cells += ["not reached" if c is None else f"{c:.0f}", "—" if c is None or not ref else f"{c / ref:.2f}"]
            lines.append(f"| {METHODS[name][0]} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed (each seed's first eval point at the target): the model calls and the train-loop wall "
                  "seconds there, mean [95% percentile-bootstrap interval of the mean over seeds] when every seed "
                  "reaches the target, else the mean ± std of those that do (no interval: the others would need more "
                  "calls than the run had), and how many do. Calls are counted at eval points, so a seed's calls are "
                  "an upper bound on when it got there.", "",
                  "| method | " + " | ".join(f"calls to {t:.3f} (seeds reaching) | wall s to {t:.3f}" for t in targets)
                  + " |", "|---|" + "---|---|" * len(targets)]
        for name, d in data.items():
            cells = []
            for t in targets:
                for key, digits in (("nfe", 0), ("wall_seconds", 0)):
                    hits = seed_calls_to_target(d["per_seed"], t, key)
                    reached = [h for h in hits if h is not None]
                    if not reached:
                        cells.append(f"not reached (0/{len(hits)})" if key == "nfe" else "—")
                    elif len(reached) == len(hits):
                        cells.append(_ci(*bootstrap_interval(reached), digits=digits)
                                     + (f" ({len(reached)}/{len(hits)})" if key == "nfe" else ""))
                    else:
                        cells.append(_fmt(*_mean_std(reached), digits=digits)
                                     + (f" ({len(reached)}/{len(hits)})" if key == "nfe" else ""))
            lines.append(f"| {METHODS[name][0]} | " + " | ".join(cells) + " |")

    lines += ["", "## Last eval point, with 95% intervals over seeds", "",
              "Each method at the last iteration all its seeds reached: mean [95% t interval over seeds]; the gains "
              "are paired by seed (after − before, the same run).", "",
              f"| method | seeds | iteration | model calls | wall s | {metric} | gain | probe reward gain |",
              "|---|---|---|---|---|---|---|---|"]
    for name, d in data.items():
        last, rows, probes = final_by_seed(d)
        if last is None or not rows:
            continue
        seeds_ = sorted(rows)
        first = {s: d["per_seed"][s][0] for s in seeds_}
        acc = seed_interval([rows[s]["accuracy"] for s in seeds_])
        gain = paired_interval([rows[s]["accuracy"] for s in seeds_], [first[s]["accuracy"] for s in seeds_])
        p0 = {s: v[0] for s, v in d.get("probe_per_seed", {}).items() if 0 in v}
        ps = [s for s in seeds_ if s in probes and s in p0]
        pgain = paired_interval([probes[s] for s in ps], [p0[s] for s in ps]) if ps else None
        lines.append(f"| {METHODS[name][0]} | {len(seeds_)} | {last} | "
                     f"{_mean_std([rows[s]['nfe'] for s in seeds_])[0]:.0f} | "
                     f"{_mean_std([rows[s]['wall_seconds'] for s in seeds_])[0]:.0f} | {_ci(*acc)} | "
                     f"{_ci(*gain, sign=True)} | {_ci(*pgain, sign=True) if pgain else '—'} |")

    versus = versus_reference(data, metric)
    if versus:
        lines += ["", "## Against Flow-GRPO at equal model calls and at equal wall time", "",
                  "Each method's last eval point against Flow-GRPO's eval point nearest to it, per seed, in model "
                  "calls (left) and in train-loop wall seconds (right): the paired difference by seed, 95% t "
                  "interval (the probe reward at the equal-calls point). Flow-GRPO's matched points are shown: "
                  "where a method's run is longer than Flow-GRPO's, its last point is the match.", ""] + versus

    ablation = ablation_table(data, metric)
    if ablation:
        lines += ["", "## TempFlow ablation ordering (bifurcation → noise-aware weights → seed grouping)", "",
                  "TempFlow-GRPO's ablation adds its parts one at a time: trajectory bifurcation alone, then the "
                  "noise-aware step weights, then seed grouping. Each row: the paired difference by seed (same seed, "
                  "same base model, prompts and noises) of two grid methods at their last common iteration, 95% t "
                  "interval; 'helps' / 'hurts' when the interval excludes 0, else 'not resolved'.", ""] + ablation

    lines += ["", "## Diagnostics (means over all logged iterations and seeds)", "",
              "| method | reward mean | within-prompt reward std | zero-std groups | clip fraction |",
              "|---|---|---|---|---|"]
    for name, d in data.items():
        g = _diagnostics(d["metrics"])
        lines.append(f"| {METHODS[name][0]} | {g['reward_mean']:.3f} | {g['reward_group_std']:.3f} | "
                     f"{g['zero_std_ratio']:.3f} | {g['clip_frac']:.4f} |")

    if any(d["probe"] for d in data.values()):
        lines += ["", "## Probe reward vs model calls", "",
                  "The trained reward of ODE samples of fixed train prompts × fixed noises (eval.probe_prompts × "
                  "eval.probe_images), mean ± std over seeds at each eval point; model calls: mean cumulative rollout "
                  "NFE there.", "", "| method | iteration | model calls | probe reward |", "|---|---|---|---|"]
        for name, d in data.items():
            for p in d["probe"]:
                lines.append(f"| {METHODS[name][0]} | {p['iteration']} | {p['nfe']:.0f} | {_fmt(*p['reward'])} |")

    spreads = {name: step_spread(d["metrics"]) for name, d in data.items()}
    spreads = {k: v for k, v in spreads.items() if v}
    if spreads:
        ks = sorted({k for v in spreads.values() for k in v})
        lines += ["", "## Within-group reward std per bifurcation step (mean over iterations)", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, v in spreads.items():
            lines.append(f"| {METHODS[name][0]} | " + " | ".join(f"{v[k]:.3f}" if k in v else "—" for k in ks) + " |")

    for prefix, title, fmt in (("approx_kl/k", "Approx-KL per trained step (mean over iterations)", ".1e"),
                               ("velocity_change/k", "Velocity movement per update, mean |v_after - v_before| per "
                                "trained step (mean over iterations)", ".2e")):
        per_step = {name: step_spread(d["metrics"], prefix) for name, d in data.items()}
        per_step = {k: v for k, v in per_step.items() if v}
        if per_step:
            ks = sorted({k for v in per_step.values() for k in v})
            lines += ["", f"## {title}", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for name, v in per_step.items():
                lines.append(f"| {METHODS[name][0]} | " + " | ".join(f"{v[k]:{fmt}}" if k in v else "—" for k in ks)
                             + " |")

    pngs = write_plots(out, data, metric)
    lines += ["", "Plots: " + ", ".join(f"`{p.name}`" for p in pngs), ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


# --- the grid -----------------------------------------------------------------------------------------

def task_folder(out: Path, task: str) -> Path:
    """Where a task's grid lives: OUT for shapes, OUT/<task> for the others."""
    return out / TASKS[task][2] if TASKS[task][2] else out


def run_grid(out: Path, *, methods: Sequence[str], seeds: Sequence[int], iterations: int, eval_every: int,
             quick: bool = False, extra: Sequence[str] = (), model_factory=None, reward=None, eval_fn=None,
             target: Optional[float] = None, command: str = "", log=print, task: str = "shapes") -> str:
    """Every (method, seed) of one task, then its report (the task's folder: `task_folder`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    out = task_folder(out, task)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for name in methods:
            t0 = time.perf_counter()
            status = run_one(name, seed, out / "runs" / name / f"seed{seed}",
                             iterations=iterations * ITERATION_SCALE.get(name, 1),
                             eval_every=eval_every, quick=quick, extra=extra, model_factory=model_factory,
                             reward=reward, eval_fn=eval_fn, task=task)
            log(f"[methods] {task} {name} seed {seed}: {status} ({time.perf_counter() - t0:.0f} s)")
    return report(out, methods, seeds, target=target, command=command, task=task)


# --movement: how far one iteration moves each variant, per step k (issue 17: approx-KL alone misreads it)
MOVEMENT_VARIANTS: Dict[str, tuple] = {
    "flow_grpo": ("Flow-GRPO, k = 0..8 trained", "flow_grpo", ["flow_grpo.group_size=24"]),
    "flow_grpo_k0_3": ("Flow-GRPO, k = 0..3 trained", "flow_grpo",
                       ["flow_grpo.group_size=24", "flow_grpo.timestep_fraction=0.4"]),
    "tempflow": ("TempFlow-GRPO, k = 0..3", "tempflow", ["tempflow.num_seeds=4", "tempflow.branches=6"]),
}


def movement(out: Path, *, iterations: int = 3, seed: int = 0, states: int = 4, quick: bool = False,
             log=print) -> str:
    """Each variant of MOVEMENT_VARIANTS from the shipped base model for `iterations` iterations (its shapes
    preset, no eval): per iteration the pooled approx-KL, approx-KL and mean |Δv| per trained step k (on `states`
    states per k), the gradient norm and |Δθ| (L2 norm of the weights' change). Returns a markdown table of the
    means over iterations."""
    import torch

    from tempflow_fast.config import load_config
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    rows = []
    for name, (label, method, overrides) in MOVEMENT_VARIANTS.items():
        cfg = load_config(Config, PRESETS[method], [
            f"method={method}", f"output_dir={out / name}", f"seed={seed}", f"train.iterations={iterations}",
            "log.tensorboard=false", "log.progress=false", "log.sample_every=0", "log.showcase_prompts=0",
            f"log.movement_states={states}", "checkpoint.every=0", *overrides, *(QUICK_OVERRIDES if quick else [])])
        trainer = Trainer(cfg, eval_fn=lambda model: None, overwrite=True)
        per_it = []
        try:
            for it in range(iterations):
                before = [p.detach().clone() for _, p in trainer.named_params]
                m = trainer.run_iteration(it)
                m["delta_theta"] = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                                                        for (_, p), b in zip(trainer.named_params, before))))
                per_it.append(m)
        finally:
            trainer.close()
        rows.append((label, per_it))
        log(f"[methods] movement {name}: {iterations} iterations")
    ks = sorted({int(k.split("/k")[1]) for _, its in rows for m in its for k in m if k.startswith("approx_kl/k")})

    def mean(its, key):
        vals = [m[key] for m in its if key in m]
        return sum(vals) / len(vals) if vals else float("nan")

    lines = [f"Means over {iterations} iterations from the base model, seed {seed}, each variant's shapes preset "
             f"(2 inner epochs: the first scores the rollout policy itself). ‖Δθ‖: L2 norm of the weights' change "
             f"per iteration; KL k: approx-KL of the samples of step k; Δv k: mean |v_after - v_before| on {states} "
             f"trained states of step k.", "",
             "| variant | approx-KL (pooled) | grad norm | ‖Δθ‖ | " + " | ".join(f"KL k={k}" for k in ks) + " | "
             + " | ".join(f"Δv k={k}" for k in ks) + " |", "|---|---|---|---|" + "---|" * (2 * len(ks))]
    for label, its in rows:
        kl = [mean(its, f"approx_kl/k{k}") for k in ks]
        dv = [mean(its, f"velocity_change/k{k}") for k in ks]
        cells = [f"{mean(its, 'approx_kl'):.1e}", f"{mean(its, 'grad_norm'):.4f}", f"{mean(its, 'delta_theta'):.4f}"]
        cells += ["—" if math.isnan(v) else f"{v:.1e}" for v in kl] + ["—" if math.isnan(v) else f"{v:.2e}" for v in dv]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "movement.md").write_text(text + "\n")
    return text


RESULTS_MARKER = "<!-- everything below is written by bench/methods.py; edit above this line -->"


def results_sections(text: str) -> Dict[str, str]:
    """{task: its section below RESULTS_MARKER, from its "## Methods on the <task> task" heading}."""
    below = text.split(RESULTS_MARKER, 1)[1] if RESULTS_MARKER in text else ""
    sections = {}
    for part in re.split(r"(?m)^(?=## Methods on the .+ task$)", below):
        heading = re.match(r"## Methods on the (.+) task$", part, re.M)
        if heading:
            sections[heading.group(1)] = part.strip()
    return sections


def write_results_md(reports: Sequence[tuple], path: Path) -> Path:
    """docs/results.md: the hand-written text above RESULTS_MARKER kept as it is (none yet: a title), then each
    (task, report text, task folder) of `reports` with its headings one level down and its PNGs copied into
    `path` without suffix (docs/results/; a task other than shapes prefixes them with its name). The section of a
    task not in `reports` (its "## Methods on the <task> task" below the marker) is kept: rerunning one task's
    grid does not delete another's results."""
    figures = path.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    head = old.split(RESULTS_MARKER)[0].rstrip() if RESULTS_MARKER in old else "# Methods on the embedded tasks"
    sections = results_sections(old)
    for task, text, folder in reports:
        prefix = "" if task == "shapes" else f"{task}_"
        names = ("accuracy_curves.png", "probe_reward_curves.png", "reward_std_per_step.png")
        for name in names:
            shutil.copyfile(Path(folder) / name, figures / (prefix + name))
        plots = "\n".join(f"![{task} {n[:-4]}]({figures.name}/{prefix}{n})" for n in names)
        sections[task] = "\n".join(plots if line.startswith("Plots: ") else "#" + line if line.startswith("#")
                                   else line for line in text.splitlines()).strip()
    order = [t for t in TASKS if t in sections] + [t for t in sections if t not in TASKS]
    path.write_text("\n\n".join([head, RESULTS_MARKER] + [sections[t] for t in order]).rstrip() + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/methods", help="output folder (one sub-folder per method and seed)")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, 2 iterations, small groups, tiny eval; every task unless --tasks says otherwise")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated: shapes (OUT), compressibility (OUT/compressibility); default shapes, "
                         "--quick: both")
    ap.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default 3; --quick: 1)")
    ap.add_argument("--iterations", type=int, default=None, help="iterations per run (default 60; --quick: 2)")
    ap.add_argument("--eval-every", type=int, default=None, help="eval/checkpoint interval (default 10; --quick: 1)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--target", type=float, default=None,
                    help="target accuracy (default: two, half of Flow-GRPO's best gain and its best seed-mean)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (all runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the report from finished evals")
    ap.add_argument("--movement", action="store_true",
                    help="instead of the grid: per-step approx-KL, |Δv| per step, grad norm and |Δθ| of Flow-GRPO "
                         "(k = 0..8 and k = 0..3 trained) and TempFlow over --iterations (default 3) from the base "
                         "model; writes OUT/movement.md")
    ap.add_argument("--no-results-md", action="store_true",
                    help="do not write the results markdown (full mode writes the reports of every --tasks task "
                         "below the hand-written text of docs/results.md; the sections of other tasks are kept)")
    ap.add_argument("--results-md", default=str(ROOT / "docs" / "results.md"),
                    help="where full mode writes the report (figures go to the same path without .md)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.movement:
        print(movement(Path(args.out), iterations=args.iterations or (1 if args.quick else 3), quick=args.quick))
        return
    for flag, value, low in (("--seeds", args.seeds, 1), ("--iterations", args.iterations, 1),
                             ("--eval-every", args.eval_every, 1), ("--threads", args.threads, 0)):
        if value is not None and value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    unknown = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    unknown = [t.strip() for t in (args.tasks or "").split(",") if t.strip() and t.strip() not in TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(TASKS)}")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    iterations = args.iterations if args.iterations is not None else (2 if args.quick else 60)
    eval_every = args.eval_every if args.eval_every is not None else (1 if args.quick else 10)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tasks = [t.strip() for t in (args.tasks or ("shapes,compressibility" if args.quick else "shapes")).split(",")
             if t.strip()]
    command = "OMP_NUM_THREADS=1 python bench/methods.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    reports = []
    for task in tasks:
        if args.report_only:
            folder = task_folder(out, task)
            if not any((folder / "runs" / m / f"seed{sd}" / "summary.json").exists() for m in methods for sd in seeds):
                ap.error(f"--report-only: no run of {task} under {folder / 'runs'} has finished (summary.json) for "
                         f"these --methods and --seeds; run the grid first (the same command without --report-only)")
            text = report(task_folder(out, task), methods, seeds, target=args.target, command=command, task=task)
        else:
            text = run_grid(out, methods=methods, seeds=seeds, iterations=iterations, eval_every=eval_every,
                            quick=args.quick, extra=args.set, target=args.target, command=command, task=task)
        print(text)
        reports.append((task, text, task_folder(out, task)))
    if not args.quick and not args.no_results_md:
        path = write_results_md(reports, Path(args.results_md))
        print(f"[methods] wrote {path} (the reports of {', '.join(tasks)} below its hand-written text) and its "
              f"figures in {path.with_suffix('')}")


if __name__ == "__main__":
    main()
