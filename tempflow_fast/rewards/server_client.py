"""Reward-server client: scores images on a remote reward server over HTTP (wire format in
server_protocol.py: Flow-GRPO's pickle format, or its JSON variant).

Each request to the server (one batch of at most `batch_size` images) has one deadline, `timeout_s`
seconds from its start, that bounds everything: connecting, sending, waiting, reading the answer and
every retry with its backoff — a server that trickles its answer a byte at a time cannot hold a call
past it. A timeout, a refused or dropped connection or a 5xx/429 status is retried up to `retries`
times with exponential backoff (`backoff_s`, 2·backoff_s, ...) while the deadline allows; then a
RuntimeError names the URL, the attempts and the last error. Other statuses (4xx), redirects (never
followed: set the URL the server really serves on), answers over `max_response_bytes`, malformed
answers and scores that are NaN/Inf or beyond ±`max_abs_score` fail at once: asking again would get
the same answer.

`check_reachable(url)` is the cheap start-up check: one GET, answered by any HTTP server (our reference
server says 200; Flow-GRPO's Flask servers 405), refused only when nothing answers or the token is
rejected.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .base import check_batch, to_uint8
from .server_protocol import IMAGE_FORMATS, PROTOCOLS, decode_scores, encode_images, encode_request

_RETRY_STATUS = {429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 30.0
MAX_RESPONSE_BYTES = 16 << 20  # a batch's scores take kilobytes; anything near this is not a score list
HEALTH_TIMEOUT_S = 10.0  # the start-up check waits at most this long (or timeout_s, if shorter)


def token_from_env(variable: Optional[str], field: str = "api_key_env") -> Optional[str]:
    """The bearer token held in environment variable `variable` (None → no token); ValueError naming
    `field` when the variable is unset or empty. Tokens live in the environment, never in configs."""
    if variable is None:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ValueError(f"{field}: environment variable {variable!r} is not set")
    return token


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
    them; GenEval ignores them). token: sent as `Authorization: Bearer <token>` (the server's --token).
    max_abs_score: a score beyond ±this (or NaN/Inf) is an error naming the server, not a reward."""

    accepts_uint8 = True  # images travel as uint8 files anyway

    def __init__(self, url: str, *, protocol: str = "json", image_format: str = "jpeg", timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, batch_size: int = 64, response_key: Optional[str] = None,
                 metadata: Optional[Mapping[str, dict]] = None, only_strict: bool = True, send_prompts: bool = True,
                 jpeg_quality: int = 75, token: Optional[str] = None, max_abs_score: float = 1e6,
                 max_response_bytes: int = MAX_RESPONSE_BYTES, name: str = "server"):
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
        if not max_abs_score > 0:
            raise ValueError(f"max_abs_score must be > 0, got {max_abs_score}")
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be >= 1, got {max_response_bytes}")
        self.url, self.protocol, self.image_format = url, protocol, image_format
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.batch_size, self.response_key = batch_size, response_key
        self.metadata, self.only_strict, self.send_prompts = metadata, only_strict, send_prompts
        self.jpeg_quality = jpeg_quality
        self.token, self.max_abs_score, self.max_response_bytes = token, float(max_abs_score), int(max_response_bytes)
        self.name = name

    def check_health(self) -> None:
        """ValueError unless the server answers a GET with our token (check_reachable)."""
        check_reachable(self.url, self.timeout_s, self.token)

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
        if self.token is not None:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        payload = post_with_retries(self.url, body, headers, self.timeout_s, self.retries, self.backoff_s,
                                    max_response_bytes=self.max_response_bytes)
        try:
            return decode_scores(payload, self.protocol, expected, self.response_key, self.max_abs_score)
        except ValueError as err:
            raise RuntimeError(f"reward server {self.url} sent a malformed response: {err}") from None


