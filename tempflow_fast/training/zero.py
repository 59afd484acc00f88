"""DeepSpeed ZeRO-2 / ZeRO-3 for full fine-tuning (`distributed.backend: deepspeed`): the engine glue the
trainer calls. Data, rollouts, credit and loss stay exactly as on the DDP path (training/distributed.py);
the engine owns the optimizer (AdamW over fp32 partitions: ZeRO's master weights), the gradient
reduction, the clipping (`gradient_clipping` = train.grad_clip) and the skip of a step whose gradient
norm is not finite.

The step equals one process's step over the global batch:
- Sum, not mean: the loss is already divided by the GLOBAL number of scored samples, so gradients must be
  summed over ranks; DeepSpeed averages them, so the backward runs on W·loss.
- Same number of backward passes on every rank: ZeRO-2 and -3 reduce(-scatter) gradients during every
  backward, while a rank's number of micro-batches depends on how many of its groups carried signal. The
  ranks agree on the largest count (all_reduce MAX) and a rank with fewer runs padding passes: a real
  policy forward on one of its rollout states whose loss is multiplied by exactly 0, adding exact zeros to
  every gradient. They are logged as `padding_passes`, apart from `policy_passes`.
- The accumulation boundary is set by hand on the last pass (`set_gradient_accumulation_boundary`), so the
  count may change from step to step, and the loss is not rescaled by gradient_accumulation_steps.
- Non-finite loss: a rank whose loss is not finite runs its backward with a NaN factor (under ZeRO-3 every
  forward must be matched by a backward: both gather parameters collectively) and its remaining passes as
  padding with a NaN factor, so the reduced gradient is NaN on every rank; DeepSpeed's step finds the
  global gradient norm not finite and skips (clearing the gradients) on every rank together;
  `was_step_applied` tells the trainer.

ZeRO-3 partitions the parameters. Forward passes gather them through the hooks DeepSpeed puts on every
submodule, so rollouts and evaluation call the model as before; the policy forward goes through the engine
(`policy`, an adapter whose `module` is the engine) so DeepSpeed's forward/backward bookkeeping runs.
What needs whole tensors runs inside `full_parameters()` (DeepSpeed's GatheredParameters): the EMA's
update and swap, the checkpoint's weights, the export. The frozen KL reference (train.beta > 0) is a full
copy taken before the engine partitions the model: with ZeRO-3 every rank holds it whole.

Checkpoints: every rank writes its shard (optimizer state; with ZeRO-3 also its slice of the weights)
with DeepSpeed's `save_checkpoint` into the checkpoint's staging folder, which rank 0 completes with the
full weights, state and config and renames into place (checkpoint.py): an interrupted write leaves the
previous checkpoint loadable. `load_checkpoint` restores the shards at the same world size.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tempflow_fast.training import checkpoint as ckpt
from tempflow_fast.training.distributed import DistContext

SHARDS_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's per-rank files

# DeepSpeed settings the trainer derives from its own config; a deepspeed_config file may not set them
TRAINER_OWNED = {
    "optimizer": "train.learning_rate, train.adam_betas and train.weight_decay",
    "scheduler": "train.lr_schedule, train.lr_warmup_iterations and train.lr_min_ratio (set before each update)",
    "gradient_clipping": "train.grad_clip",
    "train_batch_size": "train.prompts_per_iteration and train.states_per_forward",
    "train_micro_batch_size_per_gpu": "train.states_per_forward",
    "gradient_accumulation_steps": "the number of micro-batches of each step",
    "gradient_allreduce_op": "the loss scaling (gradients are summed over ranks)",
}


def deepspeed_config(cfg) -> Dict:
    """The DeepSpeed config of a run: `distributed.deepspeed_config` (if any) with the trainer's optimizer,
    clipping, batch settings and `distributed.zero_stage` filled in. Errors name the config field."""
    d, t = cfg.distributed, cfg.train
    user: Dict = {}
    if d.deepspeed_config is not None:
        path = Path(d.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"config field 'distributed.deepspeed_config': no such file {str(path)!r}")
        try:
            user = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"config field 'distributed.deepspeed_config': {str(path)!r} is not JSON ({err})") from None
        if not isinstance(user, dict):
            raise ValueError(f"config field 'distributed.deepspeed_config': {str(path)!r} must hold a JSON object")
        for key, owner in TRAINER_OWNED.items():
            if key in user:
                raise ValueError(f"config field 'distributed.deepspeed_config': {str(path)!r} sets {key!r}, which the "
                                 f"trainer derives from {owner}; remove it")
        if user.get("fp16", {}).get("enabled", False):
            raise ValueError(f"config field 'distributed.deepspeed_config': {str(path)!r} enables fp16, whose loss "
                             f"scaling skips steps on its own; use bf16")
        if user.get("bf16", {}).get("check_grad_overflow", True) is False:
            raise ValueError(f"config field 'distributed.deepspeed_config': {str(path)!r} sets "
                             f"bf16.check_grad_overflow false, which would apply steps with non-finite gradients")
    zero = dict(user.get("zero_optimization", {}))
    stage = d.zero_stage if d.zero_stage is not None else zero.get("stage", 2)
    if zero.get("stage", stage) != stage:
        raise ValueError(f"config field 'distributed.zero_stage': {stage}, but {d.deepspeed_config!r} sets "
                         f"zero_optimization.stage = {zero['stage']}; make them agree or leave zero_stage null")
    if stage not in (2, 3):
        raise ValueError(f"config field 'distributed.zero_stage': must be 2 or 3, got {stage!r}")
    zero["stage"] = stage
    from tempflow_fast.models.loading import resolve_dtype

    extra = {}
    default = torch.float32 if cfg.model.kind == "tiny_flux" else torch.bfloat16
    if resolve_dtype(cfg.model.dtype, default) == torch.bfloat16 and "bf16" not in user:
        # bf16 weights: DeepSpeed's own mixed precision, fp32 master weights inside its (sharded) optimizer
        extra["bf16"] = {"enabled": True}
    return {
        "steps_per_print": 2**31 - 1,  # the trainer logs its own metrics
        **extra,
        **user,
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # boundaries are set by hand per step (module docstring)
        # torch's AdamW: the DDP path's exact update, no compiled DeepSpeed op needed
        "optimizer": {"type": "AdamW", "params": {"lr": t.learning_rate, "betas": list(t.adam_betas), "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "gradient_clipping": t.grad_clip,
    }


def check_supported(cfg, stage: int) -> None:
    """Startup checks of what ZeRO does not cover, naming the config field."""
    if cfg.train.lora.enabled:
        raise ValueError("config field 'distributed.backend': 'deepspeed' (ZeRO) is for full fine-tuning; LoRA trains "
                         "on plain data parallel: set distributed.backend=ddp or train.lora.enabled=false")
    if stage == 3 and cfg.sampling.runner != "eager":
        raise ValueError(f"config field 'sampling.runner': ZeRO-3 gathers the parameters in hooks around every module "
                         f"call, which compiled / captured segments cannot hold; use 'eager', got "
                         f"{cfg.sampling.runner!r}")
    if stage == 3 and cfg.model.compile_blocks:
        raise ValueError("config field 'model.compile_blocks': not with ZeRO-3 (its parameter-gathering hooks run "
                         "around every block); set it false or use distributed.zero_stage=2")


def _join_process_group() -> None:
    """The process group of a one-process launch (`torchrun --nproc_per_node 1`, `deepspeed --num_gpus 1`), which
    distributed.from_environment leaves alone; DeepSpeed needs one, and the launcher's variables."""
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError("config field 'distributed.backend': 'deepspeed' needs a launcher: run under "
                         "`torchrun --nproc_per_node N` or `deepspeed --num_gpus N` (N = 1 for one process)")
    backend = os.environ.get("TEMPFLOW_FAST_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method="env://")


class ZeroEngine:
    """The DeepSpeed engine around `model.module`, built from `cfg` (see `deepspeed_config`)."""

    def __init__(self, model, named_params: Sequence[Tuple[str, torch.nn.Parameter]], cfg, ctx: DistContext):
        self.config = deepspeed_config(cfg)
        self.stage = self.config["zero_optimization"]["stage"]
        check_supported(cfg, self.stage)
        self.ctx = ctx
        if not dist.is_initialized():
            _join_process_group()
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group
        self.named_params = list(named_params)
        self.engine, _, _, _ = deepspeed.initialize(model=model.module,
                                                    model_parameters=[p for _, p in self.named_params],
                                                    config=self.config)
        # the adapter the policy forward goes through: the same model, its module called via the engine
        self.policy = copy.copy(model)
        self.policy.module = self.engine

    # --- one optimizer step -------------------------------------------------------------------------

    @property
    def param_groups(self):
        """The engine's optimizer parameter groups (ZeRO's wrapper forwards them to the torch AdamW)."""
        return self.engine.optimizer.param_groups

    def step(self, num_micro_batches: int, padding_loss: Callable[[], torch.Tensor]) -> "ZeroStep":
        return ZeroStep(self, num_micro_batches, padding_loss)

    # --- whole parameters ---------------------------------------------------------------------------

    def full_parameters(self, modify: bool = False):
        """Context in which every trainable parameter holds its whole tensor (ZeRO-3 gathers them; every rank
        must enter). With modify=True the values written inside are kept (the ranks must write the same)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for _, p in self.named_params], modifier_rank=0 if modify else None)

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """{name: whole tensor (a copy)} of the trainable parameters on rank 0, None elsewhere. ZeRO-3 gathers
        one parameter at a time, so only rank 0 ever holds them all."""
        import deepspeed

        out = {}
        for n, p in self.named_params:
            with (deepspeed.zero.GatheredParameters([p]) if self.stage == 3 else contextlib.nullcontext()):
                if self.ctx.is_main:
                    out[n] = p.detach().clone()
        return out if self.ctx.is_main else None

    # --- checkpoints --------------------------------------------------------------------------------

    def save_shards(self, root: Path, iteration: int) -> Path:
        """Every rank writes its DeepSpeed shard into the staging folder of checkpoint `iteration` (collective);
        returns that folder for `checkpoint.save_checkpoint(staged=...)`."""
        staging = ckpt.staging_dir(root, iteration)
        if self.ctx.is_main:
            ckpt.clear_staging(staging)
        self.ctx.barrier()
        self.engine.save_checkpoint(str(staging), tag=SHARDS_TAG, save_latest=False)
        self.ctx.barrier()
        return staging

    def load_shards(self, path: Path) -> None:
        """Weights and optimizer state (fp32 master partitions, Adam moments) of a checkpoint folder."""
        if not (Path(path) / SHARDS_TAG).is_dir():
            raise ValueError(f"--resume: checkpoint {str(path)!r} has no DeepSpeed shards ({SHARDS_TAG}/); it was "
                             f"written with distributed.backend=ddp: resume with that backend")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=SHARDS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"--resume: DeepSpeed could not load the shards of {str(path)!r}")


class ZeroStep:
    """The backward passes of one optimizer step through the engine; the same interface as
    distributed.DataParallelStep: `backward(loss)` per micro-batch, then `finish(ok)`."""

    def __init__(self, zero: ZeroEngine, num_micro_batches: int, padding_loss: Callable[[], torch.Tensor]):
        self.engine, self.ctx = zero.engine, zero.ctx
        self.padding_loss = padding_loss
        self.total = self._agree_max(num_micro_batches)
        self.done = 0
        self.padding_passes = 0

    def _agree_max(self, n: int) -> int:
        if not self.ctx.active:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.engine.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def backward(self, loss: torch.Tensor) -> None:
        if self.done >= self.total:
            raise RuntimeError(f"more backward passes than the {self.total} agreed for this step")
        self.engine.set_gradient_accumulation_boundary(self.done == self.total - 1)
        # DeepSpeed averages over ranks; the loss is a share of the global sum (module docstring)
        self.engine.backward(loss * self.ctx.world_size, scale_wrt_gas=False)
        self.done += 1

    def discard(self, loss: torch.Tensor) -> None:
        """A non-finite loss (the trainer then calls finish(ok=False)): backward with a NaN factor, which makes
        the reduced gradient NaN on every rank, so that its forward is matched by a backward."""
        if loss.requires_grad:
            self.backward(loss * math.nan)

    def finish(self, ok: bool) -> Tuple[bool, float]:
        """Pad to the agreed count, step. `ok` False (this rank's loss was not finite): the padding carries NaN,
        so every rank's step is skipped. Returns (step applied, gradient norm before clipping)."""
        factor = 0.0 if ok else math.nan
        while self.done < self.total:
            self.backward(self.padding_loss() * factor)
            self.padding_passes += 1
        self.engine.step()
        if not self.engine.was_step_applied():
            return False, math.nan
        return True, float(self.engine.get_global_grad_norm())
