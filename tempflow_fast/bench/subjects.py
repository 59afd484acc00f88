"""The bench subjects. Each runs its benchmark with GPU telemetry sampled around the timed
repetitions and adds rows to a `Results` (results.py); timings are p50 [p20, p80] over `reps` runs
after `warmup` runs, counts are exact.

- ops:        fused Flow-GRPO loss forward+backward per provider (bench/ops.py's inputs and
              providers), and its speedup over the unfused eager PyTorch loss
- rollout:    per plan, the engine vs the prefix-recompute reference loop (reference.py: no sharing at all, a
              lower bound, not the public codes) on the same model: wall time, NFE (checked against
              accounting's analytical counts), images, and the engine's speedup as the ratio of the two p50s
- train_step: trainer iterations split into sampling / reward / update time, model calls and
              policy forward+backward passes; the prefix-recompute and per-sample counts beside them
- iteration:  the same iterations end to end: seconds per iteration and images per second
- official:   the trainer against the public codes' structure (official.py) on a diffusers FLUX pipeline wide
              enough for compute to dominate (pipelines.py; or --model-path): rollout, update and iteration —
              calls, rows, forward-equivalents, seconds and ratios, sides interleaved — with the trainer also run
              with the completion solver; the markdown report extrapolates the forward-equivalents to FLUX.1-dev
              at 1024 px (FLUX_1024_TFLOP_PER_ROW, ASSUMED_TFLOPS)
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
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

SUBJECTS = ("ops", "rollout", "train_step", "iteration", "official")

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
PREFIX_REFERENCE = "prefix-recompute-reference"  # reference.py: every branch integrates its own prefix
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
    # the official subject also runs the trainer with this completion solver (none with euler and steps None)
    completion_solver: str = "euler"
    completion_steps: Optional[int] = None

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
        from tempflow_fast.models.loading import resolve_dtype

        resolve_dtype(self.dtype, torch.bfloat16)  # a misspelt dtype fails here, whichever subjects run
        if self.model_kind == "tiny_flux" and (self.dtype is not None or self.resolution is not None):
            raise ValueError(f"dtype and resolution are for flux / sd3 / qwen_image models; the tiny model is "
                             f"float32 at 16×16 (got dtype {self.dtype!r}, resolution {self.resolution!r})")
        if self.resolution is not None and self.resolution < 16:
            raise ValueError(f"resolution must be >= 16, got {self.resolution}")
        if self.reward not in ("brightness", "shapes"):
            raise ValueError(f"reward must be 'brightness' or 'shapes', got {self.reward!r}")
        from tempflow_fast.sampling.solvers import check_completion

        check_completion(self.completion_solver, self.completion_steps)
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


def say(message: str) -> None:
    """A progress line on stderr (the suite runs for minutes; stdout keeps the tables)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _time(fn: Callable[[int], object], s: Settings, telemetry: GpuTelemetry, label: str = "") -> List[float]:
    """Seconds of fn(rep) for each timed rep (fn(-1 - w) for the warm-up runs). Progress on stderr: a line when
    the measurement starts and ends, and one per run that took a second or more."""
    say(f"{label}: {s.warmup} warm-up + {s.reps} timed run(s)")
    for w in range(s.warmup):
        t0 = time.perf_counter()
        fn(-1 - w)
        if time.perf_counter() - t0 >= 1.0:
            say(f"{label}: warm-up {w + 1}/{s.warmup} {time.perf_counter() - t0:.1f} s")
    times = []
    with telemetry:
        for rep in range(s.reps):
            _sync(s.device)
            t0 = time.perf_counter()
            fn(rep)
            _sync(s.device)
            times.append(time.perf_counter() - t0)
            if times[-1] >= 1.0:
                say(f"{label}: run {rep + 1}/{s.reps} {times[-1]:.1f} s")
    say(f"{label}: median {statistics.median(times):.4g} s")
    return times


