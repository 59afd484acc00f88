"""Stable Diffusion 3 / 3.5 behind the model-adapter interface, from a diffusers
`StableDiffusion3Pipeline` folder.

Follows diffusers' `StableDiffusion3Pipeline` where it matters for the numbers:
- latents: the VAE latent (C, H/8, W/8) as is (the transformer patchifies internally);
- timestep: the scheduler's t = σ·1000 (the SD3 transformer takes timesteps in [0, 1000]);
- classifier-free guidance: ONE batched forward over [uncond; cond] rows, then
  v = v_uncond + g·(v_cond − v_uncond) in fp32 (the pipeline does it in the model dtype);
  with g <= 1 a single conditional forward, as the pipeline does;
- conditioning: `StableDiffusion3Pipeline.encode_prompt` — two CLIP penultimate hidden states
  concatenated and zero-padded to the T5 width, then T5 tokens; pooled = both CLIP projections.
  The negative prompt ("" by default, Flow-GRPO's choice) is encoded once and held by the adapter,
  so `Cond` carries only the prompts' rows;
- decode: `latents / scaling_factor + shift_factor`, VAE decode, `x / 2 + 0.5` clamped;
- schedule: the pipeline scheduler's config as `self.schedule` (sampling/schedules.py `FlowSchedule`: its shift),
  which `model_sigmas` samples on where a plan leaves the shift to the model.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from tempflow_fast.sampling.schedules import FlowSchedule

from .base import Cond, autocast, check_velocity_inputs
from .text_cache import CachedTextPipelineMixin, PromptCache

# LoRA targets of Flow-GRPO's SD3.5 recipe (scripts/train_sd3.py): the attention projections of
# both streams; rank 32, α 64.
SD3_LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
SD3_LORA_RANK = 32
SD3_LORA_ALPHA = 64


class SD3Adapter(CachedTextPipelineMixin):
    """`FlowModelAdapter` for a diffusers SD3 pipeline; `module` is its `SD3Transformer2DModel`."""

    TEXT_ENCODERS = ('text_encoder', 'text_encoder_2', 'text_encoder_3')

    def __init__(self, pipeline, *, resolution: int = 512, guidance_scale: float = 4.5,
                 max_sequence_length: int = 256, negative_prompt: str = "",
                 cache_device: Union[str, torch.device] = "cpu"):
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        patch = pipeline.transformer.config.patch_size
        if not isinstance(resolution, int) or resolution < 1 or resolution % (vae_scale * patch):
            raise ValueError(f"resolution must be a positive multiple of {vae_scale * patch} (VAE factor × patch), "
                             f"got {resolution!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512, got {max_sequence_length!r}")
        self.pipeline = pipeline
        self.module = pipeline.transformer
        self.vae = pipeline.vae
        self.resolution = resolution
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        h = w = resolution // vae_scale
        self.latent_shape = (self.module.config.in_channels, h, w)
        self.image_seq_len = (h // patch) * (w // patch)
        # CLIP's 77 tokens (both CLIPs, concatenated along the width) then the T5 tokens
        self.text_seq_len = pipeline.tokenizer.model_max_length + self.max_sequence_length
        # the pipeline's own sigma schedule (shift, dynamic shift and its constants), read by model_sigmas
        self.schedule = FlowSchedule.from_scheduler_config(pipeline.scheduler.config)
        self.compute_dtype = self.module.dtype
        self.cache = PromptCache(self._encode_on_device, cache_device)
        self._negative_on = {}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the weights' dtype at load; trainable weights may be fp32 master copies since)."""
        return self.compute_dtype

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def cfg_batches(self) -> int:
        """Transformer rows per latent row: 2 under classifier-free guidance."""
        return 2 if self.do_cfg else 1

    # --- text ---------------------------------------------------------------------------------

    def _encode(self, prompts: List[str]) -> Cond:
        te_device = next(self.pipeline.text_encoder.parameters()).device
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, prompts, prompts, device=te_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def _prompts_to_keep(self) -> List[str]:
        return [self.negative_prompt]

    def _negative(self, batch: int, device: torch.device) -> Cond:
        # One device-resident copy of the negative prompt's embeddings: no host-to-device copy per
        # forward (which would also break CUDA-graph capture).
        if device not in self._negative_on:
            self._negative_on[device] = self.cache.get([self.negative_prompt], device)
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative_on[device].items()}

    # --- transformer --------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = check_velocity_inputs(x, sigma, cond, self.latent_shape)
        b = x.shape[0]
        embeds, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        dtype = self.dtype
        t = sigma * 1000.0
        if self.do_cfg:
            neg = self._negative(b, x.device)
            # Rows [0, b) unconditional, [b, 2b) conditional, the pipeline's order.
            x_in = torch.cat([x, x])
            t = torch.cat([t, t])
            embeds = torch.cat([neg["prompt_embeds"], embeds.to(x.device)])
            pooled = torch.cat([neg["pooled_projections"], pooled.to(x.device)])
        else:
            x_in = x
        with autocast(x.device, dtype):
            out = self.module(hidden_states=x_in.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                              pooled_projections=pooled.to(dtype), return_dict=False)[0].float()
        if not self.do_cfg:
            return out
        uncond, cond_v = out.chunk(2)
        return uncond + self.guidance_scale * (cond_v - uncond)

    # --- VAE ----------------------------------------------------------------------------------

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], fp32."""
        cfg = self.vae.config
        latents = x.float() / cfg.scaling_factor + cfg.shift_factor
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → latents (B, C, h, w), fp32 (posterior mean)."""
        cfg = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist
        return (dist.mean.float() - cfg.shift_factor) * cfg.scaling_factor


def load_sd3(path: str, *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16,
             vae_dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
             resolution: int = 512, guidance_scale: float = 4.5, max_sequence_length: int = 256,
             negative_prompt: str = "", cache_device: Union[str, torch.device] = "cpu") -> SD3Adapter:
    """`StableDiffusion3Pipeline.from_pretrained(path)` → `SD3Adapter` with its parts on `device`.

    Transformer in `dtype`, VAE in `vae_dtype` (fp32 as Flow-GRPO does), text encoders in
    `text_encoder_dtype` (default `dtype`); every frozen part has requires_grad off.
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        path, dtype={"transformer": dtype, "vae": vae_dtype, "default": text_encoder_dtype or dtype})
    for frozen in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if frozen is not None:
            frozen.to(device).requires_grad_(False)
    pipe.transformer.to(device)
    return SD3Adapter(pipe, resolution=resolution, guidance_scale=guidance_scale,
                      max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
                      cache_device=cache_device)
