"""Issue 6's user path: a FLUX or SD3 pipeline folder and a reward-model folder given by path, trained from a
config through the CLI exactly as a user would (`tempflow-fast train --config ... --set model.path=...`)."""

import json

import pytest

from tempflow_fast.training.cli import main as train_main
from tests.models.tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline
from tests.rewards.tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_models")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a road\ntwo dogs playing\n")
    return {
        "flux": make_tiny_flux_pipeline(root / "flux"),
        "sd3": make_tiny_sd3_pipeline(root / "sd3"),
        "pickscore": save_tiny_clip(root / "pickscore"),
        "prompts": prompts,
    }


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("method", ["flow_grpo", "tempflow", "g2rpo"])
def test_train_two_iterations_from_pipeline_folder(tmp_path, folders, kind, method):
    out = tmp_path / "run"
    argv = ["--set", f"method={method}", "--set", f"output_dir={out}", "--set", f"model.kind={kind}",
            "--set", f"model.path={folders[kind]}", "--set", "model.dtype=float32", "--set", "model.device=cpu",
            "--set", "model.max_sequence_length=16", "--set", "model.resolution=32", "--set", "reward.name=pickscore",
            "--set", f"reward.path={folders['pickscore']}", "--set", "reward.device=cpu",
            "--set", f"data.train_prompts={folders['prompts']}", "--set", f"data.eval_prompts={folders['prompts']}",
            "--set", "eval.images_per_prompt=1", "--set", "eval.num_steps=4",
            "--set", "train.iterations=2", "--set", "train.prompts_per_iteration=2", "--set", "sampling.num_steps=4",
            "--set", "tempflow.num_seeds=2", "--set", "tempflow.branches=2", "--set", "flow_grpo.group_size=3",
            "--set", "g2rpo.branches=3", "--set", "g2rpo.granularities=[1,2]",
            "--set", "train.lora.enabled=true", "--set", "train.lora.rank=4", "--set", "train.lora.alpha=8",
            "--set", "train.lora.target_modules=[to_q,to_k,to_v]", "--set", "train.beta=0.01",
            "--set", "log.progress=false", "--set", "log.tensorboard=false"]
    assert train_main(argv) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    it_rows = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in it_rows] == [1, 2]
    assert all(r["trained_samples"] > 0 for r in it_rows)  # PickScore is continuous: every group has spread
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"]["optimizer_steps"] == 2 and summary["eval_metric"] == "held-out reward"
    assert (out / "final").is_dir() and (out / "checkpoints").is_dir()
