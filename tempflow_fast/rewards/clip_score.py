"""CLIP-similarity rewards through transformers: PickScore and CLIP score.

    s(x, p) = scale · exp(logit_scale) · cos(E_img(x), E_txt(p))

which is what PickScore's reference code computes (`model.logit_scale.exp() * text_embs @ image_embs.T`,
diagonal for one prompt per image) and what Flow-GRPO's CLIP score takes (`logits_per_image.diagonal()`).
Flow-GRPO then divides PickScore by 26 and CLIP score by 30: pass `scale=1/26` / `scale=1/30` to match.

PickScore ships its model (`yuvalkirstain/PickScore_v1`, a `CLIPModel`) apart from its processor (the
one of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`): hence `processor_path` (see `pickscore`).
Images are preprocessed on tensors from the processor's own size/crop/mean/std (see preprocess.py);
prompts are tokenised by the processor's tokenizer, each distinct prompt once (a GRPO batch repeats every
prompt group-size times) with a small cache across calls.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch

from .base import ModelRewardBase, check_batch, to_unit_float
from .preprocess import ImageTransform


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features (projected embeddings in
    pooler_output); transformers 4 returned the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipSimilarityReward(ModelRewardBase):
    """`reward(images, prompts)` → (B,) float32: scale · exp(logit_scale) · cosine(image, prompt)."""

    def __init__(self, path: str, *, processor_path: Optional[str] = None, device: Union[str, torch.device] = "auto",
                 dtype: Union[str, torch.dtype] = "float32", scale: float = 1.0, name: str = "clip_score",
                 max_length: int = 77, batch_size: int = 32, text_cache_size: int = 4096):
        from transformers import CLIPModel, CLIPProcessor

        self._init_settings(name=name, device=device, dtype=dtype, batch_size=batch_size, scale=scale)
        self.max_length = max_length
        self.processor = CLIPProcessor.from_pretrained(processor_path or path)
        model = CLIPModel.from_pretrained(path).to(device=self.device, dtype=self.dtype)
        self.model = model.eval().requires_grad_(False)
        self.transform = ImageTransform.from_hf_processor(self.processor.image_processor)
        self._text_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._text_cache_size = text_cache_size

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, D) unit-norm fp32 text embeddings, one row per prompt."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tok = self.processor.tokenizer(missing, padding=True, truncation=True, max_length=self.max_length,
                                           return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(**tok)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            for p, e in zip(missing, emb):
                self._text_cache[p] = e
        rows = []
        for p in prompts:
            self._text_cache.move_to_end(p)
            rows.append(self._text_cache[p])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return torch.stack(rows)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm fp32 image embeddings of (B, 3, H, W) images in [0, 1]."""
        out = []
        for chunk in images.split(self.batch_size):
            pixels = self.transform(to_unit_float(chunk, self.device), self.dtype)
            emb = _features(self.model.get_image_features(pixel_values=pixels)).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        img = self.image_embeddings(images)
        txt = self.text_embeddings(prompts)
        scores = self.scale * self.model.logit_scale.float().exp() * (img * txt).sum(-1)
        return scores.to(device=images.device, dtype=torch.float32)


PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore(path: str, *, processor_path: Optional[str] = None, **kwargs) -> ClipSimilarityReward:
    """PickScore (Kirstain et al. 2023): `path` = the PickScore_v1 folder or hub id, `processor_path` = the
    CLIP-ViT-H-14 processor it was trained with. Left out, it is `path` itself when that is a local folder
    holding a processor config, else PICKSCORE_PROCESSOR (what PickScore's reference code loads)."""
    if processor_path is None:
        has_processor = any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json",
                                                                              "processor_config.json"))
        processor_path = path if has_processor else PICKSCORE_PROCESSOR
    return ClipSimilarityReward(path, processor_path=processor_path, name=kwargs.pop("name", "pickscore"), **kwargs)


def clip_score(path: str, **kwargs) -> ClipSimilarityReward:
    """CLIP score of any transformers `CLIPModel` folder or hub id (e.g. openai/clip-vit-large-patch14)."""
    return ClipSimilarityReward(path, name=kwargs.pop("name", "clip_score"), **kwargs)
