"""`RewardConfig` (the training config's `reward:` section) and `build_reward(cfg)` → a reward.

    reward:                                  # PickScore from a local folder
      name: pickscore
      path: /models/PickScore_v1
      processor_path: /models/CLIP-ViT-H-14-laion2B-s32B-b79K

    reward:                                  # G²RPO's HPS + CLIP
      name: composite
      components:
        - {name: hps, path: /models/HPS_v2.1_compressed.pt, weight: 1.0}
        - {name: clip, path: openai/clip-vit-large-patch14, weight: 1.0}

    reward: {name: server, url: "http://127.0.0.1:18085", protocol: pickle, metadata_path: geneval.jsonl}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from .base import resolve_device

REWARD_NAMES = ("shapes", "pickscore", "clip", "hps", "imagereward", "aesthetic", "server", "unifiedreward",
                "jpeg_compressibility", "jpeg_incompressibility", "composite")
_NEEDS_PATH = ("pickscore", "clip", "hps", "aesthetic")
_SCALED = ("pickscore", "clip", "hps", "imagereward")


@dataclass
class RewardConfig:
    # which reward: the shapes detector, an in-process model, a reward server (Flow-GRPO format, or
    # UnifiedReward behind an OpenAI-compatible chat API), Flow-GRPO's JPEG size rewards (no model), or a
    # weighted sum
    name: Literal["shapes", "pickscore", "clip", "hps", "imagereward", "aesthetic", "server", "unifiedreward",
                  "jpeg_compressibility", "jpeg_incompressibility", "composite"] = "shapes"
    # weights: a folder or hub id (pickscore, clip: the CLIPModel; aesthetic: its CLIP model), or one file /
    # 'owner/repo/file' (hps: the HPS checkpoint; imagereward: the checkpoint or 'ImageReward-v1.0')
    path: Optional[str] = None
    # shapes: "strict" = 1 for exactly the prompted scene else 0 (GenEval's accuracy); "partial" = the mean of
    # per-requirement sub-scores (GenEval's lenient score, what Flow-GRPO's GenEval reward trains on); the
    # eval is strict either way
    shapes_score: Literal["strict", "partial"] = "strict"
    # pickscore: the CLIP processor folder/hub id it was trained with (default: path when that folder holds
    # a processor config, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K); clip: the processor (default: path);
    # imagereward: its med_config.json (needed offline)
    processor_path: Optional[str] = None
    # aesthetic: the LAION MLP head state dict (.pth / .safetensors, or 'owner/repo/file')
    head_path: Optional[str] = None
    arch: str = "ViT-H-14"  # hps: the open_clip architecture the checkpoint was trained on
    device: str = "auto"  # where the reward model runs: auto (CUDA when present) | cpu | cuda | cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # reward model weights and activations
    scale: float = 1.0  # pickscore/clip/hps/imagereward: multiplies the score (Flow-GRPO: 1/26 PickScore, 1/30 CLIP)
    batch_size: int = 32  # images per reward-model forward, per server request, or unifiedreward requests in flight
    url: Optional[str] = None  # server: e.g. http://127.0.0.1:18085 (GenEval); unifiedreward: http://127.0.0.1:17140/v1
    protocol: Literal["json", "pickle"] = "json"  # server: wire format; pickle = Flow-GRPO's servers
    image_format: Literal["jpeg", "png"] = "jpeg"  # server: how images travel (Flow-GRPO sends JPEG)
    timeout_s: float = 120.0  # server, unifiedreward: seconds one request may take in all, retries included
    retries: int = 3  # server, unifiedreward: further attempts after a timeout, refused connection or 5xx
    backoff_s: float = 1.0  # server, unifiedreward: sleep before retry i is backoff_s · 2^(i-1) seconds
    response_key: Optional[str] = None  # server: response field with the scores; None = "scores", else "outputs"
    metadata_path: Optional[str] = None  # server: GenEval metadata JSONL; sends each prompt's line as meta_datas
    only_strict: bool = True  # server with metadata: ask GenEval for the strict score only (faster)
    send_prompts: bool = True  # server: include the prompts in requests (UnifiedReward needs them)
    served_model: str = "UnifiedReward-7b-v1.5"  # unifiedreward: the model name the chat server serves
    # server, unifiedreward: environment variable holding the bearer token sent as 'Authorization: Bearer ...'
    # (our server's --token / $TEMPFLOW_FAST_REWARD_TOKEN, or the chat server's API key); None = send none
    api_key_env: Optional[str] = None
    max_abs_score: float = 1e6  # server: a score that is NaN/Inf or beyond ±this is an error, not a reward
    image_size: int = 512  # unifiedreward: images are resized to this square before sending
    weight: float = 1.0  # inside a composite: this component's weight w_i
    label: Optional[str] = None  # name in logs and composites; None = the reward's own name
    normalize: Literal["running", "batch", "none"] = "running"  # composite: per-component normalisation
    components: List["RewardConfig"] = field(default_factory=list)  # composite: the summed rewards
    async_workers: int = 1  # threads of the AsyncScorer scoring while the next segment samples; 0 = inline
    # composite: advantages from the weighted composite (composite), or each component's raw scores normalised in
    #   the group on their own, then summed with the weights (per_component; G²RPO's code for HPS + CLIP)
    advantage_mode: Literal["composite", "per_component"] = "composite"

    def validate(self):
        if self.name in _NEEDS_PATH and not self.path:
            raise ValueError(f"path is required for the {self.name!r} reward")
        if self.name == "aesthetic" and not self.head_path:
            raise ValueError("head_path (the LAION MLP head) is required for the 'aesthetic' reward")
        if self.name in ("server", "unifiedreward") and not self.url:
            raise ValueError(f"url is required for the {self.name!r} reward")
        if self.name == "composite":
            if not self.components:
                raise ValueError("components must list at least one reward for 'composite'")
            if any(c.name == "composite" for c in self.components):
                raise ValueError("a composite's components cannot be composites themselves")
        elif self.components:
            raise ValueError(f"components is only for name 'composite', got name {self.name!r}")
        if self.scale != 1.0 and self.name not in _SCALED:
            raise ValueError(f"scale applies to {list(_SCALED)} only, got scale {self.scale} for {self.name!r}")
        if self.shapes_score != "strict" and self.name != "shapes":
            raise ValueError(f"shapes_score applies to the 'shapes' reward only, got {self.shapes_score!r} for "
                             f"{self.name!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {self.retries} and {self.backoff_s}")
        if not 0 < self.max_abs_score < float("inf"):
            raise ValueError(f"max_abs_score must be a finite number > 0, got {self.max_abs_score}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.async_workers < 0:
            raise ValueError(f"async_workers must be >= 0, got {self.async_workers}")
        resolve_device(self.device)


def build_reward(cfg: RewardConfig):
    """The reward `cfg` describes, loaded and ready: `reward(images, prompts)` → (B,) float32."""
    if not isinstance(cfg, RewardConfig):
        raise ValueError(f"cfg must be a RewardConfig, got {type(cfg).__name__}")
    cfg.validate()
    reward = _build_one(cfg)
    if cfg.label:
        reward.name = cfg.label
    return reward


def _build_one(cfg: RewardConfig):
    common = dict(device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)
    if cfg.name == "shapes":
        from tempflow_fast.tasks.shapes.detector import ShapesReward

        return ShapesReward(mode=cfg.shapes_score)
    if cfg.name == "pickscore":
        from .clip_score import pickscore

        return pickscore(cfg.path, processor_path=cfg.processor_path, scale=cfg.scale, **common)
    if cfg.name == "clip":
        from .clip_score import clip_score

        return clip_score(cfg.path, processor_path=cfg.processor_path, scale=cfg.scale, **common)
    if cfg.name == "hps":
        from .hps import HPSReward

        return HPSReward(cfg.path, arch=cfg.arch, scale=cfg.scale, **common)
    if cfg.name == "imagereward":
        from .imagereward import ImageRewardReward

        return ImageRewardReward(cfg.path or "ImageReward-v1.0", med_config=cfg.processor_path, scale=cfg.scale,
                                 **common)
    if cfg.name == "aesthetic":
        from .aesthetic import AestheticReward

        return AestheticReward(cfg.path, cfg.head_path, **common)
    if cfg.name == "server":
        from .server_client import RewardServerClient, load_prompt_metadata, token_from_env

        metadata = load_prompt_metadata(cfg.metadata_path) if cfg.metadata_path else None
        return RewardServerClient(cfg.url, protocol=cfg.protocol, image_format=cfg.image_format,
                                  timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s,
                                  batch_size=cfg.batch_size, response_key=cfg.response_key, metadata=metadata,
                                  only_strict=cfg.only_strict, send_prompts=cfg.send_prompts,
                                  token=token_from_env(cfg.api_key_env), max_abs_score=cfg.max_abs_score)
    if cfg.name == "unifiedreward":
        from .unified_reward import UnifiedRewardClient

        return UnifiedRewardClient(cfg.url, served_model=cfg.served_model, api_key_env=cfg.api_key_env,
                                   image_size=cfg.image_size, timeout_s=cfg.timeout_s, retries=cfg.retries,
                                   backoff_s=cfg.backoff_s, concurrency=cfg.batch_size)
    if cfg.name in ("jpeg_compressibility", "jpeg_incompressibility"):
        from . import jpeg

        return getattr(jpeg, cfg.name)()
    from .composite import CompositeReward

    return CompositeReward([(build_reward(c), c.weight) for c in cfg.components], normalize=cfg.normalize)


def check_reward_reachable(cfg: RewardConfig, field: str = "reward") -> None:
    """Cheap start-up check, before any model loads: every reward server `cfg` names (itself or a
    composite's components) answers a GET with the configured token. ValueError naming the field
    (`reward.url`, `reward.components[1].url`, `reward.api_key_env`) otherwise; rewards that need no
    server pass at once. One request per server, at most min(timeout_s, 10) seconds each."""
    from .server_client import check_reachable, token_from_env

    if cfg.name == "composite":
        for i, component in enumerate(cfg.components):
            check_reward_reachable(component, f"{field}.components[{i}]")
        return
    if cfg.name not in ("server", "unifiedreward"):
        return
    if not cfg.url:
        raise ValueError(f"{field}.url is required for the {cfg.name!r} reward")
    token = token_from_env(cfg.api_key_env, f"{field}.api_key_env")
    try:
        check_reachable(cfg.url, cfg.timeout_s, token)
    except ValueError as err:
        raise ValueError(f"{field}.url: {err}") from None
