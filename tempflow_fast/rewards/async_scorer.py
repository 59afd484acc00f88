"""Asynchronous scoring: the trainer hands finished images to a worker thread and samples the next
segment while the reward model runs.

    scorer = AsyncScorer(reward)                 # one worker: calls run in submission order
    fut = scorer.submit(images, prompts)         # returns at once
    ...sample the next segment...
    scores = fut.result()                        # (B,) float32, or the reward's exception re-raised
    fut.components                               # a composite's raw per-component scores of this call

Futures map one-to-one to submissions, so results can never be paired with the wrong batch; with one
worker (the default) the reward is also *called* in submission order, which stateful rewards (a
composite's running statistics) need. More workers only help rewards that are thread-safe and wait on
I/O (reward-server clients).

On CUDA the work runs on a side stream per worker: it waits for an event recorded on the submitting
stream (so the images are complete), marks the images as used by the side stream (so the caching
allocator does not hand their memory out early), and synchronises the side stream before the future
completes; the scores are marked as used by the submitting stream. The caller must not write into
`images` until the future is done.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch


class AsyncScorer:
    def __init__(self, reward, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.reward = reward
        self.name = getattr(reward, "name", type(reward).__name__)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: set = set()

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> "Future[torch.Tensor]":
        prompts = list(prompts)
        ready = consumer = None
        if images.is_cuda:
            consumer = torch.cuda.current_stream(images.device)
            ready = torch.cuda.Event()
            ready.record(consumer)
        future: "Future[torch.Tensor]" = Future()
        future.components = {}
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        self._pool.submit(self._settle, future, images, prompts, ready, consumer)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _settle(self, future: Future, images, prompts, ready, consumer) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            out = self._run(images, prompts, ready, consumer)
            # a composite's per-component scores of *this* call; the next call overwrites last_components
            future.components = dict(getattr(self.reward, "last_components", {}))
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)
        else:
            future.set_result(out)

    def _run(self, images: torch.Tensor, prompts: Sequence[str], ready, consumer) -> torch.Tensor:
        if ready is None:
            return self.reward(images, prompts)
        stream = getattr(self._local, "stream", None)
        if stream is None or stream.device != images.device:
            stream = self._local.stream = torch.cuda.Stream(device=images.device)
        with torch.cuda.device(images.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            images.record_stream(stream)
            out = self.reward(images, prompts)
        stream.synchronize()
        if out.is_cuda:  # the submitting stream reads the scores; their memory must outlive its work
            out.record_stream(consumer)
        return out

    def close(self, wait: bool = True) -> None:
        """Finish every submitted batch (wait=True), or cancel the ones not started yet (wait=False)."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        if not wait:
            with self._lock:
                pending = list(self._pending)
            for future in pending:  # never started: the pool dropped its task, so nobody else settles it
                future.cancel()

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
