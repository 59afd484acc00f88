"""`tempflow-fast demo-ops` runs and reports the backend it used, on the machine's default device
(the GPU where there is one), and refuses a backend that cannot run with one line and exit 2."""

import os
import subprocess
import sys

import pytest
import torch

from tempflow_fast.ops import demo
from tempflow_fast.ops.testing import require

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ["--n", "2", "--k", "3", "--tokens", "16", "--channels", "4"]


def test_demo_runs_on_the_reference_backend(capsys):
    assert demo.main(["--backend", "torch", *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"backend: torch on {DEVICE}" in out
    assert "fused_flow_grpo_loss: loss" in out and "dL/dmean norm" in out


def test_demo_runs_on_triton(capsys):
    device = require("triton")  # the GPU, or the interpreter on CPU (conftest)
    assert demo.main(["--backend", "triton", "--device", str(device), *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"backend: triton on {device}" in out and "dL/dmean norm" in out


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TEMPFLOW_FAST_BACKEND")}
    return subprocess.run([sys.executable, "-m", "tempflow_fast.cli", "demo-ops", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_triton_on_cpu_without_the_interpreter_is_one_line_exit_2():
    proc = _cli("--backend", "triton", "--device", "cpu", *SMALL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tempflow-fast demo-ops: ")
    assert "'triton'" in lines[0] and "TRITON_INTERPRET=1" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the demo runs there")
def test_cuda_device_without_cuda_is_one_line_exit_2():
    proc = _cli("--device", "cuda", *SMALL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("tempflow-fast demo-ops: --device cuda: CUDA is not available on this machine "
                                   "(use --device cpu)")


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be >= 1, got 0"),  # was the op's "sample is empty" traceback
    (["--k", "-1"], "--k must be >= 1, got -1"),  # was torch's "Repeats must be non-negative"
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
])
def test_bad_sizes_and_devices_are_one_line_exit_2(capsys, flags, message):
    assert demo.main([*SMALL, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"tempflow-fast demo-ops: {message}" and captured.out == ""


def test_device_auto_is_the_machines_default(capsys):
    assert demo.main(["--backend", "torch", "--device", "auto", *SMALL]) == 0
    assert f"backend: torch on {DEVICE}" in capsys.readouterr().out
