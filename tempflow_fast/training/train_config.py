"""The training config: typed sections with the papers' defaults (loaded by tempflow_fast.config).

`tempflow-fast train --config configs/<preset>.yaml --set train.learning_rate=1e-4 ...`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from tempflow_fast.rewards.config import RewardConfig

METHODS = ("flow_grpo", "tempflow", "g2rpo", "stepwise", "mixgrpo", "diffusion_nft")
TASKS = ("shapes", "compressibility", "prompts")
JPEG_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")


def _positive(section: str, **values) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"config field '{section}.{name}': must be > 0, got {v}")


def _group(section: str, name: str, value: int, what: str) -> None:
    """A group of one has no reward spread: its advantage is 0 every time and the run would learn nothing."""
    if value < 2:
        raise ValueError(f"config field '{section}.{name}': must be >= 2 ({what}; a group of one has no reward "
                         f"spread, so every advantage would be 0), got {value}")


def _non_negative(section: str, **values) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"config field '{section}.{name}': must be >= 0, got {v}")


def _not_blank(section: str, **values) -> None:
    """Optional paths: null means 'none' (or the default), so an empty string is a mistake, not a choice."""
    for name, v in values.items():
        if v is not None and not v.strip():
            raise ValueError(f"config field '{section}.{name}': must name a file, folder or hub id, or be null; "
                             f"got {v!r}")


def _check_steps(field: str, steps: Optional[list[int]], num_steps: int) -> None:
    """Branch steps k of a plan: distinct, in 0..T-2 (an SDE step needs a step after it)."""
    if steps is None:
        return
    if not steps:
        raise ValueError(f"config field {field!r}: must list at least one step k (or be null), got []")
    bad = [k for k in steps if not 0 <= k <= num_steps - 2]
    if bad:
        raise ValueError(f"config field {field!r}: steps k must be in 0..T-2 = 0..{num_steps - 2} "
                         f"(sampling.num_steps = {num_steps}), got {bad[0]} in {steps}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"config field {field!r}: repeated steps in {steps}")


@dataclass
class ModelConfig:
    kind: Literal["tiny_flux", "flux", "sd3", "qwen_image"] = "tiny_flux"  # which adapter loads `path`
    path: Optional[str] = None  # weights folder or hub id; None = the tiny model shipped in the package
    device: str = "auto"  # where the model runs: auto (CUDA when present) | cpu | cuda | cuda:N
    dtype: Optional[str] = None  # weights dtype; None = bf16 for flux/sd3, fp32 for tiny_flux
    resolution: Optional[int] = None  # image side in px; None = 1024 FLUX, 512 SD3 (tiny_flux: fixed 16)
    max_sequence_length: Optional[int] = None  # T5 tokens; None = 512 FLUX, 256 SD3
    # attention kernel through diffusers' dispatcher (models/attention.py): native, sdpa_flash, sdpa_cudnn,
    #   sdpa_efficient, flash, flash3, xformers, sage, flex; None = the transformer's own default
    attention_backend: Optional[str] = None
    # a different kernel for the no-grad rollout forwards only (e.g. flash3, which has no backward); None = same
    rollout_attention_backend: Optional[str] = None
    compile_blocks: bool = False  # torch.compile the repeated transformer blocks (batch dimension dynamic)
    gradient_checkpointing: bool = False
    # text encoders between encodings: keep (on the model's device) | offload (on the CPU, moved to the device
    #   for each iteration's new prompts) | release (every prompt encoded at start, then the encoders dropped)
    text_encoders: Literal["keep", "offload", "release"] = "offload"
    prompt_cache_size: int = 1024  # prompts whose text embeddings stay cached (LRU; FLUX: 4 MiB each, host RAM)

    def validate(self):
        from tempflow_fast.models.attention import (ATTENTION_BACKENDS, MASK_REFUSED, MASKED_TEXT_KINDS,
                                                    TRAINING_REFUSED)

        for name in ("attention_backend", "rollout_attention_backend"):
            value = getattr(self, name)
            if value is not None and value not in ATTENTION_BACKENDS:
                raise ValueError(f"config field 'model.{name}': must be one of {sorted(ATTENTION_BACKENDS)}, "
                                 f"got {value!r}")
        if self.attention_backend in TRAINING_REFUSED:
            raise ValueError(f"config field 'model.attention_backend': {self.attention_backend!r} has no backward "
                             f"pass ({TRAINING_REFUSED[self.attention_backend]}), so the update cannot use it; set "
                             f"model.rollout_attention_backend: {self.attention_backend} for the rollouts and a "
                             f"trainable backend (native, sdpa_flash, flash) as model.attention_backend")
        for name in ("attention_backend", "rollout_attention_backend"):
            if self.kind in MASKED_TEXT_KINDS and getattr(self, name) in MASK_REFUSED:
                raise ValueError(f"config field 'model.{name}': {getattr(self, name)!r} takes no attention mask, "
                                 f"which model.kind {self.kind} needs (its prompts are padded and masked); use "
                                 f"native, sdpa_efficient, sdpa_cudnn, xformers or flex")
        _positive("model", prompt_cache_size=self.prompt_cache_size)
        _not_blank("model", path=self.path)
        from tempflow_fast.rewards.base import resolve_device

        try:
            resolve_device(self.device)
        except ValueError as err:
            raise ValueError(f"config field 'model.device': {err}") from None


@dataclass
class SamplingConfig:
    num_steps: int = 10  # T, denoising steps of training rollouts
    shift: float = 1.0  # schedule shift (diffusers' FlowMatchEulerDiscrete `shift`)
    noise_level: float = 0.7  # η of the SDE
    dynamic_shift: bool = False  # FLUX's resolution-dependent shift instead of `shift`
    runner: Literal["eager", "compile", "cuda_graph"] = "eager"  # how rollout segments run (cuda_graph: CUDA only,
    #   falls back to eager elsewhere with a warning)
    buckets: Optional[list[int]] = None  # fixed batch sizes for compile / cuda_graph runners; None = their default
    #   (capped at max_rows_per_call)
    # most latent rows in one transformer call; None = what the memory model says fits (models/memory.py; on
    #   CUDA at most 32: throughput per row saturates well below)
    max_rows_per_call: Optional[int] = None
    decode_batch: Optional[int] = None  # images per VAE decode call; None = sized by resolution (1 at 1024 px)
    guidance_scale: Optional[float] = None  # FLUX distilled guidance / SD3 CFG scale; None = the model's default
    # shift and dynamic shift from the loaded pipeline's scheduler config (FLUX, SD3), not sampling.shift / dynamic_shift
    #   (the dynamic-shift constants always come from it; sampling/schedules.py)
    schedule_from_model: bool = False
    # ODE completions after a branch step (tempflow, g2rpo with Λ = [1]; sampling/solvers.py): euler | heun (2nd
    #   order, 2 calls per step) | dpmpp_2m (2nd order multistep, 1 call per step) | tweedie (x̂0 after n - 1 steps)
    completion_solver: Literal["euler", "heun", "dpmpp_2m", "tweedie"] = "euler"
    completion_steps: Optional[int] = None  # solver steps per completion; None = the schedule's remaining (tweedie: 1)

    def validate(self):
        if self.num_steps < 2:
            raise ValueError(f"config field 'sampling.num_steps': must be >= 2, got {self.num_steps}")
        _positive("sampling", shift=self.shift, noise_level=self.noise_level)
        if self.max_rows_per_call is not None:
            _positive("sampling", max_rows_per_call=self.max_rows_per_call)
        if self.decode_batch is not None:
            _positive("sampling", decode_batch=self.decode_batch)
        if self.completion_steps is not None:
            _positive("sampling", completion_steps=self.completion_steps)
        if self.buckets is not None:
            if not self.buckets or min(self.buckets) < 1:
                raise ValueError(f"config field 'sampling.buckets': every bucket must be >= 1, got {self.buckets}")
            if self.max_rows_per_call is not None and max(self.buckets) > self.max_rows_per_call:
                raise ValueError(f"config field 'sampling.buckets': bucket {max(self.buckets)} is larger than "
                                 f"sampling.max_rows_per_call = {self.max_rows_per_call}")


def _fraction(section: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"config field '{section}.timestep_fraction': must be in (0, 1], got {value}")


@dataclass
class FlowGRPOConfig:
    group_size: int = 24  # images per prompt, SDE at every step
    # train the first int(T·fraction) steps of each trajectory (Flow-GRPO's train.timestep_fraction): 0.99 trains
    # 9 of 10, never the last step to σ = 0; 1.0 trains all T
    timestep_fraction: float = 0.99

    def validate(self):
        _positive("flow_grpo", group_size=self.group_size)
        _group("flow_grpo", "group_size", self.group_size, "images per prompt, the advantage's group")
        _fraction("flow_grpo", self.timestep_fraction)


@dataclass
class TempFlowConfig:
    num_seeds: int = 4  # N initial noises per prompt
    branches: int = 6  # K SDE branches per (seed, bifurcation step)
    bifurcation_steps: Optional[list[int]] = None  # k's to branch at; None = every step 0..T-2
    bifurcation: bool = True  # off: Flow-GRPO-style full-SDE rollouts (ablation)
    noise_aware_weights: bool = True  # w_k = Norm(s_k·sqrt(-dt_k))
    # null: the weights average 1 over the trained steps; c: w_k = c·s_k·sqrt(-dt_k), the constant of TempFlow's
    #   code (2.25 SD3.5-M, 1.73 FLUX), which also sets the policy loss against the β·KL term
    step_weight_scale: Optional[float] = None
    seed_grouping: bool = True  # group = (prompt, seed, k); off: (prompt, k)
    # adaptive bifurcation: each iteration branches at adaptive_budget of bifurcation_steps (None = all), drawn
    # in proportion to the running within-group reward spread per step, adaptive_floor of it spread uniformly
    adaptive_bifurcation: bool = False
    adaptive_floor: float = 0.2
    adaptive_budget: int = 4

    def validate(self):
        _positive("tempflow", num_seeds=self.num_seeds, branches=self.branches, adaptive_budget=self.adaptive_budget)
        if self.seed_grouping:
            _group("tempflow", "branches", self.branches, "the group is one (prompt, seed, k)'s K branches")
        elif self.num_seeds * self.branches < 2:
            _group("tempflow", "num_seeds × branches", self.num_seeds * self.branches,
                   "without seed grouping the group is one (prompt, k)'s N·K branches")
        if self.step_weight_scale is not None:
            _positive("tempflow", step_weight_scale=self.step_weight_scale)
        if not 0.0 <= self.adaptive_floor <= 1.0:
            raise ValueError(f"config field 'tempflow.adaptive_floor': must be in [0, 1], got {self.adaptive_floor}")


@dataclass
class G2RPOConfig:
    branches: int = 12  # G directions per branch step
    branch_steps: Optional[list[int]] = None  # M; None = the first half of the steps
    granularities: list[int] = field(default_factory=lambda: [1, 2, 3])  # Λ
    # diffusers: the FlowMatchEulerDiscrete schedule (sampling.shift); linspace: σ = shift(linspace(1, 0, T+1)),
    #   the schedule of G²RPO's code (needs a static shift)
    sigma_schedule: Literal["diffusers", "linspace"] = "diffusers"
    # uniform: from k+1 every λ-th step, a short last step; official: G²RPO's code, k+1 → k+2, then every λ-th
    #   step, the remainder folded into the last step (sampling/schedules.py: granularity_indices)
    completion_stride: Literal["uniform", "official"] = "uniform"
    unbiased_std: bool = False  # group std with n - 1 (G²RPO's code) instead of n (Flow-GRPO's stat tracker)
    std_eps: float = 1e-4  # A = (r - mean) / (std + eps); G²RPO's code 1e-8, Flow-GRPO's 1e-4

    def validate(self):
        _positive("g2rpo", branches=self.branches, std_eps=self.std_eps)
        _group("g2rpo", "branches", self.branches, "the group is one branch step's G directions")
        if not self.granularities or min(self.granularities) < 1:
            raise ValueError(f"config field 'g2rpo.granularities': every λ must be >= 1, got {self.granularities}")
        if len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"config field 'g2rpo.granularities': repeated λ in {self.granularities}")


@dataclass
class StepwiseConfig:
    group_size: int = 24  # SDE trajectories per prompt
    sde: Literal["ddim", "flow"] = "ddim"  # the paper's DDIM-inspired SDE, or Flow-GRPO's
    timestep_fraction: float = 0.99  # as flow_grpo.timestep_fraction (DDIM-style SDE: its last step is untrained)
    # steps whose transition std is below this are not trained: the DDIM-style step into diffusers' last sigma
    # (1e-3) has std 9e-4, and its exact log-prob ratio swamps every other step's gradient (algorithms/stepwise.py)
    min_std: float = 0.01

    def validate(self):
        _positive("stepwise", group_size=self.group_size)
        _group("stepwise", "group_size", self.group_size, "trajectories per prompt, the advantage's group")
        _fraction("stepwise", self.timestep_fraction)
        if not 0.0 <= self.min_std < 1.0:
            raise ValueError(f"config field 'stepwise.min_std': must be in [0, 1), got {self.min_std!r}")


@dataclass
class MixGRPOConfig:
    """MixGRPO (Li et al. 2025, arXiv:2507.21802; its code's finetune_flux_grpo_MixGRPO.sh): SDE inside a window of
    w steps, ODE elsewhere; the window moves by s steps every τ iterations and starts over at step 0 after the
    last (roll back)."""

    group_size: int = 12  # G images per prompt, all from one initial noise (its init_same_noise)
    window_size: int = 4  # w, SDE (and trained) steps per window
    shift_interval: int = 25  # τ, iterations before the window moves
    window_stride: int = 1  # s, steps the window moves by
    unbiased_std: bool = True  # group std with n - 1 (its code: torch.std)
    std_eps: float = 1e-8  # A = (r - mean) / (std + eps), its code's

    def validate(self):
        _positive("mixgrpo", group_size=self.group_size, window_size=self.window_size,
                  shift_interval=self.shift_interval, window_stride=self.window_stride, std_eps=self.std_eps)
        _group("mixgrpo", "group_size", self.group_size, "images per prompt, the advantage's group")


@dataclass
class DiffusionNFTConfig:
    """DiffusionNFT (Zheng et al. 2025, arXiv:2509.16117; algorithms/diffusion_nft.py): ODE samples of an old policy,
    trained on the forward process by the negative-aware flow-matching loss."""

    group_size: int = 24  # K images per prompt, ODE samples of the old policy from independent noises
    guidance_strength: float = 1.0  # β: implicit policies v± = v_old ± β·(v_θ - v_old)
    # noise levels per image and update: int(T·fraction) of the schedule's T σ's, drawn without replacement (its
    #   code: a permutation of the sampler's timesteps, the first num_train_timesteps = int(T·0.99))
    timestep_fraction: float = 0.99
    # the old policy after each iteration: θ_old ← η·θ_old + (1 - η)·θ with η = min(old_decay_rate·i,
    #   old_decay_max), i the optimizer steps so far (its decay_type 1)
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5

    def validate(self):
        _positive("diffusion_nft", group_size=self.group_size, guidance_strength=self.guidance_strength)
        _group("diffusion_nft", "group_size", self.group_size, "images per prompt, the optimality's group")
        _fraction("diffusion_nft", self.timestep_fraction)
        _non_negative("diffusion_nft", old_decay_rate=self.old_decay_rate)
        if not 0.0 <= self.old_decay_max < 1.0:
            raise ValueError(f"config field 'diffusion_nft.old_decay_max': must be in [0, 1), got {self.old_decay_max}")


@dataclass
class LoraConfig:
    enabled: bool = False  # LoRA through peft; off = full fine-tune
    rank: int = 32
    alpha: int = 64
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def validate(self):
        _positive("train.lora", rank=self.rank, alpha=self.alpha)


@dataclass
class TrainConfig:
    iterations: int = 100  # rollout + update rounds
    prompts_per_iteration: int = 4  # prompt groups per iteration
    inner_epochs: int = 1  # update passes over one rollout
    # optimizer steps per inner epoch, each on a disjoint part of the trained states (a shared state's K samples
    #   stay together; a full-SDE trajectory's steps too); Flow-GRPO / TempFlow's configs take 2
    optimizer_steps_per_epoch: int = 1
    learning_rate: float = 1e-4
    # learning rate per iteration (schedule.py): constant | cosine | linear decay to lr_min_ratio × learning_rate
    # at the last iteration, after lr_warmup_iterations of linear warm-up
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_iterations: int = 0
    lr_min_ratio: float = 0.0
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max grad norm
    clip_range: float = 1e-4  # PPO ε (Flow-GRPO's 1e-4)
    adv_clip: float = 5.0
    global_std: bool = False  # normalise advantages by the batch std instead of the group's
    beta: float = 0.0  # KL coefficient β
    kl_convention: Literal["flow_grpo", "gaussian"] = "flow_grpo"  # /(2s²) or exact Gaussian /(2·std²)
    states_per_forward: int = 64  # shared states per policy forward (micro-batch)
    rollout_segments: int = 1  # split each iteration's prompts into this many rollouts, scored while the next samples
    async_reward: bool = False  # score on a worker thread (overlaps reward models with sampling; GPU rewards)
    # one-step off-policy: the next iteration's rollout samples (worker thread, side CUDA stream) with the weights
    #   before this update while the update runs; ratios against the behaviour policy's log-probs
    #   (training/async_rollout.py; costs a copy of the trainable weights and a second runner)
    async_rollout: bool = False
    ema_decay: float = 0.0  # 0 = no EMA; with EMA its weights are what eval, sample and export use
    ema_update_every: int = 1  # update the EMA after optimizer step n when (n + 1) % this == 0 (official: 8)
    ema_warmup: bool = False  # decay min((1 + n) / (10 + n), ema_decay) at optimizer step n (official: on)
    max_nonfinite_skips: int = 10  # abort after this many skipped non-finite updates
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self):
        _positive("train", iterations=self.iterations, prompts_per_iteration=self.prompts_per_iteration,
                  inner_epochs=self.inner_epochs, learning_rate=self.learning_rate, grad_clip=self.grad_clip,
                  clip_range=self.clip_range, adv_clip=self.adv_clip, states_per_forward=self.states_per_forward,
                  rollout_segments=self.rollout_segments, optimizer_steps_per_epoch=self.optimizer_steps_per_epoch,
                  ema_update_every=self.ema_update_every)
        if self.beta < 0:
            raise ValueError(f"config field 'train.beta': must be >= 0, got {self.beta}")
        if not 0 <= self.lr_warmup_iterations < self.iterations:
            raise ValueError(f"config field 'train.lr_warmup_iterations': must be in [0, train.iterations = "
                             f"{self.iterations}), got {self.lr_warmup_iterations}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"config field 'train.lr_min_ratio': must be in [0, 1], got {self.lr_min_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"config field 'train.ema_decay': must be in [0, 1), got {self.ema_decay}")
        _non_negative("train", weight_decay=self.weight_decay, max_nonfinite_skips=self.max_nonfinite_skips)
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"config field 'train.adam_betas': each β must be in [0, 1), got {list(self.adam_betas)}")


@dataclass
class EvalConfig:
    every: int = 0  # held-out eval and probe every N iterations (0 = only before/after)
    num_steps: int = 10  # Euler ODE steps for evaluation (official: 40 SD3.5-M, 50 FLUX)
    # held-out images per prompt; null = the task's default: shapes 64 (as configs/shapes_eval.yaml), compressibility
    #   and prompt files 16 (official reward eval: 1)
    images_per_prompt: Optional[int] = None
    seed: int = 0
    # the probe set: the trained reward of ODE samples (num_steps) of fixed train prompts × fixed noises, logged as
    #   probe_reward before training, every `every` iterations and at the end; prompts spread over the task's
    #   categories; null = the task's default (shapes, compressibility: 24; prompt files: 0 = off)
    probe_prompts: Optional[int] = None
    probe_images: int = 8  # probe images per prompt

    def validate(self):
        _non_negative("eval", every=self.every)
        if self.images_per_prompt is not None:
            _positive("eval", images_per_prompt=self.images_per_prompt)
        if self.probe_prompts is not None:
            _non_negative("eval", probe_prompts=self.probe_prompts)
        _positive("eval", probe_images=self.probe_images)
        if self.num_steps < 2:
            raise ValueError(f"config field 'eval.num_steps': must be >= 2, got {self.num_steps}")


@dataclass
class LogConfig:
    tensorboard: bool = True  # scalars and sample grids under output_dir/tensorboard
    sample_every: int = 0  # a grid of the rollout's images, captioned by prompt, every N iterations (0 = never)
    progress: bool = True  # tqdm bar
    # trained states per step k whose velocity is taken before and after the update, for the logged movement
    #   velocity_change/k{k} = mean |v_after - v_before| (two extra no-grad forwards per state; 0 = off)
    movement_states: int = 2
    # experiment tracker for scalars and captioned images: none | wandb | trackio (same API; pip install it)
    tracker: Literal["none", "wandb", "trackio"] = "none"
    project: str = "tempflow-fast"  # tracker project
    run_name: Optional[str] = None  # tracker run name; None = output_dir's name
    # before_after.png: these many eval prompts × images each, same noises before and after training (0 = none)
    showcase_prompts: int = 4
    showcase_images: int = 4

    def validate(self):
        _non_negative("log", sample_every=self.sample_every, movement_states=self.movement_states,
                      showcase_prompts=self.showcase_prompts,
                      showcase_images=self.showcase_images)
        if self.tracker != "none":
            import importlib.util

            if importlib.util.find_spec(self.tracker) is None:
                raise ValueError(f"config field 'log.tracker': {self.tracker!r} is not installed here "
                                 f"(pip install {self.tracker})")


@dataclass
class CheckpointConfig:
    every: int = 10  # iterations between checkpoints (0 = only at the end)
    keep_last: int = 2

    def validate(self):
        _non_negative("checkpoint", every=self.every)
        if self.keep_last < 1:
            raise ValueError(f"config field 'checkpoint.keep_last': must be >= 1 (the newest checkpoint is what "
                             f"--resume reads), got {self.keep_last}")


@dataclass
class DataConfig:
    # training prompts: a .txt (one per line) or .jsonl (a "prompt" field); None = the shapes task's train split
    train_prompts: Optional[str] = None
    # held-out prompts scored by mean reward before/after training (non-shapes tasks); None = no such eval
    eval_prompts: Optional[str] = None
    # shapes task: draw training prompts category by category (each GenEval category equally often)
    balance_categories: bool = False
    # what the run trains on and how it is measured (tempflow_fast/tasks): shapes (the grammar's prompts, held-out
    #   accuracy) | compressibility (the same prompts, a JPEG reward, held-out mean reward) | prompts (the prompt
    #   files above, held-out mean reward); null = prompts when data.train_prompts is set or model.kind is not
    #   tiny_flux, else compressibility when reward.name is a JPEG reward, else shapes (Config.task_name)
    task: Optional[Literal["shapes", "compressibility", "prompts"]] = None

    def validate(self):
        _not_blank("data", train_prompts=self.train_prompts, eval_prompts=self.eval_prompts)
        if self.balance_categories and self.train_prompts is not None:
            raise ValueError("config field 'data.balance_categories': needs the shapes task's prompts "
                             "(data.train_prompts must be null)")


@dataclass
class DistributedConfig:
    """How the ranks of a `torchrun` / `deepspeed` launch share the update (one process: ignored)."""

    backend: Literal["ddp", "deepspeed"] = "ddp"  # ddp: explicit gradient all-reduce (full or LoRA, distributed.py);
    #   deepspeed: ZeRO engine, full fine-tune only (zero.py)
    zero_stage: Optional[int] = None  # deepspeed: 2 shards optimizer state + gradients, 3 also the parameters;
    #   None = deepspeed_config's zero_optimization.stage, else 2
    deepspeed_config: Optional[str] = None  # deepspeed: JSON of DeepSpeed settings (zero_optimization tuning, bf16,
    #   ...), e.g. configs/deepspeed_zero3.json; optimizer, clipping and batch sizes come from `train`
    world_size: Optional[int] = None  # GPUs the config is planned for (--dry-run shards ZeRO state over them);
    #   a launch takes its world size from torchrun / deepspeed

    def validate(self):
        if self.zero_stage is not None and self.zero_stage not in (2, 3):
            raise ValueError(f"config field 'distributed.zero_stage': must be 2 or 3, got {self.zero_stage}")
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"config field 'distributed.world_size': must be >= 1, got {self.world_size}")
        if self.backend == "ddp" and (self.zero_stage is not None or self.deepspeed_config is not None):
            raise ValueError("config field 'distributed.backend': zero_stage and deepspeed_config need "
                             "backend 'deepspeed', got 'ddp'")


@dataclass
class Config:
    method: Literal["flow_grpo", "tempflow", "g2rpo", "stepwise", "mixgrpo", "diffusion_nft"] = "tempflow"
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    tempflow: TempFlowConfig = field(default_factory=TempFlowConfig)
    g2rpo: G2RPOConfig = field(default_factory=G2RPOConfig)
    stepwise: StepwiseConfig = field(default_factory=StepwiseConfig)
    mixgrpo: MixGRPOConfig = field(default_factory=MixGRPOConfig)
    diffusion_nft: DiffusionNFTConfig = field(default_factory=DiffusionNFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self):
        """What spans sections: the active method's branch steps against sampling.num_steps (T)."""
        if not self.output_dir.strip():
            raise ValueError("config field 'output_dir': must name a folder, got ''")
        T = self.sampling.num_steps
        if self.method == "tempflow" and self.tempflow.bifurcation:
            _check_steps("tempflow.bifurcation_steps", self.tempflow.bifurcation_steps, T)
        if self.method == "g2rpo":
            _check_steps("g2rpo.branch_steps", self.g2rpo.branch_steps, T)
            if self.g2rpo.sigma_schedule == "linspace" and (self.sampling.dynamic_shift
                                                            or self.sampling.schedule_from_model):
                raise ValueError("config field 'g2rpo.sigma_schedule': 'linspace' takes the static sampling.shift; "
                                 "set sampling.dynamic_shift and sampling.schedule_from_model false")
        task = self.task_name()
        if task in ("shapes", "compressibility"):
            if self.data.train_prompts is not None:
                raise ValueError(f"config field 'data.task': {task!r} trains on the shapes grammar's prompts; "
                                 f"data.train_prompts must be null (or data.task: prompts)")
            if self.model.kind != "tiny_flux":
                raise ValueError(f"config field 'data.task': {task!r} is for the tiny shapes model (model.kind "
                                 f"tiny_flux), got model.kind {self.model.kind!r}")
        if task == "compressibility" and self.reward.name not in JPEG_REWARDS:
            raise ValueError(f"config field 'reward.name': the compressibility task trains {' or '.join(JPEG_REWARDS)}, "
                             f"got {self.reward.name!r}")
        if task == "prompts" and self.data.balance_categories:
            raise ValueError("config field 'data.balance_categories': needs a task with categories (shapes, "
                             "compressibility); a prompt file has none")
        if self.train.async_rollout:
            if self.method == "diffusion_nft":
                raise ValueError("config field 'train.async_rollout': diffusion_nft already samples with an old policy "
                                 "(diffusion_nft.decay); leave async_rollout off")
            if self.distributed.backend == "deepspeed":
                raise ValueError("config field 'train.async_rollout': needs whole trainable weights to copy for the "
                                 "behaviour policy; ZeRO shards them (distributed.backend: deepspeed); use ddp")
            if self.model.compile_blocks:
                raise ValueError("config field 'train.async_rollout': not with model.compile_blocks (the compiled "
                                 "blocks would be shared by two threads); use sampling.runner cuda_graph for speed")
        if self.method == "diffusion_nft" and self.distributed.backend == "deepspeed":
            raise ValueError("config field 'distributed.backend': diffusion_nft keeps an old policy beside the "
                             "trained weights, which the ZeRO engine does not shard; use ddp")
        if self.reward.advantage_mode == "per_component":
            if self.reward.name != "composite":
                raise ValueError(f"config field 'reward.advantage_mode': 'per_component' normalises each component "
                                 f"of a composite reward; reward.name is {self.reward.name!r}")
            if self.method == "stepwise":
                raise ValueError("config field 'reward.advantage_mode': 'per_component' is for flow_grpo, tempflow, "
                                 "g2rpo and mixgrpo (stepwise's gains come from the composite's Tweedie rewards)")
            if self.method == "diffusion_nft":
                raise ValueError("config field 'reward.advantage_mode': 'per_component' is for flow_grpo, tempflow, "
                                 "g2rpo and mixgrpo (diffusion_nft turns the composite's advantage into one "
                                 "optimality probability)")

    @classmethod
    def from_yaml(cls, path=None, overrides=()) -> "Config":
        """A preset (YAML file) plus dotted overrides, e.g. Config.from_yaml("configs/shapes_tempflow.yaml",
        ["train.iterations=2"]): the same loading and checks as `tempflow-fast train --config ... --set ...`."""
        from tempflow_fast.config import load_config

        return load_config(cls, path, list(overrides))

    def task_name(self) -> str:
        """data.task, or the task the other fields imply (DataConfig.task): prompts for a prompt file or a model other
        than the tiny FLUX, compressibility for a JPEG reward, else shapes."""
        if self.data.task is not None:
            return self.data.task
        if self.data.train_prompts is not None or self.model.kind != "tiny_flux":
            return "prompts"
        if self.reward.name in JPEG_REWARDS:
            return "compressibility"
        return "shapes"

    def require_train_prompts(self) -> None:
        """Starting a run: data.train_prompts null means the shapes task's toy prompts, which are for the tiny
        shapes model (model.kind tiny_flux) only; any other model needs a prompt file. Checked by `train` before
        anything loads; --print-config and --dry-run read no prompts and only note it."""
        if self.data.train_prompts is None and self.model.kind != "tiny_flux":
            raise ValueError(
                f"config field 'data.train_prompts': is null, which means the shapes task's toy prompts ('two red "
                f"squares', ...), made for the tiny shapes model, not for model.kind {self.model.kind!r}; give a "
                f"prompt file (.txt, one prompt per line, or .jsonl with a \"prompt\" field; docs/prompts.md), e.g. "
                f"tempflow-fast prompts geneval --out prompts, then --set "
                f"data.train_prompts=prompts/geneval_train.jsonl")
