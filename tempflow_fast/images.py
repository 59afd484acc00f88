"""Image tensors between the decoder and the rewards: (B, 3, H, W), float in [0, 1] or uint8 in 0..255.

Decoded 1024 px images are 12.6 MB each in fp32; a FLUX-1024 TempFlow iteration decodes over a thousand, so
the rollout hands them to the rewards as uint8 on the host (`to_uint8`, the same rounding Flow-GRPO applies
before its scorers) and every scorer turns one chunk at a time back into floats on its own device
(`to_unit_float`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float → uint8 with rounding (uint8 input is returned as is)."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def to_unit_float(images: torch.Tensor, device: Optional[Union[str, torch.device]] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] → float `dtype` in [0, 1] on `device` (default: where the images are)."""
    device = images.device if device is None else torch.device(device)
    if images.dtype == torch.uint8:
        return images.to(device, non_blocking=True).to(dtype) / 255.0
    return images.to(device=device, dtype=dtype)
