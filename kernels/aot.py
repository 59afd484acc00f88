"""Ahead-of-time compile every Triton kernel to cubin for sm_80 and sm_90 (docs/design.md §6).

    python -m tempflow_fast.kernels.aot [--arch 80 90]

Works without a GPU: `triton.compile` with an explicit GPUTarget runs the whole pipeline
(ttir -> ttgir -> llir -> ptx -> cubin through the bundled ptxas), so it catches what the
interpreter lets through (layouts, dtype rules, register pressure).

The variants are the launches the training hot path makes at FLUX-1024 sizes (D = 4096·64 latent
elements, N = 4 shared means, K = 6 branches as in TempFlow and K = 12 as in G²RPO, fp32 and bf16
latents, on an H100/H200's 132 SMs), specialised as Triton's runtime specialises them: every
argument goes through Triton's own `native_specialize_impl`, so a pointer (16-byte aligned, as
torch allocates) and an int divisible by 16 carry `tt.divisibility = 16` (what lets the compiler
emit 128-bit loads), and an int equal to 1 becomes a constexpr. Without these hints the compiled
code and its register counts are not those that run.

Prints one line per variant and architecture: the number of arguments the compiled TTIR carries
divisibility hints on, shared memory from the compiled metadata (what the launcher requests), and
registers, static shared memory and spills (local memory) from `cuobjdump --dump-resource-usage`
when that binary is found ("n/a" otherwise). Exits 1 if any kernel fails to compile.
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
FLUX_D = 4096 * 64  # FLUX-1024 packed latents: 4096 tokens x 64 channels
FLUX_N = 4  # shared means (policy forwards) per update call
BRANCHES = (6, 12)  # K: TempFlow's branches per state, G²RPO's group
SDE_ROWS = 24  # rows of one rollout SDE step (4 seeds x 6 branches)
TARGET_PROGRAMS = 4 * 132  # triton_backend._target_programs on an H100 / H200 (132 SMs)
DIVISIBILITY = ["tt.divisibility", 16]


@dataclass
class Variant:
    """One compilation: `signature` maps each runtime argument to its Triton type ("*fp32", "i32")
    or "constexpr"; `constexprs` holds the constexpr values; `hints` names the arguments that carry
    tt.divisibility = 16."""
    name: str
    fn_name: str
    signature: dict
    constexprs: dict
    hints: tuple = ()


class Ptr:
    """A pointer argument to a torch allocation of `dtype` (aligned like every allocation)."""

    def __init__(self, dtype):
        self.dtype = dtype


def _launch(name: str, fn_name: str, args: dict, constexprs: dict) -> Variant:
    """A Variant from the values a launcher passes (`Ptr` for tensors, ints as launched),
    specialised by Triton's runtime specialisation function itself."""
    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    signature, consts, hints = {}, dict(constexprs), []
    for arg, value in args.items():
        probe = torch.empty(16, dtype=value.dtype) if isinstance(value, Ptr) else value
        ty, spec = native_specialize_impl(CUDABackend, probe, False, True, True)
        if ty == "constexpr":
            consts[arg] = spec
        else:
            signature[arg] = ty
            if "tt.divisibility" in str(CUDABackend.parse_attr(spec)):
                hints.append(arg)
    return Variant(name, fn_name, signature, consts, tuple(hints))


