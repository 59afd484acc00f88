"""FLUX.1 (dev) behind the model-adapter interface, loaded from a diffusers `FluxPipeline` folder.

Follows diffusers' `FluxPipeline` exactly where it matters for the numbers:
- latents: the VAE latent (C, H/8, W/8) packed into 2×2 patches, (H/16·W/16 tokens, 4C channels),
  with latent image ids (0, row, col) per token and zero text ids;
- timestep: the pipeline passes `t / 1000` with t = σ·1000, i.e. σ itself (the transformer
  multiplies by 1000 internally); the engine's σ ∈ [0, 1] goes in unchanged;
- guidance: FLUX.1-dev is guidance-distilled, one forward with the guidance embedding set to
  `guidance_scale` for every row (no classifier-free guidance batch);
- conditioning: `FluxPipeline.encode_prompt` — CLIP pooled output → `pooled_projections`, T5
  hidden states (`max_sequence_length` tokens) → `encoder_hidden_states`;
- decode: unpack, `latents / scaling_factor + shift_factor`, VAE decode, `x / 2 + 0.5` clamped;
- schedule: the pipeline scheduler's config as `self.schedule` (sampling/schedules.py `FlowSchedule`), so the
  engine samples on the pipeline's own dynamic-shift constants (`model_sigmas`), as `FluxPipeline` does.

Weights load in `dtype` (bf16 by default) and the forward runs under autocast to it, so trainable fp32
master weights (LoRA adapters, a full fine-tune) compute in bf16 like the frozen ones; inputs are cast to
it and the velocity comes back in fp32, so the SDE step and log-prob math downstream stay fp32.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from tempflow_fast.sampling.schedules import FlowSchedule

from .base import Cond, autocast, check_velocity_inputs
from .text_cache import CachedTextPipelineMixin, PromptCache

# LoRA targets of Flow-GRPO's FLUX recipe (scripts/train_flux.py): the attention projections of
# both streams and the feed-forward layers of the double blocks (peft matches by suffix, so the
# single blocks' attn.to_q/k/v are included too).
FLUX_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
FLUX_LORA_RANK = 64
FLUX_LORA_ALPHA = 128


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C), `FluxPipeline._pack_latents`."""
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"latents must be (B, C, h, w) with even h, w; got {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w), `FluxPipeline._unpack_latents` for latent size (h, w)."""
    b, n, d = x.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"x must be (B, {(h // 2) * (w // 2)}, 4C); got {tuple(x.shape)}")
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int) -> torch.Tensor:
    """(h/2·w/2, 3) ids (0, row, col) of the packed tokens, `FluxPipeline._prepare_latent_image_ids`."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(CachedTextPipelineMixin):
    """`FlowModelAdapter` for a diffusers FLUX pipeline; `module` is its `FluxTransformer2DModel`."""

    TEXT_ENCODERS = ('text_encoder', 'text_encoder_2')

    def __init__(self, pipeline, *, resolution: int = 1024, guidance_scale: float = 3.5,
                 max_sequence_length: int = 512, cache_device: Union[str, torch.device] = "cpu"):
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        if not isinstance(resolution, int) or resolution < 1 or resolution % (vae_scale * 2):
            raise ValueError(f"resolution must be a positive multiple of {vae_scale * 2} (VAE factor × 2), "
                             f"got {resolution!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (FluxPipeline's limit), "
                             f"got {max_sequence_length!r}")
        self.pipeline = pipeline
        self.module = pipeline.transformer
        self.vae = pipeline.vae
        self.resolution = resolution
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.latent_hw = (resolution // vae_scale, resolution // vae_scale)
        h, w = self.latent_hw
        channels = self.module.config.in_channels // 4
        self.latent_shape = ((h // 2) * (w // 2), channels * 4)
        self.image_seq_len = self.latent_shape[0]
        self.text_seq_len = self.max_sequence_length
        self.cfg_batches = 1  # distilled guidance: one transformer row per latent row
        # the pipeline's own sigma schedule (shift, dynamic shift and its constants), read by model_sigmas
        self.schedule = FlowSchedule.from_scheduler_config(pipeline.scheduler.config)
        self.compute_dtype = self.module.dtype
        self._img_ids = latent_image_ids(h, w)
        self._ids_on = {}
        self.cache = PromptCache(self._encode_on_device, cache_device)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the weights' dtype at load; trainable weights may be fp32 master copies since)."""
        return self.compute_dtype

    # --- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: List[str]) -> Cond:
        te_device = next(self.pipeline.text_encoder_2.parameters()).device
        embeds, pooled, _ = self.pipeline.encode_prompt(prompts, prompt_2=prompts, device=te_device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    # --- transformer --------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = check_velocity_inputs(x, sigma, cond, self.latent_shape)
        b = x.shape[0]
        embeds, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        dtype = self.dtype
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        with autocast(x.device, dtype):
            out = self.module(
                hidden_states=x.to(dtype),
                timestep=sigma,
                guidance=guidance,
                pooled_projections=pooled.to(dtype),
                encoder_hidden_states=embeds.to(dtype),
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
                img_ids=self._image_ids(x.device, dtype),
                return_dict=False,
            )[0]
        return out.float()

    def _image_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Kept on the device: a host-to-device copy inside velocity would break CUDA-graph capture.
        key = (device, dtype)
        if key not in self._ids_on:
            self._ids_on[key] = self._img_ids.to(device=device, dtype=dtype)
        return self._ids_on[key]

    # --- VAE ----------------------------------------------------------------------------------

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, L, 4C) → images (B, 3, H, W) in [0, 1], fp32."""
        cfg = self.vae.config
        latents = unpack_latents(x.float(), *self.latent_hw) / cfg.scaling_factor + cfg.shift_factor
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → packed latents (B, L, 4C), fp32 (posterior mean)."""
        cfg = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist
        return pack_latents((dist.mean.float() - cfg.shift_factor) * cfg.scaling_factor)


def load_flux(path: str, *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16,
              vae_dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
              resolution: int = 1024, guidance_scale: float = 3.5, max_sequence_length: int = 512,
              cache_device: Union[str, torch.device] = "cpu") -> FluxAdapter:
    """`FluxPipeline.from_pretrained(path)` (folder or hub id) → `FluxAdapter` with its parts on `device`.

    Transformer in `dtype`, VAE in `vae_dtype` (fp32 as Flow-GRPO does, for reward images), text
    encoders in `text_encoder_dtype` (default `dtype`); every frozen part has requires_grad off.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(
        path, dtype={"transformer": dtype, "vae": vae_dtype, "default": text_encoder_dtype or dtype})
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        frozen.to(device).requires_grad_(False)
    pipe.transformer.to(device)
    return FluxAdapter(pipe, resolution=resolution, guidance_scale=guidance_scale,
                       max_sequence_length=max_sequence_length, cache_device=cache_device)
