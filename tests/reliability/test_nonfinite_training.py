"""Non-finite values during training (issue 18 items 1 and 2): an update that would leave a NaN / inf weight is
undone (weights and AdamW state as before it) and counted as skipped; a model whose outputs overflow is caught at
the rollout; a NaN reward skips the update and, past train.max_nonfinite_skips, stops the run with one line on
every op backend; a failing reward (a server answering NaN) stops the run with one line naming it; a model file
with NaN weights is refused naming the file."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from tempflow_fast.models import tiny_flux
from tempflow_fast.tasks.shapes.task import new_model
from tempflow_fast.ops.testing import require
from tempflow_fast.rewards import RewardHTTPServer
from tempflow_fast.training import trainer as trainer_mod

from .runs import SMALL, BrightnessReward, assert_same_weights, one_line_error, small_trainer, train_cli, weights


def _optimizer_state(trainer):
    return copy.deepcopy(trainer.optimizer.state_dict())


def _assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if isinstance(v, torch.Tensor) else v == b["state"][i][k]


def test_a_step_that_leaves_a_nan_weight_is_undone_and_counted(tmp_path, monkeypatch):
    tr = small_trainer(tmp_path)
    tr.run_iteration(0)  # a real step first, so AdamW has moments to restore
    before_w, before_opt = weights(tr), _optimizer_state(tr)
    real_step = tr.optimizer.step

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            tr.named_params[0][1].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(tr.optimizer, "step", poisoned_step)
    m = tr.run_iteration(1)
    assert m["skipped_nonfinite"] == 1 and tr.counters.skipped_nonfinite == 1
    assert_same_weights(weights(tr), before_w)
    _assert_same_optimizer_state(_optimizer_state(tr), before_opt)
    monkeypatch.setattr(tr.optimizer, "step", real_step)
    assert tr.run_iteration(2)["skipped_nonfinite"] == 0  # the run goes on from the restored weights
    assert all(torch.isfinite(p).all() for _, p in tr.named_params)


def test_the_first_step_undone_leaves_no_optimizer_state(tmp_path, monkeypatch):
    tr = small_trainer(tmp_path)
    before = weights(tr)
    real_step = tr.optimizer.step

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            tr.named_params[-1][1].fill_(float("inf"))
        return out

    monkeypatch.setattr(tr.optimizer, "step", poisoned_step)
    assert tr.run_iteration(0)["skipped_nonfinite"] == 1
    assert_same_weights(weights(tr), before)
    assert len(tr.optimizer.state) == 0  # as before any step: AdamW starts afresh at the next one


def test_a_learning_rate_whose_step_overflows_is_undone(tmp_path):
    """lr = 1e38: AdamW's bias-corrected step size exceeds fp32 midway through its step (half the weights moved)."""
    tr = small_trainer(tmp_path, "train.learning_rate=1e38")
    before = weights(tr)
    m = tr.run_iteration(0)
    assert m["skipped_nonfinite"] == 1 and tr.counters.optimizer_steps == 0
    assert_same_weights(weights(tr), before)


def test_a_model_whose_outputs_overflow_is_caught_at_the_rollout(tmp_path):
    """lr = 1e30 leaves finite weights of ~1e30 whose rollouts are NaN; a reward that scores NaN images 0 (as the
    shapes detector does) gives no group any spread, so no loss is computed: the rollout check counts the skip."""

    class ZeroForNaN(BrightnessReward):
        def __call__(self, images, prompts):
            return torch.nan_to_num(super().__call__(images, prompts), nan=0.0)

    tr = small_trainer(tmp_path, "train.learning_rate=1e30", "train.max_nonfinite_skips=1", reward=ZeroForNaN())
    assert tr.run_iteration(0)["skipped_nonfinite"] == 0  # this step is finite: weights of ~1e30
    m = tr.run_iteration(1)
    assert m["skipped_nonfinite"] == 1 and m["trained_samples"] == 0
    with pytest.raises(trainer_mod.NonFiniteAbort, match="rollout's latents are not finite"):
        tr.run_iteration(2)


