"""A tiny random-weight FLUX transformer behind the model-adapter interface, for sampling tests.

Small on purpose (1 double + 1 single block, 2 heads × 8, 16 image tokens of 12 channels = an
8×8 RGB image in 2×2 patches) so that a full TempFlow rollout (1120 latent evaluations) runs in
seconds on a CPU. The engine must not care which model it drives, so nothing here is special.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import pytest
import torch

from tempflow_fast.models.base import Cond

GRID = 4          # 4×4 image tokens
PATCH = 2         # each token is a 2×2 RGB patch → 12 channels
CHANNELS = 3 * PATCH * PATCH
TEXT_LEN = 4
TEXT_DIM = 16
VOCAB = 97


class TinyFlux:
    """FlowModelAdapter over a diffusers.FluxTransformer2DModel built from a config."""

    def __init__(self, seed: int = 0):
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(seed)
        self.module = FluxTransformer2DModel(
            patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
        ).eval()
        self.word_embedding = torch.nn.Embedding(VOCAB, TEXT_DIM)
        self.latent_shape = (GRID * GRID, CHANNELS)
        self.image_seq_len = GRID * GRID
        rows = torch.arange(GRID).repeat_interleave(GRID)
        cols = torch.arange(GRID).repeat(GRID)
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).float()
        self.txt_ids = torch.zeros(TEXT_LEN, 3)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        # crc32, not hash(): Python's str hash changes between processes.
        ids = torch.tensor([[zlib.crc32(w.encode()) % VOCAB for w in (p.split() + [""] * TEXT_LEN)[:TEXT_LEN]]
                            for p in prompts])
        tokens = self.word_embedding(ids)
        return {"tokens": tokens, "pooled": tokens.mean(1)}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.module(hidden_states=x, encoder_hidden_states=cond["tokens"],
                          pooled_projections=cond["pooled"], timestep=sigma, img_ids=self.img_ids,
                          txt_ids=self.txt_ids, return_dict=False)[0]
        return out

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        img = x.reshape(b, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        return ((img.reshape(b, 3, GRID * PATCH, GRID * PATCH) + 1) / 2).clamp(0, 1)


class CountingModel:
    """Wraps an adapter and counts the latent rows that go through `velocity`, independently of
    the engine's own bookkeeping, so NFE tests check the engine against an outside witness."""

    def __init__(self, model):
        self.inner = model
        self.module = model.module
        self.latent_shape = model.latent_shape
        self.image_seq_len = model.image_seq_len
        self.rows = 0
        self.calls = 0

    def encode_prompts(self, prompts):
        return self.inner.encode_prompts(prompts)

    def velocity(self, x, sigma, cond):
        self.rows += x.shape[0]
        self.calls += 1
        return self.inner.velocity(x, sigma, cond)

    def decode(self, x):
        return self.inner.decode(x)


@pytest.fixture(scope="session")
def tiny_model():
    return TinyFlux()


@pytest.fixture
def counting_model(tiny_model):
    """The tiny model behind a fresh row counter."""
    return CountingModel(tiny_model)


@pytest.fixture(scope="session")
def tiny_model_cls():
    """For tests that need their own instance (e.g. moved to CUDA)."""
    return TinyFlux
