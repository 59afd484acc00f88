"""One-step off-policy rollouts (`train.async_rollout`): iteration n+1's rollout samples while iteration n's update
runs, as fully asynchronous RL trainers overlap generation and training.

Timeline (θ_n = the trainable weights after update n):

    iteration 1:  rollout 1 with θ_0 (in the foreground) | launch rollout 2 with θ_0 | update 1 → θ_1
    iteration 2:  wait for rollout 2                       | launch rollout 3 with θ_1 | update 2 → θ_2
    iteration n:  wait for rollout n (sampled by θ_{n-2})  | launch n+1 with θ_{n-1}  | update n → θ_n

so every rollout after the first is sampled by the weights one update behind the ones it trains. Nothing in the
loss changes: the importance ratio is π_θ / π_behaviour with the behaviour policy's own log-probs, recorded by the
rollout (as every PPO-style method here already does), so the first inner step's ratio is no longer 1 and the
clip range bounds how far the update moves from the policy that sampled.

`BehaviourPolicy` is the adapter the background rollouts sample with: a copy of the transformer whose frozen
weights and buffers are the live model's own tensors (no memory) and whose trainable ones (LoRA adapters, or every
weight of a full fine-tune) are separate tensors, refreshed from the live ones before each update. Its rollout
runner is its own (CUDA graphs capture the weights' addresses). `BackgroundRollout` runs one rollout at a time on a
worker thread, on a side CUDA stream when the model is on a GPU; the tensors it hands back are marked as used by
the consumer's stream so the caching allocator does not give their memory to the next background rollout while
the update still reads them.

Exact resume: a checkpoint holds the behaviour weights (θ_{n-1} after iteration n); the resumed run launches the
next rollout with them and the same per-iteration seed, so it samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


class BehaviourPolicy:
    """`adapter` (model.module inside) → a shallow adapter copy whose module shares every frozen tensor with the
    live one and owns copies of the trainable ones named in `trainable`."""

    def __init__(self, adapter, trainable: Sequence[str], rollout_attention: Optional[str] = None,
                 build_runner: Optional[Callable] = None):
        module = adapter.module
        shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers()) if not t.requires_grad}
        self.adapter = copy.copy(adapter)
        self.adapter.module = copy.deepcopy(module, shared).eval().requires_grad_(False)
        params = dict(self.adapter.module.named_parameters())
        missing = [n for n in trainable if n not in params]
        if missing:
            raise ValueError(f"the behaviour policy's copy lacks trainable parameter {missing[0]!r}")
        self.names = list(trainable)
        self.params = [params[n] for n in self.names]
        if rollout_attention is not None:
            from tempflow_fast.models.attention import set_attention_backend
            from tempflow_fast.models.loading import transformer_of

            set_attention_backend(transformer_of(self.adapter), rollout_attention)
        self.runner = build_runner(self.adapter) if build_runner is not None else None

    def shared_bytes(self) -> Tuple[int, int]:
        """(bytes shared with the live model, bytes of its own): what the copy costs."""
        own = {id(p) for p in self.params}
        tensors = {id(t): t for t in itertools.chain(self.adapter.module.parameters(), self.adapter.module.buffers())}
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        return (size(t for i, t in tensors.items() if i not in own), size(self.params))

    @torch.no_grad()
    def refresh(self, live: Sequence[torch.Tensor]) -> None:
        """Copy the live trainable weights in (on the current stream: a rollout launched after this reads them)."""
        for mine, theirs in zip(self.params, live):
            mine.copy_(theirs.detach())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"the checkpoint's behaviour policy lacks parameter {missing[0]!r}")
        for n, p in zip(self.names, self.params):
            p.copy_(state[n])


class SerializedReward:
    """A reward called from two threads (the background rollout's scoring, the foreground eval and probe) one call
    at a time; a composite's `last_components` are those of the calling thread's last call."""

    def __init__(self, reward):
        self.reward = reward
        self._lock = threading.Lock()
        self._local = threading.local()

    def __call__(self, images, prompts):
        with self._lock:
            out = self.reward(images, prompts)
            self._local.components = dict(getattr(self.reward, "last_components", {}))
        return out

    @property
    def last_components(self):
        return getattr(self._local, "components", {})

    def __getattr__(self, name):
        return getattr(self.reward, name)


def cuda_tensors(obj) -> List[torch.Tensor]:
    """Every CUDA tensor inside nested dataclasses, dicts, lists and tuples."""
    out: List[torch.Tensor] = []
    seen = set()

    def walk(x):
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                out.append(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and type(x).__module__.startswith("tempflow_fast"):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return out


class BackgroundRollout:
    """One rollout at a time on a worker thread: `launch(iteration, fn)` → later `wait(iteration)` returns fn()'s
    value (its exception re-raised). On CUDA `fn` runs on a side stream that first waits for the launching stream
    (the refreshed weights), and the returned tensors are marked as used by the waiting stream."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.pending: Optional[Tuple[int, Future]] = None

    def launch(self, iteration: int, fn: Callable[[], object]) -> None:
        if self.pending is not None:
            raise RuntimeError(f"a background rollout (iteration {self.pending[0]}) is still pending")
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self.pending = (iteration, self._pool.submit(self._run, fn, ready))

    def _run(self, fn, ready):
        if self._stream is None:
            return fn()
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            out = fn()
        self._stream.synchronize()
        return out

    def wait(self, iteration: int):
        if self.pending is None or self.pending[0] != iteration:
            have = None if self.pending is None else self.pending[0]
            raise RuntimeError(f"no background rollout for iteration {iteration} (pending: {have})")
        _, future = self.pending
        self.pending = None
        out = future.result()
        if self._stream is not None:
            consumer = torch.cuda.current_stream(self.device)
            for t in cuda_tensors(out):
                t.record_stream(consumer)
        return out

    def close(self) -> None:
        """Wait for a rollout still running (its thread reads the model) and stop the worker."""
        self.pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
