"""Text-encoder outputs computed once per prompt and kept, so the text encoders can leave the GPU.

RL fine-tuning revisits the same prompts (every seed, branch and inner epoch of an iteration, and
every epoch over the prompt set), and the text encoders are frozen, so their outputs are a pure
function of the prompt. `PromptCache` stores them per prompt string (on `storage_device`, CPU by
default: FLUX's T5 output is 512×4096 values per prompt, 4 MiB in bf16) and moves only the requested
rows to the model's device. Prompts are encoded when first asked for (each iteration's new prompts
in one batch), and at most `max_entries` stay cached (least recently used go first), so a prompt set of
any size costs bounded host memory. After `release()` the encoders are dropped; a prompt not cached by
then is an error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .base import Cond

EncodeFn = Callable[[List[str]], Dict[str, torch.Tensor]]


class PromptCache:
    """Per-prompt conditioning tensors from `encode_fn(prompts) -> {name: (B, ...) tensor}`."""

    def __init__(self, encode_fn: EncodeFn, storage_device: Union[str, torch.device] = "cpu", batch_size: int = 16,
                 max_entries: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self._encode: Optional[EncodeFn] = encode_fn
        self.storage_device = torch.device(storage_device)
        self.batch_size = int(batch_size)
        self.max_entries = max_entries
        self._rows: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
        self._lock = threading.RLock()  # train.async_rollout: a background rollout encodes while the update reads
        self.encoded = 0  # prompts encoded so far (re-encodings of evicted prompts included)

    def __getstate__(self):  # a copied adapter (copy.deepcopy) gets its own lock
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def max_entries(self) -> Optional[int]:
        return self._max_entries

    @max_entries.setter
    def max_entries(self, value: Optional[int]) -> None:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"max_entries must be None or an int >= 1, got {value!r}")
        self._max_entries = value

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    @property
    def released(self) -> bool:
        return self._encode is None

    def add(self, prompts: Sequence[str]) -> None:
        """Encode the prompts not cached yet, `batch_size` at a time, under no_grad."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of str, got a single str")
        with self._lock:
            self._add(prompts)

    def _add(self, prompts: Sequence[str]) -> None:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if not todo:
            return
        if self._encode is None:
            raise ValueError(f"prompt {todo[0]!r} is not cached and the text encoders were released; "
                             "cache every prompt (adapter.cache_prompts) before release_text_encoders()")
        if self._max_entries is not None and len(todo) > self._max_entries:
            raise ValueError(f"{len(todo)} new prompts at once exceed the prompt cache's max_entries = "
                             f"{self._max_entries} (model.prompt_cache_size)")
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            with torch.no_grad():
                out = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = {k: v[i].detach().to(self.storage_device) for k, v in out.items()}
            self.encoded += len(chunk)
        self._evict(keep=prompts)

    def _evict(self, keep: Sequence[str] = ()) -> None:
        """Drop least-recently-used prompts beyond max_entries (never one of `keep`, the batch being asked for)."""
        if self._max_entries is None:
            return
        keep = set(keep)
        for prompt in list(self._rows):
            if len(self._rows) <= self._max_entries:
                break
            if prompt not in keep:
                del self._rows[prompt]

    def get(self, prompts: Sequence[str], device: Union[str, torch.device]) -> Cond:
        """Batch-first conditioning for `prompts` on `device` (encoding any not cached yet)."""
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        with self._lock:
            self._add(prompts)
            for p in prompts:
                self._rows.move_to_end(p)
            rows = [self._rows[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}

    def release(self) -> None:
        """Forget the encoder function (the adapter frees the encoders themselves)."""
        self._encode = None


class CachedTextPipelineMixin:
    """Text handling shared by the diffusers pipeline adapters (FLUX, SD3): prompts encoded once through
    `self.cache` (a PromptCache), text encoders offloaded or released, export of the pipeline folder.

    The adapter sets `TEXT_ENCODERS` (the pipeline attributes holding its encoders) and `self.pipeline`,
    `self.module`, `self.cache`, `self.device`; `_prompts_to_keep()` names extra prompts (SD3's negative
    prompt) that must be cached before the encoders go."""

    TEXT_ENCODERS: tuple = ()
    _offloaded_to: Optional[torch.device] = None  # where offload_text_encoders() parked the encoders

    def _prompts_to_keep(self) -> List[str]:
        return []

    def _encode_on_device(self, prompts: List[str]) -> Dict[str, torch.Tensor]:
        """`self._encode(prompts)` with the text encoders on the model's device: offloaded encoders come over for
        the batch and go back after it (one move per iteration's new prompts, not one per prompt)."""
        parked = self._offloaded_to
        if parked is None or parked == self.device:
            return self._encode(prompts)
        self._move_text_encoders(self.device)
        try:
            return self._encode(prompts)
        finally:
            self._move_text_encoders(parked)

    def _move_text_encoders(self, device) -> None:
        for name in self.TEXT_ENCODERS:
            enc = getattr(self.pipeline, name, None)
            if enc is not None:
                enc.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cache_prompts(self, prompts: Sequence[str]) -> None:
        """Encode and keep `prompts` now (e.g. the whole training set before releasing the encoders)."""
        self.cache.add([*self._prompts_to_keep(), *prompts])

    def release_text_encoders(self) -> None:
        """Drop the text encoders (GPU memory back); only cached prompts can be encoded after."""
        self.cache.add(self._prompts_to_keep())
        self.cache.release()
        for name in self.TEXT_ENCODERS:
            setattr(self.pipeline, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def offload_text_encoders(self, device: Union[str, torch.device] = "cpu") -> None:
        """Park the text encoders on `device` (GPU memory back; export keeps them). Prompts not cached yet are
        still encoded on the model's device: the encoders come over for that batch and go back."""
        self._offloaded_to = torch.device(device)
        self._move_text_encoders(device)

    def save_pretrained(self, directory) -> None:
        """A pipeline folder `load_adapter` reads back: `self.module` (e.g. a LoRA-merged copy) as the
        transformer, the other components as loaded. Needs the text encoders (offloaded is fine)."""
        if self.cache.released:
            raise ValueError("cannot save a complete pipeline: the text encoders were released; use "
                             "offload_text_encoders() instead of release_text_encoders() to keep them for export")
        components = dict(self.pipeline.components, transformer=self.module)
        type(self.pipeline)(**components).save_pretrained(str(directory))

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of str, got a single str")
        return self.cache.get(list(prompts), self.device)
