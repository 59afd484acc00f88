"""`tempflow-fast sample`: images for one prompt into a PNG grid with the prompt in a caption strip.

    tempflow-fast sample --prompt "two red squares" --out grid.png --n 8 --seed 0 --sde none
    tempflow-fast sample --prompt "a red square left of a blue square" --out g.png --set model.path=ckpt

Images are upscaled with nearest-neighbour (pixels stay square) and each is scored by the detector
(a green frame = correct, red = wrong), so a person sees at a glance what the reward sees.
Exit status 2 with one line on stderr for a bad config, a prompt outside the grammar (the line lists the
vocabulary) or a model folder that does not load.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from tempflow_fast.outputs import check_output_file, image_suffixes
from tempflow_fast.sampling.schedules import flow_sigmas
from tempflow_fast.sampling.simple import initial_noise, sample

from .detector import correct
from .eval_cmd import ModelConfig, load_command_config
from .grammar import parse
from .model_folder import load_model

SDE_CHOICES = ("none", "flow", "ddim")


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: str = "two red squares"  # a sentence of the shapes grammar
    out: str = "grid.png"  # image path (a suffix PIL writes: .png, .jpg, ...)
    n: int = 8  # images in the grid
    seed: int = 0  # seed of the initial noises and SDE noise
    sde: str = "none"  # none (Euler ODE) | flow (Flow-GRPO SDE) | ddim (DDIM-style SDE)
    noise_level: float = 0.7  # η of the SDE
    steps: int = 10  # T
    shift: float = 1.0  # static schedule shift
    scale: int = 8  # nearest-neighbour upscale factor per image
    columns: int = 4  # grid columns
    threads: int = 0  # torch CPU threads, 0 = torch's default; 1 is far faster on a shared, busy CPU

    def validate(self) -> None:
        if self.sde not in SDE_CHOICES:
            raise ValueError(f"sde must be one of {SDE_CHOICES}, got {self.sde!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in ("n", "steps", "scale", "columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.shift > 0:  # the config loader already refused NaN and Inf
            raise ValueError(f"shift must be > 0, got {self.shift}")
        # η's range is the stepper's: the DDIM-style SDE's std is σ'·sin(ηπ/2), so (0, 1]; the flow SDE's any η > 0
        high = 1.0 if self.sde == "ddim" else math.inf
        if not 0 < self.noise_level <= high:
            allowed = "in (0, 1]" if high == 1.0 else "> 0"
            raise ValueError(f"noise_level must be {allowed} for sde={self.sde!r}, got {self.noise_level}")
        parse(self.prompt)


def grid_image(images: torch.Tensor, caption: str, ok: Optional[Sequence[bool]] = None, scale: int = 8,
               columns: int = 4) -> Image.Image:
    """(N, 3, H, W) in [0, 1] → one RGB PIL image: a caption strip over a grid of upscaled images."""
    n, _, h, w = images.shape
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    border, gap, strip = 2, 6, 28
    cell_w, cell_h = w * scale + 2 * border, h * scale + 2 * border
    canvas = Image.new("RGB", (cols * cell_w + (cols + 1) * gap, strip + rows * cell_h + (rows + 1) * gap), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 8), caption, fill=(235, 235, 235), font=ImageFont.load_default())
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        x0 = gap + (i % cols) * (cell_w + gap)
        y0 = strip + gap + (i // cols) * (cell_h + gap)
        frame = (120, 120, 120) if ok is None else ((40, 200, 60) if ok[i] else (220, 50, 50))
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=frame)
        tile = Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (x0 + border, y0 + border))
    return canvas


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempflow-fast sample",
        description="Images of one prompt from a tiny-FLUX shapes model into a PNG grid, the prompt in a caption "
                    "strip and each image framed green or red by the detector's verdict.")
    p.add_argument("--prompt", help="a sentence of the shapes grammar, e.g. 'two red squares' (default: that one)")
    p.add_argument("--out", help="image path (default grid.png; any suffix PIL writes: .png, .jpg, .webp, ...)")
    p.add_argument("--n", type=int, help="number of images (default 8)")
    p.add_argument("--seed", type=int, help="seed of the initial noises and the SDE noise (default 0)")
    p.add_argument("--sde", choices=SDE_CHOICES,
                   help="sampler: none = Euler ODE (default), flow = Flow-GRPO's SDE, ddim = DDIM-style SDE")
    p.add_argument("--noise-level", type=float, help="η of the SDE (default 0.7)")
    p.add_argument("--steps", type=int, help="T, denoising steps (default 10)")
    p.add_argument("--config", default=None, help="optional YAML with the SampleConfig fields")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.path=runs/x (a model folder, a training "
                        "checkpoint or a run's output_dir; repeatable)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    flags = {"prompt": args.prompt, "out": args.out, "n": args.n, "seed": args.seed, "sde": args.sde,
             "noise_level": args.noise_level, "steps": args.steps}
    # Flags go in as overrides so they get the config's type checks; quoting keeps prompts strings.
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg, error = load_command_config(SampleConfig, "sample", args.config, overrides + args.overrides)
    if error is None:
        try:
            check_output_file(cfg.out, "--out" if args.out is not None else "out", suffixes=image_suffixes())
            model = load_model(cfg.model.path)
        except ValueError as err:
            error = f"tempflow-fast sample: {' '.join(str(err).split())}"
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(model, cfg)
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs in-process (tests, notebooks)


def _run(model, cfg: SampleConfig) -> int:
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = initial_noise(model, cfg.n, generator)
    cond = model.encode_prompts([cfg.prompt] * cfg.n)
    sigmas = flow_sigmas(cfg.steps, cfg.shift)
    x0 = sample(model, cond, noise, sigmas, sde=None if cfg.sde == "none" else cfg.sde,
                noise_level=cfg.noise_level, generator=generator)
    images = model.decode(x0)
    ok = correct(images, [cfg.prompt] * cfg.n).tolist()
    sampler = "Euler ODE" if cfg.sde == "none" else f"{cfg.sde} SDE eta={cfg.noise_level}"
    caption = f'"{cfg.prompt}"  T={cfg.steps} {sampler} seed={cfg.seed}  correct {sum(ok)}/{cfg.n}'
    grid_image(images, caption, ok, cfg.scale, cfg.columns).save(cfg.out)
    print(f"wrote {cfg.out}: {cfg.n} images of {cfg.prompt!r}, detector says {sum(ok)}/{cfg.n} correct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