def load_model(s: Settings):
    """(model adapter on s.device, label for the `shape` column)."""
    from tempflow_fast.models import tiny_flux
    from tempflow_fast.tasks.shapes.task import new_model

    if s.model_path:
        from tempflow_fast.models.loading import load_adapter

        say(f"loading {s.model_kind} {s.model_path}")
        model = load_adapter(s.model_kind, s.model_path, device=s.device, dtype=s.dtype, resolution=s.resolution)
        return model, f"{s.model_kind} {Path(s.model_path).name}"
    if s.quick:
        model = new_model(seed=0, transformer_config=QUICK_TRANSFORMER)
        model.module.to(s.device)
        return model, "tiny_flux 1+1 layers (random)"
    try:
        return tiny_flux.load_shipped(s.device), "tiny_flux (shipped)"
    except (ValueError, FileNotFoundError):
        model = new_model(seed=0)
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
            times_ms = [1e3 * x for x in _time(lambda rep: bops.fwd_bwd(fn, t), s, tel, f"ops {name} {label}")]
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
        for provider, fn in (("engine", engine), (PREFIX_REFERENCE, reference)):
            tel = GpuTelemetry(s.cuda_index)
            times = _time(fn, s, tel, f"rollout {provider} {shape}")
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
                                      (PREFIX_REFERENCE, sum(got_ref.values()), last["reference"]["images"])):
            res.add("rollout", provider, shape, "nfe_total", "calls", nfe)
            res.add("rollout", provider, shape, "images", "images", images)
        res.add("rollout", "engine", shape, "speedup_vs_prefix_recompute", "x", p50[PREFIX_REFERENCE] / p50["engine"])


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
        totals = _time(iteration, s, tel, f"{'/'.join(subjects)} {s.method} iterations")
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
        # With no sharing, a prefix recomputed per branch; a per-sample update (the public codes', `official`
        # measures their whole structure) one policy forward+backward per scored sample.
        ref_calls = sum(recompute_prefix_nfe(trainer.plan.layout(), len(prompts)).values())
        res.add("train_step", PREFIX_REFERENCE, shape, "model_calls", "calls", ref_calls)
        res.add("train_step", "per-sample-update", shape, "fwd_bwd_passes", "passes", last["trained_samples"])
        res.add_telemetry("train_step", "engine", shape, tel)
    if "iteration" in subjects:
        res.add("iteration", "engine", shape, "iteration_time", "s", *quantiles(totals))
        images = [m["images_total"] / t for m, t in zip(metrics, totals)]
        res.add("iteration", "engine", shape, "images_per_s", "images/s", *quantiles(images))
        res.add_telemetry("iteration", "engine", shape, tel)


# --- official: the trainer against the public codes' structure ------------------------------------------------

OFFICIAL_METHODS = ("tempflow", "flow_grpo")
DEFAULT_SOLVER = ("dpmpp_2m", 3)  # the completion solver the official subject also runs (docs/completions.md)
OFFICIAL = "official-structure"
PHASES = ("rollout", "update", "iteration")
# The papers' update settings for both sides: LoRA r = 32 / α = 64 on FLUX's targets, β = 0.004 in TempFlow's (exact
# Gaussian) KL convention, rows per rollout call capped as on a GPU (ROWS_PER_CALL_CAP_CUDA), the pipeline's own
# schedule (FLUX.1-dev's dynamic shift); the trainer's movement diagnostic off (no-grad forwards the structure
# comparison should not count).
OFFICIAL_TRAIN_OVERRIDES = ("train.lora.enabled=true", "train.lora.rank=32", "train.lora.alpha=64",
                            "train.beta=0.004", "train.kl_convention=gaussian", "train.clip_range=0.2",
                            "sampling.max_rows_per_call=32", "sampling.schedule_from_model=true",
                            "log.movement_states=0")


def _official_model(s: Settings):
    """(adapter, label): the FLUX pipeline at --model-path (--model-kind flux), else the built-in wide one (narrow
    with --quick): the public code transcribed is TempFlow's FLUX code."""
    from tempflow_fast.bench.pipelines import flux_adapter, transformer_parameters

    if s.model_path and s.model_kind == "flux":
        from tempflow_fast.models.loading import load_adapter

        model = load_adapter("flux", s.model_path, device=s.device, dtype=s.dtype, resolution=s.resolution)
        label = f"flux {Path(s.model_path).name}"
    else:
        width = "narrow" if s.quick else "wide"
        model = flux_adapter(width, seed=0, device=s.device)
        label = f"flux {width} {transformer_parameters(model) / 1e6:.1f}M"
    # both sides train with gradient checkpointing, as TempFlow's FLUX code does at 1024 px
    model.module.enable_gradient_checkpointing()
    return model, label


