"""`tempflow-fast train --config configs/<preset>.yaml [--set section.field=value ...] [--resume]`"""

from __future__ import annotations

import argparse
import sys

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
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
    except ValueError as err:
        print(f"tempflow-fast train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from tempflow_fast.training.trainer import Trainer, format_summary

    trainer = Trainer(cfg, resume=args.resume)
    summary = trainer.train()
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
