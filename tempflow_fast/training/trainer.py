"""The trainer loop: prompts → rollout plan (algorithm) → rollout engine → rewards → credit (algorithm)
→ update (one policy forward per shared state, fused loss) → log / checkpoint.

Exact resume: every source of randomness is derived from (config seed, iteration) — the prompt order
is a seeded permutation per data epoch, the rollout's generator and the update's shuffling generator are
seeded from the iteration — and the model, optimizer, EMA and counters come back from the checkpoint, so a
resumed run computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from tempflow_fast import algorithms
from tempflow_fast.algorithms.base import Rewards
from tempflow_fast.algorithms.tempflow import step_reward_std
from tempflow_fast.config import config_to_dict
from tempflow_fast.images import to_uint8, to_unit_float
from tempflow_fast.sampling.engine import concat_results, rollout
from tempflow_fast.sampling.runners import DEFAULT_BUCKETS, EagerRunner, buckets_within, make_runner
from tempflow_fast.tasks import build_task
from tempflow_fast.tasks.base import EvalRun, read_prompts, round_robin
from tempflow_fast.tasks.reward_eval import reward_scores
from tempflow_fast.tasks.stats import mean_interval
from tempflow_fast.training import checkpoint as ckpt
from tempflow_fast.training import distributed, run_dir
from tempflow_fast.training.ema import EMA
from tempflow_fast.training.metrics_log import MetricsLogger
from tempflow_fast.training.run_dir import RunLock
from tempflow_fast.training.schedule import learning_rate_at, set_learning_rate
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.update import build_update_batch, finite, policy_loss, split_parts
from tempflow_fast.models.base import select_cond


def check_device(spec: str, field_name: str) -> None:
    """ValueError naming `field_name` (a config field, or a command-line flag such as "--device") when the device
    `spec` names is not on this machine."""
    from tempflow_fast.rewards.base import resolve_device

    where = field_name if field_name.startswith("--") else f"config field {field_name!r}"
    try:
        device = resolve_device(spec)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{where}: {spec!r} needs CUDA, which this machine does not have "
                         f"(torch {torch.__version__}); use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{where}: {spec!r}, but this machine has {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1})")


def reward_devices(reward_cfg, prefix: str = "reward") -> List[tuple]:
    """(field, device) of a reward config and of a composite's components."""
    out = [(f"{prefix}.device", reward_cfg.device)]
    for i, component in enumerate(reward_cfg.components):
        out += reward_devices(component, f"{prefix}.components[{i}]")
    return out


def model_vocabulary(model, model_cfg) -> Optional[tuple]:
    """(words, max words per prompt) of a word-level model (the tiny FLUX): the given adapter's, or read from the
    config file of model.path (the shipped model when null) without loading weights; None for other models."""
    if model is not None:
        vocab = getattr(model, "vocab", None)
        return None if vocab is None else (tuple(vocab), int(model.max_words))
    from importlib.resources import as_file

    from tempflow_fast.models import tiny_flux

    with as_file(tiny_flux.shipped_weights_dir()) as shipped:
        folder = Path(model_cfg.path) if model_cfg.path is not None else Path(shipped)
        config = folder / tiny_flux.CONFIG_NAME
        if not config.is_file():
            return None  # loading the model names what is missing
        try:
            text = json.loads(config.read_text())["text_encoder"]
            return tuple(text["vocab"]), int(text["max_words"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"config field 'model.path': {str(config)!r} is not a tiny_flux config ({err})") from None


def check_vocabulary(prompts: Sequence[str], vocab: Sequence[str], max_words: int, field_name: str) -> None:
    """Every prompt tokenizes with the word-level model: ValueError naming the first unknown word and listing the
    vocabulary (index 0 is padding, not a word)."""
    words = list(vocab[1:])
    known = set(words)
    for prompt in prompts:
        tokens = prompt.lower().split()
        if len(tokens) > max_words:
            raise ValueError(f"config field {field_name!r}: prompt {prompt!r} has {len(tokens)} words; the model "
                             f"reads at most {max_words}")
        unknown = [w for w in tokens if w not in known]
        if unknown:
            raise ValueError(f"config field {field_name!r}: prompt {prompt!r} uses the word {unknown[0]!r}, which "
                             f"the model does not know; its vocabulary: {', '.join(words)}")


def eval_metrics(table: Dict) -> Dict[str, float]:
    """The logged scalars of an eval table: heldout_accuracy (overall), its 95% interval heldout_accuracy_ci_low /
    _ci_high when the table has one, and heldout/<row> for every other row (shapes: categories; reward eval: each
    component's mean raw score)."""
    out = {"heldout_accuracy": table["overall"]["accuracy"]}
    if "ci95" in table["overall"]:
        out["heldout_accuracy_ci_low"], out["heldout_accuracy_ci_high"] = table["overall"]["ci95"]
    out.update({f"heldout/{k}": v["accuracy"] for k, v in table.items() if k != "overall"})
    return out


def probe_metrics(probe: Optional[Dict]) -> Dict[str, float]:
    """The logged scalars of a probe: probe_reward and its 95% interval probe_reward_ci_low / _ci_high."""
    if probe is None:
        return {}
    return {"probe_reward": probe["mean"], "probe_reward_ci_low": probe["ci95"][0],
            "probe_reward_ci_high": probe["ci95"][1]}


class NonFiniteAbort(RuntimeError):
    """Too many updates were skipped for a non-finite loss or gradient."""


class RewardFailure(RuntimeError):
    """The reward raised (a server that timed out, refused or answered a non-finite score)."""


@dataclass
class Counters:
    """Totals carried across checkpoints."""

    nfe: int = 0  # model calls in rollouts (rows through velocity)
    images: int = 0  # images decoded and scored
    policy_passes: int = 0  # policy forward+backward rows (one per shared state per inner epoch)
    samples_scored: int = 0  # samples the fused loss scored
    optimizer_steps: int = 0
    skipped_nonfinite: int = 0
    padding_passes: int = 0  # ZeRO: forward+backward rows run with a zero loss so every rank runs as many passes
    wall_seconds: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)


def _update_stats() -> Dict[str, float]:
    return {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "kl": 0.0, "grad_norm": 0.0, "policy_passes": 0,
            "padding_passes": 0, "skipped_nonfinite": 0}


def _cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every floating parameter of `module` in `dtype`, in place (diffusers warns on ModelMixin.to(dtype))."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return module


