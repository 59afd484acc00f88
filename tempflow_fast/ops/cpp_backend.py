"""C++ (CPU, OpenMP) backend of the fused-op primitives: loader plus the contract's Python signatures.

The sources live in `csrc/` (shipped as the package `tempflow_fast.csrc`). `load()` returns the
compiled module, in this order of preference:

1. `tempflow_fast._C`, when the package was installed with `TEMPFLOW_FAST_BUILD_EXT=1` (setup.py);
2. a build on first use with `torch.utils.cpp_extension.load` into a cache directory:
   `$TORCH_EXTENSIONS_DIR` when set (torch's own convention), else
   `~/.cache/tempflow_fast/torch_extensions/<python>_<torch>`. The flags are `-O3 -fopenmp` and
   nothing machine-specific (no `-march=native`): the cache may be shared between machines with
   different CPUs. torch's loader re-builds when the sources change and locks the directory, so
   several processes may call `load()` at once.

When neither works (no compiler, no ninja, a failed build) `load()` raises RuntimeError with the
reason; the dispatcher in `tempflow_fast.ops` turns that into one warning and uses the torch
reference in auto mode. The outcome, success or failure, is cached for the process.

Shapes, dtypes and semantics of every primitive: see `tempflow_fast/ops/reference.py`. The one
difference: for fp64 inputs this backend returns fp64 log-probs and statistics (the reference
returns fp32), so that `torch.autograd.gradcheck` can run through it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
from importlib import resources
from types import ModuleType

import torch

_EXT_NAME = "tempflow_fast_flow_grpo_ops"
_SOURCES = ("flow_grpo_ops.cpp",)
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def build_directory() -> str | None:
    """Directory the on-demand build goes to; None lets torch apply $TORCH_EXTENSIONS_DIR."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    version = torch.__version__.replace("+", "_")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{version}"
    return os.path.join(os.path.expanduser("~"), ".cache", "tempflow_fast", "torch_extensions", tag, _EXT_NAME)


def _build() -> ModuleType:
    try:
        return importlib.import_module("tempflow_fast._C")
    except ImportError:
        pass
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    from torch.utils import cpp_extension

    csrc = resources.files("tempflow_fast.csrc")
    with resources.as_file(csrc) as src_dir:
        sources = [os.path.join(str(src_dir), name) for name in _SOURCES]
        missing = [s for s in sources if not os.path.isfile(s)]
        if missing:
            raise RuntimeError(f"C++ sources missing from the installed package: {missing}")
        build_dir = build_directory()
        if build_dir is not None:
            os.makedirs(build_dir, exist_ok=True)
        return cpp_extension.load(
            name=_EXT_NAME,
            sources=sources,
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=build_dir,
            verbose=os.environ.get("TEMPFLOW_FAST_VERBOSE_BUILD") == "1",
        )


def load() -> ModuleType:
    """The compiled extension (built on first call). Raises RuntimeError saying why it cannot run."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _build()
            except Exception as exc:  # any build/import failure means "backend unavailable", with the reason
                _error = f"{type(exc).__name__}: {exc}".strip()
        if _module is None:
            raise RuntimeError(f"tempflow_fast C++ backend unavailable: {_error}")
        return _module


def is_available() -> bool:
    """True when the extension loads (building it if needed)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


# ---- the primitive contract ------------------------------------------------------------------

def gaussian_log_prob_fwd(samples, mean, std):
    return load().gaussian_log_prob_fwd(samples, mean, std)


def gaussian_log_prob_bwd(grad_logp, samples, mean, std):
    return load().gaussian_log_prob_bwd(grad_logp, samples, mean, std)


def sde_step_fwd(sample, velocity, a, b, std, noise=None, prev_sample=None):
    if (noise is None) == (prev_sample is None):
        raise ValueError("sde_step_fwd: pass exactly one of noise / prev_sample")
    return load().sde_step_fwd(sample, velocity, a, b, std, noise, prev_sample)


def sde_step_bwd(grad_prev, grad_mean, grad_logp, sample, velocity, prev_sample, a, b, std, prev_given: bool):
    return load().sde_step_bwd(grad_prev, grad_mean, grad_logp, sample, velocity, prev_sample, a, b, std,
                               bool(prev_given))


def grpo_clip_loss_fwd(logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    return load().grpo_clip_loss_fwd(logp, old_logp, adv, weights, float(clip_range), float(adv_clip))


def grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, clip_range: float, adv_clip: float):
    return load().grpo_clip_loss_bwd(grad_loss, logp, old_logp, adv, weights, float(clip_range), float(adv_clip))


def flow_grpo_loss_fwd(mean, samples, std, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    return load().flow_grpo_loss_fwd(mean, samples, std, old_logp, adv, weights, ref_mean, kl_std,
                                     float(clip_range), float(adv_clip), float(beta))


def flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights, ref_mean, kl_std,
                       clip_range: float, adv_clip: float, beta: float):
    return load().flow_grpo_loss_bwd(grad_loss, mean, samples, std, logp, old_logp, adv, weights, ref_mean,
                                     kl_std, float(clip_range), float(adv_clip), float(beta))
