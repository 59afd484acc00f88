"""Common mistakes end in one line on stderr and exit status 2, not a traceback (issue: a newcomer's first hour)."""

import subprocess
import sys

import pytest


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
