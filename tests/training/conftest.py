import pytest
from tempflow_fast.tasks.shapes.task import new_model

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


class BrightnessReward:
    """A continuous reward, so every group has spread and every sample is trained."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)).float()


def no_eval(model):
    return {"overall": {"accuracy": 0.0}}


@pytest.fixture
def small_model():
    return new_model(seed=0, transformer_config=SMALL)


def small_overrides(method, out, *extra):
    return [
        f"method={method}", f"output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2",
        "log.progress=false", "log.tensorboard=false", "sampling.num_steps=4",
        "tempflow.num_seeds=2", "tempflow.branches=3", "flow_grpo.group_size=4", "g2rpo.branches=3",
        "g2rpo.granularities=[1,2]", "stepwise.group_size=3", "train.learning_rate=1e-3", "train.clip_range=0.2",
        "eval.probe_prompts=2", "eval.probe_images=1", *extra,
    ]


@pytest.fixture
def make_trainer():
    """make_trainer(out_dir, method, *overrides, resume=False) -> Trainer on a fresh small random model."""
    from tempflow_fast.config import load_config
    from tempflow_fast.training.train_config import Config
    from tempflow_fast.training.trainer import Trainer

    def make(out, method, *extra, resume=False):
        cfg = load_config(Config, None, small_overrides(method, out, *extra))
        model = new_model(seed=0, transformer_config=SMALL)
        return Trainer(cfg, model=model, reward=BrightnessReward(), eval_fn=no_eval, resume=resume)

    return make
