"""Pictures of what a run learned, drawn with PIL only (no plotting stack in the training install):

- `prompt_grid`: images grouped by prompt, one row per prompt under its caption, each image optionally framed
  green / red (the shapes detector's verdict);
- `before_after`: the same prompts and noises before and after training, side by side per prompt;
- `line_chart`: metric curves over iterations (the reward curve), evals as points with their intervals.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

from tempflow_fast.images import to_unit_float

BACKGROUND, TEXT, NEUTRAL = (32, 32, 32), (235, 235, 235), (110, 110, 110)
GOOD, BAD = (40, 200, 60), (220, 50, 50)
GAP, BORDER, CAPTION = 6, 2, 18


def _tiles(images: torch.Tensor, cell: int) -> List[Image.Image]:
    """(N, 3, H, W) float [0, 1] or uint8 → N PIL tiles of cell × cell px (pixel-exact when upscaling)."""
    x = to_unit_float(images.detach(), "cpu")
    h, w = x.shape[-2:]
    if max(h, w) > cell:
        x = torch.nn.functional.interpolate(x, size=(cell, cell), mode="bilinear", antialias=True)
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p).resize((cell, cell), Image.NEAREST) for p in pixels]


def _by_prompt(prompts: Sequence[str]) -> List[Tuple[str, List[int]]]:
    order: Dict[str, List[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(p, []).append(i)
    return list(order.items())


def _frame(ok, i) -> Tuple[int, int, int]:
    return NEUTRAL if ok is None else (GOOD if ok[i] else BAD)


def prompt_grid(images: torch.Tensor, prompts: Sequence[str], *, ok: Optional[Sequence[bool]] = None,
                title: str = "", cell: int = 96, per_row: int = 8) -> Image.Image:
    """One row per distinct prompt (first-seen order) with up to `per_row` of its images under its caption."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"images has {images.shape[0]} rows but prompts has {len(prompts)}")
    tiles = _tiles(images, cell)
    groups = [(p, idx[:per_row]) for p, idx in _by_prompt(prompts)]
    cols = max(len(idx) for _, idx in groups)
    step = cell + 2 * BORDER + GAP
    top = CAPTION + GAP if title else GAP
    canvas = Image.new("RGB", (GAP + cols * step, top + len(groups) * (CAPTION + step)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((GAP, 4), title, fill=TEXT, font=font)
    for r, (prompt, idx) in enumerate(groups):
        y = top + r * (CAPTION + step)
        draw.text((GAP, y + 2), prompt, fill=TEXT, font=font)
        for c, i in enumerate(idx):
            x0, y0 = GAP + c * step, y + CAPTION
            draw.rectangle([x0, y0, x0 + cell + 2 * BORDER - 1, y0 + cell + 2 * BORDER - 1], fill=_frame(ok, i))
            canvas.paste(tiles[i], (x0 + BORDER, y0 + BORDER))
    return canvas


def before_after(before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str], *,
                 ok_before: Optional[Sequence[bool]] = None, ok_after: Optional[Sequence[bool]] = None,
                 title: str = "", cell: int = 96) -> Image.Image:
    """Per prompt: its images before training (left) and after (right), same noises, side by side."""
    if not before.shape[0] == after.shape[0] == len(prompts):
        raise ValueError(f"before ({before.shape[0]}), after ({after.shape[0]}) and prompts ({len(prompts)}) "
                         f"must have as many rows")
    left, right = prompt_grid(before, prompts, ok=ok_before, cell=cell), prompt_grid(after, prompts, ok=ok_after,
                                                                                    cell=cell)
    head = CAPTION * (2 if title else 1) + GAP
    canvas = Image.new("RGB", (left.width + right.width + 3 * GAP, head + left.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((GAP, 4), title, fill=TEXT, font=font)
    draw.text((GAP, head - CAPTION), "before", fill=TEXT, font=font)
    draw.text((left.width + 2 * GAP, head - CAPTION), "after", fill=TEXT, font=font)
    canvas.paste(left, (0, head))
    canvas.paste(right, (left.width + 2 * GAP, head))
    draw.line([(left.width + GAP, head), (left.width + GAP, canvas.height - GAP)], fill=NEUTRAL, width=1)
    return canvas


Point = Tuple[float, ...]  # (x, y) or (x, y, low, high): a value with its interval


def running_mean(points: Sequence[Tuple[float, float]], window: int) -> List[Tuple[float, float]]:
    """Trailing mean over the last `window` points (fewer at the start), for a noisy per-iteration metric."""
    out, ys = [], []
    for x, y in sorted(points):
        ys.append(y)
        tail = ys[-window:]
        out.append((x, sum(tail) / len(tail)))
    return out


def line_chart(series: Dict[str, Sequence[Point]], *, title: str = "", xlabel: str = "iteration",
               markers: Sequence[str] = (), thin: Sequence[str] = (), width: int = 640,
               height: int = 380) -> Image.Image:
    """Curves of (x, y) points, one colour each, on shared axes with min / max tick labels and a legend above the
    plot. A series named in `markers` is drawn as points, each with its interval when given as (x, y, low, high),
    not joined (e.g. an eval before and after training); one in `thin` as a faint 1-px line (the raw values under
    their running mean)."""
    unknown = (set(markers) | set(thin)) - set(series)
    if unknown:
        raise ValueError(f"line_chart: markers/thin name series that are not given: {sorted(unknown)}")
    series = {k: [tuple(float(c) for c in p) for p in v if p[1] == p[1]] for k, v in series.items()}
    points = [p for v in series.values() for p in v]
    if not points:
        raise ValueError("line_chart needs at least one finite point")
    ys = [c for p in points for c in p[1:]]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.04 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    legend = 14 * len(series)
    left, right, top, bottom = 56, 16, 28 + legend, 40
    canvas = Image.new("RGB", (width, height + legend), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = left, top, width - right, height + legend - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(80, 80, 80))
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) // 2 - 20, canvas.height - 16), xlabel, fill=(0, 0, 0), font=font)
    for v, y in ((y_hi, y0), (y_lo, y1)):
        draw.text((4, y - 6), f"{v:.3g}", fill=(0, 0, 0), font=font)
    for v, x in ((x_lo, x0), (x_hi, x1)):
        draw.text((x - 8, y1 + 4), f"{v:g}", fill=(0, 0, 0), font=font)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    # a thin series (raw values) takes the colour of the next full one (their running mean), faded
    solid = [k for k in series if k not in thin]
    colour_of = {k: palette[i % len(palette)] for i, k in enumerate(solid)}
    for i, k in enumerate(series):
        if k in thin:
            nxt = next((n for n in list(series)[i + 1:] if n in colour_of), None)
            base = colour_of[nxt] if nxt else palette[len(colour_of) % len(palette)]
            colour_of[k] = tuple(int(c + (255 - c) * 0.6) for c in base)
    px = lambda x, y: (x0 + (x - x_lo) / (x_hi - x_lo) * (x1 - x0),  # noqa: E731
                       y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0))
    for j, (name, pts) in enumerate(series.items()):
        colour = colour_of[name]
        pts = sorted(pts)
        if name in markers:
            for p in pts:
                x, y = px(p[0], p[1])
                if len(p) == 4:
                    _, lo = px(p[0], p[2])
                    _, hi = px(p[0], p[3])
                    draw.line([(x, lo), (x, hi)], fill=colour, width=2)
                    draw.line([(x - 4, lo), (x + 4, lo)], fill=colour, width=2)
                    draw.line([(x - 4, hi), (x + 4, hi)], fill=colour, width=2)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
                draw.text((x + 6 if x < x1 - 40 else x - 40, y - 6), f"{p[1]:.3f}", fill=colour, font=font)
        else:
            xy = [px(p[0], p[1]) for p in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=1 if name in thin else 2)
            else:
                x, y = xy[0]
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        mark = "o" if name in markers else "-"
        draw.text((left, 24 + 14 * j), f"{mark} {name}", fill=colour, font=font)
    return canvas
