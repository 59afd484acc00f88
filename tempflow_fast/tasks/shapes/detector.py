"""Vectorised detector and binary reward of the shapes task.

Per image: every pixel whose brightest channel exceeds 0.5 takes the nearest palette colour, else
it is background. Same-colour pixels form blobs (8-connected), found for the whole batch at once by
max-pool label propagation (each pixel carries the largest pixel index of its blob after at most
as many rounds as the longest path through a blob). Blobs smaller than a quarter square (4 px) are
ignored as noise; blobs over 1.5 squares (24 px) are not squares (merged or smeared shapes) and
make the image wrong, so a reward-seeking policy cannot pass by painting large patches. An image
is correct when the per-colour blob counts are exactly what the prompt
asks (`colors`: at least one blob and all of that colour) and, for position prompts, the two
blobs' centroids are offset by more than half a side (2 px) in the named direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from tempflow_fast.images import to_unit_float

from ..stats import difference_interval
from .grammar import CATEGORIES, COLORS, PromptSpec, parse
from .render import PALETTE, SIDE

BRIGHT = 0.5
MIN_BLOB_PIXELS = SIDE * SIDE // 4
MAX_BLOB_PIXELS = SIDE * SIDE * 3 // 2
_RELATION_AXIS = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


@dataclass
class Detections:
    """counts (B, 4): blobs per palette colour; centroids (B, 4, 2): (x, y) mean over that
    colour's kept blobs, NaN where the colour has none; oversized (B,): blobs too big to be a square."""

    counts: torch.Tensor
    centroids: torch.Tensor
    oversized: torch.Tensor


