"""The reward interface every scorer here follows, and the argument checks they share.

A reward is any callable `reward(images, prompts) -> scores` with a `name` attribute:
  images  (B, 3, H, W) float tensor in [0, 1] or uint8 tensor in 0..255, on any device (real-model
          rollouts hand rewards uint8 images on the host; a scorer converts one chunk at a time with
          `to_unit_float`, tempflow_fast/images.py);
  prompts list of B strings, prompt i belongs to image i;
  scores  (B,) float32 tensor on the images' device (the trainer compares rewards within a group, so
          higher is better and no other scale is implied).
The shapes task's `ShapesReward` already fits; every class in this package does too, and says so with
`accepts_uint8 = True`. A reward without that attribute (a user's plain callable) is handed float images.
"""

from __future__ import annotations

from typing import List, Protocol, Sequence, Union, runtime_checkable

import torch

from tempflow_fast.images import to_uint8, to_unit_float  # noqa: F401  (re-exported for the scorers)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def check_batch(images, prompts) -> List[str]:
    """Validate one scoring call's arguments; returns `prompts` as a list."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"images must be a float tensor in [0, 1] or uint8 in 0..255, got dtype {images.dtype}")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompts has {len(prompts)} entries but images has {images.shape[0]} rows")
    return prompts


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """"auto" = the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err


class ModelRewardBase:
    """The settings every in-process reward model shares: name, device, dtype, score scale, batch size."""

    accepts_uint8 = True  # scores uint8 images as well as float ones (see the module doc)

    def _init_settings(self, *, name: str, device, dtype, batch_size: int, scale: float = 1.0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.scale = float(scale)
        self.batch_size = batch_size
