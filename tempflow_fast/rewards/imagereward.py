"""ImageReward (Xu et al. 2023): BLIP ViT-L image encoder, BLIP text encoder cross-attending to the
image, an MLP on the [CLS] feature, standardised by the released mean/std.

Loaded through the `image-reward` package's own API (`ImageReward.load`), which builds the BLIP model
from its `med_config.json` and the checkpoint; the forward pass is the package's `score` method batched:
the same modules (`blip.visual_encoder`, `blip.text_encoder`, `mlp`, `mean`, `std`) and the same
tokenisation (max_length 35), with images preprocessed on tensors (224 bicubic resize, centre crop,
OpenAI mean/std, as its `_transform(224)`).

Needs the `image-reward` package (extra `[rewards]`), which pulls timm, fairscale and torchvision.
Offline, pass the checkpoint file as `path` and its med_config.json as `med_config` (the package
otherwise downloads both).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .base import check_batch, resolve_device, resolve_dtype
from .preprocess import ImageTransform

_TEXT_MAX_LENGTH = 35


def _import_image_reward():
    try:
        import ImageReward
    except ImportError as err:
        raise ImportError("the ImageReward reward needs the image-reward package: pip install "
                          f"'tempflow_fast[rewards]' (image-reward); import failed with: {err}") from err
    return ImageReward


class ImageRewardReward:
    """`reward(images, prompts)` → (B,) float32 ImageReward score (standardised, about -2..2)."""

    def __init__(self, path: str = "ImageReward-v1.0", *, med_config: Optional[str] = None,
                 device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "float32",
                 scale: float = 1.0, name: str = "imagereward", batch_size: int = 32):
        ir = _import_image_reward()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.scale = float(scale)
        self.batch_size = batch_size
        model = ir.load(path, device=str(self.device), med_config=med_config)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.transform = ImageTransform(mean=(0.48145466, 0.4578275, 0.40821073),
                                        std=(0.26862954, 0.26130258, 0.27577711),
                                        shortest_edge=224, crop_hw=(224, 224))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        blip = self.model.blip
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device, non_blocking=True)
            text = blip.tokenizer(prompts[start:start + self.batch_size], padding="max_length", truncation=True,
                                  max_length=_TEXT_MAX_LENGTH, return_tensors="pt").to(self.device)
            image_embeds = blip.visual_encoder(self.transform(chunk, self.dtype))
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                       return_dict=True).last_hidden_state[:, 0, :]
            r = self.model.mlp(hidden.to(self.dtype)).float().squeeze(-1)
            out.append(self.scale * (r - self.model.mean) / self.model.std)
        return torch.cat(out).to(device=images.device, dtype=torch.float32)
