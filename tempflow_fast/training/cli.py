"""`tempflow-fast train --config configs/<preset>.yaml [--set section.field=value ...] [--resume | --overwrite]`

Exit status: 0 done; 2 a bad value, file or setting found before training started (one line on stderr naming
it: config fields, output_dir in use or not empty, a checkpoint from another run, ...); 1 training stopped
(too many non-finite updates, a failing reward, a checkpoint that cannot be written), also one line."""

from __future__ import annotations

import argparse
import sys

import torch
import yaml

from tempflow_fast.config import config_to_dict, load_config
from tempflow_fast.training.train_config import Config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tempflow-fast train", description="Train with a GRPO method from a YAML config.")
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/shapes_tempflow.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.iterations=2 (repeatable)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the run in output_dir from its newest checkpoint (refused for another run's)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in an output_dir that holds an earlier run: its checkpoints, logs and "
                          "final model are removed first (without this flag or --resume, output_dir must be empty)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the memory plan by phase (weights read from no file: a local "
                        "pipeline folder's configs, or the shipped ones of FLUX.1-dev / SD3.5-Medium for their hub "
                        "ids), the rows per transformer call and the NFE per iteration, then exit; exit 2 when the "
                        "peak exceeds --gpu-memory")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="GPU memory the --dry-run plans for, in GiB (default 80)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
    except ValueError as err:
        print(f"tempflow-fast train: {err}", file=sys.stderr)
        return 2
    if args.dry_run and not 0 < args.gpu_memory < float("inf"):
        print(f"tempflow-fast train: --gpu-memory must be > 0 GiB, got {args.gpu_memory}", file=sys.stderr)
        return 2
    if args.print_config or args.dry_run:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        if args.dry_run:
            try:
                lines, problem = dry_run(cfg, args.gpu_memory)
            except ValueError as err:
                print(f"tempflow-fast train: {err}", file=sys.stderr)
                return 2
            print("\n".join(lines))
            try:
                cfg.require_train_prompts()
            except ValueError as err:
                print(f"note: train will refuse to start: {_one_line(err)}", file=sys.stderr)
            if problem:
                print(f"tempflow-fast train: {problem}", file=sys.stderr)
                return 2
        return 0
    try:
        cfg.require_train_prompts()
    except ValueError as err:
        print(f"tempflow-fast train: {_one_line(err)}", file=sys.stderr)
        return 2
    from tempflow_fast.training.checkpoint import CheckpointWriteError
    from tempflow_fast.training.distributed import NonFiniteWeights
    from tempflow_fast.training.trainer import NonFiniteAbort, RewardFailure, Trainer, format_summary

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except ValueError as err:
        print(f"tempflow-fast train: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    except (NonFiniteAbort, NonFiniteWeights, RewardFailure, CheckpointWriteError) as err:
        trainer.close()
        print(f"tempflow-fast train: stopped: {_one_line(err)}", file=sys.stderr)
        return 1
    if trainer.dist.is_main:
        print(format_summary(summary), flush=True)
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _zero_plan(cfg: Config) -> dict:
    """ZeRO sharding for the memory plan: stage and GPUs (distributed.world_size) of a DeepSpeed full fine-tune."""
    d = cfg.distributed
    if d.backend != "deepspeed":
        return {}
    from tempflow_fast.training.zero import deepspeed_config

    return {"zero_stage": deepspeed_config(cfg)["zero_optimization"]["stage"], "world_size": d.world_size or 1}


def dry_run(cfg: Config, gpu_memory_gib: float = 80.0):
    """(report lines, problem or None): the memory plan by phase for a GPU of `gpu_memory_gib` (weights, trainable
    fp32 copies, optimizer, EMA / reference copies, CUDA-graph pool; rollout forward, decode, update, optimizer
    step), the rows per transformer call and the NFE per iteration, without loading any weights. `problem` names
    the phase that does not fit and the fields that would fix it."""
    from tempflow_fast import algorithms
    from tempflow_fast.models.loading import resolve_dtype
    from tempflow_fast.models.memory import GIB, dry_run_lines, estimate_for, fixes_for, nfe_per_iteration

    m, t, smp = cfg.model, cfg.train, cfg.sampling
    gpu = gpu_memory_gib * GIB
    estimate = estimate_for(
        m.kind, m.path, dtype=resolve_dtype(m.dtype, torch.float32 if m.kind == "tiny_flux" else torch.bfloat16),
        resolution=m.resolution, max_sequence_length=m.max_sequence_length, guidance_scale=smp.guidance_scale,
        lora_rank=t.lora.rank if t.lora.enabled else None, lora_targets=t.lora.target_modules if t.lora.enabled else (),
        states_per_forward=t.states_per_forward, gradient_checkpointing=m.gradient_checkpointing,
        text_encoders_resident=m.text_encoders == "keep", ema=t.ema_decay > 0, reference_copy=t.beta > 0,
        max_rows_per_call=smp.max_rows_per_call, decode_batch=smp.decode_batch,
        cuda_graphs=smp.runner == "cuda_graph", gpu_memory=gpu, async_rollout=t.async_rollout, **_zero_plan(cfg),
    )
    guidance = smp.guidance_scale
    default_cfg = {"sd3": 4.5, "qwen_image": 4.0}  # the kinds with true CFG, and their default scales
    cfg_batches = 2 if m.kind in default_cfg and (default_cfg[m.kind] if guidance is None else guidance) > 1.0 else 1
    algorithm = algorithms.from_config(cfg)
    plan = algorithm.plan()  # None: a forward-process method (DiffusionNFT), whose rollout is plain ODE sampling
    nfe = (algorithm.rollout_nfe(t.prompts_per_iteration, cfg_batches) if plan is None
           else nfe_per_iteration(plan, t.prompts_per_iteration, cfg_batches=cfg_batches))
    lines = dry_run_lines(estimate, nfe)
    problem = None
    if estimate.max_rows_per_call < 1:
        problem = (f"not one latent row per transformer call fits in {gpu_memory_gib:g} GiB next to the resident "
                   f"{estimate.resident / GIB:.1f} GiB (phase: rollout forward); lower it with "
                   f"{fixes_for('rollout forward')}")
    elif smp.buckets is not None and max(smp.buckets) > estimate.max_rows_per_call:
        problem = (f"config field 'sampling.buckets': bucket {max(smp.buckets)} is larger than the "
                   f"{estimate.max_rows_per_call} rows per transformer call that fit (sampling.max_rows_per_call)")
    else:
        phase, peak = estimate.peak()
        if peak > gpu:
            problem = (f"peak memory {peak / GIB:.1f} GiB ({phase}) exceeds --gpu-memory {gpu_memory_gib:g} GiB; "
                       f"fields that lower it: {fixes_for(phase)}")
    return lines, problem


if __name__ == "__main__":
    sys.exit(main())
