"""Common mistakes end in one line on stderr and exit status 2, not a traceback (issue: a newcomer's first hour)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tempflow_fast.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _one_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_malformed_yaml_is_one_line_exit_2(tmp_path, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\nseed: 1\n")
    proc = _cli(command, "--config", str(bad))
    assert proc.returncode == 2
    line = _one_line(proc)
    assert line.startswith(f"tempflow-fast {command}: --config {str(bad)!r}: not valid YAML (line ")


def test_train_output_dir_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder would go")
    proc = _cli("train", "--config", str(REPO / "configs" / "shapes_tempflow.yaml"), "--set", f"output_dir={blocker}")
    assert proc.returncode == 2  # was a FileExistsError traceback after the model had loaded
    assert _one_line(proc) == (f"tempflow-fast train: output_dir {str(blocker)!r} is a file, not a folder; "
                               "choose another output_dir")
    assert blocker.read_text() == "a file where the run folder would go"


def test_unknown_field_is_named_by_its_dotted_path(tmp_path):
    proc = _cli("train", "--set", "train.lr=1e-4", "--set", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert _one_line(proc).startswith("tempflow-fast train: unknown config field 'train.lr' in section 'train'; "
                                      "known fields: [")