def bench_official(res: Results, s: Settings) -> None:
    """Iterations of the trainer and of the public codes' structure (official.py) on the same pipeline, prompts,
    plan and update settings, interleaved rep by rep; with a completion solver set, the trainer once more with it."""
    from tempflow_fast.algorithms.base import Rewards
    from tempflow_fast.bench.official import ForwardCounter, official_rollout, official_update
    from tempflow_fast.config import load_config
    from tempflow_fast.models.flux import FLUX_LORA_TARGETS
    from tempflow_fast.training.distributed import DistContext
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    if s.method not in OFFICIAL_METHODS:
        raise ValueError(f"the official subject transcribes {', '.join(OFFICIAL_METHODS)}; got method {s.method!r}")
    prompts = _prompts(s.prompts)
    solver = None
    if s.method == "tempflow" and (s.completion_solver != "euler" or s.completion_steps is not None):
        solver = f"{s.completion_solver}" + (f"/{s.completion_steps}" if s.completion_steps else "")
    reward = BrightnessReward()
    providers = {"ours": []} if solver is None else {"ours": [], f"ours+{solver}": []}
    out = tempfile.TemporaryDirectory(prefix="tempflow-bench-")
    trainers, counters = {}, {}
    label = ""
    for name in providers:
        model, label = _official_model(s)
        extra = [] if name == "ours" else [f"sampling.completion_solver={s.completion_solver}"] + (
            [f"sampling.completion_steps={s.completion_steps}"] if s.completion_steps else [])
        cfg = load_config(Config, None, [f"method={s.method}", f"output_dir={out.name}/{len(trainers)}",
                                         f"train.prompts_per_iteration={len(prompts)}", "log.progress=false",
                                         "log.tensorboard=false", *OFFICIAL_TRAIN_OVERRIDES,
                                         f"train.lora.target_modules=[{','.join(FLUX_LORA_TARGETS)}]",
                                         *(QUICK_TRAIN_OVERRIDES if s.quick else ()), *extra])
        trainers[name] = Trainer(cfg, model=model, reward=reward, train_prompts=prompts,
                                 eval_fn=lambda m: {"overall": {"accuracy": float("nan")}}, dist=DistContext())
        counters[name] = ForwardCounter(model.module)
    base = trainers["ours"]
    counters[OFFICIAL] = counters["ours"]  # the public structure runs on the same model as "ours"
    cfg = base.cfg
    seconds = {name: {ph: [] for ph in PHASES} for name in (OFFICIAL, *providers)}
    work = {}

    def ours(name, it):
        c = counters[name]
        c.reset()
        t0 = time.perf_counter()
        m = trainers[name].run_iteration(it)
        wall = time.perf_counter() - t0
        roll = {"calls": m["batched_calls"], "rows": m["nfe_total"], "forward_equivalents": m["nfe_total"]}
        total = c.snapshot()
        upd = {k: total[k] - roll[k] for k in roll}
        return (m["seconds_rollout"] + m["seconds_reward"], m["seconds_update"], wall), \
            {"rollout": roll, "update": upd, "iteration": {k: total[k] for k in roll}}, m["images_total"]

    def official(it):
        tr, c = base, counters[OFFICIAL]
        c.reset()
        t0 = time.perf_counter()
        tr.model.module.eval()
        result = official_rollout(tr.model, prompts, tr.plan, seed=1000 + it)
        texts = [prompts[p] for p in result.trajectories.prompt.tolist()]
        credit = tr.algorithm.credit(result, Rewards({1: reward(result.images[1], texts)}),
                                     global_std=cfg.train.global_std)
        roll = c.snapshot()
        t1 = time.perf_counter()
        tr.model.module.train()
        tr.optimizer.zero_grad(set_to_none=True)
        official_update(tr.model, result, credit, clip_range=cfg.train.clip_range, adv_clip=cfg.train.adv_clip,
                        beta=cfg.train.beta, kl_convention=cfg.train.kl_convention, reference=tr.reference)
        torch.nn.utils.clip_grad_norm_([p for _, p in tr.named_params], cfg.train.grad_clip)
        tr.optimizer.step()
        t2 = time.perf_counter()
        total = c.snapshot()
        keys = ("calls", "rows", "forward_equivalents")
        images = result.stats.total_images
        return (t1 - t0, t2 - t1, t2 - t0), {"rollout": {k: roll[k] for k in keys},
                                             "update": {k: total[k] - roll[k] for k in keys},
                                             "iteration": {k: total[k] for k in keys}}, images

    order = [OFFICIAL, *providers]

    def one_rep(rep):
        for name in order[rep % len(order):] + order[:rep % len(order)]:  # interleaved, order rotated per rep
            times, counts, images = official(rep + s.warmup) if name == OFFICIAL else ours(name, rep + s.warmup)
            if rep >= 0:
                for ph, t in zip(PHASES, times):
                    seconds[name][ph].append(t)
            work[name] = (counts, images)

    say(f"official: {s.warmup} warm-up + {s.reps} timed rep(s) of {', '.join(order)}, one iteration each")
    for rep in range(-s.warmup, 0):
        t0 = time.perf_counter()
        one_rep(rep)
        say(f"official: warm-up {rep + s.warmup + 1}/{s.warmup} {time.perf_counter() - t0:.1f} s")
    tel = GpuTelemetry(s.cuda_index)  # one sampler over the interleaved reps: the providers alternate too fast
    with tel:
        for rep in range(s.reps):
            t0 = time.perf_counter()
            one_rep(rep)
            say(f"official: rep {rep + 1}/{s.reps} {time.perf_counter() - t0:.1f} s")
    for c in {id(c): c for c in counters.values()}.values():
        c.close()
    for tr in trainers.values():
        tr.logger.close()
    out.cleanup()

    layout = base.plan.layout()
    shape = (f"{s.method} P={len(prompts)} T={layout.num_steps} N×K={layout.seeds_per_prompt}×{layout.branches} "
             f"@ {label}")
    p50 = {name: {ph: statistics.median(v) for ph, v in d.items()} for name, d in seconds.items()}
    for name in seconds:
        counts, images = work[name]
        for ph in PHASES:
            res.add("official", name, shape, f"{ph}_time", "s", *quantiles(seconds[name][ph]))
            res.add("official", name, shape, f"{ph}_calls", "calls", counts[ph]["calls"])
            res.add("official", name, shape, f"{ph}_rows", "rows", counts[ph]["rows"])
            res.add("official", name, shape, f"{ph}_forward_equivalents", "row-forwards",
                    counts[ph]["forward_equivalents"])
            res.add("official", name, shape, f"{ph}_flux1024_time", "s (FLOP model)",
                    flux1024_seconds(counts[ph]["forward_equivalents"]))
        res.add("official", name, shape, "images_decoded", "images", images)
        if name != OFFICIAL:
            for ph in PHASES:
                res.add("official", name, shape, f"{ph}_speedup_vs_official", "x", p50[OFFICIAL][ph] / p50[name][ph])
                res.add("official", name, shape, f"{ph}_flux1024_vs_official", "x",
                        counts[ph]["forward_equivalents"] / work[OFFICIAL][0][ph]["forward_equivalents"])
    for name in providers:
        tag = "" if name == "ours" else f", {name}"
        for ph in PHASES:
            res.notes.append(f"{ph} vs official structure{tag}: {p50[OFFICIAL][ph] / p50[name][ph]:.2f}x "
                             f"(ours {p50[name][ph]:.3f} s, official {p50[OFFICIAL][ph]:.3f} s)")
    res.add_telemetry("official", "all (interleaved)", shape, tel)
    res.sections.append(_flux1024_report(shape, {name: work[name][0] for name in seconds}))


