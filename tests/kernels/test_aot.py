"""Every Triton kernel compiles ahead of time to cubin for sm_80 and sm_90 on this machine
(design.md §6), through the command users run, `python -m tempflow_fast.kernels.aot`.

It runs in a fresh process without TRITON_INTERPRET: Triton 3.9's interpreter patches
triton.language.core when a kernel calls a @triton.jit helper and does not undo it
(InterpretedFunction.__call__), so after the interpreter tests an in-process compile lowers through
the interpreter's builder and fails ('value' object has no attribute 'dtype')."""

import os
import re
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
    variants = aot._variants()
    assert len(lines) == len(variants) * len(aot.ARCHS)
    kernels = {v.fn_name for v in variants}
    from tempflow_fast.kernels import flow_grpo

    defined = {name for name in dir(flow_grpo) if name.endswith("_kernel")}
    assert kernels == defined, f"kernels without an AOT variant: {defined - kernels}"
    by_name = {v.name: v for v in variants}
    for line in lines:
        assert " ok " in line and ("registers " in line)
        # the compiled TTIR carries a divisibility hint on exactly the arguments that were given one,
        # and the report has the launch's shared memory from the compiled metadata
        name = line.split()[0]
        hints = re.search(r"div16 args (\d+)", line)
        assert hints and int(hints.group(1)) == len(by_name[name].hints) > 0, line
        assert re.search(r"shared \(launch\) \d+ B", line), line


def test_variants_are_specialised_as_the_runtime_launches_them():
    """Pointers (16-byte aligned, as torch allocates) and ints divisible by 16 carry
    tt.divisibility = 16, an int equal to 1 is a constexpr, as Triton's runtime does; K = 6
    (TempFlow) and K = 12 (G²RPO) are both compiled for every kernel whose tiling depends on K."""
    variants = aot._variants()
    for v in variants:
        pointers = {a for a, ty in v.signature.items() if ty.startswith("*")}
        assert pointers and pointers <= set(v.hints), f"{v.name}: pointers without a hint: {pointers - set(v.hints)}"
        if "D" in v.signature:
            assert "D" in v.hints, v.name  # D = 4096·64
    for kernel in ("sq_dist_partial_kernel", "flow_grpo_loss_bwd_kernel", "gaussian_log_prob_bwd_kernel",
                   "flow_grpo_loss_finalize_kernel", "logp_finalize_kernel"):
        for k in aot.BRANCHES:
            assert any(v.fn_name == kernel and f"K={k}" in v.name for v in variants), f"{kernel} without K={k}"
    by_name = {v.name: v for v in variants}
    assert by_name["logp_finalize_kernel[sde,K=1]"].constexprs["K"] == 1 and "K" not in by_name[
        "logp_finalize_kernel[sde,K=1]"].signature
    assert "NK" in by_name["logp_finalize_kernel[K=12]"].hints  # 4·12 = 48
    assert "NK" in by_name["logp_finalize_kernel[K=6]"].signature and "NK" not in by_name[
        "logp_finalize_kernel[K=6]"].hints  # 4·6 = 24
    assert by_name["sq_dist_partial_kernel[bf16,K=12,ref]"].signature["samples_ptr"] == "*bf16"


def test_a_broken_kernel_is_reported_and_fails(monkeypatch):
    bad = aot.Variant("sq_dist_partial_kernel[missing-constexpr]", "sq_dist_partial_kernel",
                      {"samples_ptr": "*fp32"}, {})
    monkeypatch.setattr(aot, "_variants", lambda: [bad])
    assert aot.main(["--arch", "90"]) == 1
