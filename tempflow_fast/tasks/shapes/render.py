"""Procedural ground-truth images for shapes prompts: squares of side 4 on a black 16×16 canvas.

Squares never touch: any two are at least one background pixel apart along some axis, so the
detector's connected components see each square as one blob. Position prompts are rendered with
the named relation holding by more than half a side (the detector's rule); the other axis is free.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .grammar import COLORS, PromptSpec, parse

IMAGE_SIZE = 16
SIDE = 4
GAP = 1
# Palette in RGB [0, 1], in the order of grammar.COLORS.
PALETTE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=np.float32)
assert len(PALETTE) == len(COLORS)

Square = Tuple[int, int, int]  # (palette index, x of left column, y of top row)


def _apart(a: Square, b: Square) -> bool:
    return abs(a[1] - b[1]) >= SIDE + GAP or abs(a[2] - b[2]) >= SIDE + GAP


def relation_holds(relation: str, first: Square, second: Square) -> bool:
    """The detector's rule: centre offset along the named axis exceeds half a side."""
    dx, dy = second[1] - first[1], second[2] - first[2]  # image y grows downwards
    half = SIDE / 2
    return {"left of": dx > half, "right of": -dx > half, "above": dy > half, "below": -dy > half}[relation]


def sample_scene(spec: PromptSpec, rng: np.random.Generator) -> List[Square]:
    """Random square placements satisfying `spec` (rejection sampling; a few tries at most)."""
    if spec.counts is not None:
        colours = [c for c, n in enumerate(spec.counts) for _ in range(n)]
    else:
        colours = [spec.colour] * int(rng.integers(1, 4))
    hi = IMAGE_SIZE - SIDE + 1
    for _ in range(1000):
        scene = [(c, int(rng.integers(0, hi)), int(rng.integers(0, hi))) for c in colours]
        if not all(_apart(scene[i], scene[j]) for i in range(len(scene)) for j in range(i)):
            continue
        if spec.relation is not None:
            first = next(s for s in scene if s[0] == spec.first)
            second = next(s for s in scene if s[0] == spec.second)
            if not relation_holds(spec.relation, first, second):
                continue
        return scene
    raise RuntimeError(f"could not place a scene for {spec.prompt!r}")  # unreachable on 16×16


def draw(scenes: Sequence[Sequence[Square]]) -> torch.Tensor:
    """Scenes → images (B, 3, 16, 16) float32 in [0, 1]."""
    images = np.zeros((len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for b, scene in enumerate(scenes):
        for c, x, y in scene:
            images[b, :, y:y + SIDE, x:x + SIDE] = PALETTE[c][:, None, None]
    return torch.from_numpy(images)


def render(prompts: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
    """One random ground-truth image per prompt, (B, 3, 16, 16) in [0, 1]."""
    return draw([sample_scene(parse(p), rng) for p in prompts])
