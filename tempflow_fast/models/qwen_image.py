"""Qwen-Image behind the model-adapter interface, loaded from a diffusers `QwenImagePipeline` folder.

Follows diffusers' `QwenImagePipeline` where it matters for the numbers:
- latents: the VAE latent (C, 1 frame, H/8, W/8) packed into 2×2 patches, (H/16·W/16 tokens, 4C channels);
  the transformer gets `img_shapes` (1, H/16, W/16) for its RoPE;
- timestep: the pipeline passes `t / 1000` with t = σ·1000, i.e. σ itself, as FLUX does;
- guidance: true classifier-free guidance with a negative prompt (`true_cfg_scale`, 4.0 by default, negative
  prompt " " by default, the one Qwen-Image's model card uses): ONE batched forward over [negative; prompt]
  rows, then v = v_neg + g·(v_cond − v_neg) rescaled per token to the conditional prediction's norm,
  v · ‖v_cond‖ / ‖v‖ (norms over channels), in fp32; with g <= 1 a single conditional forward;
- conditioning: `QwenImagePipeline.encode_prompt` — Qwen2.5-VL's last hidden states of the prompt in the
  pipeline's chat template (the template's system part dropped), at most `max_sequence_length` tokens. The
  pipeline pads a batch to its longest prompt and masks the padding; here every prompt is padded to
  `max_sequence_length` with a mask (`prompt_mask`), so cached prompts stack and every call has one shape.
  Masked text tokens are keys nobody attends to and the text RoPE positions do not depend on the padded
  length, so the image tokens' velocity is the pipeline's. The negative prompt is encoded once and held
  by the adapter, so `Cond` carries only the prompts' rows;
- decode: unpack, `latents · latents_std + latents_mean` per channel, VAE decode of the one frame,
  `x / 2 + 0.5` clamped.

Weights load in `dtype` (bf16 by default) and the forward runs under autocast to it (fp32 master weights of
LoRA adapters or a full fine-tune compute in bf16 like the frozen ones); the velocity comes back in fp32.
The text mask rules out attention kernels that take no mask (flash, flash3, sage): use native or the SDPA
backends.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from tempflow_fast.sampling.schedules import FlowSchedule

from .base import Cond, autocast, check_velocity_inputs
from .flux import pack_latents, unpack_latents
from .text_cache import CachedTextPipelineMixin, PromptCache

# LoRA targets: the attention projections of both streams and both streams' feed-forward layers of every
# dual-stream block, the counterpart of the FLUX recipe's targets (flux.py); rank 64, α 128 as there.
QWEN_IMAGE_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
QWEN_IMAGE_LORA_RANK = 64
QWEN_IMAGE_LORA_ALPHA = 128
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline's limit


class QwenImageAdapter(CachedTextPipelineMixin):
    """`FlowModelAdapter` for a diffusers Qwen-Image pipeline; `module` is its `QwenImageTransformer2DModel`."""

    TEXT_ENCODERS = ("text_encoder",)

    def __init__(self, pipeline, *, resolution: int = 1024, guidance_scale: float = 4.0,
                 max_sequence_length: int = 512, negative_prompt: str = " ",
                 cache_device: Union[str, torch.device] = "cpu"):
        vae_scale = pipeline.vae_scale_factor
        if not isinstance(resolution, int) or resolution < 1 or resolution % (vae_scale * 2):
            raise ValueError(f"resolution must be a positive multiple of {vae_scale * 2} (VAE factor × 2), "
                             f"got {resolution!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale (true_cfg_scale) must be >= 0, got {guidance_scale!r}")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be in 1..{MAX_SEQUENCE_LENGTH} (QwenImagePipeline's limit), "
                             f"got {max_sequence_length!r}")
        if pipeline.transformer.config.guidance_embeds:
            raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported: "
                             "the adapter runs true CFG")
        self.pipeline = pipeline
        self.module = pipeline.transformer
        self.vae = pipeline.vae
        self.resolution = resolution
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self.latent_hw = (resolution // vae_scale, resolution // vae_scale)
        h, w = self.latent_hw
        self.latent_shape = ((h // 2) * (w // 2), self.module.config.in_channels)
        self.image_seq_len = self.latent_shape[0]
        self.text_seq_len = self.max_sequence_length
        self._img_shapes = (1, h // 2, w // 2)
        # the pipeline's own sigma schedule (dynamic shift, its constants, the terminal stretch), read by model_sigmas
        self.schedule = FlowSchedule.from_scheduler_config(pipeline.scheduler.config)
        self.compute_dtype = self.module.dtype
        z_dim = self.vae.config.z_dim
        self._latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
        self._latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
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
        embeds, mask = self.pipeline.encode_prompt(prompts, device=te_device,
                                                   max_sequence_length=self.max_sequence_length)
        b, n, d = embeds.shape
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(b, n, dtype=torch.bool, device=embeds.device)
        padded = embeds.new_zeros(b, self.max_sequence_length, d)
        padded[:, :n] = embeds
        full_mask = torch.zeros(b, self.max_sequence_length, dtype=torch.bool, device=embeds.device)
        full_mask[:, :n] = mask.bool()
        return {"prompt_embeds": padded, "prompt_mask": full_mask}

    def _prompts_to_keep(self) -> List[str]:
        return [self.negative_prompt]

    def _negative(self, batch: int, device: torch.device) -> Cond:
        # One device-resident copy of the negative prompt's embeddings: no host-to-device copy per forward
        # (which would also break CUDA-graph capture).
        if device not in self._negative_on:
            self._negative_on[device] = self.cache.get([self.negative_prompt], device)
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative_on[device].items()}

    # --- transformer --------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = check_velocity_inputs(x, sigma, cond, self.latent_shape)
        b = x.shape[0]
        embeds, mask = cond["prompt_embeds"].to(x.device), cond["prompt_mask"].to(x.device)
        dtype = self.dtype
        if self.do_cfg:
            neg = self._negative(b, x.device)
            # Rows [0, b) negative, [b, 2b) conditional.
            x_in, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
            embeds = torch.cat([neg["prompt_embeds"], embeds])
            mask = torch.cat([neg["prompt_mask"], mask])
        else:
            x_in = x
        with autocast(x.device, dtype):
            out = self.module(hidden_states=x_in.to(dtype), timestep=sigma, encoder_hidden_states=embeds.to(dtype),
                              encoder_hidden_states_mask=mask, img_shapes=[[self._img_shapes]] * x_in.shape[0],
                              return_dict=False)[0].float()
        if not self.do_cfg:
            return out
        uncond, cond_v = out.chunk(2)
        combined = uncond + self.guidance_scale * (cond_v - uncond)
        return combined * (cond_v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    # --- VAE ----------------------------------------------------------------------------------

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, L, 4C) → images (B, 3, H, W) in [0, 1], fp32."""
        latents = unpack_latents(x.float(), *self.latent_hw).unsqueeze(2)  # (B, C, 1 frame, h, w)
        latents = latents * self._latents_std.to(latents.device) + self._latents_mean.to(latents.device)
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → packed latents (B, L, 4C), fp32 (posterior mean)."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).unsqueeze(2).to(vae_dtype)).latent_dist
        mean = dist.mean.float()
        latents = (mean - self._latents_mean.to(mean.device)) / self._latents_std.to(mean.device)
        return pack_latents(latents[:, :, 0])


def load_qwen_image(path: str, *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16,
                    vae_dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
                    resolution: int = 1024, guidance_scale: float = 4.0, max_sequence_length: int = 512,
                    negative_prompt: str = " ", cache_device: Union[str, torch.device] = "cpu") -> QwenImageAdapter:
    """`QwenImagePipeline.from_pretrained(path)` (folder or hub id) → `QwenImageAdapter` with its parts on `device`.

    Transformer in `dtype`, VAE in `vae_dtype` (fp32, for reward images), the Qwen2.5-VL text encoder in
    `text_encoder_dtype` (default `dtype`); every frozen part has requires_grad off.
    """
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(
        path, dtype={"transformer": dtype, "vae": vae_dtype, "default": text_encoder_dtype or dtype})
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.to(device).requires_grad_(False)
    pipe.transformer.to(device)
    return QwenImageAdapter(pipe, resolution=resolution, guidance_scale=guidance_scale,
                            max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
                            cache_device=cache_device)
