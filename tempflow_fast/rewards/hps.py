"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Loading follows HPSv2's own `score.py`: build the open_clip architecture, load the checkpoint's
`state_dict` over it (every weight comes from the checkpoint, so no LAION pretrained download is needed
first), tokenise with open_clip's tokenizer for the architecture. The score is the cosine of the
normalised image and text features (HPSv2 reports `image_features @ text_features.T` diagonal, without
the logit scale). Images are preprocessed on tensors from the model's own `preprocess_cfg`
(shortest-side bicubic resize, centre crop, OpenAI mean/std).

Needs `open_clip_torch` (extra `[rewards]`); it imports torchvision, so a torchvision build that matches
the installed torch must be present.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .base import ModelRewardBase, check_batch, to_unit_float
from .files import resolve_file
from .preprocess import ImageTransform


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("the HPS reward needs open_clip: pip install 'tempflow_fast[rewards]' (open_clip_torch "
                          f"and a torchvision matching your torch); import failed with: {err}") from err
    return open_clip


class HPSReward(ModelRewardBase):
    """`reward(images, prompts)` → (B,) float32 HPS score (cosine, about 0.2..0.35 for HPSv2.1)."""

    def __init__(self, path: str, *, arch: str = "ViT-H-14", device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "float32", scale: float = 1.0, name: str = "hps",
                 batch_size: int = 32):
        open_clip = _import_open_clip()
        self._init_settings(name=name, device=device, dtype=dtype, batch_size=batch_size, scale=scale)
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        ckpt = torch.load(resolve_file(path, "path"), map_location="cpu", weights_only=True)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state, dict):
            raise ValueError(f"path {path!r}: expected a state dict (or {{'state_dict': ...}}), "
                             f"got {type(state).__name__}")
        # checkpoints saved from DistributedDataParallel prefix every key with "module."
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model.load_state_dict(state)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if cfg.get("resize_mode", "shortest") != "shortest" or size[0] != size[1]:
            raise ValueError(f"arch {arch!r}: only square 'shortest' resize preprocessing is supported, got "
                             f"resize_mode={cfg.get('resize_mode')!r} size={size}")
        # open_clip's validation transform: Resize(shortest side) → CenterCrop → Normalize
        self.transform = ImageTransform(mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                                        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
                                        shortest_edge=size[0], crop_hw=size,
                                        interpolation=cfg.get("interpolation", "bicubic"))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        out = []
        for chunk, chunk_prompts in zip(images.split(self.batch_size), _chunks(prompts, self.batch_size)):
            pixels = self.transform(to_unit_float(chunk, self.device), self.dtype)
            img = self.model.encode_image(pixels, normalize=True).float()
            txt = self.model.encode_text(self.tokenizer(chunk_prompts).to(self.device), normalize=True).float()
            out.append(self.scale * (img * txt).sum(-1))
        return torch.cat(out).to(device=images.device, dtype=torch.float32)


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]
