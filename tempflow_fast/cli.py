"""`tempflow-fast <command> ...`: one entry point, each command implemented in its own module."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules expose `main(argv: list[str]) -> int | None`.
COMMANDS = {
    "train": ("tempflow_fast.training.cli", "train a model with a GRPO method from a YAML config"),
    "sample": ("tempflow_fast.tasks.shapes.sample_cmd", "sample images for a prompt into a PNG grid"),
    "eval": ("tempflow_fast.tasks.shapes.eval_cmd", "held-out accuracy of a model on the shapes task"),
    "pretrain-shapes": ("tempflow_fast.tasks.shapes.pretrain", "rectified-flow pretraining of the tiny shapes model"),
    "bench": ("tempflow_fast.bench.cli", "benchmarks: ops, rollout, train step, iteration (CSV, markdown, plots)"),
    "demo-ops": ("tempflow_fast.ops.demo", "a short demo of the fused ops on random data"),
}


def _usage() -> str:
    lines = ["usage: tempflow-fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tempflow-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
