"""C++ (CPU, OpenMP) backend of the fused-op primitives: loader plus the contract's Python signatures.

The sources live in `csrc/` (shipped as the package `tempflow_fast.csrc`). `load()` returns the
compiled module, in this order of preference:

1. `tempflow_fast._C`, when the package was installed with `TEMPFLOW_FAST_BUILD_EXT=1` (setup.py);
2. a build on first use with `torch.utils.cpp_extension.load` into a cache directory keyed by a
   hash of the sources, the torch and Python versions, the compiler and its flags
   (`build_directory()`): under `$TORCH_EXTENSIONS_DIR` when set (torch's own convention), else
   under `~/.cache/tempflow_fast/torch_extensions/`. Two installs of different versions therefore
   build into different directories instead of rebuilding each other's extension. The flags are
   `-O3 -fopenmp` and nothing machine-specific (no `-march=native`): the cache may be shared between
   machines with different CPUs. A build prints one line to stderr before it starts (it takes about
   a minute) and one when it is done.

Concurrent and killed builds (`build_lock`): a builder holds an `flock` on a file in the build
directory, which the OS releases when the process dies, however it dies. torch's loader has its
own lock, a plain file that a `kill -9` leaves behind and that makes every later loader wait for
it forever, without a word. Holding our flock, no live process is building there, so such a file
is stale: it is removed with a message naming the killed builder (pid and host, recorded in our
lock file). A process that finds the build in progress says which process it is waiting for.

When neither works (no compiler, no ninja, a failed build) `load()` raises RuntimeError with the
reason; the dispatcher in `tempflow_fast.ops` turns that into one warning and uses the torch
reference in auto mode. The outcome, success or failure, is cached for the process.

Shapes, dtypes and semantics of every primitive: see `tempflow_fast/ops/reference.py`. The one
difference: for fp64 inputs this backend returns fp64 log-probs and statistics (the reference
returns fp32), so that `torch.autograd.gradcheck` can run through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pathlib
import shutil
import socket
import sys
import threading
import time
from importlib import resources
from types import ModuleType
from typing import Iterator, Sequence, TextIO

import torch

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock file only
    fcntl = None

_EXT_NAME = "tempflow_fast_flow_grpo_ops"
_SOURCES = ("flow_grpo_ops.cpp",)
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_LOCK_NAME = "tempflow_build.lock"  # ours (flock); torch's is "lock" in the same directory
_TORCH_LOCK_NAME = "lock"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def cache_key(sources: Sequence[str], cflags: Sequence[str] = tuple(_CFLAGS),
              ldflags: Sequence[str] = tuple(_LDFLAGS), compiler: str | None = None) -> str:
    """16 hex digits identifying a build: the sources' names and bytes, the torch and Python
    versions, the compiler and its flags. Any change gives a new build directory."""
    h = hashlib.sha256()
    for path in sources:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    for part in (torch.__version__, _python_tag(), compiler or _compiler(), *cflags, "|", *ldflags):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _sources_dir():
    """The C++ sources: the installed package `tempflow_fast.csrc`, or, where the package is imported from a source
    checkout that setup.py's package_dir never mapped (`python bench/...` from a clone, or an editable install that
    now points at another checkout), the checkout's own `csrc/` — the same files."""
    try:
        return resources.files("tempflow_fast.csrc")
    except ModuleNotFoundError:
        checkout = pathlib.Path(__file__).resolve().parents[2] / "csrc"
        if all(os.path.isfile(checkout / name) for name in _SOURCES):
            return checkout  # resources.as_file passes a Path through
        raise


@contextlib.contextmanager
def _source_paths() -> Iterator[list[str]]:
    with resources.as_file(_sources_dir()) as src_dir:
        sources = [os.path.join(str(src_dir), name) for name in _SOURCES]
        missing = [s for s in sources if not os.path.isfile(s)]
        if missing:
            raise RuntimeError(f"C++ sources missing from the installed package: {missing}")
        yield sources


def build_directory(sources: Sequence[str] | None = None) -> str:
    """Directory the on-demand build of `sources` (default: the installed csrc/) goes to."""
    if sources is None:
        with _source_paths() as paths:
            return build_directory(paths)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tempflow_fast", "torch_extensions")
    version = torch.__version__.replace("+", "_")
    return os.path.join(root, f"{_EXT_NAME}_{_python_tag()}_torch{version}_{cache_key(sources)}")


def _holder() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode(errors="replace").strip()


@contextlib.contextmanager
def build_lock(build_dir: str, out: TextIO | None = None) -> Iterator[None]:
    """Hold `build_dir`'s build lock for the block (see the module docstring): wait, with a
    message, while another live process holds it; then remove torch's lock file if a killed build
    left it. The holder's pid and host are written into the lock file and cleared on release, so
    a non-empty file found on acquiring names a builder that died holding it."""
    out = sys.stderr if out is None else out
    os.makedirs(build_dir, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(os.path.join(build_dir, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"tempflow_fast: waiting for the C++ ops build of {_read_holder(fd) or 'another process'} "
                  f"in {build_dir}", file=out, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = _read_holder(fd)
        torch_lock = os.path.join(build_dir, _TORCH_LOCK_NAME)
        if os.path.exists(torch_lock):
            who = f"by {previous}" if previous else "by an unknown process"
            print(f"tempflow_fast: removing the stale lock {torch_lock} of a C++ ops build {who} that was killed "
                  f"(no process holds the build lock any more)", file=out, flush=True)
            os.remove(torch_lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _build() -> ModuleType:
    try:
        return importlib.import_module("tempflow_fast._C")
    except ImportError:
        pass
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    from torch.utils import cpp_extension

    with _source_paths() as sources:
        build_dir = build_directory(sources)
        with build_lock(build_dir):
            fresh = not os.path.exists(os.path.join(build_dir, f"{_EXT_NAME}.so"))
            if fresh:
                print(f"tempflow_fast: building the C++ ops (first use, ~1 min) in {build_dir} ...",
                      file=sys.stderr, flush=True)
            start = time.perf_counter()
            module = cpp_extension.load(
                name=_EXT_NAME,
                sources=sources,
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                build_directory=build_dir,
                verbose=os.environ.get("TEMPFLOW_FAST_VERBOSE_BUILD") == "1",
            )
            if fresh:
                print(f"tempflow_fast: built the C++ ops in {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
            return module


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