class _GuardedReward:
    """The trainer's reward for evaluations and the probe: a failure is RewardFailure (one line, as in training);
    every other attribute (a composite's last_components) is the reward's own."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer

    def __call__(self, images, prompts):
        return self._trainer._reward_call(self._trainer.reward, images, prompts)

    def __getattr__(self, name):
        return getattr(self._trainer.reward, name)


def _seed_for(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (no Python hash randomisation)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Trainer:
    """Runs `cfg` on a task (tempflow_fast/tasks/base.py). `task` defaults to the one the config names
    (`data.task`, or derived: Config.task_name); `reward`, `train_prompts` and `eval_fn` to the task's."""

    def __init__(self, cfg: Config, *, model=None, reward=None, train_prompts: Optional[Sequence[str]] = None,
                 eval_fn=None, task=None, resume: bool = False, overwrite: bool = False,
                 dist: Optional[distributed.DistContext] = None):
        """`task`: what the run trains on and how it is measured (a tempflow_fast.tasks.base.Task); `eval_fn`:
        model → eval table, in place of the task's evaluation.
        `resume`: continue from the newest loadable checkpoint in output_dir (a different run's is refused);
        `overwrite`: a new run in a folder that holds an earlier one, whose outputs are removed first. Without
        either, output_dir must be empty or new. Every check that reads no weights runs before the model loads:
        a bad value raises ValueError naming its config field."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run in output_dir, or "
                             "replace it")
        from tempflow_fast.config import validated

        cfg = validated(cfg)  # a Config built in Python gets the checks a YAML one gets (a checked copy)
        if model is not None and not callable(getattr(model, "velocity", None)):
            from tempflow_fast.models.loading import pipeline_kind

            cfg.model.kind = pipeline_kind(model)  # a diffusers pipeline object given directly
        self.cfg = cfg
        # torchrun's environment when present (training/distributed.py), else one process
        self.dist = dist if dist is not None else distributed.from_environment()
        self.out = Path(cfg.output_dir)
        self.task = task if task is not None else build_task(cfg)
        self.train_prompts = list(train_prompts) if train_prompts is not None else self.task.train_prompts()
        if not self.train_prompts:
            raise ValueError("train_prompts is empty")
        self._check_before_loading(model, reward)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output_dir {str(self.out)!r} is a file, not a folder; choose another output_dir")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"output_dir {str(self.out)!r}: cannot make the folder ({err.strerror or err})") from None
        self._lock = RunLock(self.out).acquire() if self.dist.is_main else None
        self._lock_finalizer = weakref.finalize(self, self._lock.release) if self._lock is not None else None
        try:
            self._set_up(model, reward, eval_fn, resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _set_up(self, model, reward, eval_fn, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        if self.dist.is_main:
            run_dir.claim(self.out, resume=resume, overwrite=overwrite)
            removed = ckpt.remove_temporary(self.out / "checkpoints")
            if removed:
                print(f"[tempflow-fast] removed {len(removed)} unfinished checkpoint folder(s) an interrupted "
                      f"write left: {', '.join(p.name for p in removed)}", flush=True)
        # refused before any weights load: a run that is not this one's, or a file that would run code
        self._checkpoint = self._checkpoint_to_resume() if resume else None
        torch.manual_seed(cfg.seed)
        self.model = self._adapter_for(model) if model is not None else self._load_model()
        self.reward = reward if reward is not None else self.task.build_reward(cfg.reward)
        if cfg.train.async_rollout:  # the background rollout scores while the foreground may evaluate
            from tempflow_fast.training.async_rollout import SerializedReward

            self.reward = SerializedReward(self.reward)
        self._cache_text(self.train_prompts)
        self.eval_metric: Optional[str] = self.task.metric or ("held-out accuracy" if eval_fn is not None else None)
        self.eval_fn = eval_fn if eval_fn is not None else (self._task_eval if self.task.metric is not None else None)
        self._probe_set = self._probe_prompts()
        # real pipelines hand rewards uint8 images on the host (images.py); the tiny model's 16 px ones stay as is
        self._image_format = "uint8_cpu" if getattr(self.model, "vae", None) is not None else "float"
        self.scorer = None
        if cfg.train.async_reward:
            from tempflow_fast.rewards.async_scorer import AsyncScorer

            self.scorer = AsyncScorer(self.reward)
        self._setup_params()
        self.runner = self._build_runner()
        # train.async_rollout: the behaviour policy, its worker, and a resumed run's behaviour weights
        self._behaviour = self._background = self._behaviour_state = None
        self.counters = Counters()
        self.iteration = 0
        self.eval_before: Optional[Dict] = None
        self.probe_before: Optional[Dict] = None
        if resume:
            self._resume()
        self.logger = MetricsLogger(self.out, tensorboard=cfg.log.tensorboard,
                                    resume_from=self.iteration if resume else None, tracker=cfg.log.tracker,
                                    project=cfg.log.project, run_name=cfg.log.run_name,
                                    config=config_to_dict(cfg)) \
            if self.dist.is_main else distributed.NullLogger()

    def close(self) -> None:
        """Release output_dir (its run lock) and close the logs; `train()` does this when it ends."""
        background = getattr(self, "_background", None)
        if background is not None:  # a rollout still running reads the model: let it finish first
            background.close()
            self._background = None
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        if self._lock_finalizer is not None:
            self._lock_finalizer()

    def _check_before_loading(self, model, reward) -> None:
        """The cheap checks (no weights read): devices exist, prompt files read and (tiny model) use only words
        it knows, the method's rollout plan builds (self.algorithm, self.plan), the reward server answers. Each
        failure is a ValueError naming the config field."""
        cfg = self.cfg
        if model is None:
            check_device(cfg.model.device, "model.device")
        if reward is None:
            for field_name, device in reward_devices(cfg.reward):
                check_device(device, field_name)
        eval_prompts = None
        if cfg.data.eval_prompts is not None:  # read (and checked) whatever the task does with it
            eval_prompts = read_prompts(cfg.data.eval_prompts, "data.eval_prompts")
        vocab = model_vocabulary(model, cfg.model) if (model is not None or cfg.model.kind == "tiny_flux") else None
        if vocab is not None:
            if cfg.data.train_prompts is not None:
                check_vocabulary(self.train_prompts, *vocab, "data.train_prompts")
            if eval_prompts is not None:
                check_vocabulary(eval_prompts, *vocab, "data.eval_prompts")
        try:
            self.algorithm = algorithms.from_config(cfg)
            self.plan = self.algorithm.plan()
        except ValueError as err:
            raise ValueError(f"config section {cfg.method!r} (with sampling.num_steps = {cfg.sampling.num_steps}): "
                             f"{err}") from None
        if reward is None:
            from tempflow_fast.rewards.config import check_reward_reachable

            check_reward_reachable(cfg.reward)

    # --- set-up -------------------------------------------------------------------------------

    def _adapter_for(self, model):
        """A model given in Python: an adapter as is, or a diffusers pipeline object (FluxPipeline,
        StableDiffusion3Pipeline) wrapped with this config's model / sampling settings."""
        if callable(getattr(model, "velocity", None)):
            return model
        from tempflow_fast.models.loading import adapter_for_pipeline

        device = next(model.transformer.parameters()).device
        backend, _ = self._attention_backends(device, model.transformer.dtype)
        m = self.cfg.model
        return adapter_for_pipeline(model, attention_backend=backend, gradient_checkpointing=m.gradient_checkpointing,
                                    compile_blocks=m.compile_blocks, resolution=m.resolution,
                                    guidance_scale=self.cfg.sampling.guidance_scale,
                                    max_sequence_length=m.max_sequence_length)

    def _load_model(self):
        m, smp = self.cfg.model, self.cfg.sampling
        from tempflow_fast.models.loading import load_adapter
        from tempflow_fast.rewards.base import resolve_device

        device = resolve_device(m.device)
        if device.type == "cuda" and self.dist.active:
            device = torch.device("cuda", self.dist.local_rank)
        from tempflow_fast.models.loading import resolve_dtype

        backend, _ = self._attention_backends(device, resolve_dtype(m.dtype, torch.bfloat16))
        return load_adapter(m.kind, m.path, device=device, dtype=m.dtype, attention_backend=backend,
                            compile_blocks=m.compile_blocks, gradient_checkpointing=m.gradient_checkpointing,
                            resolution=m.resolution, guidance_scale=smp.guidance_scale,
                            max_sequence_length=m.max_sequence_length)

    def _build_runner(self, adapter=None):
        """The rollout's segment runner (of `adapter`, default the live model): every transformer call at most sampling.max_rows_per_call rows (default
        from the memory model: what the device holds after the weights, the fp32 trainable copies and AdamW's
        moments, models/memory.py), compiled / captured runners on buckets capped at that."""
        from tempflow_fast.models.memory import default_max_rows_per_call

        smp = self.cfg.sampling
        max_rows = smp.max_rows_per_call if adapter is None else self.runner.max_rows
        if max_rows is None:
            trainable = sum(p.numel() for _, p in self.named_params)
            resident = None
            if self.model.module is not None and next(self.model.module.parameters()).is_cuda:
                # AdamW's two fp32 moments are allocated at the first step: count them now
                resident = torch.cuda.memory_allocated(next(self.model.module.parameters()).device) + 8 * trainable
                if self.cfg.train.async_rollout:  # the behaviour copy, and the update's gradients and activations
                    from tempflow_fast.models.memory import update_activation_bytes

                    resident += 8 * trainable + update_activation_bytes(
                        self.model, states_per_forward=self.cfg.train.states_per_forward,
                        gradient_checkpointing=self.cfg.model.gradient_checkpointing)
            max_rows = default_max_rows_per_call(self.model, resident_bytes=resident)
            if max_rows is not None and self.dist.is_main and next(self.model.module.parameters()).is_cuda:
                print(f"[tempflow-fast] max rows per transformer call: {max_rows} (memory model; set "
                      f"sampling.max_rows_per_call to override)", flush=True)
        if smp.buckets is not None and max_rows is not None and max(smp.buckets) > max_rows:
            raise ValueError(f"config field 'sampling.buckets': bucket {max(smp.buckets)} is larger than the "
                             f"{max_rows} rows per transformer call the memory model allows here "
                             f"(sampling.max_rows_per_call)")
        adapter = self.model if adapter is None else adapter
        if smp.runner == "eager":
            return EagerRunner(adapter, smp.buckets, max_rows=max_rows)
        buckets = smp.buckets if smp.buckets is not None else buckets_within(DEFAULT_BUCKETS, max_rows)
        return make_runner(smp.runner, adapter, buckets, max_rows=max_rows)

    def _cache_text(self, prompts: Sequence[str]) -> None:
        """Real pipelines (model.text_encoders): "keep" / "offload" encode each iteration's new prompts when they
        are first used and keep at most model.prompt_cache_size of them (offloaded encoders visit the device for
        that batch); "release" encodes every train and eval prompt now, then drops the encoders."""
        if not hasattr(self.model, "cache_prompts"):
            return
        m = self.cfg.model
        if m.text_encoders == "release":
            eval_file = self.cfg.data.eval_prompts
            every = list(prompts) + (read_prompts(eval_file, "data.eval_prompts") if eval_file else [])
            self.model.cache.max_entries = max(m.prompt_cache_size, len(set(every)) + 1)  # + SD3's negative prompt
            self.model.cache_prompts(every)
            self.model.release_text_encoders()
            return
        self.model.cache.max_entries = m.prompt_cache_size
        if m.text_encoders == "offload":
            self.model.offload_text_encoders("cpu")

    def _eval_run(self) -> EvalRun:
        return EvalRun(_GuardedReward(self), rows_per_call=self.runner.max_rows,
                       decode_batch=self.cfg.sampling.decode_batch, image_format=self._image_format,
                       progress=self.dist.is_main and self.cfg.log.progress)

    def _task_eval(self, model) -> Optional[Dict]:
        """The task's held-out evaluation (shapes: accuracy by category; otherwise the mean reward)."""
        return self.task.evaluate(model, self._eval_run())

    def _probe_prompts(self) -> List[str]:
        """eval.probe_prompts train prompts (null: the task's default), spread over the task's categories (by the
        task's `probe_prompts` when it has one, else `round_robin` over its category pools)."""
        n = self.cfg.eval.probe_prompts
        n = getattr(self.task, "default_probe_prompts", 0) if n is None else n
        choose = getattr(self.task, "probe_prompts", None)
        return choose(self.train_prompts, n) if choose is not None else round_robin(
            self.task.category_pools(self.train_prompts), n)

    @torch.no_grad()
    def _probe(self) -> Optional[Dict]:
        """The trained reward of the probe set (EMA weights when on): ODE samples (eval.num_steps) of the fixed
        probe prompts × eval.probe_images fixed noises. {"mean", "ci95" (prompts held fixed), "count", "scores"}."""
        if not self._probe_set:
            return None
        e = self.cfg.eval
        if self.ema is not None:
            self._swap_ema()
        try:
            scores, per_image, _ = reward_scores(
                self.model, self._probe_set, _GuardedReward(self), self.cfg, images_per_prompt=e.probe_images,
                seed=_seed_for(e.seed, 6), rows_per_call=self.runner.max_rows, decode_batch=self.cfg.sampling.decode_batch,
                image_format=self._image_format, progress=self.dist.is_main and self.cfg.log.progress, desc="probe")
        finally:
            if self.ema is not None:
                self._swap_ema()
        mean, low, high = mean_interval(scores, per_image)
        return {"mean": mean, "ci95": [low, high], "count": len(per_image), "prompts": len(self._probe_set),
                "scores": scores.tolist()}

    def _probe_change(self, after: Optional[Dict]) -> Optional[Dict]:
        """After minus before on the same probe images (paired): {"mean", "ci95"}."""
        before = self.probe_before
        if before is None or after is None or len(before["scores"]) != len(after["scores"]):
            return None
        per_image = [p for p in self._probe_set for _ in range(self.cfg.eval.probe_images)]
        diff = torch.tensor(after["scores"]) - torch.tensor(before["scores"])
        mean, low, high = mean_interval(diff, per_image if len(per_image) == len(diff) else None)
        return {"mean": mean, "ci95": [low, high]}

    def _setup_params(self):
        cfg = self.cfg.train
        module = self.model.module
        self.lora = cfg.lora.enabled
        if self.lora:
            from peft import LoraConfig

            for p in module.parameters():
                p.requires_grad_(False)
            target = getattr(module, "transformer", module)
            target.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                          target_modules=list(cfg.lora.target_modules), init_lora_weights="gaussian"))
        # Mixed precision as diffusers' training scripts do it: trainable parameters (LoRA adapters, or every weight
        # of a full fine-tune) are fp32 master weights, the frozen ones stay in the model dtype, and the adapters
        # run the forward under autocast to that dtype. AdamW on bf16 weights would round most updates away.
        # (DeepSpeed keeps its own fp32 masters inside its sharded optimizer: zero.deepspeed_config enables bf16.)
        if self.cfg.distributed.backend != "deepspeed":
            from diffusers.training_utils import cast_training_params

            cast_training_params(module, dtype=torch.float32)
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("the model has no trainable parameters")
        self.dist.broadcast_parameters([p for _, p in self.named_params])  # before any copy is taken
        self.reference = None
        if cfg.beta > 0:
            if self.lora:
                target = getattr(module, "transformer", module)

                def reference(x, sigma, cond):
                    target.disable_adapters()
                    try:
                        return self.model.velocity(x, sigma, cond)
                    finally:
                        target.enable_adapters()
            else:
                frozen = copy.copy(self.model)
                # the initial policy in the compute dtype (the fp32 master copies were cast from it: exact)
                frozen.module = copy.deepcopy(module).to(getattr(self.model, "dtype", torch.float32)).requires_grad_(False)
                reference = frozen.velocity
            self.reference = reference
        self.zero = None  # the DeepSpeed engine (distributed.backend: deepspeed), which then owns the optimizer
        self.policy = self.model  # the adapter the policy forward of the update goes through
        if self.cfg.distributed.backend == "deepspeed":
            from tempflow_fast.training.zero import ZeroEngine

            self.zero = ZeroEngine(self.model, self.named_params, self.cfg, self.dist)
            self.policy, self.optimizer = self.zero.policy, None
        else:
            self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=cfg.learning_rate,
                                               betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
            # the weights and AdamW state before each step, put back when the step leaves a non-finite weight
            self._step_snapshot = distributed.StepSnapshot(self.optimizer, [p for _, p in self.named_params])
        with self._full_parameters():
            self.ema = EMA(self.named_params, cfg.ema_decay, update_every=cfg.ema_update_every,
                           warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # DiffusionNFT's old policy (the rollout's, and v_old of its loss): a copy of the trainable weights
        self._old_weights = [p.detach().clone() for _, p in self.named_params] \
            if getattr(self.algorithm, "forward_process", False) else None

    def _full_parameters(self, modify: bool = False):
        """Context in which the trainable parameters hold whole tensors (ZeRO-3 partitions them; collective)."""
        return self.zero.full_parameters(modify) if self.zero is not None else contextlib.nullcontext()

    def _swap_ema(self) -> None:
        with self._full_parameters(modify=True):
            self.ema.swap()

    # --- data ---------------------------------------------------------------------------------

    def prompts_for(self, iteration: int) -> List[str]:
        """The prompt batch of `iteration` (0-based): consecutive slices of a seeded permutation per epoch.

        With data.balance_categories the positions cycle through the categories and each category walks its
        own seeded permutation, so every category is trained equally often whatever its share of the prompts.
        """
        P = self.cfg.train.prompts_per_iteration
        pools = self._category_pools() if self.cfg.data.balance_categories else [self.train_prompts]
        out = []
        for pos in range(iteration * P, (iteration + 1) * P):
            c, j = pos % len(pools), pos // len(pools)
            pool = pools[c]
            epoch, i = divmod(j, len(pool))
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 1, epoch, c))
            out.append(pool[int(torch.randperm(len(pool), generator=gen)[i])])
        return out

    def _category_pools(self) -> List[List[str]]:
        if self.cfg.data.train_prompts is not None:
            raise ValueError("config field 'data.balance_categories': needs the shapes task's prompts "
                             "(data.train_prompts must be null)")
        return self.task.category_pools(self.train_prompts)

    # --- one iteration ------------------------------------------------------------------------

    def _submit_rewards(self, result, prompts: List[str]):
        """Hand a segment's images to the reward (on the scorer thread when train.async_reward) and return a
        function that waits for the scores and assembles them into `Rewards` (on the rollout's device)."""
        device = result.sigmas.device

        def score(images: torch.Tensor, texts: List[str]):
            if images.dtype == torch.uint8 and not getattr(self.reward, "accepts_uint8", False):
                images = to_unit_float(images)  # a reward that only knows floats gets them (on the host)
            if self.scorer is not None:
                future = self.scorer.submit(images, texts)
                return lambda: (self._reward_call(future.result).float().to(device), future.components)
            scores = self._reward_call(self.reward, images, texts).float().to(device)
            components = dict(getattr(self.reward, "last_components", {}))  # a composite's raw scores of this call
            return lambda: (scores, components)

        traj_prompts = [prompts[i] for i in result.trajectories.prompt.tolist()]
        final = {lam: score(img, traj_prompts) for lam, img in result.images.items()}
        tweedie = trunk = None
        if result.tweedie_images is not None:
            B, T = result.tweedie_images.shape[:2]
            flat = result.tweedie_images.reshape(B * T, *result.tweedie_images.shape[2:])
            tweedie = (score(flat, [p for p in traj_prompts for _ in range(T)]), B, T)
        if result.trunk_images is not None:
            trunk = score(result.trunk_images, [prompts[i] for i in result.trunk_prompt.tolist()])

        weights = {getattr(r, "name", None): float(w) for r, w in getattr(self.reward, "components", ())}

        def collect() -> Rewards:
            done = {lam: f() for lam, f in final.items()}
            return Rewards({lam: r for lam, (r, _) in done.items()},
                           None if tweedie is None else tweedie[0]()[0].view(tweedie[1], tweedie[2]),
                           None if trunk is None else trunk()[0],
                           final_components={lam: {n: v.float().to(device) for n, v in c.items()}
                                             for lam, (_, c) in done.items() if c},
                           component_weights=weights)

        return collect

    def _reward_call(self, fn, *args):
        """fn(*args), a reward's exception turned into RewardFailure naming the reward and the iteration (a server
        that times out or answers NaN stops the run with that message, not a traceback)."""
        try:
            return fn(*args)
        except Exception as err:
            name = getattr(self.reward, "name", None) or self.cfg.reward.name
            raise RewardFailure(f"iteration {self.iteration + 1}: the reward {name!r} failed: "
                                f"{type(err).__name__}: {err}") from err

    def _attention_backends(self, device, dtype):
        """(update, rollout) attention backends: model.attention_backend / model.rollout_attention_backend, and
        where both are unset on a real model the defaults of models/attention.py."""
        from tempflow_fast.models.attention import default_attention_backends

        m = self.cfg.model
        if m.attention_backend is None and m.rollout_attention_backend is None and m.kind != "tiny_flux":
            return default_attention_backends(device, dtype, kind=m.kind)
        return m.attention_backend, m.rollout_attention_backend or m.attention_backend

    @contextlib.contextmanager
    def _rollout_attention(self):
        """The rollout backend for the no-grad rollout forwards, the update backend again after."""
        from tempflow_fast.models.loading import transformer_of

        transformer = transformer_of(self.model)
        update, rollout_backend = self._attention_backends(next(transformer.parameters()).device,
                                                           getattr(self.model, "dtype", torch.float32))
        if rollout_backend is None or rollout_backend == update:
            yield
            return
        from tempflow_fast.models.attention import set_attention_backend

        set_attention_backend(transformer, rollout_backend)
        try:
            yield
        finally:
            set_attention_backend(transformer, update or "native")

    def _plan_for(self, iteration: int):
        """This iteration's rollout plan: the algorithm's per-iteration choice when it makes one (adaptive
        bifurcation, from the checkpointed running state in counters.extra), else the fixed plan."""
        plan_for = getattr(self.algorithm, "plan_for", None)
        if plan_for is None:
            return self.plan
        return plan_for(iteration, self.counters.extra, seed=_seed_for(self.cfg.seed, 4, iteration))

    def _rollout(self, prompts: List[str], iteration: int, plan=None, model=None, runner=None):
        """Rollout in `train.rollout_segments` prompt segments; each segment's images are scored while the
        next segment samples (train.async_reward). `model` / `runner`: the behaviour policy's (train.async_rollout),
        else the live model's. Returns the merged (result, rewards, (seconds sampling, seconds waiting for the
        reward))."""
        n_seg = min(self.cfg.train.rollout_segments, len(prompts))
        bounds = [len(prompts) * j // n_seg for j in range(n_seg + 1)]
        # each rank its own noises; one process keeps the seeds it always had
        base = (_seed_for(self.cfg.seed, 2, iteration) if not self.dist.active
                else _seed_for(self.cfg.seed, 2, iteration, self.dist.rank))
        results, pending = [], []
        # a schedule the method defines itself (G²RPO's code's linspace), else the plan's own
        rollout_sigmas = getattr(self.algorithm, "rollout_sigmas", None)
        sigmas = rollout_sigmas() if rollout_sigmas is not None else None
        t0 = time.perf_counter()
        for j in range(n_seg):
            seg = prompts[bounds[j]:bounds[j + 1]]
            seed = base if j == 0 else _seed_for(base, j)
            r = rollout(self.model if model is None else model, seg, self.plan if plan is None else plan, seed=seed,
                        runner=self.runner if runner is None else runner,
                        decode_batch=self.cfg.sampling.decode_batch, image_format=self._image_format,
                        sigmas=sigmas)
            results.append(r)
            pending.append(self._submit_rewards(r, seg))
        t1 = time.perf_counter()
        rewards = [collect() for collect in pending]
        seconds = (t1 - t0, time.perf_counter() - t1)  # sampling (incl. overlapped scoring), reward wait
        merged = Rewards(
            {lam: torch.cat([r.final[lam] for r in rewards]) for lam in rewards[0].final},
            None if rewards[0].tweedie is None else torch.cat([r.tweedie for r in rewards]),
            None if rewards[0].trunk is None else torch.cat([r.trunk for r in rewards]),
            final_components={lam: {k: torch.cat([r.final_components[lam][k] for r in rewards]) for k in c}
                              for lam, c in rewards[0].final_components.items()},
            component_weights=rewards[0].component_weights,
        )
        return concat_results(results), merged, seconds

    def run_iteration(self, iteration: int) -> Dict[str, float]:
        if getattr(self.algorithm, "forward_process", False):
            return self._forward_process_iteration(iteration)
        cfg = self.cfg.train
        t0 = time.perf_counter()
        lagged = self._background is not None and self._background.pending is not None
        if self.cfg.train.async_rollout and not lagged and self._behaviour_state is not None:
            # resumed: the checkpoint's behaviour weights sample this rollout, as in the uninterrupted run
            self._launch_rollout(iteration, self._behaviour_state)
            self._behaviour_state, lagged = None, True
        if lagged:  # sampled in the background during the previous update, by the weights before it
            prompts, plan, (result, rewards, seconds) = self._background.wait(iteration)
        else:
            prompts = self.dist.shard(self.prompts_for(iteration))
            self.model.module.eval()
            plan = self._plan_for(iteration)
            with self._rollout_attention():
                result, rewards, seconds = self._rollout(prompts, iteration, plan)
        self._last_result, self._last_prompts = result, prompts  # this rank's own rollout, for sample grids
        t1 = time.perf_counter()
        # every rank's rewards, so global std and logged reward statistics cover the whole batch
        result, rewards = self.dist.global_view(result, rewards, num_prompts=len(prompts))
        if self.dist.active and self.cfg.reward.advantage_mode == "per_component":  # every rank's components too
            rewards = dataclasses.replace(rewards, final_components={
                lam: {k: self.dist.all_gather_rows(v)[0] for k, v in c.items()}
                for lam, c in rewards.final_components.items()})
        credit = self.algorithm.credit(result, rewards, global_std=cfg.global_std)
        observe = getattr(self.algorithm, "observe", None)
        if observe is not None:  # running statistics for the next iterations' plans (saved with the counters)
            observe(result, rewards, self.counters.extra)
        if self.cfg.train.async_rollout:
            # the weights before this update sample the next iteration while it runs (and are what a checkpoint
            # after it keeps for the resumed run's first rollout)
            self._behaviour_policy().refresh([p for _, p in self.named_params])
            if iteration + 1 < self.cfg.train.iterations:
                self._launch_rollout(iteration + 1)
        t2 = time.perf_counter()
        groups = build_update_batch(result, credit)
        self.model.module.train()
        lr = learning_rate_at(cfg, iteration)
        set_learning_rate(self.optimizer.param_groups if self.zero is None else self.zero.param_groups, lr)
        # a model whose outputs overflow samples NaN: its images may score alike (no group with spread, so no
        # loss to find non-finite), so the rollout itself is checked and such an iteration counts as skipped
        rollout_finite = self.dist.all_true(distributed.all_finite([*result.final_latents.values(),
                                                                    result.samples.sample]))
        if rollout_finite:
            upd = self._update(result, groups, iteration)
        else:
            upd = _update_stats()
            upd["skipped_nonfinite"] = 1
            self._skip_nonfinite(iteration, "the rollout's latents are not finite (the model's outputs overflow)")
        t3 = time.perf_counter()

        r1 = rewards.final[1]
        m: Dict[str, float] = {
            "reward_mean": float(r1.mean()),
            "reward_group_std": float(self._group_std(r1, result)),
            "zero_std_ratio": credit.stats.get("zero_std_ratio", float("nan")),
            "learning_rate": lr,
            "trained_states": sum(len(g) for g in groups),
            "trained_samples": sum(g.num_samples for g in groups),
            "seconds_rollout": seconds[0],
            "seconds_reward": seconds[1],
            # waiting for the rollout: all of it, or with train.async_rollout what the previous update did not hide
            "seconds_rollout_wait": t1 - t0,
            "rollout_policy_lag": float(lagged),  # 1: sampled by the weights one update behind
            "seconds_credit": t2 - t1,
            "seconds_update": t3 - t2,
            **{k: float(v) for k, v in result.stats.as_dict().items()},
            **upd,
        }
        for lam, r in rewards.final.items():
            if lam != 1:
                m[f"reward_mean_lambda{lam}"] = float(r.mean())
        if rewards.trunk is not None:
            m["reward_ode_trunk"] = float(rewards.trunk.mean())
        for name, raw in rewards.components.items():  # composite rewards: every component's raw mean
            m[f"reward_component/{name}"] = float(raw.mean())
        if rewards.tweedie is not None:
            m["reward_tweedie_first_state"] = float(rewards.tweedie[:, 0].mean())
        if hasattr(plan, "branches"):  # branching plans: the reward spread each branch step carried
            for k, v in step_reward_std(r1, result).items():
                m[f"reward_std/k{k}"] = v
        for k, v in self.counters.extra.items():
            if k.startswith("adaptive_spread/"):
                m[k] = float(v)
        steps = result.states.step
        for k in sorted(set(steps.tolist())):
            m[f"step_weight/k{k}"] = float(credit.state_weights[steps == k][0])
        self.counters.nfe += result.stats.total_nfe
        self.counters.images += result.stats.total_images
        self.counters.wall_seconds += t3 - t0
        m["seconds_iteration"] = t3 - t0
        return m

    # --- train.async_rollout: the next iteration's rollout during this update (training/async_rollout.py) --

    def _behaviour_policy(self):
        if self._behaviour is None:
            from tempflow_fast.training.async_rollout import BehaviourPolicy

            rollout_backend = self._attention_backends(self.model.device, getattr(self.model, "dtype", torch.float32))[1]
            self._behaviour = BehaviourPolicy(self.model, [n for n, _ in self.named_params],
                                              rollout_attention=rollout_backend, build_runner=self._build_runner)
        return self._behaviour

    def _launch_rollout(self, iteration: int, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Start iteration `iteration`'s rollout on the worker thread with the behaviour policy (`weights`: a
        checkpoint's behaviour weights, else as last refreshed)."""
        from tempflow_fast.training.async_rollout import BackgroundRollout

        behaviour = self._behaviour_policy()
        if weights is not None:
            behaviour.load_state_dict(weights)
        if self._background is None:
            self._background = BackgroundRollout(self.model.device)
        prompts = self.dist.shard(self.prompts_for(iteration))
        plan = self._plan_for(iteration)  # after this iteration's observe(): the plan the resumed run makes too

        def sample():
            with torch.no_grad():
                return prompts, plan, self._rollout(prompts, iteration, plan, model=behaviour.adapter,
                                                    runner=behaviour.runner)

        self._background.launch(iteration, sample)

    # --- DiffusionNFT: rollout by ODE with the old policy, update on the forward process -------------------

    @contextlib.contextmanager
    def _old_policy(self):
        """The old policy's weights in the trainable parameters (pointer swap, no copy), the live ones after."""
        params = [p for _, p in self.named_params]
        live = [p.data for p in params]
        for p, old in zip(params, self._old_weights):
            p.data = old
        try:
            yield
        finally:
            for p, data in zip(params, live):
                p.data = data

    def _forward_process_iteration(self, iteration: int) -> Dict[str, float]:
        """One DiffusionNFT iteration (algorithms/diffusion_nft.py, steps 1-6): K ODE images per prompt from the old
        policy, their optimality probabilities, train.inner_epochs passes over (image, noise level) rows cut into
        train.optimizer_steps_per_epoch disjoint parts of images (one optimizer step each), then the soft update of
        the old policy."""
        from tempflow_fast.algorithms.diffusion_nft import forward_process, nft_loss, optimality, train_times
        from tempflow_fast.models.memory import default_decode_batch
        from tempflow_fast.sampling.engine import decode_images
        from tempflow_fast.sampling.schedules import model_sigmas
        from tempflow_fast.sampling.simple import initial_noise, sample

        cfg, alg = self.cfg.train, self.algorithm
        t0 = time.perf_counter()
        prompts = self.dist.shard(self.prompts_for(iteration))
        K, T = alg.group_size, alg.num_steps
        rows = torch.arange(len(prompts)).repeat_interleave(K)
        per_image = [prompts[i] for i in rows.tolist()]
        device = next(self.model.module.parameters()).device
        sigmas = model_sigmas(self.model, T, alg.shift, alg.dynamic_shift)
        base = (_seed_for(self.cfg.seed, 2, iteration) if not self.dist.active
                else _seed_for(self.cfg.seed, 2, iteration, self.dist.rank))
        gen = torch.Generator().manual_seed(base)
        cond = self.model.encode_prompts(prompts)
        step = self.runner.max_rows or len(per_image)
        self.model.module.eval()
        latents = []
        with torch.no_grad(), self._old_policy(), self._rollout_attention():
            for i in range(0, len(per_image), step):
                noise = initial_noise(self.model, min(step, len(per_image) - i), gen).to(device)
                latents.append(sample(self.model, select_cond(cond, rows[i:i + step].to(device)), noise, sigmas))
        x0 = torch.cat(latents)
        images = decode_images(self.model, x0, self.cfg.sampling.decode_batch or default_decode_batch(self.model),
                               self._image_format)
        self._last_result, self._last_prompts, self._last_images = None, prompts, (images, rows)
        t1 = time.perf_counter()
        scored = images if images.dtype != torch.uint8 or getattr(self.reward, "accepts_uint8", False) \
            else to_unit_float(images)
        rewards = self._reward_call(self.reward, scored, per_image).float().cpu()
        t2 = time.perf_counter()
        r, stats = optimality(rewards, rows, cfg.adv_clip, global_std=cfg.global_std)
        if not self.dist.all_true(distributed.all_finite([x0])):
            self._skip_nonfinite(iteration, "the rollout's latents are not finite (the model's outputs overflow)")
            return {"reward_mean": float(rewards.mean()), "reward_group_std": float("nan"),
                    "zero_std_ratio": stats.zero_std_ratio, "learning_rate": learning_rate_at(cfg, iteration),
                    "seconds_rollout": t1 - t0, "seconds_reward": t2 - t1, "seconds_update": 0.0,
                    **_update_stats(), "skipped_nonfinite": 1}
        self.model.module.train()
        lr = learning_rate_at(cfg, iteration)
        set_learning_rate(self.optimizer.param_groups, lr)
        ugen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 3, iteration))
        m_times = alg.times_per_image
        total = len(per_image) * m_times
        out = _update_stats() | {"old_deviation": 0.0}
        n_parts = n_stats = 0
        for _epoch in range(cfg.inner_epochs):
            times = train_times(sigmas, len(per_image), m_times, ugen)  # (N, m)
            order = torch.randperm(len(per_image), generator=ugen)
            parts = [order[j * len(order) // cfg.optimizer_steps_per_epoch:(j + 1) * len(order)
                           // cfg.optimizer_steps_per_epoch] for j in range(cfg.optimizer_steps_per_epoch)]
            for part in parts:
                if part.numel() == 0:
                    continue
                img = part.repeat_interleave(m_times)  # (image, noise level) rows of this step
                t = times[part].reshape(-1)
                noise = torch.randn((img.numel(), *x0.shape[1:]), generator=ugen).to(device)
                rows_total = self.dist.all_sum(img.numel())
                size = cfg.states_per_forward
                step_ctx = self._begin_step(-(-img.numel() // size), None)
                ok = True
                n_parts += 1
                for a in range(0, img.numel(), size):
                    idx, tb = img[a:a + size].to(device), t[a:a + size].to(device)
                    x_t = forward_process(x0[idx], tb, noise[a:a + size])
                    c = select_cond(cond, rows.to(device)[idx])
                    with torch.no_grad():
                        with self._old_policy():
                            v_old = self.policy.velocity(x_t, tb, c)
                        v_ref = self.reference(x_t, tb, c) if self.reference is not None else None
                    v = self.policy.velocity(x_t, tb, c)
                    res = nft_loss(v, v_old, x_t, x0[idx], tb, r.to(device)[idx], beta=alg.guidance_strength,
                                   adv_clip=cfg.adv_clip, v_ref=v_ref, kl_beta=cfg.beta)
                    loss = res.loss * (idx.numel() / rows_total)
                    out["policy_passes"] += idx.numel()
                    self.counters.policy_passes += idx.numel()
                    self.counters.samples_scored += idx.numel()
                    if not finite(loss):
                        ok = False
                        step_ctx.discard(loss)
                        break
                    step_ctx.backward(loss)
                    share = idx.numel() / rows_total
                    out["loss"] += float(loss.detach())
                    out["kl"] += float(res.kl) * share
                    out["old_deviation"] += float(res.old_deviation) * share
                ok, grad_norm = step_ctx.finish(ok)
                if not self._count_step(ok, iteration, out):
                    continue
                out["grad_norm"] += grad_norm
                n_stats += 1
        self.dist.sum_into(out, ("loss", "kl", "old_deviation"))
        for k in ("loss", "kl", "old_deviation"):
            out[k] /= max(1, n_parts)
        out["grad_norm"] /= max(1, n_stats)
        eta = alg.old_decay(self.counters.optimizer_steps)
        with torch.no_grad():
            for (_, p), old in zip(self.named_params, self._old_weights):
                old.mul_(eta).add_(p.detach().to(old.dtype), alpha=1.0 - eta)
        t3 = time.perf_counter()
        nfe = len(per_image) * T
        self.counters.nfe += nfe
        self.counters.images += len(per_image)
        self.counters.wall_seconds += t3 - t0
        return {
            "reward_mean": float(rewards.mean()),
            "reward_group_std": float(torch.stack([rewards[rows == i].std(unbiased=False)
                                                   for i in range(len(prompts))]).mean()),
            "zero_std_ratio": stats.zero_std_ratio,
            "optimality_mean": float(r.mean()),
            "old_decay": eta,
            "learning_rate": lr,
            "trained_states": total,
            "trained_samples": total,
            "seconds_rollout": t1 - t0,
            "seconds_reward": t2 - t1,
            "seconds_credit": 0.0,
            "seconds_update": t3 - t2,
            "nfe/trunk": nfe, "nfe_total": nfe, "images/trunk": len(per_image), "images_total": len(per_image),
            **out,
        }

    @staticmethod
    def _group_std(r: torch.Tensor, result) -> float:
        """Mean over prompts of the std of final rewards within each prompt's trajectories."""
        p = result.trajectories.prompt
        stds = [r[p == i].std(unbiased=False) for i in p.unique().tolist()]
        return float(torch.stack(stds).mean())

    def _update(self, result, groups, iteration: int) -> Dict[str, float]:
        """train.inner_epochs passes over the trained states, each cut into train.optimizer_steps_per_epoch
        disjoint parts (update.split_parts), one optimizer step per part whose loss is the mean over the part's
        samples (on every rank together). Also measures approx-KL per step k and, on log.movement_states states
        per k, how far the update moved the velocity (velocity_change/k{k} = mean |v_after - v_before|)."""
        cfg = self.cfg.train
        stats = _update_stats()
        if self.dist.all_sum(sum(g.num_samples for g in groups)) == 0:
            return stats
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 3, iteration))
        sigma_max = float(result.sigmas[1])
        T = len(result.sigmas) - 1
        kl_per_step = {f"kl_sum/{k}": 0.0 for k in range(T)} | {f"kl_count/{k}": 0.0 for k in range(T)}
        probe = self._movement_probe(groups)
        v_before = self._probe_velocity(probe, result.cond) if probe is not None else None
        n_stats = n_parts = 0
        for _epoch in range(cfg.inner_epochs):
            for part in split_parts(groups, cfg.optimizer_steps_per_epoch, gen):
                # the loss of a step is a mean over its part of the global batch
                total = self.dist.all_sum(sum(g.num_samples for g in part))
                if total == 0:  # fewer units than parts: every rank skips this one
                    continue
                n_parts += 1
                ok, grad_norm = self._step_on(part, total, result, sigma_max, gen, stats, kl_per_step)
                stats["padding_passes"] += self._last_padding
                if not self._count_step(ok, iteration, stats):
                    continue
                stats["grad_norm"] += grad_norm
                n_stats += 1
        self.dist.sum_into(stats, ("loss", "clip_frac", "approx_kl", "kl"))  # each rank held its share
        for k in ("loss", "clip_frac", "approx_kl", "kl"):
            stats[k] /= max(1, n_parts)
        stats["grad_norm"] /= max(1, n_stats)
        self.dist.sum_into(kl_per_step, list(kl_per_step))
        for k in range(T):
            if kl_per_step[f"kl_count/{k}"]:
                stats[f"approx_kl/k{k}"] = kl_per_step[f"kl_sum/{k}"] / kl_per_step[f"kl_count/{k}"]
        if probe is not None:
            stats.update(self._movement(probe, v_before, self._probe_velocity(probe, result.cond), T))
        return stats

    def _step_on(self, part, total: int, result, sigma_max: float, gen, stats, kl_per_step):
        """One optimizer step on the state groups of `part`; (applied, gradient norm)."""
        cfg = self.cfg.train
        num_micro_batches = sum(math.ceil(len(g) / cfg.states_per_forward) for g in part)
        step = self._begin_step(num_micro_batches, result)
        ok = True
        for mb in self._micro_batches(part, gen):
                loss, out = policy_loss(
                    self.policy, mb, cond=result.cond, sde=result.sde, noise_level=result.noise_level,
                    sigma_max=sigma_max, total_samples=total, clip_range=cfg.clip_range, adv_clip=cfg.adv_clip,
                    beta=cfg.beta, kl_convention=cfg.kl_convention, reference=self.reference,
                )
                stats["policy_passes"] += len(mb)
                self.counters.policy_passes += len(mb)
                self.counters.samples_scored += mb.num_samples
                if not finite(loss):
                    ok = False
                    step.discard(loss)
                    break
                step.backward(loss)
                share = mb.num_samples / total
                stats["loss"] += float(loss.detach())
                stats["clip_frac"] += float(out.clip_frac.detach()) * share
                stats["approx_kl"] += float(out.approx_kl.detach()) * share
                stats["kl"] += float(out.kl.detach()) * share
                half_sq = (0.5 * (out.log_prob.detach().float() - mb.old_log_prob.float()) ** 2).sum(1)
                for k in mb.step.unique().tolist():
                    sel = mb.step == k
                    kl_per_step[f"kl_sum/{k}"] += float(half_sq[sel].sum())
                    kl_per_step[f"kl_count/{k}"] += float(sel.sum()) * mb.samples.shape[1]
        ok, grad_norm = step.finish(ok)  # agreed by every rank
        self._last_padding = step.padding_passes
        self.counters.padding_passes += step.padding_passes
        return ok, grad_norm

    def _movement_probe(self, groups):
        """(latents, σ, prompt row, k) of the first log.movement_states trained states of every step k (empty on a
        rank with none: every rank still joins the sums), or None when off and under ZeRO, whose forwards are
        collective."""
        n = self.cfg.log.movement_states
        if n == 0 or self.zero is not None:
            return None
        if not groups:
            return (torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        picked = []
        steps = torch.cat([g.step for g in groups])
        for k in sorted(set(steps.tolist())):
            left = n
            for g in groups:
                idx = (g.step == k).nonzero().squeeze(1)[:left]
                if idx.numel():
                    picked.append(g.take(idx))
                    left -= idx.numel()
                if left == 0:
                    break
        return tuple(torch.cat([getattr(g, f) for g in picked]) for f in ("latents", "sigma", "prompt", "step"))

    @torch.no_grad()
    def _probe_velocity(self, probe, cond) -> torch.Tensor:
        """v of the probe's states as the rollouts compute it (eval mode, the rollout attention backend, the
        segment runner), so compiled blocks and captured graphs are reused rather than built again."""
        x, sigma, prompt, _ = probe
        if x.shape[0] == 0:
            return torch.empty(0)
        was = self.model.module.training
        self.model.module.eval()
        try:
            with self._rollout_attention():
                return self.runner(x, sigma, cond, prompt).float()
        finally:
            self.model.module.train(was)

    def _movement(self, probe, before: torch.Tensor, after: torch.Tensor, T: int) -> Dict[str, float]:
        """velocity_change/k{k}: mean |v_after - v_before| over the probe's states of step k; velocity_change: over
        all of them (means over ranks)."""
        per_state = (after - before).abs().flatten(1).mean(1) if before.numel() else torch.empty(0)
        step = probe[3]
        sums = {f"sum/{k}": float(per_state[step == k].sum()) for k in range(T)}
        sums |= {f"count/{k}": float((step == k).sum()) for k in range(T)}
        self.dist.sum_into(sums, list(sums))
        out = {f"velocity_change/k{k}": sums[f"sum/{k}"] / sums[f"count/{k}"] for k in range(T) if sums[f"count/{k}"]}
        total = sum(sums[f"count/{k}"] for k in range(T))
        if total:
            out["velocity_change"] = sum(sums[f"sum/{k}"] for k in range(T)) / total
        return out

    def _count_step(self, ok: bool, iteration: int, stats: Dict[str, float]) -> bool:
        """After an optimizer step: a skipped one is counted in stats and reported (NonFiniteAbort past the limit);
        a taken one advances the step counter and the EMA. Returns ok."""
        if not ok:
            stats["skipped_nonfinite"] += 1
            self._skip_nonfinite(iteration, "non-finite loss, gradient or updated weights")
            return False
        self.counters.optimizer_steps += 1
        if self.ema is not None:
            with self._full_parameters():
                self.ema.update(self.counters.optimizer_steps)
        return True

    def _skip_nonfinite(self, iteration: int, what: str) -> None:
        """Count a skipped update; NonFiniteAbort once more than train.max_nonfinite_skips were skipped."""
        allowed = self.cfg.train.max_nonfinite_skips
        self.counters.skipped_nonfinite += 1
        print(f"[tempflow-fast] iteration {iteration + 1}: {what}, update skipped "
              f"({self.counters.skipped_nonfinite}/{allowed} allowed)", flush=True)
        if self.counters.skipped_nonfinite > allowed:
            raise NonFiniteAbort(
                f"{self.counters.skipped_nonfinite} updates skipped for non-finite values, the last at iteration "
                f"{iteration + 1}: {what} (train.max_nonfinite_skips = {allowed}); lower train.learning_rate or "
                f"check the reward")

    def _micro_batches(self, groups, gen: torch.Generator):
        """Each group's states in a random order (from `gen`), train.states_per_forward at a time."""
        size = self.cfg.train.states_per_forward
        for g in groups:
            order = torch.randperm(len(g), generator=gen).to(g.sigma.device)
            for start in range(0, len(g), size):
                yield g.take(order[start:start + size])

    def _begin_step(self, num_micro_batches: int, result):
        """The backward passes of one optimizer step: through the DeepSpeed engine, or the explicit all-reduce."""
        if self.zero is None:
            return distributed.DataParallelStep(self.dist, self.optimizer, [p for _, p in self.named_params],
                                                self.cfg.train.grad_clip, self._step_snapshot)
        st = result.states

        def padding_loss():  # a real policy forward on one of this rank's states; the step scales it by 0
            v = self.policy.velocity(st.latents[:1], st.sigma[:1], select_cond(result.cond, st.prompt[:1]))
            return v.float().sum()

        return self.zero.step(num_micro_batches, padding_loss)

    # --- checkpoints --------------------------------------------------------------------------

    def _model_state(self) -> Optional[Dict[str, torch.Tensor]]:
        if self.zero is not None:  # whole tensors on rank 0 (collective)
            return self.zero.full_state_dict()
        return {n: p.detach() for n, p in self.named_params}

    def save(self) -> Path:
        state = {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict() if self.zero is None else None,  # ZeRO: in the shards
            "rng": ckpt.rng_state(),
            "data_position": self.iteration * self.cfg.train.prompts_per_iteration,
            "counters": self.counters.__dict__,
            "eval_before": self.eval_before,
            "probe_before": self.probe_before,
            "old_policy": None if self._old_weights is None else
            {n: w.detach() for (n, _), w in zip(self.named_params, self._old_weights)},
            "world_size": self.dist.world_size,
            # train.async_rollout: the weights before the last update, which sample the next rollout
            "behaviour_policy": None if self._behaviour is None else self._behaviour.state_dict(),
        }
        root = self.out / "checkpoints"
        path = root / f"iter-{self.iteration:06d}"
        # ZeRO: every rank writes its shard into the staging folder first, rank 0 completes it
        staged = self.zero.save_shards(root, self.iteration) if self.zero is not None else None
        model_state = self._model_state()
        if self.dist.is_main:  # weights are identical on every rank: one writer
            path = ckpt.save_checkpoint(
                root, self.iteration, model_state=model_state, state=state,
                config_yaml=yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False),
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                keep_last=self.cfg.checkpoint.keep_last, staged=staged,
            )
        self.dist.barrier()
        return path

    def _checkpoint_to_resume(self):
        """(path, contents) of the newest checkpoint that loads (a corrupt newer one is skipped with a message
        naming both), refused when it is another run's (run_dir.RUN_IDENTITY: seed, method, model, plan) or
        another world size wrote it. Reads no model: every refusal comes before the weights load."""
        root = self.out / "checkpoints"
        try:
            found = ckpt.load_latest(root, set_aside=self.dist.is_main)
        except ckpt.CheckpointError as err:
            raise ValueError(f"--resume: {err}") from None
        if found is None:
            raise ValueError(f"--resume: no complete checkpoint under {str(root)!r}")
        path, data = found
        current = yaml.safe_load(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        differences = run_dir.run_differences(data["config"], current)
        if differences:
            raise ValueError(f"--resume: checkpoint {str(path)!r} belongs to another run ({'; '.join(differences)}); "
                             f"resume with its settings, or start a new run with --overwrite or another output_dir")
        written_by = data["state"].get("world_size", 1)
        if written_by != self.dist.world_size:
            raise ValueError(f"--resume: checkpoint {str(path)!r} was written by {written_by} process(es), "
                             f"this run has {self.dist.world_size}; resume on the same world size")
        return path, data

    def _resume(self):
        path, data = self._checkpoint
        self._checkpoint = None
        params = dict(self.named_params)
        missing = sorted(set(params) - set(data["model"]))
        if missing:
            raise ValueError(f"--resume: checkpoint {str(path)!r} lacks parameter {missing[0]!r} "
                             f"(was it written with another model or LoRA setting?)")
        st = data["state"]
        if self.zero is not None:  # weights and optimizer state from the ranks' shards
            self.zero.load_shards(path)
        else:
            if st["optimizer"] is None:
                raise ValueError(f"--resume: checkpoint {str(path)!r} was written with distributed.backend=deepspeed: "
                                 f"resume with that backend")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(data["model"][n])
            self.optimizer.load_state_dict(st["optimizer"])
        if self.ema is not None:
            if data["ema"] is None:
                raise ValueError(f"--resume: checkpoint {str(path)!r} has no EMA but train.ema_decay > 0")
            self.ema.load_state_dict(data["ema"])
        ckpt.set_rng_state(st["rng"])
        self.iteration = st["iteration"]
        self.counters = Counters(**st["counters"])
        self.eval_before = st["eval_before"]
        self.probe_before = st.get("probe_before")  # checkpoints written before the probe existed have none
        if self._old_weights is not None:
            if st.get("old_policy") is None:
                raise ValueError(f"--resume: checkpoint {str(path)!r} has no old policy (method diffusion_nft keeps one)")
            with torch.no_grad():
                for (n, _), old in zip(self.named_params, self._old_weights):
                    old.copy_(st["old_policy"][n])
        if self.cfg.train.async_rollout:
            # None (a checkpoint from a synchronous run, or before the first update): the next rollout samples
            # with the resumed weights, as a run's first one does
            self._behaviour_state = st.get("behaviour_policy")
        print(f"[tempflow-fast] resumed from {path} (iteration {self.iteration})", flush=True)

    # --- export -------------------------------------------------------------------------------

    def export(self, directory: Path) -> Path:
        """Save the trained model as a loadable model folder (LoRA merged into a copy), in the model's dtype (the
        fp32 master weights of a full fine-tune are cast back to it)."""
        model = self.model
        dtype = getattr(self.model, "dtype", torch.float32)
        if self.lora:
            model = copy.copy(self.model)
            model.module = copy.deepcopy(self.model.module)
            target = getattr(model.module, "transformer", model.module)
            target.fuse_lora()
            target.unload_lora()
            _cast_floating(model.module, dtype)
        elif any(p.dtype != dtype for p in self.model.module.parameters()):
            model = copy.copy(self.model)
            model.module = _cast_floating(copy.deepcopy(self.model.module), dtype)
        with self._full_parameters():  # ZeRO-3: whole tensors on every rank while rank 0 writes
            if self.dist.is_main:
                model.save_pretrained(directory)
        self.dist.barrier()
        return directory

    # --- the loop -----------------------------------------------------------------------------

    def _evaluate(self) -> Optional[Dict]:
        if self.eval_fn is None:
            return None
        was = self.model.module.training
        if self.ema is not None:
            self._swap_ema()
        try:
            return self.eval_fn(self.model)
        finally:
            if self.ema is not None:
                self._swap_ema()
            self.model.module.train(was)

    def _verdicts(self, images: torch.Tensor, prompts: Sequence[str]) -> Optional[List[bool]]:
        """The task's per-image verdict (green / red frames; shapes: the detector's), or None."""
        return self.task.annotate(images, list(prompts))

    def _write_samples(self, iteration: int) -> None:
        """samples/iter-N.png (and TensorBoard / the tracker): this iteration's images, one row per prompt."""
        from tempflow_fast.training.visuals import prompt_grid

        result, prompts = self._last_result, self._last_prompts
        if result is None:  # a forward-process rollout: its ODE images
            images, rows = self._last_images
        elif result.trunk_images is not None:
            images, rows = result.trunk_images, result.trunk_prompt
        else:
            images, rows = result.images[1], result.trajectories.prompt
        keep = torch.cat([(rows == p).nonzero().squeeze(1)[:8] for p in rows.unique()[:8]])
        texts = [prompts[i] for i in rows[keep].tolist()]
        images = images[keep.to(images.device)]
        grid = prompt_grid(images, texts, ok=self._verdicts(images, texts), title=f"iteration {iteration}")
        path = self.out / "samples" / f"iter-{iteration:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.logger.log_image(iteration, "samples", grid, caption=f"iteration {iteration}")

    def _showcase_prompts(self) -> List[str]:
        n = self.cfg.log.showcase_prompts
        if self.cfg.data.eval_prompts is not None:
            pool = read_prompts(self.cfg.data.eval_prompts, "data.eval_prompts")
        else:
            pool = self.task.eval_prompts() or self.train_prompts
        step = max(1, len(pool) // max(n, 1))
        return list(pool[::step][:n])

    @torch.no_grad()
    def _showcase(self) -> Optional[torch.Tensor]:
        """uint8 images of the showcase prompts from fixed noises (ODE, eval.num_steps; EMA weights when on)."""
        from tempflow_fast.models.memory import default_decode_batch
        from tempflow_fast.sampling.engine import decode_images
        from tempflow_fast.sampling.schedules import flow_sigmas
        from tempflow_fast.sampling.simple import initial_noise, sample

        lg = self.cfg.log
        if not (lg.showcase_prompts and lg.showcase_images) or not self.dist.is_main:
            return None
        prompts = [p for p in self._showcase_prompts() for _ in range(lg.showcase_images)]
        model = self.model
        device = next(model.module.parameters()).device
        sigmas = flow_sigmas(self.cfg.eval.num_steps, self.cfg.sampling.shift, image_seq_len=model.image_seq_len,
                             dynamic_shift=self.cfg.sampling.dynamic_shift)
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 5))
        was = model.module.training
        if self.ema is not None:
            self._swap_ema()
        model.module.eval()
        try:
            out, step = [], self.runner.max_rows or len(prompts)
            for i in range(0, len(prompts), step):
                chunk = prompts[i:i + step]
                x = sample(model, model.encode_prompts(chunk), initial_noise(model, len(chunk), gen).to(device),
                           sigmas)
                out.append(to_uint8(decode_images(model, x, self.cfg.sampling.decode_batch
                                                  or default_decode_batch(model))).cpu())
        finally:
            if self.ema is not None:
                self._swap_ema()
            model.module.train(was)
        return torch.cat(out)

    def _pictures(self, before: Optional[torch.Tensor]) -> List[Path]:
        """before_after.png (showcase before vs after training) and reward_curve.png (from metrics.jsonl)."""
        from tempflow_fast.training.metrics_log import lines_up_to
        from tempflow_fast.training.visuals import before_after, line_chart, running_mean

        written = []
        after = self._showcase() if before is not None else None
        if after is not None:
            prompts = [p for p in self._showcase_prompts() for _ in range(self.cfg.log.showcase_images)]
            grid = before_after(before, after, prompts, ok_before=self._verdicts(before, prompts),
                                ok_after=self._verdicts(after, prompts),
                                title=f"{self.cfg.method}, {self.iteration} iterations: same prompts, same noises")
            grid.save(self.out / "before_after.png")
            self.logger.log_image(self.iteration, "before_after", grid)
            written.append(self.out / "before_after.png")
        rows = [json.loads(l) for l in lines_up_to(self.out / "metrics.jsonl", self.iteration)]
        reward = [(r["iteration"], r["reward_mean"]) for r in rows if "reward_mean" in r]
        window = max(1, min(10, len(reward) // 5))
        series = {"training reward (mean per iteration)": reward,
                  f"training reward, running mean of {window}": running_mean(reward, window)}
        interval = lambda r, k: (r["iteration"], r[k], r.get(f"{k}_ci_low", r[k]), r.get(f"{k}_ci_high", r[k]))  # noqa: E731
        probe = [interval(r, "probe_reward") for r in rows if "probe_reward" in r]
        held = [interval(r, "heldout_accuracy") for r in rows if "heldout_accuracy" in r]
        if probe:
            series["probe reward (fixed prompts and noises, 95% interval)"] = probe
        if held:
            series[f"{self.eval_metric or 'held-out'} (95% interval)"] = held
        if reward:
            chart = line_chart(series, title=f"{self.cfg.method} on {Path(self.cfg.output_dir).name}",
                               thin=[next(iter(series))], markers=list(series)[2:])
            chart.save(self.out / "reward_curve.png")
            self.logger.log_image(self.iteration, "reward_curve", chart)
            written.append(self.out / "reward_curve.png")
        return written

    def train(self) -> Dict:
        cfg = self.cfg
        from tqdm.auto import tqdm

        first = {}
        if self.eval_before is None and self.eval_fn is not None:
            self.eval_before = self._evaluate()
            first.update(eval_metrics(self.eval_before) if self.eval_before is not None else {})
        if self.iteration == 0 and self.probe_before is None:
            self.probe_before = self._probe()
            first.update(probe_metrics(self.probe_before))
        if first:
            self.logger.log(0, first)
        # the showcase before training, kept in output_dir so a resumed run still draws before_after.png
        showcase_file = self.out / "showcase_before.pt"
        before = None
        if self.dist.is_main and self.cfg.log.showcase_prompts and self.cfg.log.showcase_images:
            if showcase_file.exists():
                before = torch.load(showcase_file, weights_only=True)
            elif self.iteration == 0:
                before = self._showcase()
                try:
                    torch.save(before, showcase_file)
                except OSError as err:  # only a resumed run's picture needs it; the checkpoint writes report disk faults
                    showcase_file.unlink(missing_ok=True)
                    print(f"[tempflow-fast] could not keep the showcase for a resumed run's before_after.png: {err}",
                          flush=True)
        bar = tqdm(range(self.iteration, cfg.train.iterations), initial=self.iteration, total=cfg.train.iterations,
                   desc=f"{cfg.method}", unit="it", disable=not cfg.log.progress or not self.dist.is_main,
                   dynamic_ncols=True)
        for it in bar:
            started = time.perf_counter()
            m = self.run_iteration(it)
            seconds = time.perf_counter() - started
            self.iteration = it + 1
            if cfg.eval.every and self.iteration % cfg.eval.every == 0 and self.iteration < cfg.train.iterations:
                if self.eval_fn is not None:
                    m.update(eval_metrics(self._evaluate()))
                m.update(probe_metrics(self._probe()))
            m.update(total_nfe=self.counters.nfe, total_policy_passes=self.counters.policy_passes,
                     total_wall_seconds=self.counters.wall_seconds)
            self.logger.log(self.iteration, m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", nfe=self.counters.nfe,
                            s_per_it=f"{seconds:.1f}")
            if cfg.log.sample_every and self.iteration % cfg.log.sample_every == 0 and self.dist.is_main:
                self._write_samples(self.iteration)
            if cfg.checkpoint.every and self.iteration % cfg.checkpoint.every == 0:
                self.save()
        bar.close()
        if not (cfg.checkpoint.every and self.iteration % cfg.checkpoint.every == 0):
            self.save()
        after = self._evaluate()
        probe_after = self._probe()
        if after is not None or probe_after is not None:
            self.logger.log(self.iteration, {**(eval_metrics(after) if after else {}), **probe_metrics(probe_after)})
        pictures = self._pictures(before) if self.dist.is_main else []
        self.logger.close()
        if self.scorer is not None:
            self.scorer.close()
        if self.ema is not None:
            self._swap_ema()
        self.export(self.out / "final")
        if self.ema is not None:
            self._swap_ema()
        without_scores = lambda probe: None if probe is None else {k: v for k, v in probe.items() if k != "scores"}
        summary = {"before": self.eval_before, "after": after, "counters": self.counters.__dict__,
                   "iterations": self.iteration, "method": cfg.method, "eval_metric": self.eval_metric,
                   "task": getattr(self.task, "name", None), "split_version": getattr(self.task, "split_version", None),
                   "probe_before": without_scores(self.probe_before),
                   "probe_after": without_scores(probe_after), "probe_change": self._probe_change(probe_after),
                   "pictures": [str(p) for p in pictures]}
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
            ckpt.remove_temporary(self.out / "checkpoints")
        self.close()
        return summary


def _ci(row: Dict) -> str:
    return f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]" if row and "ci95" in row else ""


def format_summary(summary: Dict) -> str:
    before, after, c = summary["before"], summary["after"], summary["counters"]
    metric = summary.get("eval_metric") or "held-out accuracy"
    lines = []
    if before is not None and after is not None:
        cats = [k for k in before if k != "overall"] + ["overall"]
        with_ci = "ci95" in after.get("overall", {})
        lines += [f"{metric:<18} {'before':>7} {'after':>7} {'change':>7}"
                  + ("   95% interval before → after" if with_ci else ""), "-" * (72 if with_ci else 42)]
        for k in cats:
            if k in before and k in after:
                b, a = before[k]["accuracy"], after[k]["accuracy"]
                cell = f"   {_ci(before[k])} → {_ci(after[k])}" if with_ci else ""
                lines.append(f"{k:<18} {b:>7.3f} {a:>7.3f} {a - b:>+7.3f}{cell}")
    lines += [
        "",
        f"method: {summary['method']}, iterations: {summary['iterations']}",
        f"model calls (rollout NFE): {c['nfe']}",
        f"policy forward+backward passes (state rows): {c['policy_passes']}  "
        f"(samples scored: {c['samples_scored']}, optimizer steps: {c['optimizer_steps']})",
        f"images scored: {c['images']}",
        f"skipped non-finite updates: {c['skipped_nonfinite']}",
        f"wall time (train loop): {c['wall_seconds']:.1f} s",
    ]
    pb, pa, dp = summary.get("probe_before"), summary.get("probe_after"), summary.get("probe_change")
    if pb is not None and pa is not None:
        line = (f"probe reward (the trained reward, {pa['prompts']} train prompts × {pa['count'] // pa['prompts']} "
                f"fixed noises, ODE): before {pb['mean']:.3f} {_ci(pb)} after {pa['mean']:.3f} {_ci(pa)}")
        if dp is not None:
            line += f", change {dp['mean']:+.3f} [{dp['ci95'][0]:+.3f}, {dp['ci95'][1]:+.3f}] (same images, paired)"
        lines.append(line)
    if summary.get("pictures"):
        lines.append("pictures: " + ", ".join(summary["pictures"]))
    if before is not None and after is not None:
        lines.append(f"{metric}: before {before['overall']['accuracy']:.3f} after {after['overall']['accuracy']:.3f}")
    else:
        lines.append("no held-out evaluation (set data.eval_prompts)")
    return "\n".join(lines)
