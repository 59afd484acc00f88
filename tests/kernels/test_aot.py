"""Every Triton kernel compiles ahead of time to cubin for sm_80 and sm_90 on this machine
(design.md §6), through the same function `python -m tempflow_fast.kernels.aot` runs."""

import io

import pytest

pytest.importorskip("triton")

from tempflow_fast.kernels import aot  # noqa: E402


def test_every_kernel_compiles_for_sm80_and_sm90():
    out = io.StringIO()
    failures = aot.compile_all(aot.ARCHS, out=out)
    lines = out.getvalue().splitlines()
    assert not failures, out.getvalue()
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
