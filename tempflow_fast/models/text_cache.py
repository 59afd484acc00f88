"""Text-encoder outputs computed once per prompt and kept, so the text encoders can leave the GPU.

RL fine-tuning revisits the same prompts (every seed, branch and inner epoch of an iteration, and
every epoch over the prompt set), and the text encoders are frozen, so their outputs are a pure
function of the prompt. `PromptCache` stores them per prompt string (on `storage_device`, CPU by
default: FLUX's T5 output is 512×4096 values per prompt) and moves only the requested rows to the
model's device. After `release()` the encoders are dropped; a prompt not cached by then is an error.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .base import Cond

EncodeFn = Callable[[List[str]], Dict[str, torch.Tensor]]


class PromptCache:
    """Per-prompt conditioning tensors from `encode_fn(prompts) -> {name: (B, ...) tensor}`."""

    def __init__(self, encode_fn: EncodeFn, storage_device: Union[str, torch.device] = "cpu", batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self._encode: Optional[EncodeFn] = encode_fn
        self.storage_device = torch.device(storage_device)
        self.batch_size = int(batch_size)
        self._rows: Dict[str, Dict[str, torch.Tensor]] = {}

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
        todo = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if not todo:
            return
        if self._encode is None:
            raise ValueError(f"prompt {todo[0]!r} is not cached and the text encoders were released; "
                             "cache every prompt (adapter.cache_prompts) before release_text_encoders()")
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            with torch.no_grad():
                out = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = {k: v[i].detach().to(self.storage_device) for k, v in out.items()}

    def get(self, prompts: Sequence[str], device: Union[str, torch.device]) -> Cond:
        """Batch-first conditioning for `prompts` on `device` (encoding any not cached yet)."""
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        self.add(prompts)
        keys = self._rows[prompts[0]].keys()
        return {k: torch.stack([self._rows[p][k] for p in prompts]).to(device) for k in keys}

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

    def _prompts_to_keep(self) -> List[str]:
        return []

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
        """Move the text encoders to `device` (GPU memory back; they still encode, and export keeps them)."""
        for name in self.TEXT_ENCODERS:
            enc = getattr(self.pipeline, name)
            if enc is not None:
                enc.to(device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
