"""One entry point from a config's `model.kind` / `model.path` to a ready model adapter.

`load_adapter(kind, path, ...)` loads the weights (the embedded tiny FLUX, a FLUX pipeline folder or
hub id, an SD3 / SD3.5 pipeline folder or hub id, a Qwen-Image pipeline folder or hub id) and applies the speed settings to the transformer:
attention backend (diffusers' dispatcher, see attention.py), gradient checkpointing, and
`torch.compile` of the repeated transformer blocks. Compilation is lazy (it traces on the first
forward), so LoRA layers attached after `load_adapter` are part of the compiled blocks.

`lora_defaults(kind)` gives the papers' LoRA targets / rank / α for the trainer.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch

from .attention import set_attention_backend

MODEL_KINDS = ("tiny_flux", "flux", "sd3", "qwen_image")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: Union[str, torch.dtype, None], default: torch.dtype) -> torch.dtype:
    """A torch dtype from a config string ("bf16", "float32", ...), a torch dtype, or None (default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_finite_weights(tensors: Iterable[Tuple[str, torch.Tensor]], source: str) -> None:
    """ValueError naming `source` (the file or component folder) and the first weight holding NaN or ±inf: such a
    model samples NaN, its images score alike and nothing would say so."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source}: weight {name!r} holds {bad} non-finite value(s) (NaN or inf); refusing "
                             f"to load it")


def _check_pipeline_weights(adapter, path: str) -> None:
    components = getattr(getattr(adapter, "pipeline", None), "components", None) or {"transformer": adapter.module}
    for component, module in components.items():
        if isinstance(module, torch.nn.Module):
            check_finite_weights(module.named_parameters(), f"model {path!r}, {component}/")


def transformer_of(adapter) -> torch.nn.Module:
    """The diffusers transformer inside an adapter (the tiny FLUX wraps it with its text encoder)."""
    return getattr(adapter.module, "transformer", adapter.module)


# Regional compilation with a symbolic batch dimension: rollout calls (bucket sizes, ragged last chunks) and
# update micro-batches all share one graph per grad mode, instead of one per batch size until dynamo's
# recompile limit silently leaves the blocks eager.
COMPILE_DEFAULTS = {"dynamic": True}


def compile_transformer_blocks(transformer: torch.nn.Module, options: Optional[dict] = None) -> int:
    """`torch.compile` each repeated block (regional compilation); returns how many were compiled.

    Uses diffusers' `compile_repeated_blocks` where the model declares its blocks (FLUX); SD3
    (diffusers 0.42) declares none, so its `transformer_blocks` are compiled one by one, which
    is the same thing. Options default to COMPILE_DEFAULTS; every recompile is logged (torch's
    `recompiles` log: which guard failed), so a fallback to eager never goes unnoticed.
    """
    options = {**COMPILE_DEFAULTS, **(options or {})}
    torch._logging.set_logs(recompiles=True)
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**options)
        names = set(transformer._repeated_blocks)
        return sum(type(m).__name__ in names for m in transformer.modules())
    blocks = getattr(transformer, "transformer_blocks", None)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks to compile")
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def configure_transformer(transformer: torch.nn.Module, *, attention_backend: Optional[str] = None,
                          gradient_checkpointing: bool = False,
                          compile_blocks: Union[bool, dict] = False) -> None:
    """Apply the speed settings to a diffusers transformer (see the module doc)."""
    set_attention_backend(transformer, attention_backend)
    if gradient_checkpointing:
        if not getattr(transformer, "_supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: {type(transformer).__name__} does not support it")
        transformer.enable_gradient_checkpointing()
    if compile_blocks:
        compile_transformer_blocks(transformer, compile_blocks if isinstance(compile_blocks, dict) else None)


def load_adapter(kind: str, path: Optional[str] = None, *, device: Union[str, torch.device] = "cpu",
                 dtype: Union[str, torch.dtype, None] = None, attention_backend: Optional[str] = None,
                 compile_blocks: Union[bool, dict] = False, gradient_checkpointing: bool = False,
                 resolution: Optional[int] = None, guidance_scale: Optional[float] = None,
                 max_sequence_length: Optional[int] = None, cache_device: Union[str, torch.device] = "cpu"):
    """The model adapter for `kind` in MODEL_KINDS, loaded from `path`.

    Weights holding NaN or ±inf are refused (ValueError naming the file or component).
    - "tiny_flux": `tiny_flux.load(path)` (None = the shipped model); fp32 only, and resolution /
      guidance / sequence length do not apply (ValueError if given).
    - "flux": a `FluxPipeline` folder or hub id; dtype default bf16, resolution 1024, guidance 3.5
      (FLUX.1-dev's distilled guidance), T5 length 512.
    - "sd3": a `StableDiffusion3Pipeline` folder or hub id; dtype default bf16, resolution 512,
      CFG 4.5 (Flow-GRPO's SD3.5-M setting), T5 length 256.
    - "qwen_image": a `QwenImagePipeline` folder or hub id; dtype default bf16, resolution 1024, true CFG
      (`true_cfg_scale`) 4.0 with the negative prompt " ", Qwen2.5-VL length 512 (the pipeline's defaults).
    `compile_blocks`: False, True, or a dict of `torch.compile` options (e.g. {"mode": "max-autotune"}).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {list(MODEL_KINDS)}, got {kind!r}")
    if kind == "tiny_flux":
        given = {k: v for k, v in dict(resolution=resolution, guidance_scale=guidance_scale,
                                       max_sequence_length=max_sequence_length).items() if v is not None}
        if given:
            raise ValueError(f"kind 'tiny_flux' has a fixed 16×16 size and no guidance or T5; got {given}")
        if resolve_dtype(dtype, torch.float32) != torch.float32:
            raise ValueError(f"kind 'tiny_flux' runs in float32 only, got dtype {dtype!r}")
        from .tiny_flux import load

        adapter = load(path, device)
    else:
        if path in (None, ""):
            raise ValueError(f"kind {kind!r} needs path (a pipeline folder or hub id), got {path!r}")
        options = dict(device=device, dtype=resolve_dtype(dtype, torch.bfloat16), cache_device=cache_device)
        for name, value in dict(resolution=resolution, guidance_scale=guidance_scale,
                                max_sequence_length=max_sequence_length).items():
            if value is not None:
                options[name] = value
        if kind == "flux":
            from .flux import load_flux

            adapter = load_flux(path, **options)
        elif kind == "sd3":
            from .sd3 import load_sd3

            adapter = load_sd3(path, **options)
        else:
            from .qwen_image import load_qwen_image

            adapter = load_qwen_image(path, **options)
        _check_pipeline_weights(adapter, path)
    configure_transformer(transformer_of(adapter), attention_backend=attention_backend,
                          gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks)
    return adapter


def pipeline_kind(pipeline) -> str:
    """"flux" / "sd3" / "qwen_image" for a diffusers pipeline object (by its class), else ValueError."""
    names = {cls.__name__ for cls in type(pipeline).__mro__}
    if "FluxPipeline" in names:
        return "flux"
    if "StableDiffusion3Pipeline" in names:
        return "sd3"
    if "QwenImagePipeline" in names:
        return "qwen_image"
    raise ValueError(f"model must be an adapter (with velocity/decode) or a diffusers FluxPipeline / "
                     f"StableDiffusion3Pipeline / QwenImagePipeline, got {type(pipeline).__name__}")


def adapter_for_pipeline(pipeline, *, attention_backend: Optional[str] = None, gradient_checkpointing: bool = False,
                         compile_blocks: Union[bool, dict] = False, resolution: Optional[int] = None,
                         guidance_scale: Optional[float] = None, max_sequence_length: Optional[int] = None):
    """The adapter around a diffusers pipeline object already loaded (and placed) by the caller, with the same
    defaults and speed settings as `load_adapter`; frozen parts get requires_grad off."""
    kind = pipeline_kind(pipeline)
    options = {k: v for k, v in dict(resolution=resolution, guidance_scale=guidance_scale,
                                     max_sequence_length=max_sequence_length).items() if v is not None}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        part = getattr(pipeline, name, None)
        if part is not None:
            part.requires_grad_(False)
    if kind == "flux":
        from .flux import FluxAdapter

        adapter = FluxAdapter(pipeline, **options)
    elif kind == "sd3":
        from .sd3 import SD3Adapter

        adapter = SD3Adapter(pipeline, **options)
    else:
        from .qwen_image import QwenImageAdapter

        adapter = QwenImageAdapter(pipeline, **options)
    configure_transformer(pipeline.transformer, attention_backend=attention_backend,
                          gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks)
    return adapter


def lora_defaults(kind: str) -> dict:
    """The papers' LoRA settings for `kind`: {"target_modules", "rank", "alpha"}."""
    if kind == "flux":
        from .flux import FLUX_LORA_ALPHA, FLUX_LORA_RANK, FLUX_LORA_TARGETS

        return {"target_modules": list(FLUX_LORA_TARGETS), "rank": FLUX_LORA_RANK, "alpha": FLUX_LORA_ALPHA}
    if kind == "sd3":
        from .sd3 import SD3_LORA_ALPHA, SD3_LORA_RANK, SD3_LORA_TARGETS

        return {"target_modules": list(SD3_LORA_TARGETS), "rank": SD3_LORA_RANK, "alpha": SD3_LORA_ALPHA}
    if kind == "qwen_image":
        from .qwen_image import QWEN_IMAGE_LORA_ALPHA, QWEN_IMAGE_LORA_RANK, QWEN_IMAGE_LORA_TARGETS

        return {"target_modules": list(QWEN_IMAGE_LORA_TARGETS), "rank": QWEN_IMAGE_LORA_RANK,
                "alpha": QWEN_IMAGE_LORA_ALPHA}
    if kind == "tiny_flux":
        return {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "rank": 32, "alpha": 64}
    raise ValueError(f"kind must be one of {list(MODEL_KINDS)}, got {kind!r}")
