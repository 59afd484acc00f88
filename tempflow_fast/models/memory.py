"""The `--dry-run` estimates: GPU memory of a training set-up and NFE per iteration, without weights.

Memory (bytes, per GPU, no sharding):
- weights: every component at its dtype. Parameter counts are exact: the transformer is built on
  the meta device from its config (no weights read), the text encoders and VAE are counted from
  their safetensors headers.
- LoRA: r·(in + out) parameters per targeted Linear layer of the transformer, fp32 (peft keeps
  adapters in fp32 on a bf16 model).
- gradients + optimizer: AdamW keeps two fp32 moments per trainable parameter; gradients take
  the trainable parameters' dtype.
- activations: the policy forward+backward of one micro-batch (`states_per_forward` rows, ×2 for
  CFG). Per row and block, an MMDiT-style block keeps about 16 hidden-size vectors per token for
  backward (normed input, q, k, v, attention output, its projection, normed MLP input, the 4×-wide
  MLP hidden before and after the activation, residuals); attention itself is O(tokens) with a
  fused kernel. With gradient checkpointing each block keeps only its input, plus one block's
  full set during recomputation. A planning figure, good to a factor of about 1.5.

NFE per iteration comes from the plan through `sampling.accounting.min_nfe` (latent rows through
`velocity`); with CFG the transformer evaluates twice as many rows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from tempflow_fast.sampling.accounting import min_nfe

GIB = 1024 ** 3
MIB = 1024 ** 2
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ACTIVATION_VECTORS_PER_TOKEN = 16  # saved hidden-size vectors per token per block (see module doc)


@dataclass
class TransformerSpec:
    """What the estimate needs from a transformer (counted on the meta device)."""

    params: int
    hidden_size: int
    num_blocks: int
    image_tokens: int
    text_tokens: int
    linear_shapes: Dict[str, tuple] = field(default_factory=dict)  # qualified name -> (in, out)

    def lora_params(self, targets: Sequence[str], rank: int) -> int:
        """Parameters peft adds for `targets` (suffix match on the module name, as peft does)."""
        n = 0
        for name, (fan_in, fan_out) in self.linear_shapes.items():
            if any(name == t or name.endswith("." + t) for t in targets):
                n += rank * (fan_in + fan_out)
        return n


def safetensors_params(folder: Path) -> int:
    """Number of parameters in every *.safetensors file of `folder`, read from the headers only."""
    total = 0
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(folder)!r}")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


def _linear_shapes(module: torch.nn.Module) -> Dict[str, tuple]:
    return {n: (m.in_features, m.out_features) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def transformer_spec_from_module(transformer: torch.nn.Module, image_tokens: int, text_tokens: int) -> TransformerSpec:
    cfg = transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = (len(getattr(transformer, "transformer_blocks", []))
              + len(getattr(transformer, "single_transformer_blocks", [])))
    return TransformerSpec(sum(p.numel() for p in transformer.parameters()), hidden, blocks, image_tokens, text_tokens,
                           _linear_shapes(transformer))


def pipeline_spec(kind: str, folder: str, *, resolution: int, max_sequence_length: int):
    """(TransformerSpec, {component: params}) for a local FLUX / SD3 pipeline folder, weights unread."""
    root = Path(folder)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"path must be a local pipeline folder with model_index.json for the memory estimate, "
                         f"got {folder!r}")
    if kind == "flux":
        from diffusers import FluxTransformer2DModel as cls
    elif kind == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    else:
        raise ValueError(f"kind must be 'flux' or 'sd3' for a pipeline folder, got {kind!r}")
    config = cls.load_config(str(root / "transformer"))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        transformer = cls.from_config(config)
    vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latent = resolution // vae_scale
    if kind == "flux":
        image_tokens = (latent // 2) ** 2
        text_tokens = max_sequence_length
    else:
        image_tokens = (latent // transformer.config.patch_size) ** 2
        clip_len = 77
        tok = root / "tokenizer" / "tokenizer_config.json"
        if tok.is_file():
            clip_len = int(json.loads(tok.read_text()).get("model_max_length", clip_len))
        text_tokens = clip_len + max_sequence_length
    spec = transformer_spec_from_module(transformer, image_tokens, text_tokens)
    components = {"vae": safetensors_params(root / "vae")}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if (root / name).is_dir():
            components[name] = safetensors_params(root / name)
    return spec, components


@dataclass
class MemoryEstimate:
    """Bytes by part; `total` sums them. `text_encoders` is 0 once they are released."""

    weights: int
    text_encoders: int
    vae: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (self.weights + self.text_encoders + self.vae + self.lora + self.gradients + self.optimizer
                + self.activations)

    def lines(self) -> list:
        parts = [("transformer weights", self.weights), ("text encoders", self.text_encoders), ("VAE", self.vae),
                 ("LoRA weights", self.lora), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                 ("activations (one micro-batch)", self.activations), ("total", self.total)]
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        return ([f"{name:<30} {b / scale:10.2f} {unit}" for name, b in parts]
                + [f"  {k}: {v}" for k, v in self.notes.items()])


def estimate_memory(spec: TransformerSpec, *, dtype: torch.dtype = torch.bfloat16, vae_params: int = 0,
                    vae_dtype: torch.dtype = torch.float32, text_encoder_params: int = 0,
                    text_encoder_dtype: Optional[torch.dtype] = None, text_encoders_resident: bool = False,
                    lora_rank: Optional[int] = None, lora_targets: Sequence[str] = (),
                    states_per_forward: int = 1, cfg_batches: int = 1,
                    gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Memory of one training set-up (see the module doc); `lora_rank` None means full fine-tuning."""
    if states_per_forward < 1 or cfg_batches not in (1, 2):
        raise ValueError(f"states_per_forward must be >= 1 and cfg_batches 1 or 2, got "
                         f"{states_per_forward!r}, {cfg_batches!r}")
    size = torch.finfo(dtype).bits // 8
    te_size = torch.finfo(text_encoder_dtype or dtype).bits // 8
    if lora_rank is not None:
        if lora_rank < 1 or not lora_targets:
            raise ValueError(f"LoRA needs rank >= 1 and target modules, got rank {lora_rank!r}, "
                             f"targets {lora_targets!r}")
        trainable = spec.lora_params(lora_targets, lora_rank)
        if trainable == 0:
            raise ValueError(f"lora_targets {list(lora_targets)} match no Linear layer of the transformer")
        lora, grads = 4 * trainable, 4 * trainable
    else:
        trainable, lora, grads = spec.params, 0, size * spec.params
    rows = states_per_forward * cfg_batches
    per_block_token = spec.hidden_size * size * (spec.image_tokens + spec.text_tokens)
    if gradient_checkpointing:
        act = rows * per_block_token * (spec.num_blocks + ACTIVATION_VECTORS_PER_TOKEN)
    else:
        act = rows * per_block_token * spec.num_blocks * ACTIVATION_VECTORS_PER_TOKEN
    notes = {"trainable parameters": f"{trainable:,}",
             "tokens per row": f"{spec.image_tokens} image + {spec.text_tokens} text",
             "rows per policy forward": f"{rows}" + (" (CFG doubles them)" if cfg_batches == 2 else "")}
    return MemoryEstimate(weights=size * spec.params,
                          text_encoders=te_size * text_encoder_params if text_encoders_resident else 0,
                          vae=(torch.finfo(vae_dtype).bits // 8) * vae_params, lora=lora, gradients=grads,
                          optimizer=8 * trainable, activations=act, notes=notes)


def nfe_per_iteration(plan, num_prompts: int, cfg_batches: int = 1) -> Dict[str, int]:
    """Rollout NFE by phase for `num_prompts` prompts (min_nfe), their total, and transformer rows
    (NFE × 2 under CFG)."""
    if num_prompts < 1 or cfg_batches not in (1, 2):
        raise ValueError(f"num_prompts must be >= 1 and cfg_batches 1 or 2, got {num_prompts!r}, {cfg_batches!r}")
    nfe = min_nfe(plan.layout(), num_prompts)
    out = {f"nfe/{k}": v for k, v in nfe.items()}
    out["nfe_total"] = sum(nfe.values())
    out["transformer_rows"] = out["nfe_total"] * cfg_batches
    return out


def estimate_for(kind: str, path: Optional[str], *, dtype: torch.dtype = torch.bfloat16,
                 resolution: Optional[int] = None, max_sequence_length: Optional[int] = None,
                 guidance_scale: Optional[float] = None, lora_rank: Optional[int] = None,
                 lora_targets: Sequence[str] = (), states_per_forward: int = 1,
                 gradient_checkpointing: bool = False, text_encoders_resident: bool = False) -> MemoryEstimate:
    """`estimate_memory` for a config's model: kind in {"tiny_flux", "flux", "sd3"} and its path
    (a local pipeline folder for flux / sd3). Defaults follow `loading.load_adapter`; SD3 counts
    two rows per state when its guidance scale is > 1 (CFG), FLUX one (distilled guidance)."""
    if kind == "tiny_flux":
        from .tiny_flux import IMAGE_SIZE, PATCH, TinyFluxAdapter, load, shipped_weights_dir

        # The shipped model has the default architecture; count a fresh one if its weights are absent.
        shipped = shipped_weights_dir() / "tiny_flux_config.json"
        adapter = load(path) if path or shipped.is_file() else TinyFluxAdapter.create()
        text_tokens = adapter.max_words
        spec = transformer_spec_from_module(adapter.module.transformer, (IMAGE_SIZE // PATCH) ** 2, text_tokens)
        # The tiny model trains its word encoder with the transformer: count it as transformer weights.
        spec.params = sum(p.numel() for p in adapter.module.parameters())
        return estimate_memory(spec, dtype=torch.float32, lora_rank=lora_rank, lora_targets=lora_targets,
                               states_per_forward=states_per_forward, gradient_checkpointing=gradient_checkpointing)
    if kind == "flux":
        resolution, seq, cfg_batches = resolution or 1024, max_sequence_length or 512, 1
    elif kind == "sd3":
        resolution, seq = resolution or 512, max_sequence_length or 256
        cfg_batches = 2 if (4.5 if guidance_scale is None else guidance_scale) > 1.0 else 1
    else:
        raise ValueError(f"kind must be one of ['tiny_flux', 'flux', 'sd3'], got {kind!r}")
    spec, parts = pipeline_spec(kind, path, resolution=resolution, max_sequence_length=seq)
    te = sum(v for k, v in parts.items() if k.startswith("text_encoder"))
    return estimate_memory(spec, dtype=dtype, vae_params=parts["vae"], text_encoder_params=te,
                           text_encoders_resident=text_encoders_resident, lora_rank=lora_rank,
                           lora_targets=lora_targets, states_per_forward=states_per_forward,
                           cfg_batches=cfg_batches, gradient_checkpointing=gradient_checkpointing)


def dry_run_lines(estimate: MemoryEstimate, nfe: Dict[str, int]) -> list:
    """The `--dry-run` block: memory by part, then NFE per iteration by phase (from nfe_per_iteration)."""
    lines = ["memory estimate (per GPU):"] + ["  " + line for line in estimate.lines()]
    lines.append("NFE per iteration (latent rows through the model):")
    lines += [f"  {k.split('/', 1)[1]:<28} {v:>12,} rows" for k, v in nfe.items() if k.startswith("nfe/")]
    lines.append(f"  {'total':<28} {nfe['nfe_total']:>12,} rows")
    lines.append(f"  {'transformer rows (x2 with CFG)':<28} {nfe['transformer_rows']:>12,} rows")
    return lines
