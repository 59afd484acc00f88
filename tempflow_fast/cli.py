"""`tempflow-fast <command> ...`: one entry point, each command implemented in its own module."""

from __future__ import annotations

import importlib
import sys

from tempflow_fast import __version__

# command -> (module, one-line help). Modules expose `main(argv: list[str]) -> int | None`.
COMMANDS = {
    "train": ("tempflow_fast.training.cli", "train a model with a GRPO method from a YAML config"),
    "sample": ("tempflow_fast.tasks.shapes.sample_cmd", "sample images for a prompt into a PNG grid"),
    "eval": ("tempflow_fast.tasks.shapes.eval_cmd", "held-out accuracy of a model on the shapes task"),
    "pretrain-shapes": ("tempflow_fast.tasks.shapes.pretrain", "rectified-flow pretraining of the tiny shapes model"),
    "prompts": ("tempflow_fast.tasks.prompts_cmd", "write prompt files to train on (geneval: COCO objects, fixed splits)"),
    "bench": ("tempflow_fast.bench.cli", "benchmarks: ops, rollout, train step, iteration (CSV, markdown, plots)"),
    "demo-ops": ("tempflow_fast.ops.demo", "a short demo of the fused ops on random data"),
    "doctor": ("tempflow_fast.doctor", "GPU check of the production path (--smoke: the same code on the CPU)"),
}

# importable name of an optional dependency -> the extra of pyproject.toml that installs it
EXTRAS = {
    "diffusers": "train", "transformers": "train", "peft": "train", "tensorboard": "train", "tqdm": "train",
    "PIL": "train", "huggingface_hub": "train",
    "triton": "triton",
    "open_clip": "rewards", "torchvision": "rewards",
    "matplotlib": "bench", "pynvml": "bench",
    "deepspeed": "deepspeed",
}
# optional dependencies no extra can install beside the training stack
SEPARATE = {
    "ImageReward": "image-reward 1.5 needs transformers < 4.56, which cannot share an environment with diffusers >= "
                   "0.42: serve it from its own environment with python -m tempflow_fast.rewards.serve "
                   "(docs/install.md)",
}


def _usage() -> str:
    lines = ["usage: tempflow-fast <command> [options]", "       tempflow-fast --version", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`tempflow-fast <command> --help` lists a command's options."]
    return "\n".join(lines)


def _install_command(extra: str, editable: bool) -> str:
    spec = f'-e ".[{extra}]"' if editable else f'"tempflow_fast[{extra}]"'
    if extra == "rewards":  # pinned, or pip replaces torch with the one the newest torchvision wants
        from importlib.metadata import version

        return f'pip install {spec} "torch=={version("torch")}"'
    if extra == "deepspeed":  # its build imports the installed torch
        return f"pip install --no-build-isolation {spec}"
    return f"pip install {spec}"


def missing_extra_message(command: str, err: ImportError):
    """One line saying which extra installs the missing optional dependency behind `err` (the error
    itself or what caused it), or None when `err` is about anything else."""
    cause = err
    while cause is not None and not (isinstance(cause, ModuleNotFoundError)
                                     and (cause.name or "").split(".")[0] in {**EXTRAS, **SEPARATE}):
        cause = cause.__cause__
    if cause is None:
        return None
    module = cause.name.split(".")[0]
    if module in SEPARATE:
        return f"tempflow-fast {command}: needs {module}, which is not installed; {SEPARATE[module]}"
    extra = EXTRAS[module]
    message = (f"tempflow-fast {command}: needs {module}, which is not installed; install tempflow_fast[{extra}]: "
               f"{_install_command(extra, False)} (from a checkout: {_install_command(extra, True)})")
    if extra == "rewards":
        message += "; a torch built for the CPU or from PyTorch's index needs its torchvision first (docs/install.md)"
    return message


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"tempflow-fast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tempflow-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except ImportError as err:
        message = missing_extra_message(name, err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
