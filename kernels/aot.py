"""Ahead-of-time compile every Triton kernel to cubin for sm_80 and sm_90 (design.md §6).

    python -m tempflow_fast.kernels.aot [--arch 80 90]

Works without a GPU: `triton.compile` with an explicit GPUTarget runs the whole pipeline
(ttir -> ttgir -> llir -> ptx -> cubin through the bundled ptxas), so it catches what the
interpreter lets through (layouts, dtype rules, register pressure). Prints one line per kernel
variant and architecture with registers, shared memory and spills (local memory) read from
`cuobjdump --dump-resource-usage` when that binary is found, "n/a" otherwise. Exits 1 if any
kernel fails to compile.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)
NUM_WARPS = 4


@dataclass
class Variant:
    name: str
    fn_name: str
    signature: dict
    constexprs: dict


def _variants() -> list[Variant]:
    """Each kernel with its pointer dtypes for fp32 and bf16 latents and every constexpr path the
    launchers in tempflow_fast.ops.triton_backend take (a path never compiled is a path untested)."""
    import triton.language as tl

    from tempflow_fast.ops.triton_backend import _REDUCE_BLOCK, _blocks

    # the block sizes the launchers pick for FLUX-1024 latents (K = 6 branches, D = 4096·64)
    block_k, block_d = _blocks(6, 4096 * 64)
    _, block_d1 = _blocks(1, 4096 * 64)
    f32 = tl.float32
    acc = "*fp32"
    out = []
    for lat in ("fp32", "bf16"):
        p = f"*{lat}"
        for has_ref in (True, False):
            ref = "ref" if has_ref else "no-ref"
            out.append(Variant(
                f"sq_dist_partial_kernel[{lat},{ref}]", "sq_dist_partial_kernel",
                {"samples_ptr": p, "mean_ptr": p, "ref_ptr": p, "part_ptr": acc, "kl_part_ptr": acc,
                 "K": "i32", "D": "i32", "chunk": "i32", "S": "i32"},
                {"HAS_REF": has_ref, "ACC": f32, "BLOCK_K": block_k, "BLOCK_D": block_d}))
            out.append(Variant(
                f"flow_grpo_loss_bwd_kernel[{lat},{ref}]", "flow_grpo_loss_bwd_kernel",
                {"grad_loss_ptr": acc, "samples_ptr": p, "mean_ptr": p, "ref_ptr": p, "std_ptr": acc,
                 "kl_std_ptr": acc, "logp_ptr": acc, "old_ptr": acc, "adv_ptr": acc, "w_ptr": acc,
                 "dmean_ptr": p, "N": "i32", "K": "i32", "D": "i32"},
                {"CLIP": 0.2, "ADV_CLIP": 5.0, "BETA": 0.04, "HAS_REF": has_ref, "ACC": f32, "BLOCK_K": block_k,
                 "BLOCK_D": block_d}))
        out.append(Variant(
            f"gaussian_log_prob_bwd_kernel[{lat}]", "gaussian_log_prob_bwd_kernel",
            {"grad_ptr": acc, "samples_ptr": p, "mean_ptr": p, "std_ptr": acc, "dmean_ptr": p,
             "K": "i32", "D": "i32"},
            {"ACC": f32, "BLOCK_K": block_k, "BLOCK_D": block_d}))
        for given in (False, True):
            out.append(Variant(
                f"sde_step_fwd_kernel[{lat},{'prev_given' if given else 'noise'}]", "sde_step_fwd_kernel",
                {"sample_ptr": p, "velocity_ptr": p, "noise_ptr": p, "prev_in_ptr": p, "a_ptr": acc,
                 "b_ptr": acc, "std_ptr": acc, "prev_ptr": p, "mean_ptr": p, "part_ptr": acc,
                 "D": "i32", "chunk": "i32", "S": "i32"},
                {"PREV_GIVEN": given, "ACC": f32, "BLOCK_D": block_d1}))
            out.append(Variant(
                f"sde_step_bwd_kernel[{lat},{'prev_given' if given else 'noise'}]", "sde_step_bwd_kernel",
                {"grad_prev_ptr": p, "grad_mean_ptr": p, "grad_logp_ptr": acc, "sample_ptr": p,
                 "velocity_ptr": p, "prev_ptr": p, "a_ptr": acc, "b_ptr": acc, "std_ptr": acc,
                 "dsample_ptr": p, "dvelocity_ptr": p, "D": "i32"},
                {"HAS_GRAD_PREV": not given, "HAS_GRAD_MEAN": True, "HAS_GRAD_LOGP": True, "ACC": f32,
                 "BLOCK_D": block_d1}))
    out += [
        Variant("logp_finalize_kernel", "logp_finalize_kernel",
                {"part_ptr": acc, "std_ptr": acc, "logp_ptr": acc, "NK": "i32", "K": "i32", "S": "i32", "D": "i32"},
                {"ACC": f32, "BLOCK": _REDUCE_BLOCK}),
        Variant("grpo_clip_loss_fwd_kernel", "grpo_clip_loss_fwd_kernel",
                {"logp_ptr": acc, "old_ptr": acc, "adv_ptr": acc, "w_ptr": acc, "ratio_ptr": acc,
                 "stats_ptr": acc, "M": "i32"},
                {"CLIP": 0.2, "ADV_CLIP": 5.0, "ACC": f32, "BLOCK": _REDUCE_BLOCK}),
        Variant("grpo_clip_loss_bwd_kernel", "grpo_clip_loss_bwd_kernel",
                {"grad_loss_ptr": acc, "logp_ptr": acc, "old_ptr": acc, "adv_ptr": acc, "w_ptr": acc,
                 "dlogp_ptr": acc, "M": "i32"},
                {"CLIP": 0.2, "ADV_CLIP": 5.0, "ACC": f32, "BLOCK": _REDUCE_BLOCK}),
    ]
    for has_ref in (True, False):
        out.append(Variant(
            f"flow_grpo_loss_finalize_kernel[{'ref' if has_ref else 'no-ref'}]", "flow_grpo_loss_finalize_kernel",
            {"part_ptr": acc, "kl_part_ptr": acc, "std_ptr": acc, "old_ptr": acc, "adv_ptr": acc,
             "w_ptr": acc, "kl_std_ptr": acc, "logp_ptr": acc, "ratio_ptr": acc, "stats_ptr": acc,
             "N": "i32", "K": "i32", "S": "i32", "D": "i32"},
            {"CLIP": 0.2, "ADV_CLIP": 5.0, "BETA": 0.04, "HAS_REF": has_ref, "ACC": f32, "BLOCK": _REDUCE_BLOCK}))
    return out


_compile_module = None


def _kernel_module():
    """A copy of the kernel module built with the interpreter off. Under TRITON_INTERPRET=1 (the
    tests on CPU) the imported module holds interpreter objects, kernels and the @jit helpers they
    call alike, which the compiler cannot lower; this copy holds JITFunctions."""
    global _compile_module
    if _compile_module is None:
        import importlib.util

        from triton import knobs

        from tempflow_fast.kernels import flow_grpo

        spec = importlib.util.spec_from_file_location("tempflow_fast.kernels._flow_grpo_aot", flow_grpo.__file__)
        module = importlib.util.module_from_spec(spec)
        saved = knobs.runtime.interpret
        knobs.runtime.interpret = False
        try:
            spec.loader.exec_module(module)
        finally:
            knobs.runtime.interpret = saved
        _compile_module = module
    return _compile_module


def _jit_function(fn_name: str):
    return getattr(_kernel_module(), fn_name)


def find_cuobjdump() -> str | None:
    import triton

    candidates = [shutil.which("cuobjdump")]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def resource_usage(cubin: bytes, cuobjdump: str | None) -> str:
    if cuobjdump is None:
        return "registers n/a, shared n/a, spills n/a (no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", res.stdout))
    if res.returncode != 0 or "REG" not in fields:
        return f"registers n/a (cuobjdump failed: {res.stderr.strip()[:80]})"
    return (f"registers {fields['REG']}, shared {fields.get('SHARED', '?')} B, "
            f"spills (local) {fields.get('LOCAL', '?')} B, stack {fields.get('STACK', '?')} B")


def compile_variant(variant: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(variant.fn_name)
    signature = dict(variant.signature)
    signature.update({name: "constexpr" for name in variant.constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


def _root_cause(exc: BaseException) -> str:
    """Triton wraps the real error (NameError, type errors) in CompilationErrors showing source."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def compile_all(archs=ARCHS, out=sys.stdout) -> list[str]:
    """Compile every variant for every arch; print one line each; return the failures."""
    cuobjdump = find_cuobjdump()
    failures = []
    for variant in _variants():
        for arch in archs:
            label = f"{variant.name:<42} sm_{arch}"
            try:
                compiled = compile_variant(variant, arch)
                cubin = compiled.asm["cubin"]
                print(f"{label}  ok    cubin {len(cubin)} B, {resource_usage(cubin, cuobjdump)}", file=out)
            except Exception as exc:  # report every kernel, then fail as a whole
                failures.append(f"{variant.name} sm_{arch}")
                print(f"{label}  FAIL  {_root_cause(exc)}", file=out)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    args = parser.parse_args(argv)
    failures = compile_all(args.arch)
    if failures:
        print(f"{len(failures)} kernel compilation(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"all {len(_variants()) * len(args.arch)} kernel compilations succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
