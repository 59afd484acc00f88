"""Segment runners: how the engine evaluates v(x, σ, cond) for one batch of rows.

All runners share one contract, `runner(x, sigma, cond, rows=None) -> v`, and the same chunking:

- no transformer call ever sees more than `max_rows` rows (`sampling.max_rows_per_call`; the
  trainer derives the default from the memory model, models/memory.py): a batch of n rows is cut
  into chunks of at most that many rows;
- with `buckets`, every chunk is padded (repeating its last row) up to the smallest bucket that
  holds it, so a compiled or captured function only ever sees a few fixed shapes. Padding rows
  are evaluated but not counted as NFE (`padded_rows` says how many there were). The largest
  bucket must not exceed `max_rows`;
- `cond` is the per-prompt conditioning and `rows` the prompt row of every x row: the text
  conditioning is gathered chunk by chunk, never copied for every live row at once (FLUX's T5
  states are 512 × 4096 values per row). `rows=None` means cond already has one row per x row.

`ode_segment(x, sigmas, cond, rows)` runs a whole run of deterministic Euler steps along the
schedule `sigmas` (L+1 values shared by every row, L model calls per row) and returns the end
point. The engine hands it the ODE completions (and the trunks' last stretch) when
`runner.segments` is on. The default implementation loops over the runner's own per-chunk call;
`CudaGraphRunner` captures each (bucket, L) segment as ONE graph and replays it, the state copied
in and out once per segment instead of once per step.

- `EagerRunner`: calls the adapter directly (buckets optional). `segments=True` runs the segment
  path eagerly (the CPU test of the code path the CUDA graphs use).
- `CompiledRunner`: `torch.compile` of the adapter's velocity, one static graph per bucket size.
- `CudaGraphRunner`: CUDA only; per bucket size (and per segment length), static input buffers,
  warm-up calls on a side stream, one captured graph; all graphs share ONE memory pool, so the
  pool costs about one bucket's activations, not one per bucket. It refuses a model that is not
  on CUDA (ValueError). `make_runner("cuda_graph", ...)` instead falls back (with a warning) to
  the `fallback` kind, which gives the same numbers as that runner built directly.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tempflow_fast.models.base import Cond
from tempflow_fast.sampling.steppers import ode_step

RUNNER_KINDS = ("eager", "compile", "cuda_graph")
DEFAULT_BUCKETS = (8, 32, 128)


def _check_buckets(buckets) -> Optional[Tuple[int, ...]]:
    if buckets is None:
        return None
    b = tuple(sorted(set(buckets)))
    if not b or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in b):
        raise ValueError(f"buckets must be positive ints, got {buckets!r}")
    return b


def _check_max_rows(max_rows) -> Optional[int]:
    if max_rows is None:
        return None
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows_per_call must be an int >= 1, got {max_rows!r}")
    return max_rows


def buckets_within(buckets: Sequence[int], max_rows: Optional[int]) -> Tuple[int, ...]:
    """Default buckets capped by `max_rows`: those of `buckets` below it, plus `max_rows` itself."""
    if max_rows is None:
        return tuple(buckets)
    return tuple(sorted({b for b in buckets if b < max_rows} | {max_rows}))


def _model_device(model) -> torch.device:
    p = next(model.module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _gather(cond: Cond, rows: Optional[torch.Tensor], idx: torch.Tensor) -> Cond:
    """Rows `idx` of the batch as conditioning: cond[rows[idx]] (or cond[idx] when rows is None)."""
    sel = idx if rows is None else rows.index_select(0, idx)
    return {k: v.index_select(0, sel.to(v.device)) for k, v in cond.items()}


class _BucketedRunner:
    """Chunking, padding and per-chunk conditioning shared by every runner; subclasses implement `_run`
    for one chunk (and may override `_run_segment`)."""

    segments = False

    def __init__(self, model, buckets: Optional[Sequence[int]] = None, max_rows: Optional[int] = None):
        self.model = model
        self.buckets = _check_buckets(buckets)
        self.max_rows = _check_max_rows(max_rows)
        if self.buckets is not None and self.max_rows is not None and self.buckets[-1] > self.max_rows:
            raise ValueError(f"sampling.buckets: bucket {self.buckets[-1]} is larger than "
                             f"sampling.max_rows_per_call = {self.max_rows}; lower the bucket or raise the limit")
        self.padded_rows = 0
        self.batched_calls = 0

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def _chunks(self, n: int) -> List[Tuple[int, int, int]]:
        """(start, stop, padded size) for each chunk of a batch of n rows."""
        if self.buckets is None:
            top = self.max_rows or n
            return [(s, min(s + top, n), min(s + top, n) - s) for s in range(0, n, top)]
        top = self.buckets[-1]
        out = []
        for start in range(0, n, top):
            m = min(top, n - start)
            out.append((start, start + m, next(s for s in self.buckets if s >= m)))
        return out

    def _chunk_inputs(self, start, stop, size, device):
        idx = torch.arange(start, stop, device=device)
        if size > stop - start:
            idx = torch.cat([idx, idx[-1:].expand(size - (stop - start))])
            self.padded_rows += size - (stop - start)
        return idx

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        outs = []
        for start, stop, size in self._chunks(x.shape[0]):
            idx = self._chunk_inputs(start, stop, size, x.device)
            whole = start == 0 and stop == size == x.shape[0]
            xc = x if whole else x.index_select(0, idx)
            sc = sigma if whole else sigma.index_select(0, idx)
            cc = cond if whole and rows is None else _gather(cond, rows, idx)
            outs.append(self._run(xc, sc, cc)[:stop - start])
            self.batched_calls += 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def ode_segment(self, x: torch.Tensor, sigmas: Sequence[float], cond: Cond,
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Euler steps of every row of x along `sigmas` (Python floats, L+1 values): L model calls per row."""
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2:
            raise ValueError(f"sigmas must hold at least 2 values, got {sigmas}")
        if x.shape[0] == 0:
            return x.clone()
        outs = []
        for start, stop, size in self._chunks(x.shape[0]):
            idx = self._chunk_inputs(start, stop, size, x.device)
            outs.append(self._run_segment(x.index_select(0, idx), sigmas, _gather(cond, rows, idx))[:stop - start])
            self.batched_calls += len(sigmas) - 1
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run_segment(self, x: torch.Tensor, sigmas: List[float], cond: Cond) -> torch.Tensor:
        n = x.shape[0]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = self._run(x, torch.full((n,), s, device=x.device), cond).float()
            x = ode_step(x, v, s, s_next)
        return x


