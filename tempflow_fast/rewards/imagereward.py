"""ImageReward (Xu et al. 2023): BLIP ViT-L image encoder, BLIP text encoder cross-attending to the
image, an MLP on the [CLS] feature, standardised by the released mean/std.

Loaded through the `image-reward` package's own API: `ImageReward.load(path)` (a released name such as
"ImageReward-v1.0", fetched into ~/.cache/ImageReward, or a checkpoint file), or — with `med_config` given,
for offline use — the package's `ImageReward` model class built from that med_config.json with the
checkpoint file loaded over it, as `load` itself does. BLIP's tokenizer is bert-base-uncased, which
transformers must find in its cache when offline. The forward pass is the package's `score` method batched:
the same modules (`blip.visual_encoder`, `blip.text_encoder`, `mlp`, `mean`, `std`) and the same
tokenisation (max_length 35), with images preprocessed on tensors (224 bicubic resize, centre crop,
OpenAI mean/std, as its `_transform(224)`).

Needs the `image-reward` package (extra `[rewards]`), which pulls timm, fairscale and torchvision.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .base import ModelRewardBase, check_batch, to_unit_float
from .preprocess import ImageTransform

_TEXT_MAX_LENGTH = 35


def _import_image_reward():
    try:
        import ImageReward
    except ImportError as err:
        raise ImportError("the ImageReward reward needs the image-reward package: pip install "
                          f"'tempflow_fast[rewards]' (image-reward); import failed with: {err}") from err
    return ImageReward


class ImageRewardReward(ModelRewardBase):
    """`reward(images, prompts)` → (B,) float32 ImageReward score (standardised, about -2..2)."""

    def __init__(self, path: str = "ImageReward-v1.0", *, med_config: Optional[str] = None,
                 device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "float32",
                 scale: float = 1.0, name: str = "imagereward", batch_size: int = 32):
        ir = _import_image_reward()
        self._init_settings(name=name, device=device, dtype=dtype, batch_size=batch_size, scale=scale)
        if med_config is None:
            model = ir.load(path, device=str(self.device))
        else:
            model = _load_offline(path, med_config, self.device)
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
            chunk = to_unit_float(images[start:start + self.batch_size], self.device)
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


def _load_offline(path: str, med_config: str, device: torch.device):
    """What `ImageReward.load` does, minus its downloads: the package's model class from `med_config`,
    the checkpoint's state dict over it (non-strict, as the package loads it)."""
    import importlib
    import os

    for name, value in (("path", path), ("med_config", med_config)):
        if not os.path.isfile(value):
            raise ValueError(f"{name}: no such file {value!r} "
                             "(offline ImageReward needs the checkpoint and med_config.json)")
    model_class = importlib.import_module("ImageReward.ImageReward").ImageReward
    model = model_class(med_config=med_config, device=str(device))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
    return model.to(device).eval()