NAN_REWARD_RUN = """
import sys
import tempflow_fast.ops as ops
from tempflow_fast.training.cli import main


class NaNReward:
    name = "nan-in-one-image"
    accepts_uint8 = False

    def __call__(self, images, prompts):
        r = images.float().mean(dim=(1, 2, 3))
        r[0] = float("nan")
        return r


from tempflow_fast.tasks.shapes.task import ShapesTask

ShapesTask.build_reward = lambda self, cfg: NaNReward()
print("backend", ops.active_backend(sys.argv[2]), flush=True)
sets = ["output_dir=" + sys.argv[1], "model.device=" + sys.argv[2], "method=flow_grpo", "train.iterations=3",
        "train.prompts_per_iteration=1", "flow_grpo.group_size=3", "sampling.num_steps=3", "log.progress=false",
        "log.tensorboard=false", "train.max_nonfinite_skips=1", "eval.images_per_prompt=1", "eval.num_steps=2"]
sys.exit(main([a for s in sets for a in ("--set", s)]))
"""


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_nan_reward_skips_then_stops_with_one_line_on_every_backend(tmp_path, backend):
    """Issue 18's must-show: the fused loss of each backend turns the NaN advantage into a NaN loss, the update is
    skipped, and past train.max_nonfinite_skips = 1 the run stops (exit 1) with one line and no traceback.
    Triton runs through the interpreter on a machine without CUDA."""
    device = require(backend)
    env = dict(os.environ, TEMPFLOW_FAST_BACKEND=backend)
    if backend == "triton" and device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", NAN_REWARD_RUN, str(tmp_path / "run"), device.type], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"backend {backend}" in proc.stdout
    assert "iteration 1: non-finite loss" in proc.stdout and "update skipped (1/1 allowed)" in proc.stdout
    assert "iteration 2: non-finite loss" in proc.stdout and "iteration 3" not in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith("tempflow-fast train: stopped: 2 updates skipped") and "max_nonfinite_skips" in err[0]
    assert not (tmp_path / "run" / "final").exists()  # no model exported from a run that stopped


class NaNScores:
    accepts_uint8 = True

    def __call__(self, images, prompts):
        return torch.full((len(images),), float("nan"))


def test_a_reward_server_answering_nan_stops_the_run_in_one_line_naming_it(tmp_path, capsys):
    with RewardHTTPServer(NaNScores()) as server:
        rc = train_cli(tmp_path / "run", "reward.name=server", f"reward.url={server.url}", "reward.retries=0",
                       "reward.image_format=png", "reward.timeout_s=30")
    assert rc == 1
    line = one_line_error(capsys)
    assert line.startswith("tempflow-fast train: stopped: iteration 1: the reward") and server.url in line, line
    assert "finite" in line.lower() or "nan" in line.lower(), line


def test_a_reward_that_raises_stops_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    class Broken:
        name = "broken"

        def __call__(self, images, prompts):
            raise RuntimeError("the scorer's GPU fell off the bus")

    from tempflow_fast.tasks.shapes.task import ShapesTask

    monkeypatch.setattr(ShapesTask, "build_reward", lambda self, cfg: Broken())
    assert train_cli(tmp_path / "run") == 1
    line = one_line_error(capsys)
    assert "the reward 'broken' failed" in line and "fell off the bus" in line, line


def _nan_model(folder):
    model = new_model(seed=0, transformer_config=SMALL)
    with torch.no_grad():
        next(model.module.parameters()).view(-1)[3] = float("nan")
    model.save_pretrained(folder)
    return folder / tiny_flux.WEIGHTS_NAME


def test_a_model_file_with_nan_weights_is_refused_naming_the_file(tmp_path, capsys):
    weights_file = _nan_model(tmp_path / "nan_model")
    with pytest.raises(ValueError, match="non-finite"):
        tiny_flux.load(tmp_path / "nan_model")
    assert train_cli(tmp_path / "run", f"model.path={tmp_path / 'nan_model'}") == 2
    line = one_line_error(capsys)
    assert str(weights_file) in line and "non-finite" in line, line


def test_a_pipeline_component_with_inf_weights_is_refused_naming_it():
    from tempflow_fast.models.loading import _check_pipeline_weights

    class Pipeline:
        def __init__(self):
            self.components = {"transformer": torch.nn.Linear(2, 2), "vae": torch.nn.Linear(2, 2), "scheduler": 1}

    class Adapter:
        pipeline = Pipeline()
        module = pipeline.components["transformer"]

    _check_pipeline_weights(Adapter, "/models/flux")  # all finite: accepted
    with torch.no_grad():
        Adapter.pipeline.components["vae"].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"model '/models/flux', vae/: weight 'bias' holds 1 non-finite"):
        _check_pipeline_weights(Adapter, "/models/flux")



def test_too_large_a_trainable_state_to_copy_stops_instead_of_undoing(tmp_path, monkeypatch):
    """Above the snapshot limit (full fine-tunes of real models: 12 bytes per weight per step) nothing is copied
    before a step; a step that leaves non-finite weights then stops the run with one message."""
    from tempflow_fast.training.distributed import NonFiniteWeights

    tr = small_trainer(tmp_path, "train.learning_rate=1e38")
    monkeypatch.setattr(tr._step_snapshot, "max_bytes", 1)
    assert tr._step_snapshot.take() is False
    with pytest.raises(NonFiniteWeights, match="too large to keep a pre-step copy.*train.learning_rate"):
        tr.run_iteration(0)
