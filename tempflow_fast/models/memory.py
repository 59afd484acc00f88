"""The memory model: GPU memory of a training set-up by phase, the rows per transformer call that fit, and
the `--dry-run` report — from configs alone (the transformer is built on the meta device), no weights read.

Resident for the whole run (bytes, per GPU, no sharding):
- weights: the frozen transformer at the model dtype; trainable parameters are fp32 master weights
  (LoRA adapters; for a full fine-tune every transformer weight), the forward runs under bf16 autocast,
  as diffusers' own training scripts do. VAE and (with `model.text_encoders: keep`) text encoders at
  their dtypes. Parameter counts are exact: transformer, VAE and text encoders are built on the meta
  device from their configs (a local pipeline folder's, or the shipped facts of FLUX.1-dev and
  SD3.5-Medium in tempflow_fast/assets/known_models/ for a hub id).
- optimizer: AdamW's two fp32 moments per trainable parameter; EMA: one fp32 copy of them; reference
  policy (β > 0, full fine-tune): a frozen copy of the transformer at the model dtype (LoRA needs none: the
  reference is the base with adapters disabled).
- CUDA-graph pool (`sampling.runner: cuda_graph`): every captured graph allocates from one shared pool,
  which holds about one largest-bucket forward's activations.

Transient, per phase, on top of the resident set:
- rollout forward: rows per call × activations of a no-grad forward, ROLLOUT_VECTORS_PER_TOKEN
  hidden-size vectors per token per row (×2 rows under CFG);
- decode: images per VAE decode call × VAE_DECODE_BYTES_PER_PIXEL at the output resolution;
- update forward+backward: fp32 gradients of the trainable parameters + the activations of one
  micro-batch (`states_per_forward` rows, ×2 under CFG): per row and block an MMDiT block keeps about
  ACTIVATION_VECTORS_PER_TOKEN hidden-size vectors per token for backward; with gradient checkpointing each
  block keeps only its input, plus one block's full set during recomputation;
- optimizer step: gradients + one fp32 temporary per trainable parameter on this GPU (AdamW's foreach update;
  half the moments' bytes).

The constants were measured on an H200 (docs/gpu.md, 2026-11-30, torch 2.11, diffusers 0.42.1): a no-grad
full-depth FLUX-1024 forward in bf16 peaks 0.45 GiB above the weights per row (4608 tokens × 3072 wide
→ 17 vectors per token); a 1024 px fp32 VAE decode peaks 4.8 GiB for one image. On CUDA the default rows
per call is also capped at ROWS_PER_CALL_CAP_CUDA: the same measurement ran 206 / 190 / 184 ms per row at
1 / 4 / 8 rows per call, so larger calls buy nothing and only raise the peak. Good to a factor of ~1.5.

NFE per iteration comes from the plan through `sampling.accounting.min_nfe` (latent rows through
`velocity`); with CFG the transformer evaluates twice as many rows.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from tempflow_fast.sampling.accounting import min_nfe

GIB = 1024 ** 3
MIB = 1024 ** 2
ACTIVATION_VECTORS_PER_TOKEN = 16  # saved hidden-size vectors per token per block for backward (see module doc)
ROLLOUT_VECTORS_PER_TOKEN = 17     # peak live hidden-size vectors per token of a no-grad forward (measured)
VAE_DECODE_BYTES_PER_PIXEL = 4.8 * GIB / 1024 ** 2  # fp32 AutoencoderKL decode peak per output pixel (measured)
DECODE_BUDGET = 8 * GIB            # default decode_batch: as many images as fit in this much
ROWS_PER_CALL_CAP_CUDA = 32        # default rows per call on CUDA: throughput saturates well below (module doc)
ROWS_PER_CALL_CAP_CPU = 1024
HEADROOM = 0.9                     # share of the device usable by tensors (allocator fragmentation, workspaces)
KNOWN_MODELS = Path(__file__).resolve().parent.parent / "assets" / "known_models"
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


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

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


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


def _meta_params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _text_encoder_params(config: dict) -> int:
    import transformers

    config = dict(config)
    cls = getattr(transformers, config.pop("_class_name"))
    cfg_cls = transformers.T5Config if cls.__name__.startswith("T5") else transformers.CLIPTextConfig
    return _meta_params(lambda: cls(cfg_cls(**config)))


def known_pipeline(path: Optional[str]) -> Optional[dict]:
    """The shipped config facts for a hub id (FLUX.1-dev, SD3.5-Medium), or None."""
    if not path:
        return None
    for f in sorted(KNOWN_MODELS.glob("*.json")):
        facts = json.loads(f.read_text())
        if facts["hub_id"].lower() == str(path).strip("/").lower():
            return facts
    return None


def known_hub_ids() -> List[str]:
    return [json.loads(f.read_text())["hub_id"] for f in sorted(KNOWN_MODELS.glob("*.json"))]


def _tokens(kind: str, transformer, latent: int, max_sequence_length: int, clip_len: int) -> Tuple[int, int]:
    if kind in ("flux", "qwen_image"):  # 2×2 packed latents; text padded to max_sequence_length
        return (latent // 2) ** 2, max_sequence_length
    return (latent // transformer.config.patch_size) ** 2, clip_len + max_sequence_length


def pipeline_spec(kind: str, folder: str, *, resolution: int, max_sequence_length: int):
    """(TransformerSpec, {component: params}) for a FLUX / SD3 / Qwen-Image pipeline, weights unread: a local
    pipeline folder (configs and safetensors headers), or a hub id whose facts ship with the package
    (known_pipeline; FLUX.1-dev and SD3.5-Medium)."""
    if kind == "flux":
        from diffusers import FluxTransformer2DModel as cls
    elif kind == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    elif kind == "qwen_image":
        from diffusers import QwenImageTransformer2DModel as cls
    else:
        raise ValueError(f"kind must be 'flux', 'sd3' or 'qwen_image' for a pipeline, got {kind!r}")
    facts = known_pipeline(folder)
    root = Path(folder) if folder else None
    if facts is None and (root is None or not (root / "model_index.json").is_file()):
        raise ValueError(f"model.path must be a local pipeline folder with model_index.json for the memory estimate, "
                         f"or one of the hub ids whose configs ship with tempflow_fast ({', '.join(known_hub_ids())}); "
                         f"got {folder!r}")
    if facts is not None:
        if facts["kind"] != kind:
            raise ValueError(f"model.path {folder!r} is a {facts['kind']!r} pipeline, but model.kind is {kind!r}")
        config = {k: v for k, v in facts["transformer"].items() if k != "_class_name"}
        vae_cfg = facts["vae"]
        clip_len = facts["clip_max_length"]
    else:
        config = cls.load_config(str(root / "transformer"))
        vae_cfg = json.loads((root / "vae" / "config.json").read_text())
        clip_len = 77
        tok = root / "tokenizer" / "tokenizer_config.json"
        if tok.is_file():
            clip_len = int(json.loads(tok.read_text()).get("model_max_length", clip_len))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        transformer = cls.from_config(config)
    if "temperal_downsample" in vae_cfg:  # AutoencoderKLQwenImage: 2^(stages) spatial, as QwenImagePipeline says
        latent = resolution // (2 ** len(vae_cfg["temperal_downsample"]))
    else:
        latent = resolution // (2 ** (len(vae_cfg["block_out_channels"]) - 1))
    spec = transformer_spec_from_module(transformer, *_tokens(kind, transformer, latent, max_sequence_length, clip_len))
    if facts is not None:
        from diffusers import AutoencoderKL

        vae = {k: v for k, v in vae_cfg.items() if k != "_class_name"}
        components = {"vae": _meta_params(lambda: AutoencoderKL.from_config(vae))}
        components.update({name: _text_encoder_params(c) for name, c in facts["text_encoders"].items()})
    else:
        components = {"vae": safetensors_params(root / "vae")}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if (root / name).is_dir():
                components[name] = safetensors_params(root / name)
    return spec, components


# --- defaults the runtime derives from a loaded model ---------------------------------------------------

def rollout_bytes_per_row(spec: TransformerSpec, dtype: torch.dtype, cfg_batches: int = 1) -> int:
    """Peak activation bytes one latent row adds to a no-grad transformer call (×2 rows under CFG)."""
    return ROLLOUT_VECTORS_PER_TOKEN * spec.tokens * spec.hidden_size * _bytes(dtype) * cfg_batches


def decode_bytes_per_image(resolution: int, vae_dtype: torch.dtype = torch.float32) -> int:
    return int(VAE_DECODE_BYTES_PER_PIXEL * resolution * resolution * _bytes(vae_dtype) / 4)


def rows_that_fit(free_bytes: Optional[float], per_row: int, cap: int) -> int:
    """Rows per call: as many as `free_bytes` holds (0 when not even one does), at most `cap`."""
    if free_bytes is None:
        return cap
    return max(0, min(cap, int(free_bytes // max(per_row, 1))))


def default_decode_batch(model) -> int:
    """Images per VAE decode call for an adapter: as many as DECODE_BUDGET holds at its resolution (at least 1,
    at most 64); adapters without a VAE (the tiny model decodes by unpacking pixels) decode 256 at a time."""
    vae = getattr(model, "vae", None)
    resolution = getattr(model, "resolution", None)
    if vae is None or resolution is None:
        return 256
    p = next(vae.parameters(), None)
    per_image = decode_bytes_per_image(resolution, p.dtype if p is not None else torch.float32)
    return max(1, min(64, DECODE_BUDGET // per_image))


def _adapter_spec(model) -> Optional[TransformerSpec]:
    from tempflow_fast.models.loading import transformer_of

    transformer = transformer_of(model)
    if getattr(getattr(transformer, "config", None), "attention_head_dim", None) is None:
        return None
    return transformer_spec_from_module(transformer, model.image_seq_len, getattr(model, "text_seq_len", 0))


def update_activation_bytes(model, *, states_per_forward: int, gradient_checkpointing: bool) -> int:
    """The update's activations for one micro-batch of a loaded adapter (0 for a model without a diffusers
    transformer): what a rollout running beside the update (train.async_rollout) must leave room for."""
    spec = _adapter_spec(model)
    if spec is None:
        return 0
    p = next(model.module.parameters())
    return estimate_memory(spec, dtype=getattr(model, "compute_dtype", p.dtype), states_per_forward=states_per_forward,
                           cfg_batches=getattr(model, "cfg_batches", 1), lora_rank=None,
                           gradient_checkpointing=gradient_checkpointing).activations


def default_max_rows_per_call(model, *, resident_bytes: Optional[int] = None,
                              device_memory: Optional[int] = None) -> Optional[int]:
    """Rows per transformer call for a loaded adapter: what the memory left on its GPU holds (the device's memory,
    or `device_memory` bytes, × HEADROOM minus `resident_bytes`, default what is allocated now), capped at
    ROWS_PER_CALL_CAP_CUDA; on a CPU ROWS_PER_CALL_CAP_CPU. None for a model without a diffusers transformer
    (a test stand-in)."""
    spec = _adapter_spec(model)
    if spec is None:
        return None
    p = next(model.module.parameters())
    per_row = rollout_bytes_per_row(spec, getattr(model, "compute_dtype", p.dtype), getattr(model, "cfg_batches", 1))
    if device_memory is None:
        if p.device.type != "cuda":
            return ROWS_PER_CALL_CAP_CPU
        device_memory = torch.cuda.get_device_properties(p.device).total_memory
    if resident_bytes is None:
        resident_bytes = torch.cuda.memory_allocated(p.device) if p.device.type == "cuda" else 0
    return max(1, rows_that_fit(device_memory * HEADROOM - resident_bytes, per_row, ROWS_PER_CALL_CAP_CUDA))


# --- the plan of a whole set-up ---------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    """Bytes by part (resident and per phase) of one training set-up; see the module doc."""

    weights: int
    text_encoders: int
    vae: int
    lora: int
    gradients: int
    optimizer: int
    activations: int            # update forward+backward of one micro-batch
    ema: int = 0
    reference: int = 0
    graph_pool: int = 0
    rollout_per_row: int = 0
    max_rows_per_call: Optional[int] = None
    decode_per_image: int = 0
    decode_batch: int = 1
    trainable: int = 0
    behaviour: int = 0          # train.async_rollout: the behaviour policy's fp32 copy of the trainable weights
    concurrent_rollout: bool = False  # train.async_rollout: a rollout call runs during the update and the step
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def resident(self) -> int:
        return (self.weights + self.text_encoders + self.vae + self.lora + self.optimizer + self.ema + self.reference
                + self.graph_pool + self.behaviour)

    @property
    def total(self) -> int:
        """Resident set + the update's gradients and activations (the former single-number estimate)."""
        return self.resident + self.gradients + self.activations

    def phases(self) -> Dict[str, int]:
        rollout = 0 if self.graph_pool else (self.max_rows_per_call or 0) * self.rollout_per_row
        # train.async_rollout: the next rollout's call (or its decode, the larger) runs beside the update
        beside = max(rollout, self.decode_batch * self.decode_per_image) if self.concurrent_rollout else 0
        return {"rollout forward": self.resident + rollout,
                "decode": self.resident + self.decode_batch * self.decode_per_image,
                "update forward+backward": self.resident + self.gradients + self.activations + beside,
                "optimizer step": self.resident + self.gradients + self.optimizer // 2 + beside}

    def peak(self) -> Tuple[str, int]:
        return max(self.phases().items(), key=lambda kv: kv[1])

    def lines(self) -> list:
        parts = [("transformer weights", self.weights), ("text encoders", self.text_encoders), ("VAE", self.vae),
                 ("LoRA weights (fp32)", self.lora), ("optimizer state (fp32)", self.optimizer),
                 ("EMA copy (fp32)", self.ema), ("reference copy", self.reference),
                 ("CUDA-graph pool", self.graph_pool), ("behaviour policy copy (fp32)", self.behaviour),
                 ("resident", self.resident),
                 ("gradients", self.gradients), ("activations (one micro-batch)", self.activations),
                 ("total", self.total)]
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", MIB)
        out = [f"{name:<30} {b / scale:10.2f} {unit}" for name, b in parts]
        out.append("peak by phase:")
        out += [f"  {name:<28} {b / scale:10.2f} {unit}" for name, b in self.phases().items()]
        return out + [f"  {k}: {v}" for k, v in self.notes.items()]


def estimate_memory(spec: TransformerSpec, *, dtype: torch.dtype = torch.bfloat16, vae_params: int = 0,
                    vae_dtype: torch.dtype = torch.float32, text_encoder_params: int = 0,
                    text_encoder_dtype: Optional[torch.dtype] = None, text_encoders_resident: bool = False,
                    lora_rank: Optional[int] = None, lora_targets: Sequence[str] = (),
                    states_per_forward: int = 1, cfg_batches: int = 1,
                    gradient_checkpointing: bool = False, ema: bool = False, reference_copy: bool = False,
                    resolution: Optional[int] = None, max_rows_per_call: Optional[int] = None,
                    decode_batch: Optional[int] = None, cuda_graphs: bool = False,
                    gpu_memory: Optional[float] = None, rows_cap: int = ROWS_PER_CALL_CAP_CUDA,
                    zero_stage: Optional[int] = None, world_size: int = 1,
                    async_rollout: bool = False) -> MemoryEstimate:
    """Memory of one training set-up (see the module doc); `lora_rank` None means full fine-tuning.
    `async_rollout` (train.async_rollout): an fp32 copy of the trainable weights for the behaviour policy, its own
    CUDA-graph pool, and a rollout call (or decode) during the update: rows per call then come from what the update
    leaves.

    `max_rows_per_call` / `decode_batch` None: derived — rows from what `gpu_memory` (bytes; None = no limit
    but `rows_cap`) leaves after the resident set, decode batch from DECODE_BUDGET at `resolution`.
    `zero_stage` 2 / 3 (DeepSpeed, full fine-tune): weights stay in the model dtype, DeepSpeed's fp32 masters,
    AdamW moments and the gradients are sharded over `world_size` GPUs (stage 3: the weights too)."""
    if states_per_forward < 1 or cfg_batches not in (1, 2):
        raise ValueError(f"states_per_forward must be >= 1 and cfg_batches 1 or 2, got "
                         f"{states_per_forward!r}, {cfg_batches!r}")
    size = _bytes(dtype)
    te_size = _bytes(text_encoder_dtype or dtype)
    if lora_rank is not None:
        if lora_rank < 1 or not lora_targets:
            raise ValueError(f"LoRA needs rank >= 1 and target modules, got rank {lora_rank!r}, "
                             f"targets {lora_targets!r}")
        trainable = spec.lora_params(lora_targets, lora_rank)
        if trainable == 0:
            raise ValueError(f"lora_targets {list(lora_targets)} match no Linear layer of the transformer")
        weights, lora = size * spec.params, 4 * trainable
    else:  # full fine-tune: fp32 master weights
        trainable, weights, lora = spec.params, 4 * spec.params, 0
    grads, optimizer = 4 * trainable, 8 * trainable
    if zero_stage is not None:
        if lora_rank is not None or zero_stage not in (2, 3) or world_size < 1:
            raise ValueError(f"zero_stage 2/3 is for a full fine-tune on world_size >= 1 GPUs, got stage "
                             f"{zero_stage!r}, world_size {world_size!r}, lora_rank {lora_rank!r}")
        masters = 4 * spec.params if size < 4 else 0
        weights = size * spec.params // (world_size if zero_stage == 3 else 1)
        optimizer = (masters + 8 * spec.params) // world_size
        grads = size * spec.params // world_size
    rows = states_per_forward * cfg_batches
    per_block_token = spec.hidden_size * size * spec.tokens
    if gradient_checkpointing:
        act = rows * per_block_token * (spec.num_blocks + ACTIVATION_VECTORS_PER_TOKEN)
    else:
        act = rows * per_block_token * spec.num_blocks * ACTIVATION_VECTORS_PER_TOKEN
    est = MemoryEstimate(weights=weights,
                         text_encoders=te_size * text_encoder_params if text_encoders_resident else 0,
                         vae=_bytes(vae_dtype) * vae_params, lora=lora, gradients=grads,
                         optimizer=optimizer, activations=act, ema=4 * trainable if ema else 0,
                         reference=size * spec.params if reference_copy and lora_rank is None else 0,
                         rollout_per_row=rollout_bytes_per_row(spec, dtype, cfg_batches), trainable=trainable,
                         behaviour=4 * trainable if async_rollout else 0, concurrent_rollout=async_rollout)
    if max_rows_per_call is None:
        free = None if gpu_memory is None else gpu_memory * HEADROOM - est.resident
        if free is not None and async_rollout:  # the rollout's calls share the GPU with the update's peak
            free -= max(grads + act, grads + optimizer // 2)
            if cuda_graphs:
                free /= 2  # two graph pools: the live model's (eval, probe) and the behaviour policy's
        # with CUDA graphs the pool IS the rollout's activation memory, resident from then on
        max_rows_per_call = rows_that_fit(free, est.rollout_per_row, rows_cap)
    est.max_rows_per_call = max_rows_per_call
    if cuda_graphs:
        est.graph_pool = max_rows_per_call * est.rollout_per_row * (2 if async_rollout else 1)
    if resolution is not None and vae_params:
        est.decode_per_image = decode_bytes_per_image(resolution, vae_dtype)
        est.decode_batch = decode_batch or max(1, min(64, DECODE_BUDGET // est.decode_per_image))
    est.notes = {"trainable parameters": f"{trainable:,} (fp32)",
                 "tokens per row": f"{spec.image_tokens} image + {spec.text_tokens} text",
                 "rows per policy forward": f"{rows}" + (" (CFG doubles them)" if cfg_batches == 2 else ""),
                 "images per VAE decode call": f"{est.decode_batch}"}
    if zero_stage is not None:
        est.notes["sharding"] = (f"DeepSpeed ZeRO-{zero_stage} over {world_size} GPU(s): fp32 masters, AdamW moments "
                                 f"and gradients{' and weights' if zero_stage == 3 else ''} split {world_size} ways")
    return est


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
                 gradient_checkpointing: bool = False, text_encoders_resident: bool = False, ema: bool = False,
                 reference_copy: bool = False, max_rows_per_call: Optional[int] = None,
                 decode_batch: Optional[int] = None, cuda_graphs: bool = False,
                 gpu_memory: Optional[float] = None, zero_stage: Optional[int] = None,
                 world_size: int = 1, async_rollout: bool = False) -> MemoryEstimate:
    """`estimate_memory` for a config's model: kind in {"tiny_flux", "flux", "sd3", "qwen_image"} and its path (a
    local pipeline folder, or a known hub id for flux / sd3). Defaults follow `loading.load_adapter`; SD3 and
    Qwen-Image count two rows per state when their guidance scale is > 1 (CFG), FLUX one (distilled guidance)."""
    common = dict(lora_rank=lora_rank, lora_targets=lora_targets, states_per_forward=states_per_forward,
                  gradient_checkpointing=gradient_checkpointing, ema=ema, reference_copy=reference_copy,
                  max_rows_per_call=max_rows_per_call, decode_batch=decode_batch, cuda_graphs=cuda_graphs,
                  gpu_memory=gpu_memory, zero_stage=zero_stage, world_size=world_size, async_rollout=async_rollout)
    if kind == "tiny_flux":
        from .tiny_flux import IMAGE_SIZE, PATCH, load

        adapter = load(path)  # the shipped model when path is None
        spec = transformer_spec_from_module(adapter.module.transformer, (IMAGE_SIZE // PATCH) ** 2, adapter.max_words)
        # The tiny model trains its word encoder with the transformer: count it as transformer weights.
        spec.params = sum(p.numel() for p in adapter.module.parameters())
        return estimate_memory(spec, dtype=torch.float32, rows_cap=ROWS_PER_CALL_CAP_CPU, **common)
    if kind == "flux":
        resolution, seq, cfg_batches = resolution or 1024, max_sequence_length or 512, 1
    elif kind == "sd3":
        resolution, seq = resolution or 512, max_sequence_length or 256
        cfg_batches = 2 if (4.5 if guidance_scale is None else guidance_scale) > 1.0 else 1
    elif kind == "qwen_image":
        resolution, seq = resolution or 1024, max_sequence_length or 512
        cfg_batches = 2 if (4.0 if guidance_scale is None else guidance_scale) > 1.0 else 1
    else:
        raise ValueError(f"kind must be one of ['tiny_flux', 'flux', 'sd3', 'qwen_image'], got {kind!r}")
    spec, parts = pipeline_spec(kind, path, resolution=resolution, max_sequence_length=seq)
    te = sum(v for k, v in parts.items() if k.startswith("text_encoder"))
    return estimate_memory(spec, dtype=dtype, vae_params=parts["vae"], text_encoder_params=te,
                           text_encoders_resident=text_encoders_resident, cfg_batches=cfg_batches,
                           resolution=resolution, **common)


def dry_run_lines(estimate: MemoryEstimate, nfe: Dict[str, int]) -> list:
    """The `--dry-run` block: memory by part and phase, rows per call, NFE per iteration by phase, and last the
    peak (`peak memory: <x> GiB (<phase>)`)."""
    lines = ["memory estimate (per GPU):"] + ["  " + line for line in estimate.lines()]
    lines.append(f"max rows per transformer call: {estimate.max_rows_per_call}")
    lines.append("NFE per iteration (latent rows through the model):")
    lines += [f"  {k.split('/', 1)[1]:<28} {v:>12,} rows" for k, v in nfe.items() if k.startswith("nfe/")]
    lines.append(f"  {'total':<28} {nfe['nfe_total']:>12,} rows")
    lines.append(f"  {'transformer rows (x2 with CFG)':<28} {nfe['transformer_rows']:>12,} rows")
    name, peak = estimate.peak()
    lines.append(f"peak memory: {peak / GIB:.2f} GiB ({name})")
    return lines


def fixes_for(phase: str) -> str:
    """The config fields that lower a phase's peak (for the --gpu-memory refusal)."""
    return {"rollout forward": "sampling.max_rows_per_call, sampling.runner (cuda_graph pools stay resident), "
                               "model.text_encoders, train.ema_decay",
            "decode": "sampling.decode_batch",
            "update forward+backward": "train.states_per_forward, model.gradient_checkpointing, train.lora.enabled",
            "optimizer step": "train.lora.enabled, train.lora.rank, distributed.backend=deepspeed"}[phase]