def colour_map(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, H, W) long: palette index, or -1 for background."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    palette = torch.as_tensor(PALETTE, device=x.device)
    dist = ((x.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # (B, 4, H, W)
    nearest = dist.argmin(1)
    return torch.where(x.amax(1) > BRIGHT, nearest, torch.full_like(nearest, -1))


def detect(images: torch.Tensor) -> Detections:
    colours = colour_map(images)
    b, h, w = colours.shape
    k = len(COLORS)
    masks = colours.unsqueeze(1) == torch.arange(k, device=colours.device).view(1, k, 1, 1)  # (B, K, H, W)
    maskf = masks.float()
    index = torch.arange(1, h * w + 1, device=colours.device, dtype=torch.float32).view(1, 1, h, w)
    labels = index * maskf
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * maskf
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(b * k, h * w).long()  # 0 = not this colour; else blob id = its max pixel index
    ones = torch.ones_like(flat, dtype=torch.float32)
    size = torch.zeros(b * k, h * w + 1, device=flat.device).scatter_add_(1, flat, ones)
    size[:, 0] = 0
    kept_blob = size >= MIN_BLOB_PIXELS  # (B*K, HW+1)
    counts = kept_blob.sum(1).view(b, k)
    oversized = (size > MAX_BLOB_PIXELS).sum(1).view(b, k).sum(1)
    pixel_kept = kept_blob.gather(1, flat) & (flat > 0)
    ys, xs = torch.meshgrid(torch.arange(h, device=flat.device), torch.arange(w, device=flat.device), indexing="ij")
    pk = pixel_kept.view(b, k, h * w).float()
    n = pk.sum(2)
    cx = (pk * xs.reshape(1, 1, -1)).sum(2) / n
    cy = (pk * ys.reshape(1, 1, -1)).sum(2) / n
    centroids = torch.stack([cx, cy], -1)  # NaN where n == 0 (0/0)
    return Detections(counts=counts, centroids=centroids, oversized=oversized)


def _spec_tensors(specs: Sequence[PromptSpec], device) -> Dict[str, torch.Tensor]:
    k = len(COLORS)
    counts = torch.tensor([s.counts if s.counts is not None else (-1,) * k for s in specs], device=device)
    colour = torch.tensor([s.colour if s.colour is not None else -1 for s in specs], device=device)
    first = torch.tensor([s.first if s.first is not None else 0 for s in specs], device=device)
    second = torch.tensor([s.second if s.second is not None else 0 for s in specs], device=device)
    axis = torch.tensor([_RELATION_AXIS[s.relation][0] if s.relation else 0 for s in specs], device=device)
    sign = torch.tensor([_RELATION_AXIS[s.relation][1] if s.relation else 0.0 for s in specs], device=device)
    has_rel = torch.tensor([s.relation is not None for s in specs], device=device)
    return dict(counts=counts, colour=colour, first=first, second=second, axis=axis, sign=sign, has_rel=has_rel)


def correct(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image correctness (B,) bool of `images` for `prompts` (one prompt per image)."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"images has {images.shape[0]} rows but prompts has {len(prompts)}")
    return judge(detect(images), prompts)


def judge(det: Detections, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image correctness (B,) bool of detections `det` against `prompts` (one per row)."""
    if det.counts.shape[0] != len(prompts):
        raise ValueError(f"detections have {det.counts.shape[0]} rows but prompts has {len(prompts)}")
    specs = [parse(p) for p in prompts]
    t = _spec_tensors(specs, det.counts.device)
    exact = (det.counts == t["counts"]).all(1)
    total = det.counts.sum(1)
    col = t["colour"].clamp_min(0)
    only_colour = (total > 0) & (det.counts.gather(1, col[:, None]).squeeze(1) == total)
    ok = torch.where(t["colour"] >= 0, only_colour, exact)
    rows = torch.arange(len(specs), device=det.counts.device)
    p1 = det.centroids[rows, t["first"]]
    p2 = det.centroids[rows, t["second"]]
    offset = (p2 - p1).gather(1, t["axis"][:, None]).squeeze(1) * t["sign"]
    rel_ok = torch.nan_to_num(offset, nan=0.0) > SIDE / 2
    return ok & (~t["has_rel"] | rel_ok) & (det.oversized == 0)


def partial_score(det: Detections, prompts: Sequence[str]) -> torch.Tensor:
    """Per-image lenient score (B,) in [0, 1], the shapes analogue of GenEval's non-strict score that
    Flow-GRPO's GenEval reward trains on: the mean of one sub-score per requirement the image is judged on.

    - every colour the prompt asks for: 1 − |found − asked| / asked, floored at 0 (``colors``: 1 when at
      least one square of the colour is there, else 0);
    - every colour the prompt does not ask for but the image has: 0;
    - ``position``: the relation, 1 when it holds, else 0;
    - any blob too big to be a square: one more 0.

    The score is 1 exactly when `judge` says the image is correct, so its maximiser is the strict reward's;
    below 1 it tells apart "one square short" from "nothing right".
    """
    if det.counts.shape[0] != len(prompts):
        raise ValueError(f"detections have {det.counts.shape[0]} rows but prompts has {len(prompts)}")
    specs = [parse(p) for p in prompts]
    t = _spec_tensors(specs, det.counts.device)
    found = det.counts.float()
    k = found.shape[1]
    is_colors = t["colour"] >= 0
    asked = torch.where(is_colors[:, None],
                        F.one_hot(t["colour"].clamp_min(0), k).float(),  # colors: "at least one" of the colour
                        t["counts"].float().clamp_min(0))
    wanted = asked > 0
    sub_count = (1 - (found - asked).abs() / asked.clamp_min(1)).clamp_min(0)
    sub_colors = (found >= 1).float()
    subs = torch.where(is_colors[:, None], sub_colors, sub_count) * wanted
    n_subs = wanted.sum(1) + ((~wanted) & (found > 0)).sum(1) + t["has_rel"].long() + (det.oversized > 0).long()
    rows = torch.arange(len(specs), device=det.counts.device)
    offset = (det.centroids[rows, t["second"]] - det.centroids[rows, t["first"]]).gather(1, t["axis"][:, None])
    rel_ok = torch.nan_to_num(offset.squeeze(1) * t["sign"], nan=0.0) > SIDE / 2
    total = subs.sum(1) + (t["has_rel"] & rel_ok).float()
    return total / n_subs


FAILURE_MODES = ("correct", "oversized", "too few", "too many", "wrong colours", "relation")


def failure_modes(det: Detections, prompts: Sequence[str]) -> List[str]:
    """Why each image fails its prompt, the first that applies of `FAILURE_MODES`: "correct"; "oversized" (a
    blob too big to be a square); "too few" / "too many" squares in all; "wrong colours" (the right number of
    squares, not the asked colours); "relation" (the right squares, the relation does not hold)."""
    ok = judge(det, prompts).tolist()
    counts, oversized = det.counts.tolist(), det.oversized.tolist()
    out = []
    for i, prompt in enumerate(prompts):
        spec = parse(prompt)
        total = sum(counts[i])
        if ok[i]:
            out.append("correct")
        elif oversized[i] > 0:
            out.append("oversized")
        elif spec.counts is None:  # colors: at least one square, all of the colour
            out.append("too few" if total == 0 else "wrong colours")
        elif total != sum(spec.counts):
            out.append("too few" if total < sum(spec.counts) else "too many")
        elif tuple(counts[i]) != spec.counts:
            out.append("wrong colours")
        else:
            out.append("relation")
    return out


def word_table(det: Detections, prompts: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Does the model know each word on its own (issue 19, item 2)? Per word of the grammar, how often the image
    has what the word asks for when the prompt says it ("asked"), against how often it has it when the prompt says
    something else in its place ("otherwise", the model's base rate, what chance is here):

    - a colour c: at least one square of c; otherwise = prompts that do not mention c;
    - a number n ("a" = 1, "two", "three"; a colour asked with a count, not ``colors`` prompts): exactly n squares
      of that colour; otherwise = that colour asked with another count;
    - a relation r (``position`` images whose two colours have one square each): the first square is r of the
      second; otherwise = the same squares when the prompt asks the opposite relation (left of ↔ right of).

    {word: {"asked", "asked_images", "otherwise", "otherwise_images", "lift", "lift_ci95"}}: rates in [0, 1] (NaN
    without images), lift = asked − otherwise with its 95% interval (Newcombe's, `stats.difference_interval`)."""
    if det.counts.shape[0] != len(prompts):
        raise ValueError(f"detections have {det.counts.shape[0]} rows but prompts has {len(prompts)}")
    from .grammar import MIRROR, NUMBERS, RELATIONS

    counts = det.counts.cpu()
    specs = [parse(p) for p in prompts]
    tally: Dict[str, list] = {}  # word -> [asked hits, asked n, otherwise hits, otherwise n]

    def add(word: str, asked: bool, hit: bool) -> None:
        row = tally.setdefault(word, [0, 0, 0, 0])
        row[0 if asked else 2] += int(hit)
        row[1 if asked else 3] += 1

    number_words = {1: "a", **{n: w for w, n in NUMBERS.items()}}
    for i, spec in enumerate(specs):
        asked_colours = {spec.colour} if spec.counts is None else {c for c, n in enumerate(spec.counts) if n > 0}
        for c, name in enumerate(COLORS):
            add(name, c in asked_colours, bool(counts[i, c] >= 1))
        if spec.counts is not None:
            for c, n in enumerate(spec.counts):
                if n > 0:
                    for m, word in number_words.items():
                        add(word, m == n, bool(counts[i, c] == m))
        if spec.relation is not None and counts[i, spec.first] == 1 and counts[i, spec.second] == 1:
            offset = det.centroids[i, spec.second].cpu() - det.centroids[i, spec.first].cpu()
            for r in RELATIONS:
                if r in (spec.relation, MIRROR[spec.relation]):
                    axis, sign = _RELATION_AXIS[r]
                    add(r, r == spec.relation, bool(float(offset[axis]) * sign > SIDE / 2))
    rate = lambda hits, n: hits / n if n else float("nan")
    return {w: {"asked": rate(a, na), "asked_images": na, "otherwise": rate(o, no), "otherwise_images": no,
                "lift": rate(a, na) - rate(o, no), "lift_ci95": list(difference_interval(a, na, o, no))}
            for w, (a, na, o, no) in tally.items()}


def accuracy_by_category(correctness: torch.Tensor, prompts: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{category: {"accuracy", "correct", "count"}} plus "overall".

    As in GenEval, the overall accuracy is the mean of the per-category accuracies (categories
    present), so the many position prompts do not outweigh the rest; "overall" also carries the
    pooled totals and their ratio as "image_accuracy".
    """
    cats = [parse(p).category for p in prompts]
    c = correctness.float().cpu()
    out: Dict[str, Dict[str, float]] = {}
    for name in CATEGORIES:
        idx = [i for i, cat in enumerate(cats) if cat == name]
        if idx:
            hits = int(c[idx].sum())
            out[name] = {"accuracy": hits / len(idx), "correct": hits, "count": len(idx)}
    hits = int(c.sum())
    mean = sum(row["accuracy"] for row in out.values()) / max(1, len(out))
    out["overall"] = {"accuracy": mean, "correct": hits, "count": len(c), "image_accuracy": hits / max(1, len(c))}
    return out


class ShapesReward:
    """The shapes task's reward: `reward(images, prompts)` → (B,) float32.

    mode "strict" (GenEval's accuracy): 1 where the detector finds exactly the scene the prompt describes,
    else 0. mode "partial": `partial_score`, the lenient per-requirement score (1 exactly where strict is 1).
    Either way `details` holds the strict per-category breakdown of the last call, and
    `reward.breakdown(images, prompts)` computes it without a reward call.
    """

    name = "shapes_detector"
    MODES = ("strict", "partial")
    accepts_uint8 = True

    def __init__(self, mode: str = "strict"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.details: Dict[str, Dict[str, float]] = {}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"images has {images.shape[0]} rows but prompts has {len(prompts)}")
        det = detect(to_unit_float(images))
        ok = judge(det, prompts)
        self.details = accuracy_by_category(ok, prompts)
        return partial_score(det, prompts).float() if self.mode == "partial" else ok.float()

    def breakdown(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, Dict[str, float]]:
        return accuracy_by_category(correct(to_unit_float(images), prompts), prompts)

    def categories(self, prompts: Sequence[str]) -> List[str]:
        return [parse(p).category for p in prompts]
