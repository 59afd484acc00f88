"""The reward-server wire format: Flow-GRPO's (pickle over HTTP) and a JSON variant of it.

Flow-GRPO's GenEval, UnifiedReward and DeQA servers (github.com/yifan123/reward-server, a Flask app on
`POST /`, modelled on ddpo-pytorch's LLaVA server) speak this; the client sends at most 64 images a
request:

  request   POST <url>, body = pickle.dumps(dict), no content type
    GenEval        {"images": [JPEG bytes] * B, "meta_datas": [GenEval metadata dict] * B, "only_strict": bool}
    UnifiedReward  {"images": [JPEG bytes] * B, "prompts": [str] * B}
    DeQA           {"images": [JPEG bytes] * B}
  response  200, body = pickle.dumps(dict)
    GenEval        {"scores": [float] * B, "rewards": [...], "strict_rewards": [...],
                    "group_rewards": {tag: [...]}, "group_strict_rewards": {tag: [...]}}
                   Flow-GRPO trains on "scores".
    UnifiedReward, DeQA  {"outputs": [float] * B}
  failure   500, body = the server's Python traceback as UTF-8 text (ours: the error's type and message;
            the traceback stays in the server's log)

  (Flow-GRPO's newer UnifiedReward path talks to an OpenAI-compatible chat server instead: unified_reward.py.)
  The GenEval metadata of a prompt is its line of GenEval's metadata JSONL (`{"tag": ..., "include":
  [{"class": ..., "count": ...}], "prompt": ...}`).

JSON variant (ours; same fields, nothing executable on either side):
  request   POST <url>, Content-Type: application/json
            {"images": [base64 of the encoded image] * B, "image_format": "jpeg" | "png",
             "prompts": [str] * B, optional "meta_datas": [...] and "only_strict": bool}
  response  200, Content-Type: application/json, {"scores": [float] * B} (or "outputs")
  failure   any non-200 status, body = error text

Our server (reference_server.py) also answers `GET <url>` with 200 {"status": "ok", "reward": name} (the
client's health check), needs `Authorization: Bearer <token>` on every request when started with a
token (401 otherwise), and refuses oversized requests with 413: more than a set number of bytes,
images, or pixels in one image (checked from the image headers, before any pixel is decoded).

Unpickling runs code chosen by whoever wrote the bytes, so pickle is used only when asked for
(`protocol="pickle"`) and then through `safe_loads`, which rebuilds plain containers, numbers, strings,
bytes and numpy scalars/arrays and refuses every other class.
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

PROTOCOLS = ("json", "pickle")
IMAGE_FORMATS = ("jpeg", "png")
JSON_CONTENT_TYPE = "application/json"
SCORE_KEYS = ("scores", "outputs")  # GenEval's, then UnifiedReward's / DeQA's


class RequestTooLarge(ValueError):
    """A request over one of the server's limits (answered 413, not 400)."""


_SAFE_GLOBALS = {
    ("builtins", n)
    for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool", "complex")
} | {("collections", "OrderedDict"), ("collections", "defaultdict")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")
} | {("numpy", "dtype"), ("numpy", "ndarray")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only plain data is accepted)")
        return super().find_class(module, name)


def safe_loads(data: bytes) -> Any:
    """`pickle.loads` restricted to plain data (see the module docstring)."""
    return _SafeUnpickler(io.BytesIO(data)).load()


def encode_images(images_uint8: torch.Tensor, image_format: str, jpeg_quality: int = 75) -> List[bytes]:
    """(B, 3, H, W) uint8 → one encoded file per image. JPEG quality 75 is PIL's default, which is
    what Flow-GRPO's clients send; PNG is lossless."""
    from PIL import Image

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    arrays = images_uint8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    out = []
    for a in arrays:
        buf = io.BytesIO()
        if image_format == "jpeg":
            Image.fromarray(a).save(buf, format="JPEG", quality=jpeg_quality)
        else:
            Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def _check_count(count: int, max_images: Optional[int]) -> None:
    if max_images is not None and count > max_images:
        raise RequestTooLarge(f"{count} images in one request, the server's limit is {max_images}; "
                              f"send smaller batches (reward.batch_size)")


