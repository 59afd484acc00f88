"""Every Triton kernel compiles ahead of time to cubin for sm_80 and sm_90 on this machine
(design.md §6), through the command users run, `python -m tempflow_fast.kernels.aot`.

It runs in a fresh process without TRITON_INTERPRET: Triton 3.9's interpreter patches
triton.language.core when a kernel calls a @triton.jit helper and does not undo it
(InterpretedFunction.__call__), so after the interpreter tests an in-process compile lowers through
the interpreter's builder and fails ('value' object has no attribute 'dtype')."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tempflow_fast.kernels import aot  # noqa: E402


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tempflow_fast.kernels.aot"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " sm_" in line]
    assert len(lines) == len(aot._variants()) * len(aot.ARCHS)
    kernels = {v.fn_name for v in aot._variants()}
    from tempflow_fast.kernels import flow_grpo

    defined = {name for name in dir(flow_grpo) if name.endswith("_kernel")}
    assert kernels == defined, f"kernels without an AOT variant: {defined - kernels}"
    for line in lines:
        assert " ok " in line and ("registers " in line)


def test_a_broken_kernel_is_reported_and_fails(monkeypatch):
    bad = aot.Variant("sq_dist_partial_kernel[missing-constexpr]", "sq_dist_partial_kernel",
                      {"samples_ptr": "*fp32"}, {})
    monkeypatch.setattr(aot, "_variants", lambda: [bad])
    assert aot.main(["--arch", "90"]) == 1
