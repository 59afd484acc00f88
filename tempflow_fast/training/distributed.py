"""Data-parallel GRPO across processes (launched with `torchrun`): what each rank samples, what it
shares, and how the update stays one update.

The global batch of an iteration is `train.prompts_per_iteration` prompts; rank r takes the r-th
contiguous slice of P / W prompts (`shard`). A rank rolls out every seed and branch of its prompts,
so every advantage group of every method — (prompt), (prompt, seed, k), (prompt, k) — is whole on
one rank and its statistics need no communication. What does (`global_view`): the global std of
`train.global_std`, and the logged reward statistics. Rewards are tiny (one float per
trajectory), so every rank gathers all of them and the algorithm's credit runs on a view whose
`trajectories` are the global ones (prompt ids offset per rank) while `states` / `samples` stay the
rank's own, their `trajectory` ids offset the same way: the credit a rank gets for its own samples
is then exactly what a single process would compute for them over the whole batch.

The update: the loss is scaled by the GLOBAL number of scored samples (`all_sum`) and gradients are
summed across ranks (`all_reduce_gradients`) after the rank's last backward, so the step equals a
single process's step over the global batch. Gradients are reduced explicitly, once per optimizer
step, rather than through `torch.nn.parallel.DistributedDataParallel`: DDP's reducer needs every
rank to run the same number of backward passes per step, while here a rank's number of
micro-batches depends on how many of its groups carried signal, and the model adapter calls its
module's submodules rather than a wrapped `forward`. The non-finite check is agreed on
(`all_true`), so every rank skips the same steps and the weights never diverge; a step whose result holds a
non-finite weight is undone on every rank (the weights and AdamW state from before it, `StepSnapshot`).

Rollout noise: each rank draws from its own generator (the trainer seeds it with the rank), so
ranks sample distinct initial noises and SDE noises.

Checkpoints: rank 0 writes, every rank waits (`barrier`) and later loads the same files; the world
size is stored and a resume on another world size is refused (the data order and the per-rank
noises depend on it). Logging, progress bars and exports happen on rank 0 only (`is_main`). What
rank 0 logs: rewards, reward statistics, zero-std ratio, loss, clip fraction and KL of the global
batch; NFE, image and policy-pass counts (per iteration and the run's totals) of rank 0's own shard.

DeepSpeed ZeRO-2/3 (`distributed.backend: deepspeed`, full fine-tuning) shares everything above but the
update's gradient reduction, optimizer and clipping, which its engine owns (training/zero.py). Both paths
give the trainer the same per-step interface: `backward(loss)` per micro-batch (`discard(loss)` for a
non-finite one), then `finish(ok)`.

Backend: nccl when CUDA is available (the model must then live on `cuda:<local_rank>`), gloo otherwise;
TEMPFLOW_FAST_DIST_BACKEND=gloo|nccl overrides the choice (gloo for a CPU model on a GPU machine).

    torchrun --nproc_per_node 2 -m tempflow_fast.cli train --config configs/shapes_tempflow.yaml
"""

from __future__ import annotations

