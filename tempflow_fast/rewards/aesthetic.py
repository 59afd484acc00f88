"""LAION aesthetic predictor: a CLIP image embedding (unit norm) through the improved-aesthetic-
predictor MLP head (`sac+logos+ava1-l14-linearMSE.pth` on top of openai/clip-vit-large-patch14).

The head is `nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear)` with no
activations (as released); its state dict therefore has `layers.{0,2,4,6,7}.{weight,bias}`. Layer sizes
are read from the file, so the 768→1024→128→64→16→1 release and smaller test heads load the same way.
The prompt plays no part in the score.
"""

from __future__ import annotations

import os
from typing import Dict, Sequence, Union

import torch
from torch import nn

from .base import ModelRewardBase, check_batch, to_unit_float
from .clip_score import _features
from .files import resolve_file
from .preprocess import ImageTransform

_LINEAR_INDICES = (0, 2, 4, 6, 7)
_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticHead(nn.Module):
    """The LAION MLP, layer sizes taken from `state_dict`."""

    def __init__(self, state_dict: Dict[str, torch.Tensor]):
        super().__init__()
        expected = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
        if set(state_dict) != expected:
            raise ValueError(f"aesthetic head state dict must have keys {sorted(expected)}, got {sorted(state_dict)}")
        mods = []
        for i in range(8):
            if i in _LINEAR_INDICES:
                out_f, in_f = state_dict[f"layers.{i}.weight"].shape
                mods.append(nn.Linear(in_f, out_f))
            else:
                mods.append(nn.Dropout(_DROPOUTS[i]))
        self.layers = nn.Sequential(*mods)
        if self.layers[7].out_features != 1:
            raise ValueError(f"aesthetic head must end in one output, got {self.layers[7].out_features}")
        self.load_state_dict(state_dict)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def load_head_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch pickle of plain tensors (`weights_only=True`: never runs code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(ModelRewardBase):
    """`reward(images, prompts)` → (B,) float32 aesthetic score (about 1..10 for the released head)."""

    def __init__(self, clip_path: str, head_path: str, *, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "float32", name: str = "aesthetic", batch_size: int = 32):
        from transformers import CLIPImageProcessor, CLIPModel

        self._init_settings(name=name, device=device, dtype=dtype, batch_size=batch_size)
        processor = CLIPImageProcessor.from_pretrained(clip_path)
        self.transform = ImageTransform.from_hf_processor(processor)
        clip = CLIPModel.from_pretrained(clip_path)
        # only the vision tower and its projection are used; drop the text tower's memory
        self.vision = clip.vision_model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.projection = clip.visual_projection.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        head_file = resolve_file(head_path, "head_path")
        self.head = AestheticHead(load_head_state_dict(head_file)).to(self.device).eval().requires_grad_(False)
        if self.head.layers[0].in_features != self.projection.out_features:
            raise ValueError(f"head_path {os.path.basename(head_file)!r} expects {self.head.layers[0].in_features}-d "
                             f"embeddings but the CLIP model at clip_path projects to {self.projection.out_features}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(images, prompts)
        out = []
        for chunk in images.split(self.batch_size):
            pixels = self.transform(to_unit_float(chunk, self.device), self.dtype)
            pooled = _features(self.vision(pixel_values=pixels))
            emb = self.projection(pooled).float()
            out.append(self.head(emb / emb.norm(dim=-1, keepdim=True)))
        return torch.cat(out).to(device=images.device, dtype=torch.float32)
