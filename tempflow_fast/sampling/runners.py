"""Segment runners: how the engine evaluates v(x, σ, cond) for one batch of rows.

All runners share one contract, `runner(x, sigma, cond) -> v`, and the same bucketing: a batch
of n rows is cut into chunks of the largest bucket, and the last chunk is padded (repeating its
last row) up to the smallest bucket that holds it, so a compiled or captured function only ever
sees a few fixed shapes. Padding rows are evaluated but not counted as NFE (`padded_rows` says
how many there were).

- `EagerRunner`: calls the adapter directly (buckets optional).
- `CompiledRunner`: `torch.compile` of the adapter's velocity, one static graph per bucket size.
- `CudaGraphRunner`: CUDA only; per bucket size, static input buffers, two warm-up calls on a
  side stream, one captured graph; a call copies inputs in, replays, clones the output out.
  It refuses a model that is not on CUDA (ValueError). `make_runner("cuda_graph", ...)` instead
  falls back (with a warning) to the `fallback` kind, which gives the same numbers as that
  runner built directly.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch

from tempflow_fast.models.base import Cond

RUNNER_KINDS = ("eager", "compile", "cuda_graph")
DEFAULT_BUCKETS = (8, 32, 128)


def _check_buckets(buckets) -> Optional[Tuple[int, ...]]:
    if buckets is None:
        return None
    b = tuple(sorted(set(buckets)))
    if not b or any(not isinstance(s, int) or s < 1 for s in b):
        raise ValueError(f"buckets must be positive ints, got {buckets!r}")
    return b


def _model_device(model) -> torch.device:
    p = next(model.module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _BucketedRunner:
    """Chunking and padding shared by every runner; subclasses implement `_run` for one bucket."""

    def __init__(self, model, buckets: Optional[Sequence[int]] = None):
        self.model = model
        self.buckets = _check_buckets(buckets)
        self.padded_rows = 0
        self.batched_calls = 0

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def _chunks(self, n: int):
        """(start, stop, padded size) for each chunk of a batch of n rows."""
        if self.buckets is None:
            return [(0, n, n)]
        top = self.buckets[-1]
        out = []
        for start in range(0, n, top):
            m = min(top, n - start)
            out.append((start, start + m, next(s for s in self.buckets if s >= m)))
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        chunks = self._chunks(x.shape[0])
        if len(chunks) == 1 and chunks[0][2] == x.shape[0]:
            self.batched_calls += 1
            return self._run(x, sigma, cond)
        outs = []
        for start, stop, size in chunks:
            m = stop - start
            idx = torch.arange(start, stop, device=x.device)
            if size > m:
                idx = torch.cat([idx, idx[-1:].expand(size - m)])
                self.padded_rows += size - m
            xc = x.index_select(0, idx)
            sc = sigma.index_select(0, idx)
            cc = {k: v.index_select(0, idx.to(v.device)) for k, v in cond.items()}
            outs.append(self._run(xc, sc, cc)[:m])
            self.batched_calls += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class EagerRunner(_BucketedRunner):
    kind = "eager"

    def _run(self, x, sigma, cond):
        return self.model.velocity(x, sigma, cond)


class CompiledRunner(_BucketedRunner):
    """torch.compile of the adapter's velocity. Fixed bucket shapes keep recompiles to one per size."""

    kind = "compile"

    def __init__(self, model, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, mode: Optional[str] = None,
                 backend: str = "inductor"):
        super().__init__(model, buckets)
        self._fn = torch.compile(model.velocity, dynamic=False, mode=mode, backend=backend)

    def _run(self, x, sigma, cond):
        return self._fn(x, sigma, cond)


class CudaGraphRunner(_BucketedRunner):
    """Capture/replay of the adapter's velocity, one CUDA graph per bucket size (see module doc)."""

    kind = "cuda_graph"

    def __init__(self, model, buckets: Sequence[int] = DEFAULT_BUCKETS, warmup: int = 2):
        device = _model_device(model)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CudaGraphRunner needs a model on a CUDA device, got model on {device}; "
                             f"use make_runner('cuda_graph', ..., fallback='eager'|'compile') to fall back")
        if buckets is None:
            raise ValueError("CudaGraphRunner needs fixed buckets, got buckets=None")
        super().__init__(model, buckets)
        self.device = device
        self.warmup = warmup
        self._graphs: Dict[tuple, tuple] = {}

    def _capture(self, x, sigma, cond):
        static_x, static_s = x.clone(), sigma.clone()
        static_c = {k: v.clone() for k, v in cond.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # Warm-up outside the capture: lazy initialisation (cuBLAS handles, autotuning) must
            # not be recorded into the graph.
            for _ in range(self.warmup):
                self.model.velocity(static_x, static_s, static_c)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model.velocity(static_x, static_s, static_c)
        return graph, static_x, static_s, static_c, static_out

    def _run(self, x, sigma, cond):
        key = (x.shape[0], x.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())))
        if key not in self._graphs:
            self._graphs[key] = self._capture(x, sigma, cond)
        graph, sx, ss, sc, out = self._graphs[key]
        sx.copy_(x)
        ss.copy_(sigma)
        for k, v in cond.items():
            sc[k].copy_(v)
        graph.replay()
        return out.clone()


def make_runner(kind: str, model, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, *,
                fallback: str = "eager"):
    """Build a runner by name. "cuda_graph" on a model that is not on CUDA falls back to `fallback`
    ("eager" or "compile", same buckets) with a warning, so one config runs everywhere."""
    if kind not in RUNNER_KINDS:
        raise ValueError(f"runner kind must be one of {RUNNER_KINDS}, got {kind!r}")
    if fallback not in ("eager", "compile"):
        raise ValueError(f"fallback must be 'eager' or 'compile', got {fallback!r}")
    if kind == "cuda_graph":
        device = _model_device(model)
        if device.type == "cuda" and torch.cuda.is_available():
            return CudaGraphRunner(model, buckets)
        warnings.warn(f"cuda_graph runner needs CUDA; model is on {device}, using the {fallback} runner instead")
        kind = fallback
    if kind == "compile":
        return CompiledRunner(model, buckets)
    return EagerRunner(model, buckets)
