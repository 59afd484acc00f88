"""Flow-GRPO's JPEG compressibility / incompressibility rewards (after DDPO's): the size of each image
saved by PIL as a quality-95 JPEG, in kB (1 kB = 1000 bytes).

    jpeg_incompressibility   score = size_kB           (more detail, noise, texture → higher)
    jpeg_compressibility     score = -size_kB / 500    (flat, simple images → higher; Flow-GRPO's scaling,
                                                         where DDPO used -size_kB)

Offline, no model. Images are (B, 3, H, W) float in [0, 1] (rounded to uint8 as Flow-GRPO does) or
uint8 in 0..255 (taken as they are), so both forms of one picture get the same score.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch

from .base import to_uint8

JPEG_QUALITY = 95  # Flow-GRPO's and DDPO's
COMPRESSIBILITY_SCALE = -1 / 500  # Flow-GRPO: jpeg_compressibility = -jpeg_incompressibility / 500


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """(B,) float32 on the images' device: the size of each image's JPEG at `quality`, in kB."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {got}")
    if images.dtype == torch.uint8:
        pixels = images.detach()
    elif images.is_floating_point():
        pixels = to_uint8(images)
    else:
        raise ValueError(f"images must be float in [0, 1] or uint8 in 0..255, got dtype {images.dtype}")
    sizes = []
    for array in pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward:
    """`reward(images, prompts)` → (B,) float32: kB of the quality-95 JPEG times `scale` (module docstring).
    Prompts are ignored (but their count is checked)."""

    accepts_uint8 = True

    def __init__(self, name: str, scale: float, quality: int = JPEG_QUALITY):
        self.name, self.scale, self.quality = name, float(scale), quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        sizes = jpeg_size_kb(images, self.quality)
        if isinstance(prompts, str) or len(prompts) != len(sizes):
            raise ValueError(f"prompts must be a list of {len(sizes)} strings (one per image), got {prompts!r:.80}")
        return sizes * self.scale


def jpeg_incompressibility() -> JpegReward:
    return JpegReward("jpeg_incompressibility", 1.0)


def jpeg_compressibility() -> JpegReward:
    return JpegReward("jpeg_compressibility", COMPRESSIBILITY_SCALE)