def _variants() -> list[Variant]:
    """Each kernel with its pointer dtypes for fp32 and bf16 latents, K = 6 and 12, and every
    constexpr path the launchers in tempflow_fast.ops.triton_backend take (a path never compiled
    is a path untested), with the int arguments those launchers pass at FLUX-1024 sizes."""
    import torch
    import triton.language as tl

    from tempflow_fast.ops.triton_backend import _REDUCE_BLOCK, _blocks, split_sizes

    f32, acc = tl.float32, Ptr(torch.float32)
    n, d = FLUX_N, FLUX_D
    out = []
    for lat_name, lat_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        p = Ptr(lat_dtype)
        for k in BRANCHES:
            block_k, block_d = _blocks(k, d)
            s, chunk = split_sizes(n, d, block_d, TARGET_PROGRAMS)
            tag = f"{lat_name},K={k}"
            for has_ref in (True, False):
                ref = "ref" if has_ref else "no-ref"
                out.append(_launch(
                    f"sq_dist_partial_kernel[{tag},{ref}]", "sq_dist_partial_kernel",
                    dict(samples_ptr=p, mean_ptr=p, ref_ptr=p, part_ptr=acc, kl_part_ptr=acc, K=k, D=d, chunk=chunk,
                         S=s),
                    dict(HAS_REF=has_ref, ACC=f32, BLOCK_K=block_k, BLOCK_D=block_d)))
                out.append(_launch(
                    f"flow_grpo_loss_bwd_kernel[{tag},{ref}]", "flow_grpo_loss_bwd_kernel",
                    dict(grad_loss_ptr=acc, samples_ptr=p, mean_ptr=p, ref_ptr=p, std_ptr=acc, kl_std_ptr=acc,
                         logp_ptr=acc, old_ptr=acc, adv_ptr=acc, w_ptr=acc, dmean_ptr=p, N=n, K=k, D=d),
                    dict(CLIP=0.2, ADV_CLIP=5.0, BETA=0.04, HAS_REF=has_ref, ACC=f32, BLOCK_K=block_k,
                         BLOCK_D=block_d)))
            out.append(_launch(
                f"gaussian_log_prob_bwd_kernel[{tag}]", "gaussian_log_prob_bwd_kernel",
                dict(grad_ptr=acc, samples_ptr=p, mean_ptr=p, std_ptr=acc, dmean_ptr=p, K=k, D=d),
                dict(ACC=f32, BLOCK_K=block_k, BLOCK_D=block_d)))
        _, block_d1 = _blocks(1, d)
        s1, chunk1 = split_sizes(SDE_ROWS, d, block_d1, TARGET_PROGRAMS)
        for given in (False, True):
            path = "prev_given" if given else "noise"
            out.append(_launch(
                f"sde_step_fwd_kernel[{lat_name},{path}]", "sde_step_fwd_kernel",
                dict(sample_ptr=p, velocity_ptr=p, noise_ptr=p, prev_in_ptr=p, a_ptr=acc, b_ptr=acc, std_ptr=acc,
                     prev_ptr=p, mean_ptr=p, part_ptr=acc, D=d, chunk=chunk1, S=s1),
                dict(PREV_GIVEN=given, ACC=f32, BLOCK_D=block_d1)))
            out.append(_launch(
                f"sde_step_bwd_kernel[{lat_name},{path}]", "sde_step_bwd_kernel",
                dict(grad_prev_ptr=p, grad_mean_ptr=p, grad_logp_ptr=acc, sample_ptr=p, velocity_ptr=p, prev_ptr=p,
                     a_ptr=acc, b_ptr=acc, std_ptr=acc, dsample_ptr=p, dvelocity_ptr=p, D=d),
                dict(HAS_GRAD_PREV=not given, HAS_GRAD_MEAN=True, HAS_GRAD_LOGP=True, ACC=f32, BLOCK_D=block_d1)))
    # log-probs and statistics are fp32 whatever the latents: one variant per K (the SDE step's
    # finalize runs with K = 1, which the runtime turns into a constexpr)
    _, block_d1 = _blocks(1, d)
    s1, _ = split_sizes(SDE_ROWS, d, block_d1, TARGET_PROGRAMS)
    out.append(_launch("logp_finalize_kernel[sde,K=1]", "logp_finalize_kernel",
                       dict(part_ptr=acc, std_ptr=acc, logp_ptr=acc, NK=SDE_ROWS, K=1, S=s1, D=d),
                       dict(ACC=f32, BLOCK=_REDUCE_BLOCK)))
    for k in BRANCHES:
        s, _ = split_sizes(n, d, _blocks(k, d)[1], TARGET_PROGRAMS)
        out.append(_launch(f"logp_finalize_kernel[K={k}]", "logp_finalize_kernel",
                           dict(part_ptr=acc, std_ptr=acc, logp_ptr=acc, NK=n * k, K=k, S=s, D=d),
                           dict(ACC=f32, BLOCK=_REDUCE_BLOCK)))
        out.append(_launch(f"grpo_clip_loss_fwd_kernel[M={n * k}]", "grpo_clip_loss_fwd_kernel",
                           dict(logp_ptr=acc, old_ptr=acc, adv_ptr=acc, w_ptr=acc, ratio_ptr=acc, stats_ptr=acc,
                                M=n * k),
                           dict(CLIP=0.2, ADV_CLIP=5.0, ACC=f32, BLOCK=_REDUCE_BLOCK)))
        out.append(_launch(f"grpo_clip_loss_bwd_kernel[M={n * k}]", "grpo_clip_loss_bwd_kernel",
                           dict(grad_loss_ptr=acc, logp_ptr=acc, old_ptr=acc, adv_ptr=acc, w_ptr=acc, dlogp_ptr=acc,
                                M=n * k),
                           dict(CLIP=0.2, ADV_CLIP=5.0, ACC=f32, BLOCK=_REDUCE_BLOCK)))
        for has_ref in (True, False):
            out.append(_launch(
                f"flow_grpo_loss_finalize_kernel[K={k},{'ref' if has_ref else 'no-ref'}]",
                "flow_grpo_loss_finalize_kernel",
                dict(part_ptr=acc, kl_part_ptr=acc, std_ptr=acc, old_ptr=acc, adv_ptr=acc, w_ptr=acc, kl_std_ptr=acc,
                     logp_ptr=acc, ratio_ptr=acc, stats_ptr=acc, N=n, K=k, S=s, D=d),
                dict(CLIP=0.2, ADV_CLIP=5.0, BETA=0.04, HAS_REF=has_ref, ACC=f32, BLOCK=_REDUCE_BLOCK)))
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
        return "registers n/a, static shared n/a, spills n/a (no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", res.stdout))
    if res.returncode != 0 or "REG" not in fields:
        return f"registers n/a (cuobjdump failed: {res.stderr.strip()[:80]})"
    return (f"registers {fields['REG']}, static shared {fields.get('SHARED', '?')} B, "
            f"spills (local) {fields.get('LOCAL', '?')} B, stack {fields.get('STACK', '?')} B")


