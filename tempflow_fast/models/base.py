"""The model-adapter interface every part of the trainer talks to.

A model adapter wraps a flow-matching transformer (the embedded tiny FLUX, FLUX.1-dev, SD3.5) and
hides its latent layout. The rollout engine and the trainer only ever call the methods below;
latents are opaque tensors whose first dimension is the batch.

Conditioning (`Cond`) is a dict of tensors that all share the batch dimension 0, so the engine can
gather any rows with `select_cond(cond, index)` and the adapter receives exactly the rows that
match `x`.
"""

from __future__ import annotations

from typing import Dict, Protocol, Sequence, runtime_checkable

import torch

Cond = Dict[str, torch.Tensor]


def select_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """Rows `index` of every tensor in `cond` (index: 1-D long tensor on any device)."""
    return {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate several conditionings along the batch dimension."""
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's compute precision: bf16/fp16 autocast when the model computes in half precision, so
    fp32 master weights (LoRA, full fine-tune) run their matmuls in `dtype` as the frozen bf16 weights do."""
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half)


def cond_batch_size(cond: Cond) -> int:
    return next(iter(cond.values())).shape[0]


def check_velocity_inputs(x: torch.Tensor, sigma, cond: Cond, latent_shape: tuple) -> torch.Tensor:
    """Validate an adapter's `velocity(x, sigma, cond)` arguments; returns sigma as a (B,) fp32 tensor
    (a scalar sigma is broadcast to every row)."""
    if tuple(x.shape[1:]) != tuple(latent_shape) or x.ndim != len(latent_shape) + 1:
        raise ValueError(f"x must be (B, {', '.join(map(str, latent_shape))}); got {tuple(x.shape)}")
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    if sigma.shape != (b,):
        raise ValueError(f"sigma must be (B,) = ({b},) or a scalar; got {tuple(sigma.shape)}")
    for name, t in cond.items():
        if t.shape[0] != b:
            raise ValueError(f"cond batch {t.shape[0]} (cond[{name!r}]) does not match x batch {b}")
    return sigma


@runtime_checkable
class FlowModelAdapter(Protocol):
    """What the rollout engine and the trainer need from a model.

    - `module`: the trainable `torch.nn.Module` (the transformer; LoRA attaches here).
    - `latent_shape`: shape of one latent without the batch dim (e.g. (L, C) for packed FLUX).
    - `image_seq_len`: number of image tokens, for resolution-dependent schedule shift.
    - `encode_prompts(prompts)`: conditioning for each prompt (batch = len(prompts)); computed
      once per prompt and reusable across seeds/branches through `select_cond`.
    - `velocity(x, sigma, cond)`: v(x, σ) with x (B, *latent_shape), sigma (B,) in [0, 1],
      cond with batch B. Returns a tensor shaped like x.
    - `decode(x)`: final latents → images, float in [0, 1], (B, 3, H, W).
    """

    module: torch.nn.Module
    latent_shape: tuple
    image_seq_len: int

    def encode_prompts(self, prompts: Sequence[str]) -> Cond: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...
