"""The Python API a diffusers / TRL user recognises: `from tempflow_fast import Trainer, Config`, keyword
construction checked like YAML, Config.from_yaml, a plain callable as the reward, a diffusers pipeline object as
the model, and the README's example run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_top_level_names_import_lazily():
    out = subprocess.run([sys.executable, "-c", "import sys, tempflow_fast; print('diffusers' in sys.modules); "
                          "from tempflow_fast import Trainer, Config, TrainConfig, RewardConfig; print(Trainer.__name__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "Trainer"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import tempflow_fast

        tempflow_fast.Nope  # noqa: B018


def test_keyword_config_is_checked_like_yaml(tmp_path):
    from tempflow_fast import Config, TrainConfig, Trainer

    with pytest.raises(ValueError, match="train.learning_rate"):
        Trainer(Config(output_dir=str(tmp_path / "a"), train=TrainConfig(learning_rate=-1.0)))
    with pytest.raises(ValueError, match="'method'"):
        Trainer(Config(method="ppo", output_dir=str(tmp_path / "b")))
    cfg = Config.from_yaml(REPO / "configs" / "shapes_tempflow.yaml", ["train.iterations=3"])
    assert cfg.train.iterations == 3 and cfg.method == "tempflow"


def test_pipeline_object_and_callable_reward(tmp_path):
    from diffusers import FluxPipeline

    from tempflow_fast import Config, ModelConfig, SamplingConfig, TempFlowConfig, TrainConfig, Trainer
    from tests.models.tiny_pipelines import RESOLUTION, TEXT_LEN, make_tiny_flux_pipeline

    pipe = FluxPipeline.from_pretrained(str(make_tiny_flux_pipeline(tmp_path / "flux")))
    seen = []

    def brightness(images, prompts):
        seen.append((images.dtype, len(prompts)))
        return images.mean(dim=(1, 2, 3))

    cfg = Config(output_dir=str(tmp_path / "run"), model=ModelConfig(resolution=RESOLUTION,
                                                                     max_sequence_length=TEXT_LEN),
                 sampling=SamplingConfig(num_steps=3), tempflow=TempFlowConfig(num_seeds=2, branches=2),
                 train=TrainConfig(iterations=1, prompts_per_iteration=1))
    cfg.log.progress = cfg.log.tensorboard = False
    trainer = Trainer(cfg, model=pipe, reward=brightness, train_prompts=["a cat", "a dog"])
    assert trainer.cfg.model.kind == "flux" and trainer.model.pipeline is pipe
    summary = trainer.train()
    assert summary["counters"]["optimizer_steps"] == 1 and seen and seen[0][0] == torch.float32


def test_readme_python_example_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accuracy, rest = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert 0.0 <= float(accuracy) <= 1.0 and "before_after.png" in rest
    assert (tmp_path / "runs" / "api" / "final").is_dir()
