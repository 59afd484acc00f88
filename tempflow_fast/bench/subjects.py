"""The bench subjects. Each runs its benchmark with GPU telemetry sampled around the timed
repetitions and adds rows to a `Results` (results.py); timings are p50 [p20, p80] over `reps` runs
after `warmup` runs, counts are exact.

- ops:        fused Flow-GRPO loss forward+backward per provider (bench/ops.py's inputs and
              providers), and its speedup over the unfused eager PyTorch loss
- rollout:    per plan, the engine vs the per-branch reference loop (reference.py) on the same
              model: wall time, NFE (checked against accounting's analytical counts), images, and
              the engine's speedup as the ratio of the two p50s
- train_step: trainer iterations split into sampling / reward / update time, model calls and
              policy forward+backward passes; the per-sample reference's counts beside them
- iteration:  the same iterations end to end: seconds per iteration and images per second
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

import tempflow_fast
from tempflow_fast.bench.reference import per_branch_rollout
from tempflow_fast.bench.results import Results
from tempflow_fast.bench.telemetry import GpuTelemetry, quantiles
from tempflow_fast.sampling.accounting import min_nfe, recompute_prefix_nfe
from tempflow_fast.sampling.engine import rollout
from tempflow_fast.sampling.plans import Bifurcation, FullSDE, SingularSDE
from tempflow_fast.images import to_unit_float
from tempflow_fast.sampling.runners import EagerRunner

SUBJECTS = ("ops", "rollout", "train_step", "iteration")

# The papers' plans, and small ones with the same structure for --quick.
PLANS = {
    "flow_grpo_24x10": FullSDE(num_steps=10, samples_per_prompt=24),
    "tempflow_4x6": Bifurcation(num_steps=10, seeds_per_prompt=4, branches=6),
    "g2rpo_12xL123": SingularSDE(num_steps=16, branches=12, granularities=(1, 2, 3)),
}
QUICK_PLANS = {
    "flow_grpo_4x4": FullSDE(num_steps=4, samples_per_prompt=4),
    "tempflow_2x3x4": Bifurcation(num_steps=4, seeds_per_prompt=2, branches=3),
    "g2rpo_3xL12x4": SingularSDE(num_steps=4, branches=3, granularities=(1, 2)),
}
QUICK_OPS_SHAPES = {"tiny": (2, 3, 1024)}
OPS_PROVIDERS = ("fused-triton", "fused-cpp", "cpp-kernels", "fused-torch", "unfused-eager")  # bench/ops.py's
# a 1+1-layer tiny FLUX for --quick without --model-path (same code path, a fraction of the time)
QUICK_TRANSFORMER = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)
QUICK_TRAIN_OVERRIDES = ("sampling.num_steps=4", "tempflow.num_seeds=2", "tempflow.branches=3",
                         "flow_grpo.group_size=4", "g2rpo.branches=3", "g2rpo.granularities=[1,2]",
                         "stepwise.group_size=3")


@dataclass
class Settings:
    device: torch.device
    reps: int = 5  # timed repetitions
    warmup: int = 1  # untimed repetitions first
    quick: bool = False  # small plans, shapes and model: a smoke run in seconds
    prompts: int = 1  # prompts (groups) per rollout / iteration
    method: str = "tempflow"  # trainer method of train_step / iteration
    model_kind: str = "tiny_flux"  # adapter of model_path: tiny_flux, flux or sd3 (models.loading.MODEL_KINDS)
    model_path: Optional[str] = None  # folder (or hub id) for model_kind; None = shipped tiny (random when quick)
    dtype: Optional[str] = None  # model dtype for flux / sd3 (default bf16)
    resolution: Optional[int] = None  # image size for flux / sd3 (default: the adapter's)
    reward: str = "brightness"  # "brightness" or "shapes"
    ops_providers: Optional[Sequence[str]] = None  # None = bench/ops.py's providers for the device
    plans: Optional[Sequence[str]] = None  # rollout plans by name (PLANS, or QUICK_PLANS with quick); None = all

    def __post_init__(self):
        if self.reps < 1:
            raise ValueError(f"reps must be >= 1, got {self.reps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")
        from tempflow_fast.models.loading import MODEL_KINDS

        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {', '.join(MODEL_KINDS)}, got {self.model_kind!r}")
        if self.model_kind != "tiny_flux" and not self.model_path:
            raise ValueError(f"model_kind {self.model_kind!r} needs model_path (a pipeline folder or hub id)")
        if self.reward not in ("brightness", "shapes"):
            raise ValueError(f"reward must be 'brightness' or 'shapes', got {self.reward!r}")
        known = QUICK_PLANS if self.quick else PLANS
        for name in self.plans or ():
            if name not in known:
                raise ValueError(f"plans: unknown plan {name!r}; known{' with quick' if self.quick else ''}: "
                                 f"{', '.join(known)}")

    @property
    def cuda_index(self) -> Optional[int]:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()


class BrightnessReward:
    """Mean pixel value: continuous, so every group carries signal and the update trains every
    sample — the full cost of an iteration, whatever the model has learnt."""

    name = "brightness"
    accepts_uint8 = True

    def __call__(self, images, prompts):
        return to_unit_float(images).mean(dim=(1, 2, 3))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[int], object], s: Settings, telemetry: GpuTelemetry) -> List[float]:
    """Seconds of fn(rep) for each timed rep (fn(-1 - w) for the warm-up runs)."""
    for w in range(s.warmup):
        fn(-1 - w)
    times = []
    with telemetry:
        for rep in range(s.reps):
            _sync(s.device)
            t0 = time.perf_counter()
            fn(rep)
            _sync(s.device)
            times.append(time.perf_counter() - t0)
    return times


def load_model(s: Settings):
    """(model adapter on s.device, label for the `shape` column)."""
    from tempflow_fast.models import tiny_flux

    if s.model_path:
        from tempflow_fast.models.loading import load_adapter

        model = load_adapter(s.model_kind, s.model_path, device=s.device, dtype=s.dtype, resolution=s.resolution)
        return model, f"{s.model_kind} {Path(s.model_path).name}"
    if s.quick:
        model = tiny_flux.TinyFluxAdapter.create(seed=0, transformer_config=QUICK_TRANSFORMER)
        model.module.to(s.device)
        return model, "tiny_flux 1+1 layers (random)"
    try:
        return tiny_flux.load_shipped(s.device), "tiny_flux (shipped)"
    except (ValueError, FileNotFoundError):
        model = tiny_flux.TinyFluxAdapter.create(seed=0)
        model.module.to(s.device)
        return model, "tiny_flux (random)"


def _prompts(n: int) -> List[str]:
    from tempflow_fast.tasks.shapes.grammar import TRAIN_PROMPTS

    if n > len(TRAIN_PROMPTS):
        raise ValueError(f"prompts must be <= {len(TRAIN_PROMPTS)} (the shapes task's training prompts), got {n}")
    return list(TRAIN_PROMPTS[:n])


# --- ops -----------------------------------------------------------------------------------------

def _bench_script(name: str):
    """bench/<name>.py of the source checkout, imported as a module (it is a script, not package code)."""
    path = Path(tempflow_fast.__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"the ops subject reuses {path}, which is only in a source checkout of tempflow_fast")
    spec = importlib.util.spec_from_file_location(f"_tempflow_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_ops(res: Results, s: Settings) -> None:
    bops = _bench_script("ops")
    shapes = QUICK_OPS_SHAPES if s.quick else bops.SHAPES
    names = list(s.ops_providers) if s.ops_providers else bops.providers(s.device)
    for name in names:  # unknown names fail here, before any timing
        if name not in OPS_PROVIDERS:
            raise ValueError(f"ops_providers: unknown provider {name!r}; known: {', '.join(OPS_PROVIDERS)}")
    for shape_name, shape in shapes.items():
        label = f"{shape_name} N,K,D={','.join(map(str, shape))}"
        t = bops.make_inputs(shape, s.device)
        p50s = {}
        for name in names:
            fn = bops.provider_fn(name)
            tel = GpuTelemetry(s.cuda_index)
            times_ms = [1e3 * x for x in _time(lambda rep: bops.fwd_bwd(fn, t), s, tel)]
            p50, p20, p80 = quantiles(times_ms)
            p50s[name] = p50
            res.add("ops", name, label, "fwd_bwd_time", "ms", p50, p20, p80)
            res.add_telemetry("ops", name, label, tel)
        if "unfused-eager" in p50s:
            for name, p50 in p50s.items():
                res.add("ops", name, label, "speedup_vs_unfused", "x", p50s["unfused-eager"] / p50)


# --- rollout -------------------------------------------------------------------------------------

def bench_rollout(res: Results, s: Settings, model, model_label: str) -> None:
    prompts = _prompts(s.prompts)
    plans = QUICK_PLANS if s.quick else PLANS
    for plan_name in s.plans or plans:
        plan = plans[plan_name]
        layout = plan.layout()
        shape = f"{plan_name} P={len(prompts)} @ {model_label}"
        runner = EagerRunner(model)
        last = {}

        def engine(rep):
            last["engine"] = rollout(model, prompts, plan, seed=rep + 1000, runner=runner)

        def reference(rep):
            last["reference"] = per_branch_rollout(model, prompts, plan, seed=rep + 1000)

        p50 = {}
        for provider, fn in (("engine", engine), ("per-branch-reference", reference)):
            tel = GpuTelemetry(s.cuda_index)
            times = _time(fn, s, tel)
            p50[provider] = statistics.median(times)
            res.add("rollout", provider, shape, "wall_time", "s", *quantiles(times))
            res.add_telemetry("rollout", provider, shape, tel)
        # counts hold on any machine: check each provider made exactly the calls its plan needs
        got_engine, want_engine = last["engine"].stats.nfe, min_nfe(layout, len(prompts))
        got_ref, want_ref = last["reference"]["nfe"], recompute_prefix_nfe(layout, len(prompts))
        if got_engine != want_engine or got_ref != want_ref:
            raise RuntimeError(f"{plan_name}: NFE engine {got_engine} (want {want_engine}), "
                               f"reference {got_ref} (want {want_ref})")
        st = last["engine"].stats
        for provider, nfe, images in (("engine", st.total_nfe, st.images["trunk"] + st.images["completion"]
                                       + st.images["granularity"]),
                                      ("per-branch-reference", sum(got_ref.values()), last["reference"]["images"])):
            res.add("rollout", provider, shape, "nfe_total", "calls", nfe)
            res.add("rollout", provider, shape, "images", "images", images)
        res.add("rollout", "engine", shape, "speedup_vs_reference", "x", p50["per-branch-reference"] / p50["engine"])


# --- train_step and iteration ----------------------------------------------------------------------

def bench_training(res: Results, s: Settings, model, model_label: str, subjects: Sequence[str]) -> None:
    """Trainer iterations on `model` (its weights change); rows for `subjects` ⊆ {train_step, iteration}."""
    from tempflow_fast.config import load_config
    from tempflow_fast.training.distributed import DistContext
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    prompts = _prompts(max(s.prompts, 1))
    with tempfile.TemporaryDirectory(prefix="tempflow-bench-") as out:
        overrides = [f"method={s.method}", f"output_dir={out}", f"train.prompts_per_iteration={len(prompts)}",
                     "log.progress=false", "log.tensorboard=false", *(QUICK_TRAIN_OVERRIDES if s.quick else ())]
        cfg = load_config(Config, None, overrides)
        if s.reward == "shapes":
            from tempflow_fast.tasks.shapes.detector import ShapesReward

            reward = ShapesReward()
        else:
            reward = BrightnessReward()
        trainer = Trainer(cfg, model=model, reward=reward, train_prompts=prompts,
                          eval_fn=lambda m: {"overall": {"accuracy": float("nan")}}, dist=DistContext())
        metrics = []

        def iteration(rep):
            m = trainer.run_iteration(rep + s.warmup)
            if rep >= 0:
                metrics.append(m)

        tel = GpuTelemetry(s.cuda_index)
        totals = _time(iteration, s, tel)
        trainer.logger.close()
    shape = f"{s.method} P={len(prompts)} T={cfg.sampling.num_steps} @ {model_label}"
    last = metrics[-1]
    if "train_step" in subjects:
        for metric, key in (("sampling_time", "seconds_rollout"), ("reward_time", "seconds_reward"),
                            ("update_time", "seconds_update")):
            res.add("train_step", "engine", shape, metric, "s", *quantiles([m[key] for m in metrics]))
        res.add("train_step", "engine", shape, "model_calls", "calls", last["nfe_total"])
        res.add("train_step", "engine", shape, "fwd_bwd_passes", "passes", last["policy_passes"])
        res.add("train_step", "engine", shape, "samples_scored", "samples", last["trained_samples"])
        # What a per-sample trainer (Flow-GRPO's, TempFlow's public code) needs for the same batch:
        # a prefix recomputed per branch, and one policy forward+backward per scored sample.
        ref_calls = sum(recompute_prefix_nfe(trainer.plan.layout(), len(prompts)).values())
        res.add("train_step", "per-sample-reference", shape, "model_calls", "calls", ref_calls)
        res.add("train_step", "per-sample-reference", shape, "fwd_bwd_passes", "passes", last["trained_samples"])
        res.add_telemetry("train_step", "engine", shape, tel)
    if "iteration" in subjects:
        res.add("iteration", "engine", shape, "iteration_time", "s", *quantiles(totals))
        images = [m["images_total"] / t for m, t in zip(metrics, totals)]
        res.add("iteration", "engine", shape, "images_per_s", "images/s", *quantiles(images))
        res.add_telemetry("iteration", "engine", shape, tel)


def run(subjects: Sequence[str], s: Settings) -> Results:
    """Run `subjects` (a subset of SUBJECTS) and return their rows."""
    unknown = [x for x in subjects if x not in SUBJECTS]
    if unknown or not subjects:
        raise ValueError(f"subjects must be a non-empty subset of {', '.join(SUBJECTS)}, got {list(subjects)}")
    res = Results(s.device)
    if "ops" in subjects:
        bench_ops(res, s)
    if "rollout" in subjects:
        model, label = load_model(s)
        bench_rollout(res, s, model, label)
    train_subjects = [x for x in subjects if x in ("train_step", "iteration")]
    if train_subjects:
        model, label = load_model(s)  # fresh weights: training changes them
        bench_training(res, s, model, label, train_subjects)
    return res