import dataclasses
import os
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_BUCKET_ELEMENTS = 25 * 2**20 // 4  # DDP's default 25 MB bucket, in fp32 elements


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. world_size == 1 is the single-process trainer: every
    collective below is then the identity and costs nothing."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # --- data -----------------------------------------------------------------------------------

    def shard(self, prompts: Sequence[str]) -> List[str]:
        """This rank's contiguous slice of the global prompt batch (whole prompts: every group whole)."""
        prompts = list(prompts)
        if len(prompts) % self.world_size:
            raise ValueError(f"train.prompts_per_iteration must be a multiple of the world size {self.world_size} "
                             f"(each rank takes whole prompts), got {len(prompts)}")
        per = len(prompts) // self.world_size
        return prompts[self.rank * per:(self.rank + 1) * per]

    # --- collectives ----------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        """Sum of a Python number over ranks (ints stay exact up to 2**53)."""
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        out = float(t.item())
        return int(out) if isinstance(value, int) else out

    def sum_into(self, stats: Dict[str, float], keys: Iterable[str]) -> None:
        """Replace stats[k] by its sum over ranks, for each k in keys (one collective)."""
        keys = list(keys)
        if not self.active or not keys:
            return
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            stats[k] = v

    def all_true(self, flag: bool) -> bool:
        """True iff `flag` is True on every rank."""
        if not self.active:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=_comm_device())
        dist.all_reduce(t)
        return float(t.item()) == 0.0

    def all_reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's .grad over ranks, in buckets of ~25 MB. A parameter with no gradient
        on this rank (none of its micro-batches reached it) contributes zeros, so every rank takes
        part in every bucket."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params]):
            flat = torch.cat([g.reshape(-1).float() for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's `params` (start from identical weights)."""
        if not self.active:
            return
        with torch.no_grad():
            for bucket in _buckets(list(params)):
                flat = torch.cat([p.detach().reshape(-1) for p in bucket])
                dist.broadcast(flat, src=0)
                offset = 0
                for p in bucket:
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def all_gather_rows(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Concatenate every rank's `x` along dim 0, in rank order (rows may differ per rank).
        Returns (gathered, rows per rank)."""
        if not self.active:
            return x, [x.shape[0]]
        counts = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(all_counts, counts)
        rows = [int(c.item()) for c in all_counts]
        padded = torch.zeros((max(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)]), rows

    # --- credit -----------------------------------------------------------------------------------

    def global_view(self, result, rewards, *, num_prompts: int):
        """(result', rewards') for the algorithm's credit and the logged reward statistics: rewards and
        trajectory keys of every rank (this rank's prompt ids offset by the prompts of lower ranks),
        this rank's states and samples (their trajectory ids offset by the trajectories of lower
        ranks). With one process, (result, rewards) unchanged."""
        if not self.active:
            return result, rewards
        traj = result.trajectories
        device = traj.prompt.device
        prompt_counts = self.all_gather_rows(torch.tensor([num_prompts], dtype=torch.long, device=device))[0]
        prompt_offset = int(prompt_counts[:self.rank].sum())
        keys = torch.stack([traj.prompt + prompt_offset, traj.seed, traj.branch_step, traj.branch], dim=1)
        all_keys, traj_rows = self.all_gather_rows(keys)
        traj_offset = sum(traj_rows[:self.rank])
        trajectories = dataclasses.replace(traj, prompt=all_keys[:, 0].contiguous(), seed=all_keys[:, 1].contiguous(),
                                           branch_step=all_keys[:, 2].contiguous(), branch=all_keys[:, 3].contiguous())
        samples = dataclasses.replace(result.samples, trajectory=result.samples.trajectory + traj_offset)
        final = {lam: self.all_gather_rows(r)[0] for lam, r in rewards.final.items()}
        tweedie = None if rewards.tweedie is None else self.all_gather_rows(rewards.tweedie)[0]
        trunk = None if rewards.trunk is None else self.all_gather_rows(rewards.trunk)[0]
        return (dataclasses.replace(result, trajectories=trajectories, samples=samples),
                dataclasses.replace(rewards, final=final, tweedie=tweedie, trunk=trunk))


class DataParallelStep:
    """The backward passes of one optimizer step on the explicit all-reduce path (also one process):
    gradients accumulate locally, are summed over ranks once, clipped, and the optimizer steps."""

    padding_passes = 0  # every rank runs only its own micro-batches

    def __init__(self, ctx: DistContext, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 grad_clip: float, snapshot: Optional["StepSnapshot"] = None):
        self.ctx, self.optimizer, self.params, self.grad_clip = ctx, optimizer, list(params), grad_clip
        # the pre-step copy (reuse one across steps: its host buffers are allocated once)
        self.snapshot = snapshot if snapshot is not None else StepSnapshot(optimizer, self.params)
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def discard(self, loss: torch.Tensor) -> None:
        """A non-finite loss: nothing to run (finish(ok=False) skips the step)."""

    def finish(self, ok: bool) -> Tuple[bool, float]:
        """`ok`: this rank's losses were finite. Returns (step applied, gradient norm before clipping); a step
        whose loss or gradient is not finite on any rank is skipped on every rank, and so is a step that leaves
        a non-finite weight (an overflowing learning rate): the weights and optimizer state from before it are
        put back."""
        ok = self.ctx.all_true(ok)  # every rank skips together, or the weights would diverge
        grad_norm = math.nan
        if ok:
            self.ctx.all_reduce_gradients(self.params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
            ok = math.isfinite(grad_norm)
        if ok:
            kept = self.snapshot.take()
            try:
                self.optimizer.step()
                finite = all_finite(self.params)
            except RuntimeError as err:  # a rate so large that AdamW's step size overflows: half the weights moved
                if "overflow" not in str(err):
                    raise
                finite = False
            ok = self.ctx.all_true(finite)
            if not ok:
                if not kept:
                    raise NonFiniteWeights(
                        f"an optimizer step left non-finite weights, and the trainable state "
                        f"({self.snapshot.nbytes() / 2**30:.1f} GiB) is too large to keep a pre-step copy "
                        f"(limit {self.snapshot.max_bytes / 2**30:.0f} GiB): resume from the last checkpoint with a "
                        f"lower train.learning_rate")
                self.snapshot.restore()
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            return False, math.nan
        return True, grad_norm


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one host synchronisation)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


SNAPSHOT_MAX_BYTES = 4 * 2**30  # largest trainable state (weights + AdamW moments) copied before each step


class NonFiniteWeights(RuntimeError):
    """A step left non-finite weights and there was no pre-step copy to put back (the state was too large)."""


class StepSnapshot:
    """The trainable weights and the optimizer state before an optimizer step, kept on the host (pinned when the
    weights live on a GPU, so the copies queue on the stream ahead of the step and take no device memory);
    `restore()` puts them back exactly. The host buffers are allocated once and reused by every `take()`. Costs
    one device-to-host copy of weights and moments per step: small for LoRA adapters (FLUX r64: 2 GiB), but 12
    bytes per weight for an fp32 full fine-tune (SD3.5-M: 29 GiB a step), so above `max_bytes` nothing is copied
    and a non-finite step stops the run instead (NonFiniteWeights). With finite gradients (checked before the
    step) and a finite learning rate, AdamW's update is bounded by a few × lr per weight: only an overflowing
    rate gets here."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 max_bytes: int = SNAPSHOT_MAX_BYTES):
        self.optimizer, self.params, self.max_bytes = optimizer, list(params), max_bytes
        self._buffers: Dict[Tuple[int, str], torch.Tensor] = {}
        self.weights: List[torch.Tensor] = []
        self.state: Dict[int, Dict] = {}

    def nbytes(self) -> int:
        """Weights + AdamW's two moments (fp32 moments, whatever the state holds yet)."""
        return sum(p.numel() * (p.element_size() + 8) for p in self.params)

    def _copy(self, key: Tuple[int, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = self._buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        buf.copy_(t.detach(), non_blocking=True)
        return buf

    def take(self) -> bool:
        """Copy the pre-step weights and state; False (nothing copied) when they exceed max_bytes."""
        if self.nbytes() > self.max_bytes:
            return False
        self.weights = [self._copy((i, ""), p) for i, p in enumerate(self.params)]
        self.state = {}
        for i, p in enumerate(self.params):
            if p in self.optimizer.state:
                self.state[i] = {k: self._copy((i, k), v) if isinstance(v, torch.Tensor) else v
                                 for k, v in self.optimizer.state[p].items()}
        return True

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
        for i, p in enumerate(self.params):
            saved = self.state.get(i)
            if saved is None:  # the step created this parameter's state: it had none before
                self.optimizer.state.pop(p, None)
                continue
            live = self.optimizer.state[p]
            for k in set(live) - set(saved):
                del live[k]
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    live[k].copy_(v)
                else:
                    live[k] = v


def _comm_device() -> torch.device:
    """Where small control tensors live: nccl only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterable[List[torch.Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > _BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def from_environment(backend: Optional[str] = None) -> DistContext:
    """The context `torchrun` describes through RANK, WORLD_SIZE and LOCAL_RANK; joins (or reuses) the
    default process group when WORLD_SIZE > 1. Without those variables: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = os.environ.get("TEMPFLOW_FAST_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend (or TEMPFLOW_FAST_DIST_BACKEND) must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                         f"RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank, world, local_rank)


class NullLogger:
    """The metrics sink of ranks other than 0: rank 0 writes the one log of the run."""

    def log(self, iteration: int, metrics: Dict) -> None:
        pass

    def log_image(self, iteration: int, tag: str, image, caption: str = "") -> None:
        pass

    def close(self) -> None:
        pass