class EagerRunner(_BucketedRunner):
    kind = "eager"

    def __init__(self, model, buckets: Optional[Sequence[int]] = None, max_rows: Optional[int] = None,
                 segments: bool = False):
        super().__init__(model, buckets, max_rows)
        self.segments = bool(segments)

    def _run(self, x, sigma, cond):
        return self.model.velocity(x, sigma, cond)


class CompiledRunner(_BucketedRunner):
    """torch.compile of the adapter's velocity. Fixed bucket shapes keep recompiles to one per size."""

    kind = "compile"

    def __init__(self, model, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, mode: Optional[str] = None,
                 backend: str = "inductor", max_rows: Optional[int] = None):
        super().__init__(model, buckets, max_rows)
        self._fn = torch.compile(model.velocity, dynamic=False, mode=mode, backend=backend)

    def _run(self, x, sigma, cond):
        return self._fn(x, sigma, cond)


class CudaGraphRunner(_BucketedRunner):
    """Capture/replay of the adapter's velocity (one graph per bucket size) and of whole ODE segments (one
    graph per (bucket, segment length)); every graph allocates from one shared memory pool (see module doc)."""

    kind = "cuda_graph"
    segments = True

    def __init__(self, model, buckets: Sequence[int] = DEFAULT_BUCKETS, warmup: int = 2,
                 max_rows: Optional[int] = None, segments: bool = True):
        device = _model_device(model)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CudaGraphRunner needs a model on a CUDA device, got model on {device}; "
                             f"use make_runner('cuda_graph', ..., fallback='eager'|'compile') to fall back")
        if buckets is None:
            raise ValueError("CudaGraphRunner needs fixed buckets, got buckets=None")
        super().__init__(model, buckets, max_rows)
        self.device = device
        self.warmup = warmup
        self.segments = bool(segments)
        self.pool = torch.cuda.graph_pool_handle()  # shared by every graph of this runner
        self._graphs: Dict[tuple, tuple] = {}

    def _graph(self, fn, *static, warm=None):
        """Warm up on a side stream (lazy initialisation must not be recorded) with `warm()` (default
        `fn(*static)`), then capture `fn(*static)`."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                (warm or (lambda: fn(*static)))()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the reward thread (train.async_reward) may be scoring on the GPU while a graph captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(*static)
        return graph, out

    @staticmethod
    def _key(kind, x, cond, extra=()):
        return (kind, x.shape[0], x.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())), *extra)

    def _run(self, x, sigma, cond):
        key = self._key("step", x, cond)
        if key not in self._graphs:
            static = (x.clone(), sigma.clone(), {k: v.clone() for k, v in cond.items()})
            self._graphs[key] = (*self._graph(self.model.velocity, *static), static)
        graph, out, (sx, ss, sc) = self._graphs[key]
        sx.copy_(x)
        ss.copy_(sigma)
        for k, v in cond.items():
            sc[k].copy_(v)
        graph.replay()
        return out.clone()

    def _run_segment(self, x, sigmas, cond):
        L = len(sigmas) - 1
        key = self._key("segment", x, cond, (L,))
        if key not in self._graphs:
            static = (x.float().clone(), torch.zeros(L + 1, device=self.device), torch.zeros(L, device=self.device),
                      {k: v.clone() for k, v in cond.items()})

            def segment(sx, sig, dt, sc):
                n = sx.shape[0]
                y = sx
                for j in range(L):
                    v = self.model.velocity(y, sig[j].expand(n), sc).float()
                    y = y + v * dt[j]  # the Euler step of ode_step, dt as a device scalar
                return y

            # warm-up: one velocity call (an L-step warm-up would cost L real forwards per graph)
            warm = lambda: self.model.velocity(static[0], static[1][0].expand(x.shape[0]), static[3])  # noqa: E731
            self._graphs[key] = (*self._graph(segment, *static, warm=warm), static)
        graph, out, (sx, sig, dt, sc) = self._graphs[key]
        sx.copy_(x)
        # σ and Δσ from the same Python floats the eager path uses, so a replay equals the eager loop
        sig.copy_(torch.tensor(sigmas, dtype=torch.float32))
        dt.copy_(torch.tensor([b - a for a, b in zip(sigmas[:-1], sigmas[1:])], dtype=torch.float32))
        for k, v in cond.items():
            sc[k].copy_(v)
        graph.replay()
        return out.clone()


def make_runner(kind: str, model, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, *,
                fallback: str = "eager", max_rows: Optional[int] = None):
    """Build a runner by name. "cuda_graph" on a model that is not on CUDA falls back to `fallback`
    ("eager" or "compile", same buckets) with a warning, so one config runs everywhere."""
    if kind not in RUNNER_KINDS:
        raise ValueError(f"runner kind must be one of {RUNNER_KINDS}, got {kind!r}")
    if fallback not in ("eager", "compile"):
        raise ValueError(f"fallback must be 'eager' or 'compile', got {fallback!r}")
    if kind == "cuda_graph":
        device = _model_device(model)
        if device.type == "cuda" and torch.cuda.is_available():
            return CudaGraphRunner(model, buckets, max_rows=max_rows)
        warnings.warn(f"cuda_graph runner needs CUDA; model is on {device}, using the {fallback} runner instead")
        kind = fallback
    if kind == "compile":
        return CompiledRunner(model, buckets, max_rows=max_rows)
    return EagerRunner(model, buckets, max_rows=max_rows)