def decode_images(files: Sequence[bytes], max_images: Optional[int] = None,
                  max_pixels: Optional[int] = None) -> torch.Tensor:
    """Encoded images (all one size) → (B, 3, H, W) float in [0, 1]. The count and every image's size
    (read from its header) are checked against `max_images` / `max_pixels` before anything is decoded:
    a small, highly compressed file can otherwise claim gigabytes of pixels."""
    from PIL import Image

    if not files:
        raise ValueError("images must hold at least one image, got none")
    _check_count(len(files), max_images)
    opened = []
    for i, f in enumerate(files):
        if not isinstance(f, bytes):
            raise ValueError(f"image {i} must be the bytes of an encoded image, got {type(f).__name__}")
        try:
            image = Image.open(io.BytesIO(f))  # reads the header only
        except Image.DecompressionBombError as err:  # PIL's own limit, far above any sane max_pixels
            raise RequestTooLarge(f"image {i}: {err}") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise RequestTooLarge(f"image {i} is {width}x{height} = {width * height} pixels, the server's limit "
                                  f"is {max_pixels} pixels per image")
        opened.append(image)
    if len({im.size for im in opened}) > 1:
        raise ValueError(f"images must all have one size, got {sorted({im.size for im in opened})} (width, height)")
    arrays = [np.asarray(im.convert("RGB")) for im in opened]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)


def encode_request(protocol: str, files: List[bytes], image_format: str, prompts: Optional[Sequence[str]],
                   meta_datas: Optional[Sequence[dict]] = None,
                   only_strict: bool = True) -> tuple[bytes, Dict[str, str]]:
    """→ (body, headers) of one request."""
    if protocol == "json":
        payload: Dict[str, Any] = {"images": [base64.b64encode(f).decode("ascii") for f in files],
                                   "image_format": image_format}
    elif protocol == "pickle":
        payload = {"images": list(files)}
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if prompts is not None:
        payload["prompts"] = list(prompts)
    if meta_datas is not None:
        payload["meta_datas"] = list(meta_datas)
        payload["only_strict"] = bool(only_strict)
    if protocol == "json":
        return json.dumps(payload).encode("utf-8"), {"Content-Type": JSON_CONTENT_TYPE}
    return pickle.dumps(payload), {}


def decode_request(body: bytes, content_type: str, allow_pickle: bool, max_images: Optional[int] = None,
                   max_pixels: Optional[int] = None) -> Dict[str, Any]:
    """Server side: the request dict with "images" decoded to (B, 3, H, W) floats in [0, 1];
    RequestTooLarge past `max_images` / `max_pixels` (decode_images), ValueError for anything malformed."""
    if content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE:
        data = json.loads(body.decode("utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError("JSON request must be an object with an 'images' list")
        _check_count(len(data["images"]), max_images)  # before base64-decoding any of them
        files = [base64.b64decode(s, validate=True) for s in data["images"]]
    elif allow_pickle:
        data = safe_loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError("pickled request must be a dict with an 'images' list")
        files = data["images"]
    else:
        raise ValueError(f"this server accepts {JSON_CONTENT_TYPE} only (pickle is off), "
                         f"got content type {content_type!r}")
    data = dict(data)
    data["images"] = decode_images(files, max_images, max_pixels)
    return data


def encode_response(protocol: str, scores: Sequence[float]) -> tuple[bytes, str]:
    payload = {"scores": [float(s) for s in scores]}
    if protocol == "json":
        return json.dumps(payload).encode("utf-8"), JSON_CONTENT_TYPE
    return pickle.dumps(payload), "application/octet-stream"


def decode_scores(body: bytes, protocol: str, expected: int, response_key: Optional[str],
                  max_abs_score: float = math.inf) -> List[float]:
    """Client side: the score list of one response; ValueError saying what is wrong with it, including a
    NaN/Inf score or one beyond ±max_abs_score (a broken reward model, not a signal to train on)."""
    try:
        data = json.loads(body.decode("utf-8")) if protocol == "json" else safe_loads(body)
    except (ValueError, UnicodeDecodeError, pickle.UnpicklingError, EOFError, TypeError) as err:
        raise ValueError(f"response is not valid {protocol}: {err}; body starts {body[:120]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"response must be an object/dict, got {type(data).__name__}")
    keys = (response_key,) if response_key else SCORE_KEYS
    key = next((k for k in keys if k in data), None)
    if key is None:
        raise ValueError(f"response has none of the keys {list(keys)}; it has {sorted(map(str, data))}")
    values = data[key]
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"response {key!r} must be a list of {expected} numbers, got {got}")
    out = []
    for v in values:
        # bools count: GenEval's "rewards" / "strict_rewards" are per-image pass/fail flags
        if not isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating)):
            raise ValueError(f"response {key!r} holds a non-number: {v!r}")
        out.append(float(v))
        if not abs(out[-1]) <= max_abs_score:  # also catches NaN
            raise ValueError(f"response {key!r}[{len(out) - 1}] is {out[-1]!r}; scores must be finite and within "
                             f"±{max_abs_score:g}")
    return out
