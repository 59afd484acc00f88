"""The embedded tiny FLUX: a real `diffusers.FluxTransformer2DModel` on 2×2-packed 16×16 RGB pixels.

There is no VAE: the "latent" of an image is its pixels scaled to [-1, 1] and packed the way FLUX
packs VAE latents (2×2 patches → 64 tokens × 12 channels), so the transformer, the rope ids and
the packing are exactly FLUX's. A word-level text encoder stands in for CLIP + T5: learned word
embeddings plus learned positions give `encoder_hidden_states`; their masked mean, through a
linear layer, gives `pooled_projections`; text ids are zero as in FLUX.

Everything trainable lives in one `nn.Module` (`TinyFluxModule`: transformer + text encoder), so
LoRA, full fine-tuning and EMA all act on `adapter.module`. Conditioning carries token ids, not
embeddings, so the text encoder is part of every forward and receives gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Cond, check_velocity_inputs

IMAGE_SIZE = 16
CHANNELS = 3
PATCH = 2  # FLUX packs 2×2 latent pixels into one token
WEIGHTS_NAME = "tiny_flux.safetensors"
CONFIG_NAME = "tiny_flux_config.json"

DEFAULT_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS * PATCH * PATCH,
    out_channels=CHANNELS * PATCH * PATCH,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


class WordTextEncoder(nn.Module):
    """Token ids (B, L) → (encoder_hidden_states (B, L, D), pooled (B, P)); id 0 is padding."""

    def __init__(self, vocab_size: int, max_words: int, dim: int, pooled_dim: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_words, dim))
        self.pool = nn.Linear(dim, pooled_dim)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.word(token_ids) + self.position[: token_ids.shape[1]]
        mask = (token_ids != 0).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return hidden, self.pool(pooled)


class TinyFluxModule(nn.Module):
    """Transformer + text encoder as one module: forward(x, sigma, token_ids) → velocity."""

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: WordTextEncoder):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        rows = torch.arange(IMAGE_SIZE // PATCH).repeat_interleave(IMAGE_SIZE // PATCH)
        cols = torch.arange(IMAGE_SIZE // PATCH).repeat(IMAGE_SIZE // PATCH)
        # FLUX image ids: (0, row, col) per token; not parameters, not saved.
        self.register_buffer("img_ids", torch.stack([torch.zeros_like(rows), rows, cols], 1).float(), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self.text_encoder(token_ids)
        txt_ids = torch.zeros(token_ids.shape[1], 3, device=x.device, dtype=x.dtype)
        # diffusers' Flux transformer multiplies `timestep` by 1000 itself (FluxPipeline passes
        # t/1000), so σ ∈ [0, 1] goes in as is.
        return self.transformer(
            hidden_states=x,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            timestep=sigma.to(x.dtype),
            img_ids=self.img_ids.to(x.dtype),
            txt_ids=txt_ids,
            return_dict=False,
        )[0]


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, C·4), FLUX's `_pack_latents` layout."""
    if images.ndim != 4 or images.shape[2] % PATCH or images.shape[3] % PATCH:
        raise ValueError(f"images must be (B, C, H, W) with even H, W; got {tuple(images.shape)}")
    b, c, h, w = images.shape
    x = images.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(x: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of `pack`: (B, H/2·W/2, C·4) → (B, C, H, W)."""
    b, n, d = x.shape
    if n != (height // PATCH) * (width // PATCH) or d % (PATCH * PATCH):
        raise ValueError(f"x must be (B, {(height // PATCH) * (width // PATCH)}, C*4); got {tuple(x.shape)}")
    c = d // (PATCH * PATCH)
    x = x.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class TinyFluxAdapter:
    """`FlowModelAdapter` for the tiny FLUX on 16×16 RGB; latents are packed pixels in [-1, 1]."""

    latent_shape = ((IMAGE_SIZE // PATCH) ** 2, CHANNELS * PATCH * PATCH)
    image_seq_len = (IMAGE_SIZE // PATCH) ** 2

    def __init__(self, module: TinyFluxModule, vocab: Sequence[str], max_words: int):
        self.module = module
        self.vocab = tuple(vocab)
        self.max_words = int(max_words)
        self.text_seq_len = self.max_words
        self._index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def create(cls, seed: int = 0, transformer_config: Optional[dict] = None, *, vocab: Sequence[str],
               max_words: int, text_dim: int = 64) -> "TinyFluxAdapter":
        """A freshly initialised model (deterministic in `seed`) reading the words `vocab` (index 0: padding), at
        most `max_words` per prompt. The vocabulary is the task's (tasks/shapes/task.py: new_model); a saved
        model carries its own in its config (`from_pretrained`)."""
        vocab = tuple(vocab)
        if len(vocab) < 2:
            raise ValueError(f"vocab must hold the padding entry and at least one word, got {vocab!r}")
        max_words = int(max_words)
        config = dict(DEFAULT_TRANSFORMER_CONFIG, **(transformer_config or {}))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel.from_config(config)
            text = WordTextEncoder(len(vocab), max_words, text_dim, config["pooled_projection_dim"])
        return cls(TinyFluxModule(transformer, text), vocab, max_words)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → token ids (B, max_words), zero-padded; unknown word → ValueError naming it."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of str, got a single str")
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = prompt.lower().split()
            if len(words) > self.max_words:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_words}")
            for i, w in enumerate(words):
                if w not in self._index or w == self.vocab[0]:
                    raise ValueError(f"prompt {prompt!r}: unknown word {w!r}")
                ids[b, i] = self._index[w]
        return ids

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        return {"token_ids": self.tokenize(prompts).to(self.device)}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = check_velocity_inputs(x, sigma, cond, self.latent_shape)
        return self.module(x, sigma, cond["token_ids"])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, 16, 16) → latents (B, 64, 12) in [-1, 1]."""
        return pack(images * 2.0 - 1.0)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((unpack(x) + 1.0) / 2.0).clamp(0.0, 1.0)

    def config(self) -> dict:
        return {
            "transformer": dict(self.module.transformer.config),
            "text_encoder": {
                "vocab": list(self.vocab),
                "max_words": self.max_words,
                "dim": self.module.text_encoder.word.embedding_dim,
            },
        }

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Weights as fp32 safetensors + a JSON config (its "transformer" part is a diffusers config)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        config = self.config()
        config["transformer"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config["transformer"].items()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=str))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "TinyFluxAdapter":
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"directory {str(directory)!r} has no {WEIGHTS_NAME} + {CONFIG_NAME}")
        config = json.loads((directory / CONFIG_NAME).read_text())
        transformer_config = {k: v for k, v in config["transformer"].items() if not k.startswith("_")}
        transformer_config["axes_dims_rope"] = tuple(transformer_config["axes_dims_rope"])
        text = config["text_encoder"]
        adapter = cls.create(0, transformer_config, vocab=text["vocab"], max_words=text["max_words"], text_dim=text["dim"])
        from .loading import check_finite_weights

        state = load_file(str(directory / WEIGHTS_NAME))
        check_finite_weights(state.items(), str(directory / WEIGHTS_NAME))
        adapter.module.load_state_dict(state)
        adapter.module.to(device)
        return adapter


def shipped_weights_dir():
    """The packaged weights folder (a Traversable; a real directory for normal installs)."""
    from importlib.resources import files

    return files("tempflow_fast") / "assets" / "tiny_flux_shapes"


def load_shipped(device: Union[str, torch.device] = "cpu") -> TinyFluxAdapter:
    """The pretrained shapes model shipped in the package."""
    from importlib.resources import as_file

    with as_file(shipped_weights_dir()) as path:
        return TinyFluxAdapter.from_pretrained(path, device)


def load(path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu") -> TinyFluxAdapter:
    """A saved model from `path` (a `save_pretrained` folder), or the shipped one when path is None."""
    return load_shipped(device) if path in (None, "") else TinyFluxAdapter.from_pretrained(path, device)