def compile_variant(variant: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(variant.fn_name)
    signature = dict(variant.signature)
    signature.update({name: "constexpr" for name in variant.constexprs})
    # the runtime passes hints as {(argument index,): [["tt.divisibility", 16]]} (JITFunction._pack_args)
    attrs = {(fn.arg_names.index(name),): [DIVISIBILITY] for name in variant.hints}
    src = ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS})


def divisibility_hints(compiled) -> int:
    """Arguments of the compiled kernel that carry tt.divisibility = 16 in its TTIR."""
    return compiled.asm["ttir"].count("tt.divisibility = 16")


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
            label = f"{variant.name:<48} sm_{arch}"
            try:
                compiled = compile_variant(variant, arch)
                cubin = compiled.asm["cubin"]
                print(f"{label}  ok    div16 args {divisibility_hints(compiled)}, shared (launch) "
                      f"{compiled.metadata.shared} B, cubin {len(cubin)} B, {resource_usage(cubin, cuobjdump)}",
                      file=out, flush=True)
            except Exception as exc:  # report every kernel, then fail as a whole
                failures.append(f"{variant.name} sm_{arch}")
                print(f"{label}  FAIL  {_root_cause(exc)}", file=out)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempflow_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help=f"compute capabilities to compile for, e.g. 80 90 (default: {' '.join(map(str, ARCHS))})")
    args = parser.parse_args(argv)
    failures = compile_all(args.arch)
    if failures:
        print(f"{len(failures)} kernel compilation(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"all {len(_variants()) * len(args.arch)} kernel compilations succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