def post_with_retries(url: str, body: bytes, headers: Dict[str, str], timeout_s: float, retries: int,
                      backoff_s: float, max_response_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
    """POST `body`; the response body of the first 200 answer. Everything, retries included, ends within
    `timeout_s` (module docstring); RuntimeError naming `url` and the last error otherwise."""
    deadline = time.monotonic() + timeout_s
    limits = f"timeout_s={timeout_s:g} for the whole call, retries={retries}"
    last, attempts = "", 0
    while True:
        attempts += 1
        try:
            status, response_headers, payload = http_request("POST", url, body, headers, deadline, max_response_bytes)
        except TimeoutError:
            last = f"no complete answer within timeout_s={timeout_s:g} s"
            break
        except ResponseTooLarge as err:
            raise RuntimeError(f"reward server {url} sent an oversized answer: {err}") from None
        except (http.client.HTTPException, OSError) as err:
            last = f"{type(err).__name__}: {err}"
        else:
            if status == 200:
                return payload
            last = f"HTTP {status}: {_detail(payload)}"
            if 300 <= status < 400:
                raise RuntimeError(f"reward server {url} answered with a redirect ({last}, Location: "
                                   f"{response_headers.get('Location')}); redirects are not followed, "
                                   f"give the URL the server answers on") from None
            if status not in _RETRY_STATUS:
                raise RuntimeError(f"reward server {url} refused the request ({last})") from None
        if attempts > retries:
            break
        pause = min(_MAX_BACKOFF_S, backoff_s * 2 ** (attempts - 1))
        if time.monotonic() + pause >= deadline:
            last += "; no time left for another attempt"
            break
        time.sleep(pause)
    raise RuntimeError(f"reward server {url} failed after {attempts} attempt{'s' * (attempts > 1)} "
                       f"({limits}); last error: {last}")


def check_reachable(url: str, timeout_s: float = HEALTH_TIMEOUT_S, token: Optional[str] = None) -> None:
    """One GET to `url` within min(timeout_s, HEALTH_TIMEOUT_S): fine when any HTTP server answers below
    500 (our server: 200; a POST-only Flask route: 405); ValueError naming `url` when nothing answers,
    the token is refused (401/403) or the server fails (5xx)."""
    deadline = time.monotonic() + min(timeout_s, HEALTH_TIMEOUT_S)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        status, _, payload = http_request("GET", url, None, headers, deadline, 1 << 16)
    except TimeoutError:
        raise ValueError(f"reward server {url} did not answer within {min(timeout_s, HEALTH_TIMEOUT_S):g} s") from None
    except ResponseTooLarge:
        return  # something answered; a health page this big is odd but says the server is up
    except (http.client.HTTPException, OSError) as err:
        raise ValueError(f"no reward server reachable at {url} ({type(err).__name__}: {err})") from None
    if status in (401, 403):
        raise ValueError(f"reward server {url} refused our token (HTTP {status}: {_detail(payload)}); "
                         f"{'no token was sent' if token is None else 'the token sent is not the one it expects'}")
    if status >= 500:
        raise ValueError(f"reward server {url} is failing (HTTP {status}: {_detail(payload)})")


class ResponseTooLarge(Exception):
    """An answer over the response size limit."""


def http_request(method: str, url: str, body: Optional[bytes], headers: Dict[str, str], deadline: float,
                 max_response_bytes: int) -> Tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP request finished by `deadline` (time.monotonic()) or TimeoutError: (status, headers, body).

    Socket timeouts bound each read, not the sum of them, so a watchdog shuts the socket down at the
    deadline; the blocked read then returns and the request ends. Redirects are returned, not followed;
    a body over `max_response_bytes` raises ResponseTooLarge without being read whole."""
    parts = urllib.parse.urlsplit(url)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname, parts.port, timeout=remaining)
    expired = threading.Event()
    watchdog = response = None
    try:
        conn.connect()  # within `remaining` (the socket timeout)
        sock = conn.sock  # kept here: the connection lets go of it when an answer ends with the connection

        def expire():
            expired.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
        watchdog.daemon = True
        watchdog.start()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            if expired.is_set():
                raise
            # the server may have answered before reading all of the body (401, 413) and closed: read that answer
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_response_bytes:
            raise ResponseTooLarge(f"Content-Length {length} bytes, the limit is {max_response_bytes}")
        chunks, size = [], 0
        while True:
            chunk = response.read(min(1 << 16, max_response_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_response_bytes:
                raise ResponseTooLarge(f"more than {max_response_bytes} bytes")
        if expired.is_set():  # an answer without a length ends at the shutdown as if complete
            raise TimeoutError
        return response.status, response.headers, b"".join(chunks)
    except (OSError, http.client.HTTPException):
        if expired.is_set() or time.monotonic() >= deadline:
            raise TimeoutError from None
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if response is not None:
            response.close()
        conn.close()


def _detail(payload: bytes) -> str:
    detail = payload.decode("utf-8", "replace").strip()
    return detail if len(detail) <= 600 else "..." + detail[-600:]  # the end of an error text says what went wrong
