"""UnifiedReward served behind an OpenAI-compatible chat API (sglang / vLLM), the way Flow-GRPO's
current UnifiedReward reward talks to it (its older pickle server is covered by server_client.py):

  request   POST <url>/chat/completions, Content-Type: application/json, one image per request:
            {"model": <served model>, "temperature": 0,
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:image;base64,<PNG>"}},
                 {"type": "text", "text": <question naming the prompt>}]}]}
  response  {"choices": [{"message": {"content": "... Final Score: 4.5"}}]}
  score     the number after "Final Score:" (1..5) divided by 5; 0 when the answer has none (as Flow-GRPO).

Images are resized to `image_size` square (Flow-GRPO: 512) on tensors before PNG encoding. Requests run
`concurrency` at a time; each has the timeout/retry policy of server_client.py. The default question
asks for caption alignment and image quality and a "Final Score:" from 1 to 5; pass `question` (with a
`{prompt}` placeholder) to use another wording, e.g. the exact one a reproduction needs.
"""

from __future__ import annotations

import base64
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import check_batch, to_uint8
from .server_client import post_with_retries
from .server_protocol import encode_images

_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")
DEFAULT_QUESTION = (
    "<image>\nYou are shown a generated image and the caption it was generated from. Rate the image on "
    "(1) how faithfully it depicts the caption: the objects, their counts, attributes and relations, and "
    "(2) its visual quality: clarity, detail, colour and overall appeal. Give one score from 1 to 5 after "
    "'Final Score:'.\nCaption: [{prompt}]"
)


def parse_final_score(text: str) -> Optional[float]:
    """The 1..5 number after "Final Score:", or None when the answer has none."""
    match = _FINAL_SCORE.search(text)
    return float(match.group(1)) if match else None


class UnifiedRewardClient:
    """`reward(images, prompts)` → (B,) float32 in [0, 1]: UnifiedReward's final score / 5.
    `last_unparsed` counts the answers of the last call that had no final score (scored 0)."""

    accepts_uint8 = True

    def __init__(self, url: str = "http://127.0.0.1:17140/v1", *, served_model: str = "UnifiedReward-7b-v1.5",
                 api_key_env: Optional[str] = None, question: str = DEFAULT_QUESTION, image_size: int = 512,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0, concurrency: int = 8,
                 name: str = "unifiedreward"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if "{prompt}" not in question:
            raise ValueError("question must contain a {prompt} placeholder")
        if image_size < 1 or concurrency < 1:
            raise ValueError(f"image_size and concurrency must be >= 1, got {image_size} and {concurrency}")
        if not timeout_s > 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0; "
                             f"got {timeout_s}, {retries}, {backoff_s}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"api_key_env: environment variable {api_key_env!r} is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.served_model, self.question, self.image_size = served_model, question, image_size
        self.timeout_s, self.retries, self.backoff_s, self.concurrency = timeout_s, retries, backoff_s, concurrency
        self.name = name
        self.last_unparsed = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 1)
        files = encode_images(to_uint8(x), "png")
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(files))) as pool:
            answers = list(pool.map(self._ask, files, prompts))
        scores: List[float] = []
        self.last_unparsed = 0
        for answer in answers:
            value = parse_final_score(answer)
            self.last_unparsed += value is None
            scores.append(0.0 if value is None else value / 5.0)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _ask(self, png: bytes, prompt: str) -> str:
        body = {"model": self.served_model, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image;base64," + base64.b64encode(png).decode("ascii")}},
            {"type": "text", "text": self.question.format(prompt=prompt)}]}]}
        raw = post_with_retries(self.endpoint, json.dumps(body).encode("utf-8"), self.headers, self.timeout_s,
                                self.retries, self.backoff_s)
        try:
            content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
        except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError) as err:
            raise RuntimeError(f"reward server {self.endpoint} sent a malformed chat completion "
                               f"({type(err).__name__}: {err}); body starts {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise RuntimeError(f"reward server {self.endpoint}: message content must be text, "
                               f"got {type(content).__name__}")
        return content
