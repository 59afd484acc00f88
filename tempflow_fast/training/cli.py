"""`tempflow-fast train --config configs/<preset>.yaml [--set section.field=value ...] [--resume]`"""

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
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, a memory estimate and the NFE per iteration, then exit")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
    except ValueError as err:
        print(f"tempflow-fast train: {err}", file=sys.stderr)
        return 2
    if args.print_config or args.dry_run:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        if args.dry_run:
            print("\n".join(dry_run(cfg)))
        return 0
    from tempflow_fast.training.trainer import Trainer, format_summary

    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.train()
    if trainer.dist.is_main:
        print(format_summary(summary), flush=True)
    return 0


def dry_run(cfg: Config) -> list:
    """Memory estimate (weights, activations, optimizer, LoRA) and NFE per iteration, without loading weights
    onto a device."""
    from tempflow_fast import algorithms
    from tempflow_fast.models.loading import resolve_dtype
    from tempflow_fast.models.memory import dry_run_lines, estimate_for, nfe_per_iteration

    m, t = cfg.model, cfg.train
    estimate = estimate_for(
        m.kind, m.path, dtype=resolve_dtype(m.dtype, torch.float32 if m.kind == "tiny_flux" else torch.bfloat16),
        resolution=m.resolution, max_sequence_length=m.max_sequence_length, guidance_scale=cfg.sampling.guidance_scale,
        lora_rank=t.lora.rank if t.lora.enabled else None, lora_targets=t.lora.target_modules if t.lora.enabled else (),
        states_per_forward=t.states_per_forward, gradient_checkpointing=m.gradient_checkpointing,
        text_encoders_resident=m.text_encoders == "keep",
    )
    guidance = cfg.sampling.guidance_scale
    cfg_batches = 2 if m.kind == "sd3" and (4.5 if guidance is None else guidance) > 1.0 else 1
    nfe = nfe_per_iteration(algorithms.from_config(cfg).plan(), t.prompts_per_iteration, cfg_batches=cfg_batches)
    return dry_run_lines(estimate, nfe)


if __name__ == "__main__":
    sys.exit(main())
