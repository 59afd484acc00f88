"""Reward-server client: scores images on a remote reward server over HTTP (wire format in
server_protocol.py: Flow-GRPO's pickle format, or its JSON variant).

Each request has a timeout (`timeout_s`, per socket operation: connect, and every read while waiting
for the answer); a timeout, a refused connection or a 5xx/429 status is retried `retries` times with
exponential backoff (`backoff_s`, 2·backoff_s, ...), after which a RuntimeError names the URL, the
attempts and the last error. Other statuses (4xx) and malformed responses fail at once: asking again
would get the same answer.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .base import check_batch, to_uint8
from .server_protocol import IMAGE_FORMATS, PROTOCOLS, decode_scores, encode_images, encode_request

_RETRY_STATUS = {429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 30.0


def load_prompt_metadata(path: str) -> Dict[str, dict]:
    """GenEval metadata JSONL (one object with a "prompt" field per line) → {prompt: metadata}."""
    out: Dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"metadata_path {path!r} line {lineno}: not JSON ({err})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"metadata_path {path!r} line {lineno}: expected an object with a 'prompt' string")
            out[item["prompt"]] = item
    return out


class RewardServerClient:
    """`reward(images, prompts)` → (B,) float32 scores from the server at `url`.

    metadata: {prompt: GenEval metadata}; when given, requests carry "meta_datas" (and "only_strict")
    as Flow-GRPO's GenEval client sends them. send_prompts: include "prompts" (UnifiedReward needs
    them; GenEval ignores them)."""

    def __init__(self, url: str, *, protocol: str = "json", image_format: str = "jpeg", timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, batch_size: int = 64, response_key: Optional[str] = None,
                 metadata: Optional[Mapping[str, dict]] = None, only_strict: bool = True, send_prompts: bool = True,
                 jpeg_quality: int = 75, name: str = "server"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url, self.protocol, self.image_format = url, protocol, image_format
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.batch_size, self.response_key = batch_size, response_key
        self.metadata, self.only_strict, self.send_prompts = metadata, only_strict, send_prompts
        self.jpeg_quality = jpeg_quality
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        meta = None
        if self.metadata is not None:
            missing = [p for p in prompts if p not in self.metadata]
            if missing:
                raise ValueError(f"prompts: no GenEval metadata for {missing[0]!r} ({len(missing)} prompts missing)")
            meta = [self.metadata[p] for p in prompts]
        pixels = to_uint8(images)
        scores: List[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            files = encode_images(pixels[start:stop], self.image_format, self.jpeg_quality)
            body, headers = encode_request(self.protocol, files, self.image_format,
                                           prompts[start:stop] if self.send_prompts else None,
                                           None if meta is None else meta[start:stop], self.only_strict)
            scores += self._post(body, headers, len(files))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _post(self, body: bytes, headers: Dict[str, str], expected: int) -> List[float]:
        payload = post_with_retries(self.url, body, headers, self.timeout_s, self.retries, self.backoff_s)
        try:
            return decode_scores(payload, self.protocol, expected, self.response_key)
        except ValueError as err:
            raise RuntimeError(f"reward server {self.url} sent a malformed response: {err}") from None


def post_with_retries(url: str, body: bytes, headers: Dict[str, str], timeout_s: float, retries: int,
                      backoff_s: float) -> bytes:
    """POST `body`; the response body of the first 200 answer. Timeouts, refused connections and
    429/5xx are retried (module docstring); RuntimeError naming `url` and the last error after that."""
    last = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(_MAX_BACKOFF_S, backoff_s * 2 ** (attempt - 1)))
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace").strip()
            if len(detail) > 600:  # a traceback's last lines say what went wrong
                detail = "..." + detail[-600:]
            last = f"HTTP {err.code}: {detail}"
            if err.code not in _RETRY_STATUS:
                raise RuntimeError(f"reward server {url} refused the request ({last})") from None
        except (socket.timeout, TimeoutError) as err:
            last = f"no answer within timeout_s={timeout_s:g} s ({err})"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    raise RuntimeError(f"reward server {url} failed after {retries + 1} attempts "
                       f"(timeout_s={timeout_s:g}, retries={retries}); last error: {last}")
