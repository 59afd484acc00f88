"""Attention-backend selection through diffusers' attention dispatcher.

`set_attention_backend(transformer, name)` picks the kernel every attention layer of a diffusers
transformer runs: native SDPA, flash-attn 2, flash-attn 3, xformers, SageAttention or flex. It
checks that the backend's package is importable first and raises a ValueError that names the
backend and the package to install, instead of diffusers' RuntimeError deep in the first forward.

FLUX's attention processor already routes through `diffusers.models.attention_dispatch.
dispatch_attention_fn`; SD3's `JointAttnProcessor2_0` (diffusers 0.42) calls
`F.scaled_dot_product_attention` directly, so for SD3 each such processor is swapped for
`DispatchJointAttnProcessor`, the same joint attention written against the dispatcher.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

# Our name -> (diffusers AttentionBackendName value, what to install when it is missing).
ATTENTION_BACKENDS: Dict[str, Tuple[str, Optional[str]]] = {
    "native": ("native", None),                       # torch SDPA, torch picks the kernel
    "sdpa_flash": ("_native_flash", None),            # torch SDPA forced to its flash kernel
    "sdpa_cudnn": ("_native_cudnn", None),            # torch SDPA forced to cuDNN attention
    "sdpa_efficient": ("_native_efficient", None),    # torch SDPA forced to memory-efficient attention
    "flash": ("flash", "flash-attn>=2.6.3 (pip install flash-attn --no-build-isolation)"),
    "flash3": ("_flash_3", "flash-attn 3 (build `hopper/` of github.com/Dao-AILab/flash-attention)"),
    "xformers": ("xformers", "xformers>=0.0.29 (pip install xformers)"),
    "sage": ("sage", "sageattention>=2.1.1 (pip install sageattention)"),
    "flex": ("flex", "torch>=2.5"),
}

# Backends with no backward pass: usable for no-grad rollouts (model.rollout_attention_backend), refused for the
# update. diffusers registers `_flash_3` as a forward-only custom op (FA3's beta release has no autograd op).
TRAINING_REFUSED: Dict[str, str] = {"flash3": "diffusers' _flash_3 backend is a forward-only custom op"}

# Backends that take no attention mask (diffusers raises "`attn_mask` is not supported"), so no use to a model whose
# text tokens are masked: Qwen-Image pads every prompt to max_sequence_length and masks the padding.
MASK_REFUSED = frozenset({"sdpa_flash", "flash", "flash3", "sage"})
MASKED_TEXT_KINDS = frozenset({"qwen_image"})


class DispatchJointAttnProcessor:
    """SD3's joint (image + text) attention, as `JointAttnProcessor2_0`, through the dispatcher.

    Same projections, qk-norms, concatenation order (image tokens, then text tokens) and output
    split; only the attention call goes through `dispatch_attention_fn`, which takes
    (batch, seq, heads, head_dim) tensors and the backend set by `set_attention_backend`.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        batch = hidden_states.shape[0]
        n_image = hidden_states.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        # diffusers' qk-norms normalise the last (head_dim) axis, so (B, S, H, D) works as (B, H, S, D) does.
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            q_txt = heads(attn.add_q_proj(encoder_hidden_states))
            k_txt = heads(attn.add_k_proj(encoder_hidden_states))
            v_txt = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                q_txt = attn.norm_added_q(q_txt)
            if attn.norm_added_k is not None:
                k_txt = attn.norm_added_k(k_txt)
            query, key, value = torch.cat([query, q_txt], 1), torch.cat([key, k_txt], 1), torch.cat([value, v_txt], 1)

        out = dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, txt = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                txt = attn.to_add_out(txt)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, txt) if encoder_hidden_states is not None else out


def _route_joint_attention(transformer: torch.nn.Module) -> int:
    """Swap every `JointAttnProcessor2_0` for `DispatchJointAttnProcessor`; returns how many."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    n = 0
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), JointAttnProcessor2_0):
            module.set_processor(DispatchJointAttnProcessor())
            n += 1
    return n


def default_attention_backends(device, dtype, kind: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(update backend, rollout backend) a run gets when model.attention_backend is unset.

    On CUDA in bf16 / fp16: the update on torch SDPA forced to its flash kernel (`sdpa_flash`: FLUX and SD3 head
    dims fit it, no extra package), the no-grad rollouts on `native`, where torch picks cuDNN attention. Measured
    on an H200 with torch 2.11 (docs/gpu.md): cuDNN's SDPA backward faults inside a FLUX forward+backward (and gave
    NaN gradients before), while its forward is 16-19 % faster per row than flash. A model.kind with masked text
    (MASKED_TEXT_KINDS: Qwen-Image) cannot use the flash kernel: its update runs on SDPA's memory-efficient kernel
    (`sdpa_efficient`, masks and a backward). Elsewhere (None, None): the transformer's own default."""
    import torch

    if torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return ("sdpa_efficient" if kind in MASKED_TEXT_KINDS else "sdpa_flash"), "native"
    return None, None


def check_attention_backend(name: str) -> str:
    """The diffusers backend value for `name`; ValueError when unknown or its package is missing."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}, got {name!r}")
    value, install = ATTENTION_BACKENDS[name]
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(value))
    except RuntimeError as err:
        raise ValueError(f"attention_backend {name!r} is not available here: install {install}. ({err})") from None
    return value


def set_attention_backend(transformer: torch.nn.Module, name: Optional[str]) -> None:
    """Run every attention layer of a diffusers `transformer` on backend `name` (None: leave as is).

    Call it on the transformer after any LoRA is attached or before; processors are kept by peft.
    """
    if name is None:
        return
    value = check_attention_backend(name)
    if not callable(getattr(transformer, "set_attention_backend", None)):
        raise ValueError(f"transformer must be a diffusers ModelMixin, got {type(transformer).__name__}")
    if name in MASK_REFUSED and type(transformer).__name__ == "QwenImageTransformer2DModel":
        raise ValueError(f"attention backend {name!r} takes no attention mask, which Qwen-Image's padded text needs; "
                         f"use native, sdpa_efficient, sdpa_cudnn, xformers or flex")
    _route_joint_attention(transformer)
    transformer.set_attention_backend(value)
