"""Small training runs for the reliability tests: the CLI in-process on the shipped tiny model with a budget of a
few seconds, and the Trainer on a smaller random model."""

import json
from pathlib import Path

import torch

from tempflow_fast.config import load_config
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.training.cli import main as train_main
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)

# one flow_grpo iteration of one prompt, 3 images, T = 3, a one-image-per-prompt eval of 2 steps, a checkpoint
# every iteration
CLI_BASE = ["method=flow_grpo", "train.iterations=1", "train.prompts_per_iteration=1", "flow_grpo.group_size=3",
            "sampling.num_steps=3", "log.progress=false", "log.tensorboard=false", "eval.images_per_prompt=1",
            "eval.num_steps=2", "eval.probe_prompts=2", "eval.probe_images=1", "checkpoint.every=1", "train.learning_rate=1e-3", "train.clip_range=0.2"]


def cli_args(out, *extra):
    args = []
    for s in [f"output_dir={out}", *CLI_BASE, *extra]:
        args += ["--set", s]
    return args


def train_cli(out, *extra, flags=()):
    """`tempflow-fast train` in this process: its exit status."""
    return train_main([*cli_args(out, *extra), *flags])


def one_line_error(capsys) -> str:
    """stderr of the last command: exactly one line, no traceback."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class BrightnessReward:
    """Continuous, so every group has spread and every sample is trained; NaN images score NaN."""

    name = "brightness"

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


def no_eval(model):
    return {"overall": {"accuracy": 0.0}}


def small_config(out, *extra):
    return load_config(Config, None, [
        f"output_dir={out}", "method=flow_grpo", "train.iterations=2", "train.prompts_per_iteration=2",
        "flow_grpo.group_size=4", "sampling.num_steps=4", "log.progress=false", "log.tensorboard=false",
        "train.learning_rate=1e-3", "train.clip_range=0.2", "checkpoint.every=1", "eval.probe_prompts=2",
        "eval.probe_images=1", *extra])


def small_trainer(out, *extra, reward=None, **kwargs):
    """A Trainer on a small random tiny FLUX (seed 0) and the brightness reward."""
    model = new_model(seed=0, transformer_config=SMALL)
    return Trainer(small_config(out, *extra), model=model, reward=reward or BrightnessReward(), eval_fn=no_eval,
                   **kwargs)


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.named_params}


def metrics_rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def snapshot_files(folder):
    """{relative path: bytes} of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def forbid_model_load(monkeypatch):
    """From here on, loading a model fails the test: the check under test must come before."""
    from tempflow_fast.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad value was refused")

    monkeypatch.setattr(loading, "load_adapter", refuse)
