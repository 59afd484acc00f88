"""The trainer runs on the rewards built here: a tiny PickScore folder loaded by path, and the same
model behind the reference HTTP server, each for 2 flow_grpo iterations (the lead wires `reward:`
into the training config; this checks the interface fits `Trainer(reward=...)` as it stands)."""

import json

import pytest

from tempflow_fast.config import load_config
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.rewards import RewardConfig, RewardHTTPServer, build_reward
from tempflow_fast.training.train_config import Config
from tempflow_fast.training.trainer import Trainer

from .tiny_models import save_tiny_clip

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_pickscore"))


def _train(out, reward):
    cfg = load_config(Config, None, [
        "method=flow_grpo", f"output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2",
        "log.progress=false", "log.tensorboard=false", "sampling.num_steps=4", "flow_grpo.group_size=4",
        "train.learning_rate=1e-3", "train.clip_range=0.2"])
    model = new_model(seed=0, transformer_config=SMALL)
    trainer = Trainer(cfg, model=model, reward=reward, eval_fn=lambda m: {"overall": {"accuracy": 0.0}})
    summary = trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


@pytest.mark.parametrize("where", ["in_process", "server"])
def test_flow_grpo_trains_two_iterations_on_pickscore(tmp_path, clip_dir, where):
    reward = build_reward(RewardConfig(name="pickscore", path=str(clip_dir), device="cpu"))
    if where == "in_process":
        summary, rows = _train(tmp_path, reward)
    else:
        with RewardHTTPServer(reward) as server:
            client = build_reward(RewardConfig(name="server", url=server.url, image_format="png", timeout_s=30,
                                               retries=1, backoff_s=0.1))
            summary, rows = _train(tmp_path, client)
    assert summary["counters"]["optimizer_steps"] == 2
    assert [r["iteration"] for r in rows] == [1, 2]
    # PickScore is continuous: every group has spread, so every sample is trained
    assert all(r["zero_std_ratio"] == 0.0 and r["trained_samples"] > 0 for r in rows)
