"""Backend dispatch: which implementation of the primitives runs for a given device.

`TEMPFLOW_FAST_BACKEND=auto|triton|cpp|torch` (read at call time), overridable per call with the
`use_backend(name)` context manager. `auto` picks triton for CUDA tensors, the C++ extension on
CPU when it builds, and the PyTorch reference otherwise, with one warning saying why. An explicit
request for a backend that cannot run on the device raises `BackendUnavailable`: a user who asks
for triton must not be silently measured on PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
ENV_VAR = "TEMPFLOW_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on the given device."""


_local = threading.local()
_warned: set[str] = set()


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` for ops called inside the block (this thread), whatever the environment says."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def requested_backend() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return name


def _triton_problem(device: torch.device) -> str | None:
    """Why triton cannot run on `device`, or None when it can."""
    try:
        from tempflow_fast.ops import triton_backend
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_backend.interpreted():
            return None
        return ("triton kernels run on CPU tensors only through the interpreter "
                "(TRITON_INTERPRET=1 set before tempflow_fast.kernels is first imported)")
    return f"triton has no support for device {device.type!r}"


def _cpp_problem(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the C++ backend runs on CPU tensors only, got {device.type!r}"
    return _cpp_load_problem()


@functools.lru_cache(maxsize=None)
def _cpp_load_problem() -> str | None:
    """Cached: a failed build must not be retried (tens of seconds) on every op call."""
    try:
        cpp_backend = importlib.import_module("tempflow_fast.ops.cpp_backend")
    except ImportError as exc:
        return f"the C++ backend is not available ({exc})"
    try:
        cpp_backend.load()
    except Exception as exc:  # a failed compile surfaces as many exception types
        return f"the C++ extension did not build ({type(exc).__name__}: {exc})"
    return None


_PROBLEM = {"triton": _triton_problem, "cpp": _cpp_problem, "torch": lambda device: None}


def _module(name: str) -> ModuleType:
    if name == "torch":
        return importlib.import_module("tempflow_fast.ops.reference")
    if name == "triton":
        return importlib.import_module("tempflow_fast.ops.triton_backend")
    return importlib.import_module("tempflow_fast.ops.cpp_backend")


def _resolve(device: torch.device) -> str:
    name = requested_backend()
    if name != "auto":
        problem = _PROBLEM[name](device)
        if problem is not None:
            raise BackendUnavailable(f"{ENV_VAR}/use_backend asked for {name!r} on {device}: {problem}")
        return name
    preferred = "triton" if device.type == "cuda" else "cpp"
    problem = _PROBLEM[preferred](device)
    if problem is None:
        return preferred
    key = f"{device.type}:{preferred}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"tempflow_fast.ops: using the PyTorch reference backend on {device.type} because {problem}",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def active_backend(device: str | torch.device = "cpu") -> str:
    """Name of the backend ('triton', 'cpp' or 'torch') that ops on `device` will run with."""
    return _resolve(torch.device(device))


def backend_for(device: torch.device) -> ModuleType:
    """The primitives module for `device` (see the contract in tempflow_fast.ops.reference)."""
    return _module(_resolve(device))
