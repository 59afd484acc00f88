"""Qwen-Image through the CLI as a user would run it: a pipeline folder given by path, two iterations of training
(true CFG rollouts, LoRA update with a KL reference), the --dry-run memory plan, and the prompt-file rule."""

import json

import pytest

from tempflow_fast.training.cli import main as train_main
from tests.models.tiny_qwen_image import make_tiny_qwen_image_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_train")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a road\ntwo dogs playing\n")
    return {"qwen": make_tiny_qwen_image_pipeline(root / "qwen"), "prompts": prompts}


def _argv(out, folders, *extra):
    sets = [f"output_dir={out}", "model.kind=qwen_image", f"model.path={folders['qwen']}", "model.dtype=float32",
            "model.device=cpu", "model.max_sequence_length=16", "model.resolution=32",
            "reward.name=jpeg_compressibility", f"data.train_prompts={folders['prompts']}",
            f"data.eval_prompts={folders['prompts']}", "eval.images_per_prompt=1", "eval.num_steps=3",
            "train.iterations=2", "train.prompts_per_iteration=2", "sampling.num_steps=4", "tempflow.num_seeds=2",
            "tempflow.branches=2", "flow_grpo.group_size=3", "train.lora.enabled=true", "train.lora.rank=4",
            "train.lora.alpha=8", "train.beta=0.01", "log.progress=false", "log.tensorboard=false", *extra]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("method", ["tempflow", "flow_grpo"])
def test_train_two_iterations_from_a_qwen_image_folder(tmp_path, folders, method):
    out = tmp_path / "run"
    assert train_main(_argv(out, folders, f"method={method}")) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    it_rows = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in it_rows] == [1, 2]
    assert all(r["trained_samples"] > 0 for r in it_rows)  # JPEG size is continuous: every group has spread
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"]["optimizer_steps"] == 2 and summary["eval_metric"] == "held-out reward"
    assert (out / "final" / "model_index.json").is_file()  # the LoRA-merged pipeline, loadable as model.path


def test_dry_run_counts_two_transformer_rows_per_latent_row(tmp_path, folders, capsys):
    assert train_main([*_argv(tmp_path / "run", folders, "method=tempflow"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = int(next(l for l in out.splitlines() if l.strip().startswith("total") and l.endswith(" rows"))
                .split()[1].replace(",", ""))
    cfg_rows = int(next(l for l in out.splitlines() if "transformer rows (x2 with CFG)" in l).split()[-2]
                   .replace(",", ""))
    assert cfg_rows == 2 * total > 0 and "peak memory:" in out and "tokens per row: 16 image + 16 text" in out
    assert not (tmp_path / "run").exists()


def test_without_a_prompt_file_it_is_refused(tmp_path, folders, capsys):
    assert train_main(["--set", "model.kind=qwen_image", "--set", f"model.path={folders['qwen']}",
                       "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "config field 'data.train_prompts'" in err and "model.kind 'qwen_image'" in err
