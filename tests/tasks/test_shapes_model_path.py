"""`eval` / `sample` read a training checkpoint or run folder as `model.path` (full fine-tune and LoRA weights
on the run's base model), and refuse other folders in one line (exit 2)."""

import shutil

import pytest
import torch

from tempflow_fast import cli
from tempflow_fast.models.tiny_flux import TinyFluxAdapter, load_shipped
from tempflow_fast.tasks.shapes.model_folder import load_model
from tempflow_fast.training.cli import main as train_main

RUN = ["method=flow_grpo", "train.iterations=1", "train.prompts_per_iteration=1", "flow_grpo.group_size=3",
       "sampling.num_steps=3", "log.progress=false", "log.tensorboard=false", "eval.images_per_prompt=1",
       "eval.num_steps=2", "checkpoint.every=1", "train.learning_rate=1e-3", "train.clip_range=0.2",
       "reward.name=jpeg_compressibility"]  # continuous, so the group has spread and a step is taken


def _train(out, *extra):
    args = []
    for s in [f"output_dir={out}", *RUN, *extra]:
        args += ["--set", s]
    assert train_main(args) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"full": _train(root / "full"), "lora": _train(root / "lora", "train.lora.enabled=true")}


def _state(model):
    return {k: v.detach().float() for k, v in model.module.state_dict().items()}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_checkpoint_loads_the_trained_weights(runs, kind):
    run = runs[kind]
    messages = []
    from_checkpoint = _state(load_model(run / "checkpoints" / "iter-000001", report=messages.append))
    exported = _state(TinyFluxAdapter.from_pretrained(run / "final"))  # the same weights, exported by the trainer
    shipped = _state(load_shipped())
    assert from_checkpoint.keys() == exported.keys() == shipped.keys()
    for name in exported:
        torch.testing.assert_close(from_checkpoint[name], exported[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(from_checkpoint[n], shipped[n]) for n in shipped)  # training moved them
    assert "iteration 1" in messages[0] and (("LoRA merged" in messages[0]) == (kind == "lora"))


def test_run_folder_reads_final_else_the_newest_checkpoint(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    messages = []
    load_model(run, report=messages.append)
    assert messages == [f"[tempflow-fast] model: {run / 'final'}"]
    shutil.rmtree(run / "final")
    messages.clear()
    load_model(run, report=messages.append)
    assert "checkpoint" in messages[0] and "iter-000001" in messages[0]


def test_eval_and_sample_accept_a_checkpoint(runs, tmp_path, capsys):
    checkpoint = runs["lora"] / "checkpoints" / "iter-000001"
    assert cli.main(["eval", "--set", f"model.path={checkpoint}", "--set", "eval.images_per_prompt=1",
                     "--set", "eval.num_steps=2", "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--prompt", "a red square", "--out", str(out), "--n", "2", "--steps", "2",
                     "--set", f"model.path={runs['full']}"]) == 0
    assert out.is_file()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_folder_without_a_model_is_one_line(tmp_path, capsys, command):
    (tmp_path / "notes.txt").write_text("no weights here")
    extra = ["--out", str(tmp_path / "g.png")] if command == "sample" else []
    assert cli.main([command, "--set", f"model.path={tmp_path}", *extra]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"tempflow-fast {command}: model.path") and "holds no model" in line
    assert "training checkpoint" in line and "output_dir" in line
    assert cli.main([command, "--set", f"model.path={tmp_path / 'missing'}", *extra]) == 2
    assert "no such folder" in _one_line(capsys)


def test_a_torn_checkpoint_is_one_line(runs, tmp_path, capsys):
    checkpoint = tmp_path / "iter-000001"
    shutil.copytree(runs["full"] / "checkpoints" / "iter-000001", checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"torn")
    assert cli.main(["eval", "--set", f"model.path={checkpoint}"]) == 2
    assert "model.safetensors" in _one_line(capsys)
