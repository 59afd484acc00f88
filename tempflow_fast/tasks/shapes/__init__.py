"""The embedded shapes task: a mini-GenEval on coloured squares (see `grammar` for what each
category means). What the trainer needs is importable from here without diffusers:
`ShapesReward`, `TRAIN_PROMPTS`, `HELD_OUT_PROMPTS`; ground-truth images from `render.render`."""

from .detector import ShapesReward, accuracy_by_category, correct
from .grammar import ALL_PROMPTS, CATEGORIES, HELD_OUT_PROMPTS, TRAIN_PROMPTS, parse

__all__ = ["ShapesReward", "accuracy_by_category", "correct", "ALL_PROMPTS", "CATEGORIES",
           "HELD_OUT_PROMPTS", "TRAIN_PROMPTS", "parse"]
