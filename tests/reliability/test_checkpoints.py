"""Safe checkpoints (issue 18 item 5): state.pt is plain data read with weights_only=True (a crafted one that would
run code is refused unread); a corrupt or partial newest checkpoint falls back to the previous one with a message
naming both; a torn last metrics line is dropped on resume; .tmp folders are removed at start and end; pruning
removes COMPLETE first; a disk-full write leaves no .tmp and stops the run in one line."""

import errno
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tempflow_fast.training import checkpoint as ckpt

from .runs import (assert_same_weights, forbid_model_load, metrics_rows, one_line_error, small_trainer,
                   train_cli, weights)


def _two_checkpoints(out):
    """A run of 2 iterations with a checkpoint after each; returns (weights after 1, after 2)."""
    tr = small_trainer(out, "checkpoint.keep_last=3")
    tr.run_iteration(0)
    tr.iteration = 1
    tr.save()
    after_1 = weights(tr)
    tr.run_iteration(1)
    tr.iteration = 2
    tr.save()
    after_2 = weights(tr)
    tr.close()
    return after_1, after_2


def test_state_pt_loads_with_weights_only(tmp_path):
    tr = small_trainer(tmp_path)
    tr.run_iteration(0)
    tr.iteration = 1
    path = tr.save()
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["iteration"] == 1 and state["optimizer"]["state"] and isinstance(state["rng"]["python"]["state"],
                                                                                   torch.Tensor)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_states_round_trip_through_tensors():
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of both states
    state = ckpt.rng_state()
    want = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
           torch.rand(3).tolist())
    assert got == want


def test_state_that_a_weights_only_load_would_refuse_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['bad'\]: a PosixPath cannot go into state.pt"):
        ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, state={"iteration": 1, "bad": Path(".")},
                             config_yaml="")
    assert list(tmp_path.iterdir()) == []
    saved = ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, config_yaml="",
                                 state={"iteration": 1, "x": np.float64(0.5), "a": np.arange(3)})
    state = ckpt.load_checkpoint(saved)["state"]
    assert type(state["x"]) is float and torch.equal(state["a"], torch.arange(3))


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): code run by loading a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_state_pt_is_refused_on_resume_and_runs_nothing(tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    _two_checkpoints(out)
    newest = ckpt.latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "pwned"
    state = torch.load(newest / "state.pt", weights_only=True)
    state["counters"]["extra"] = _WritesMarker(marker)
    with open(newest / "state.pt", "wb") as fh:
        torch.save(state, fh)
    # keep COMPLETE's size listing true, as an attacker would
    listing = (newest / "COMPLETE").read_text().splitlines()
    listing = [f"state.pt {(newest / 'state.pt').stat().st_size}" if l.startswith("state.pt ") else l for l in listing]
    (newest / "COMPLETE").write_text("\n".join(listing) + "\n")
    assert train_cli(out, "method=flow_grpo", "train.iterations=3", "train.prompts_per_iteration=2",
                     "flow_grpo.group_size=4", "sampling.num_steps=4", "checkpoint.keep_last=3",
                     flags=["--resume"]) == 2
    line = one_line_error(capsys)
    assert "global io.open" in line and "would run code" in line and str(newest) in line, line
    assert not marker.exists()
    assert newest.is_dir()  # left where it is for the user to look at


RESUME = ("train.iterations=3", "checkpoint.keep_last=3")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garble(path):
    """Overwrite the file's header (a flip inside tensor data keeps every size and format intact: checkpoints carry
    no checksums, docs/reliability.md)."""
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def _nan_weight(newest):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(newest / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(newest / "model.safetensors"))


CORRUPTIONS = {
    "truncated state.pt": lambda c: _truncate(c / "state.pt"),
    "garbled state.pt": lambda c: _garble(c / "state.pt"),
    "garbled model.safetensors": lambda c: _garble(c / "model.safetensors"),
    "truncated model.safetensors": lambda c: _truncate(c / "model.safetensors"),
    "missing model.safetensors": lambda c: (c / "model.safetensors").unlink(),
    "config.yaml not YAML": lambda c: (c / "config.yaml").write_text("seed: [unclosed\n"),
    "NaN weights": _nan_weight,
    "empty state.pt": lambda c: (c / "state.pt").write_bytes(b""),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, kind):
    out = tmp_path / "run"
    after_1, _ = _two_checkpoints(out)
    newest = out / "checkpoints" / "iter-000002"
    CORRUPTIONS[kind](newest)
    resumed = small_trainer(out, *RESUME, resume=True)
    stdout = capsys.readouterr().out
    assert f"checkpoint '{newest}'" in stdout and f"previous complete checkpoint '{newest.with_name('iter-000001')}'" \
        in stdout, stdout
    assert resumed.iteration == 1
    assert_same_weights(weights(resumed), after_1)
    assert not newest.exists() and newest.with_name("iter-000002.corrupt").is_dir()  # set aside, not pruned into
    resumed.run_iteration(1)
    resumed.iteration = 2
    resumed.save()
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["iter-000001", "iter-000002"]
    resumed.close()


def test_no_loadable_checkpoint_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train_cli(out, "train.iterations=1") == 0
    _truncate(out / "checkpoints" / "iter-000001" / "state.pt")
    forbid_model_load(monkeypatch)
    assert train_cli(out, flags=["--resume"]) == 2
    line = one_line_error(capsys)
    assert "no loadable checkpoint" in line and "state.pt" in line, line


def test_the_resumed_run_continues_exactly_after_a_fallback(tmp_path):
    """From checkpoint 1 (checkpoint 2 corrupt), iteration 2 gives the weights the uninterrupted run had."""
    out = tmp_path / "run"
    _, after_2 = _two_checkpoints(out)
    _truncate(out / "checkpoints" / "iter-000002" / "model.safetensors")
    resumed = small_trainer(out, *RESUME, resume=True)
    resumed.run_iteration(1)
    assert_same_weights(weights(resumed), after_2)
    resumed.close()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "train.iterations=1") == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 2, "reward_mean": 0.4')  # killed mid-write
    assert train_cli(out, "train.iterations=2", flags=["--resume"]) == 0
    assert "dropped 1 torn line" in capsys.readouterr().out
    rows = metrics_rows(out)  # every line parses
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2]


