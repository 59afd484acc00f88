"""`tempflow-fast eval`: accuracy of a tiny-FLUX model on the shapes task, overall and per category.

Every prompt of the chosen split is sampled `seeds_per_prompt` times from fixed initial noises
(one generator seeded with `eval.seed`, drawn in prompt-major order) with a T-step Euler ODE, so
the result is deterministic; the detector scores each image. Prints a table and writes JSON.

    tempflow-fast eval --config configs/shapes_eval.yaml --set model.path=runs/x/checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from tempflow_fast.config import config_to_dict, load_config
from tempflow_fast.models import tiny_flux
from tempflow_fast.sampling.schedules import flow_sigmas
from tempflow_fast.sampling.simple import sample

from .detector import FAILURE_MODES, accuracy_by_category, correct, detect, failure_modes
from .grammar import CATEGORIES, HELD_OUT_PROMPTS, TRAIN_PROMPTS, parse


@dataclass
class ModelConfig:
    path: Optional[str] = None  # folder written by TinyFluxAdapter.save_pretrained; None = shipped weights


@dataclass
class EvalSettings:
    split: str = "held_out"  # which prompts: "held_out" (never trained on) or "train"
    seeds_per_prompt: int = 16  # images per prompt, each from its own fixed initial noise
    seed: int = 0  # seed of the generator all initial noises are drawn from
    num_steps: int = 10  # T, Euler ODE steps
    shift: float = 1.0  # static schedule shift (1 = plain linear sigmas, as in pretraining's eval)
    batch_size: int = 128  # images per batched model call (memory; other sizes can change float rounding)

    def validate(self) -> None:
        if self.split not in ("held_out", "train"):
            raise ValueError(f"split must be 'held_out' or 'train', got {self.split!r}")
        for name in ("seeds_per_prompt", "num_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


@dataclass
class ShapesEvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    output_json: Optional[str] = None  # where to write the result JSON; None = print only
    threads: int = 0  # torch CPU threads, 0 = torch's default; 1 is far faster on a shared, busy CPU
    failures: bool = False  # also print why images fail, per category (detector.failure_modes)

    def validate(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def split_prompts(split: str):
    return list(HELD_OUT_PROMPTS if split == "held_out" else TRAIN_PROMPTS)


def generate(model, prompts: Sequence[str], settings: EvalSettings) -> torch.Tensor:
    """The eval's images (len(prompts) · seeds_per_prompt, 3, H, W), prompt-major, from its fixed noises."""
    settings.validate()
    per_image = images_prompts(prompts, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((len(per_image), *model.latent_shape), generator=generator)
    sigmas = flow_sigmas(settings.num_steps, settings.shift)
    images = []
    was_training = model.module.training
    model.module.eval()
    try:
        for start in range(0, len(per_image), settings.batch_size):
            chunk = per_image[start:start + settings.batch_size]
            cond = model.encode_prompts(chunk)
            x0 = sample(model, cond, noise[start:start + len(chunk)].to(model.device), sigmas.to(model.device))
            images.append(model.decode(x0).cpu())
    finally:
        model.module.train(was_training)
    return torch.cat(images)


def images_prompts(prompts: Sequence[str], settings: EvalSettings) -> list:
    """The prompt of every eval image, in `generate`'s order."""
    return [p for p in prompts for _ in range(settings.seeds_per_prompt)]


def evaluate(model, prompts: Sequence[str], settings: EvalSettings) -> Dict[str, Dict[str, float]]:
    """Accuracy table {category: {accuracy, correct, count}, "overall": ...} of `model` on `prompts`."""
    per_image = images_prompts(prompts, settings)
    return accuracy_by_category(correct(generate(model, prompts, settings), per_image), per_image)


def failure_table(images: torch.Tensor, per_image: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """{category: {failure mode: images}} (modes of `detector.FAILURE_MODES`, every one present)."""
    table: Dict[str, Dict[str, int]] = {}
    for prompt, mode in zip(per_image, failure_modes(detect(images), per_image)):
        row = table.setdefault(parse(prompt).category, dict.fromkeys(FAILURE_MODES, 0))
        row[mode] += 1
    return {c: table[c] for c in CATEGORIES if c in table}


def format_failures(table: Dict[str, Dict[str, int]]) -> str:
    lines = [f"{'category':<18}" + "".join(f"{m:>14}" for m in FAILURE_MODES), "-" * (18 + 14 * len(FAILURE_MODES))]
    for name, row in table.items():
        lines.append(f"{name:<18}" + "".join(f"{row[m]:>14d}" for m in FAILURE_MODES))
    return "\n".join(lines)


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    lines = [f"{'category':<18} {'accuracy':>8} {'correct / images':>17}", "-" * 45]
    for name in CATEGORIES:
        if name in table:
            row = table[name]
            lines.append(f"{name:<18} {row['accuracy']:>8.3f} {row['correct']:>8d} / {row['count']:<6d}")
    overall = table["overall"]
    lines.append("-" * 45)
    lines.append(f"{'overall':<18} {overall['accuracy']:>8.3f}   (mean of categories, as GenEval)")
    lines.append(f"{'all images':<18} {overall['image_accuracy']:>8.3f} {overall['correct']:>8d} / {overall['count']:<6d}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tempflow-fast eval", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file (see configs/shapes_eval.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.path=ckpt (repeatable)")
    p.add_argument("--json", default=None, help="write the result JSON here (overrides output_json)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_config(ShapesEvalConfig, args.config, args.overrides)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, args.json or cfg.output_json)
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs in-process (tests, notebooks)


def _run(cfg: ShapesEvalConfig, out_path: Optional[str]) -> int:
    model = tiny_flux.load(cfg.model.path)
    prompts = split_prompts(cfg.eval.split)
    start = time.time()
    per_image = images_prompts(prompts, cfg.eval)
    images = generate(model, prompts, cfg.eval)
    table = accuracy_by_category(correct(images, per_image), per_image)
    seconds = time.time() - start
    print(f"shapes eval: model {cfg.model.path or 'shipped'}, split {cfg.eval.split} ({len(prompts)} prompts "
          f"× {cfg.eval.seeds_per_prompt} seeds), T={cfg.eval.num_steps} Euler ODE, shift {cfg.eval.shift}")
    print(format_table(table))
    failures = failure_table(images, per_image) if cfg.failures else None
    if failures is not None:
        print("\nimages by failure mode (the first that applies):")
        print(format_failures(failures))
    print(f"time: {seconds:.1f} s ({torch.get_num_threads()} threads)")
    if out_path:
        result = {"config": config_to_dict(cfg), "accuracy": table, "seconds": round(seconds, 2)}
        if failures is not None:
            result["failures"] = failures
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=1))
        print(f"wrote {out_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
