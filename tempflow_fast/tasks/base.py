"""The task seam (issue 19, item 7): what a run learns and how it is measured, apart from the method and the model.

The trainer is given a `Task` (`Trainer(cfg, task=...)`, or the one the config names, `tempflow_fast.tasks.
build_task`) and never imports a task module itself. It asks the task for:

- `train_prompts()`: the prompts rollouts draw from;
- `category_pools(prompts)`: those prompts by category, for `data.balance_categories` and the probe set (one
  pool when the task has no categories);
- `eval_prompts()`: the held-out prompts (the showcase grid's; empty when there are none);
- `evaluate(model, run)`: the held-out table {row: {"accuracy", "correct", "count", "ci95": [low, high]},
  "overall": {...}} of `model` (the trainer swaps the EMA weights in first), or None when the task has no
  held-out eval; `metric` names what "overall" measures ("held-out accuracy", "held-out reward") or is None;
- `annotate(images, prompts)`: a verdict per image (True / False: green / red frames in the sample grids and
  before_after.png), or None when the task has none;
- `build_reward(reward_cfg)`: the reward the run trains when none is given in Python (the `reward:` section);
- `default_images_per_prompt` / `default_probe_prompts`: what `eval.images_per_prompt` and `eval.probe_prompts`
  mean when left null;
- optionally `probe_prompts(prompts, n)`: the probe set's n prompts (default: `round_robin` over the category
  pools); a task whose pools have structure inside (the shapes task's relations, numbers, colours) spreads it;
- optionally `split_version`: which version of its fixed train / held-out split the task has (summary.json
  records it; held-out numbers compare only within one version).

Implementations: `shapes` (tasks/shapes/task.py: the mini-GenEval, held-out accuracy by category),
`compressibility` (tasks/compressibility.py: JPEG size on the tiny model, mean reward), `prompts`
(tasks/prompt_file.py: a real model's prompt files, mean reward on data.eval_prompts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch


@dataclass
class EvalRun:
    """How the trainer runs an evaluation: the reward it trains (prompt-file and compressibility tasks score with
    it), rows per model call, images per decode call, the image format the reward gets, a progress bar."""

    reward: Callable
    rows_per_call: Optional[int] = None
    decode_batch: Optional[int] = None
    image_format: str = "float"
    progress: bool = False


class Task(Protocol):
    name: str
    metric: Optional[str]
    default_images_per_prompt: int
    default_probe_prompts: int

    def train_prompts(self) -> List[str]:
        """The training prompts."""

    def eval_prompts(self) -> List[str]:
        """The held-out prompts ([] when there are none)."""

    def category_pools(self, prompts: Sequence[str]) -> List[List[str]]:
        """`prompts` by category, in a fixed category order; [list(prompts)] for a task without categories."""

    def evaluate(self, model, run: EvalRun) -> Optional[Dict]:
        """The held-out table (module doc), or None."""

    def annotate(self, images: torch.Tensor, prompts: Sequence[str]) -> Optional[List[bool]]:
        """A verdict per image, or None."""

    def build_reward(self, reward_cfg):
        """The reward `reward_cfg` names, checked against the task."""


def round_robin(pools: Sequence[Sequence[str]], n: int) -> List[str]:
    """Up to n prompts taken from the pools in turn (pool 0's first, pool 1's first, ..., pool 0's second, ...),
    each pool's prompts spread over its list, so a small set covers every category equally."""
    if n <= 0:
        return []
    per_pool = -(-n // max(1, len(pools)))
    return take_turns([list(pool[::max(1, len(pool) // per_pool)][:per_pool]) for pool in pools], n)


def take_turns(pools: Sequence[Sequence[str]], n: int) -> List[str]:
    """Up to n prompts: each pool's first in pool order, then each pool's second, ...; a pool that runs out drops
    out of the turns, so n come back while the pools hold n (a small category leaves its share to the others)."""
    out: List[str] = []
    for i in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if i < len(pool) and len(out) < n:
                out.append(pool[i])
    return out


def read_prompts(path: str, field_name: str) -> List[str]:
    """Prompts from a .txt (one per line) or .jsonl (objects with a "prompt" field)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config field {field_name!r}: no such file {path!r}")
    lines = [l.strip() for l in p.read_text().splitlines() if l.strip()]
    if p.suffix == ".jsonl":
        try:
            prompts = [json.loads(l)["prompt"] for l in lines]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"config field {field_name!r}: {path!r} must hold one JSON object with a "
                             f"'prompt' field per line ({err})") from None
    else:
        prompts = lines
    if not prompts:
        raise ValueError(f"config field {field_name!r}: {path!r} holds no prompts")
    return prompts