def test_unfinished_checkpoint_folders_are_removed_at_start_and_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train_cli(out, "train.iterations=1") == 0
    root = out / "checkpoints"
    for name in ("iter-000002.tmp-4242", "iter-000002.staging"):
        (root / name).mkdir()
        (root / name / "state.pt").write_bytes(b"partial")
    assert train_cli(out, "train.iterations=2", flags=["--resume"]) == 0
    assert "removed 2 unfinished checkpoint folder(s)" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001", "iter-000002"]
    # at the end: a temporary folder written during the run (here by a save that failed midway) is gone too
    real_save = ckpt.save_checkpoint

    def leaves_tmp(root_, iteration, **kwargs):
        (Path(root_) / f"iter-{iteration:06d}.tmp-99999").mkdir(exist_ok=True)
        return real_save(root_, iteration, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", leaves_tmp)
    assert train_cli(out, "train.iterations=3", flags=["--resume"]) == 0
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_pruning_removes_complete_before_the_files(tmp_path, monkeypatch):
    for it in (1, 2):
        ckpt.save_checkpoint(tmp_path, it, model_state={"w": torch.ones(2)}, state={"iteration": it},
                             config_yaml="", keep_last=2)
    seen = []
    real_rmtree = shutil.rmtree

    def spy(path, *args, **kwargs):
        seen.append((Path(path).name, (Path(path) / "COMPLETE").exists(), (Path(path) / "state.pt").exists()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", spy)
    ckpt.save_checkpoint(tmp_path, 3, model_state={"w": torch.ones(2)}, state={"iteration": 3}, config_yaml="",
                         keep_last=2)
    assert ("iter-000001", False, True) in seen  # the marker was gone while the files were still there


class _DiskFull:
    """torch.save that writes half the file, then fails as a full disk does."""

    def __init__(self, real):
        self.real = real

    def __call__(self, obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))


def test_disk_full_leaves_no_tmp_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, state={"iteration": 1}, config_yaml="")
    monkeypatch.setattr(ckpt.torch, "save", _DiskFull(torch.save))
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device") as err:
        ckpt.save_checkpoint(tmp_path, 2, model_state={"w": torch.zeros(2)}, state={"iteration": 2}, config_yaml="")
    assert "iter-000001" in str(err.value) and "free disk space" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-000001"]
    assert ckpt.load_checkpoint(tmp_path / "iter-000001")["state"]["iteration"] == 1


def test_disk_full_during_a_run_stops_it_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ckpt.torch, "save", _DiskFull(torch.save))
    out = tmp_path / "run"
    assert train_cli(out) == 1
    line = one_line_error(capsys)
    assert line.startswith("tempflow-fast train: stopped: cannot write checkpoint iter-000001") and \
        "No space left on device" in line, line
    assert list((out / "checkpoints").iterdir()) == []
    assert not (out / "run.lock").exists()


def test_a_partial_checkpoint_is_detected_from_the_sizes_complete_lists(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(4)}, state={"iteration": 1},
                                config_yaml="a: 1\n")
    assert "model.safetensors" in (path / "COMPLETE").read_text()
    with open(path / "config.yaml", "a") as fh:
        fh.write("b: 2\n")  # still valid YAML: only the size says it is not what was written
    with pytest.raises(ckpt.CorruptCheckpoint, match="config.yaml is 10 bytes, COMPLETE lists 5"):
        ckpt.load_checkpoint(path)


def test_a_raw_pickle_state_is_refused_unread(tmp_path):
    """Not even torch's zip format: a bare pickle with a code-running reduce is never executed."""
    path = ckpt.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(2)}, state={"iteration": 1}, config_yaml="")
    marker = tmp_path / "pwned"
    (path / "state.pt").write_bytes(pickle.dumps({"iteration": 1, "x": _WritesMarker(marker)}, protocol=2))
    (path / "COMPLETE").write_text("1\n")  # an older-style marker: no sizes to check
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