def flux1024_seconds(forward_equivalents: float) -> float:
    """Seconds of transformer compute at FLUX.1-dev 1024 px under the FLOP model (official.py constants)."""
    from tempflow_fast.bench.official import ASSUMED_TFLOPS, FLUX_1024_TFLOP_PER_ROW

    return forward_equivalents * FLUX_1024_TFLOP_PER_ROW / ASSUMED_TFLOPS


def _flux1024_report(shape: str, counts) -> str:
    from tempflow_fast.bench.official import ASSUMED_TFLOPS, FLUX_1024_TFLOP_PER_ROW

    lines = [f"### FLUX.1-dev 1024 px extrapolation — {shape}", "",
             f"FLOP model: {FLUX_1024_TFLOP_PER_ROW:g} TFLOP per row-forward (FLUX.1-dev, 4096 image + 512 text "
             f"tokens), {ASSUMED_TFLOPS:g} TFLOP/s sustained; forward-equivalents per row: no-grad forward 1, "
             f"forward+backward 3, checkpoint recompute 1 (counted, official.FORWARD_EQUIVALENTS); transformer only "
             f"(VAE decodes are counted apart). The counts are this run's, for this plan and prompt count.", "",
             "| provider | rollout fwd-eq | update fwd-eq | iteration fwd-eq | FLUX-1024 s | vs official |",
             "|---|---:|---:|---:|---:|---:|"]
    ref = counts[OFFICIAL]["iteration"]["forward_equivalents"]
    for name, c in counts.items():
        f = [c[ph]["forward_equivalents"] for ph in PHASES]
        lines.append(f"| {name} | {f[0]:.0f} | {f[1]:.0f} | {f[2]:.0f} | {flux1024_seconds(f[2]):.0f} | "
                     f"{f[2] / ref:.3f}x |")
    return "\n".join(lines)


def run(subjects: Sequence[str], s: Settings) -> Results:
    """Run `subjects` (a subset of SUBJECTS) and return their rows."""
    unknown = [x for x in subjects if x not in SUBJECTS]
    if unknown or not subjects:
        raise ValueError(f"subjects must be a non-empty subset of {', '.join(SUBJECTS)}, got {list(subjects)}")
    res = Results(s.device)
    say(f"subjects: {', '.join(subjects)} on {s.device}")
    if "ops" in subjects:
        bench_ops(res, s)
    if "rollout" in subjects:
        model, label = load_model(s)
        bench_rollout(res, s, model, label)
    train_subjects = [x for x in subjects if x in ("train_step", "iteration")]
    if train_subjects:
        model, label = load_model(s)  # fresh weights: training changes them
        bench_training(res, s, model, label, train_subjects)
    if "official" in subjects:
        bench_official(res, s)
    return res
