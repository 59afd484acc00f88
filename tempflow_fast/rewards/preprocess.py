"""Scorer image preprocessing on tensors: resize, centre crop, normalise — the steps of CLIP's
`CLIPImageProcessor`, open_clip's validation transform and ImageReward's `_transform`, done on the
images' own device in one batched pass instead of a PIL round trip per image.

Known difference from the PIL path: PIL's bicubic kernel uses a = -0.5 and rounds to uint8 after the
resize, torch's uses a = -0.75 on floats (both antialias when shrinking). On natural images the
normalised pixels differ by a few 1e-2 at most where a resize happens, and not at all without one;
tests/rewards/test_preprocess.py measures it against `CLIPImageProcessor` itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# PIL resample codes (what processor configs store) → torch interpolate modes. LANCZOS (1) has no
# torch counterpart; bicubic is the nearest antialiased kernel.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", "bicubic": "bicubic",
             "bilinear": "bilinear", "nearest": "nearest"}


@dataclass(frozen=True)
class ImageTransform:
    """resize (shortest edge to `shortest_edge`, or exactly to `resize_hw`) → centre crop to `crop_hw`
    → (x - mean) / std. Any step whose size is None is skipped."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    shortest_edge: Optional[int] = None
    resize_hw: Optional[Tuple[int, int]] = None
    crop_hw: Optional[Tuple[int, int]] = None
    interpolation: str = "bicubic"

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={self.mean} std={self.std}")
        if self.shortest_edge is not None and self.resize_hw is not None:
            raise ValueError("give shortest_edge or resize_hw, not both")

    @classmethod
    def from_hf_processor(cls, image_processor) -> "ImageTransform":
        """From a transformers image processor (`CLIPImageProcessor` and kin): its size, crop, mean, std."""
        shortest, resize_hw, crop = None, None, None
        if getattr(image_processor, "do_resize", True):
            size = _as_dict(image_processor.size, "size")
            if "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            elif "height" in size and "width" in size:
                resize_hw = (int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"image processor size must have shortest_edge or height/width, got {size}")
        if getattr(image_processor, "do_center_crop", False):
            c = _as_dict(image_processor.crop_size, "crop_size")
            crop = (int(c["height"]), int(c["width"]))
        if getattr(image_processor, "do_normalize", True):
            mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = getattr(image_processor, "resample", 3)
        resample = getattr(resample, "value", resample)  # PIL enum or int
        if resample not in _RESAMPLE:
            raise ValueError(f"image processor resample {resample!r} is not supported; "
                             f"known: {sorted(map(str, _RESAMPLE))}")
        return cls(mean=mean, std=std, shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop,
                   interpolation=_RESAMPLE[resample])

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, 3, h, w) normalised pixels in `dtype` (maths in fp32)."""
        x = images.float()
        h, w = x.shape[-2:]
        if self.shortest_edge is not None:
            s = self.shortest_edge
            # transformers' get_resize_output_image_size: the short side becomes s, the long side int(s·L/S)
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        else:
            size = self.resize_hw
        if size is not None and tuple(size) != (h, w):
            x = _resize(x, size, self.interpolation)
        if self.crop_hw is not None:
            x = _center_crop(x, self.crop_hw)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


def _as_dict(size, what: str) -> dict:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if dataclasses.is_dataclass(size):  # transformers 5's SizeDict
        size = dataclasses.asdict(size)
    if hasattr(size, "items"):
        return {k: v for k, v in size.items() if v is not None}
    raise ValueError(f"image processor {what} must be an int or a mapping, got {size!r}")


def _resize(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    # the processors resize uint8 images, so values stay in [0, 1]; bicubic overshoots without the clamp
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=True).clamp_(0, 1)


def _center_crop(x: torch.Tensor, crop_hw: Sequence[int]) -> torch.Tensor:
    ch, cw = crop_hw
    h, w = x.shape[-2:]
    if h < ch or w < cw:  # the processors pad with zeros first; do the same
        ph, pw = max(0, ch - h), max(0, cw - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]
