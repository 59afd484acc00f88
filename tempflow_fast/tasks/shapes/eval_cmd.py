"""`tempflow-fast eval`: accuracy of a tiny-FLUX model on the shapes task, overall and per category.

Every prompt of the chosen split is sampled `images_per_prompt` times (default 64) from fixed initial noises
(one generator seeded with `eval.seed`, drawn in prompt-major order) with a T-step Euler ODE, so
the result is deterministic; the detector scores each image. Prints a table and writes JSON: per category the
accuracy with its 95% interval (Wilson's, over the category's images; the overall, a mean of categories, combines
them: tasks/stats.py) and pass@k (k = `eval.pass_k`, default 24: the share of prompts with at least one correct
image among k, the unbiased estimator from all `images_per_prompt` images).

    tempflow-fast eval --config configs/shapes_eval.yaml --set model.path=runs/x

`model.path` takes a model folder, a training checkpoint or a training run's output_dir (model_folder.py).
Exit status 2 with one line on stderr for a bad config, file or model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from tempflow_fast.config import config_to_dict, load_config
from tempflow_fast.sampling.schedules import flow_sigmas
from tempflow_fast.sampling.simple import sample

from tempflow_fast.outputs import check_output_file, write_text_atomic
from tempflow_fast.tasks.stats import mean_of_intervals, pass_at_k, wilson_interval

from .detector import FAILURE_MODES, accuracy_by_category, correct, detect, failure_modes, word_table
from .grammar import CATEGORIES, HELD_OUT_PROMPTS, SPLIT_VERSION, TRAIN_PROMPTS, parse
from .model_folder import load_model


@dataclass
class ModelConfig:
    # a model folder, a training checkpoint or a training run's output_dir (model_folder.py); None = shipped weights
    path: Optional[str] = None


@dataclass
class EvalSettings:
    split: str = "held_out"  # which prompts: "held_out" (never trained on) or "train"
    images_per_prompt: int = 64  # images per prompt, each from its own fixed initial noise (train: eval.images_per_prompt)
    pass_k: int = 24  # k of pass@k: share of prompts with a correct image among k (needs images_per_prompt >= k)
    seed: int = 0  # seed of the generator all initial noises are drawn from
    num_steps: int = 10  # T, Euler ODE steps
    shift: float = 1.0  # static schedule shift (1 = plain linear sigmas, as in pretraining's eval)
    batch_size: int = 128  # images per batched model call (memory; other sizes can change float rounding)
    seeds_per_prompt: Optional[int] = None  # deprecated name of images_per_prompt (warns; it wins when both are set)

    def __post_init__(self) -> None:
        if self.seeds_per_prompt is not None:
            warnings.warn("eval.seeds_per_prompt is deprecated: it is now eval.images_per_prompt (the name the "
                          "train config uses); the old name still works for now", DeprecationWarning, stacklevel=3)
            self.images_per_prompt, self.seeds_per_prompt = self.seeds_per_prompt, None

    def validate(self) -> None:
        if self.split not in ("held_out", "train"):
            raise ValueError(f"split must be 'held_out' or 'train', got {self.split!r}")
        for name in ("images_per_prompt", "num_steps", "batch_size", "pass_k"):
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
    words: bool = False  # also print, per word, how often its requirement holds when asked vs otherwise (word_table)

    def validate(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def split_prompts(split: str):
    return list(HELD_OUT_PROMPTS if split == "held_out" else TRAIN_PROMPTS)


def generate(model, prompts: Sequence[str], settings: EvalSettings, progress: bool = False) -> torch.Tensor:
    """The eval's images (len(prompts) · images_per_prompt, 3, H, W), prompt-major, from its fixed noises.
    `progress`: a tqdm bar on stderr counting images."""
    settings.validate()
    per_image = images_prompts(prompts, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((len(per_image), *model.latent_shape), generator=generator)
    sigmas = flow_sigmas(settings.num_steps, settings.shift)
    images = []
    was_training = model.module.training
    model.module.eval()
    from tqdm.auto import tqdm

    # one tick per batched model call (a 128-image call takes about a second on a busy CPU)
    calls = -(-len(per_image) // settings.batch_size) * settings.num_steps
    bar = tqdm(total=calls, desc=f"eval: {len(per_image)} images", unit="call", disable=not progress,
               dynamic_ncols=True)
    counted = _CountingModel(model, bar)
    try:
        for start in range(0, len(per_image), settings.batch_size):
            chunk = per_image[start:start + settings.batch_size]
            cond = model.encode_prompts(chunk)
            x0 = sample(counted, cond, noise[start:start + len(chunk)].to(model.device), sigmas.to(model.device))
            images.append(model.decode(x0).cpu())
    finally:
        bar.close()
        model.module.train(was_training)
    return torch.cat(images)


class _CountingModel:
    """`model` whose velocity calls tick a progress bar."""

    def __init__(self, model, bar):
        self._model, self._bar = model, bar

    def __getattr__(self, name):
        return getattr(self._model, name)

    def velocity(self, x, sigma, cond):
        v = self._model.velocity(x, sigma, cond)
        self._bar.update(1)
        return v


def images_prompts(prompts: Sequence[str], settings: EvalSettings) -> list:
    """The prompt of every eval image, in `generate`'s order."""
    return [p for p in prompts for _ in range(settings.images_per_prompt)]


def evaluate(model, prompts: Sequence[str], settings: EvalSettings,
             progress: bool = False) -> Dict[str, Dict[str, float]]:
    """`accuracy_table` of `model` on `prompts` (`progress`: generate's bar on stderr)."""
    per_image = images_prompts(prompts, settings)
    return accuracy_table(correct(generate(model, prompts, settings, progress), per_image), per_image, settings.pass_k)


def accuracy_table(correctness: torch.Tensor, per_image: Sequence[str], pass_k: int = 24) -> Dict[str, Dict]:
    """`accuracy_by_category` with, per row, "ci95": [low, high] (categories: Wilson over their images; overall:
    the category intervals combined, clipped to [0, 1]; "image_ci95": Wilson over all images) and, when every
    prompt has at least `pass_k` images, f"pass@{pass_k}": the mean over the category's prompts of the unbiased
    pass@k (overall: the mean of categories, as the accuracy)."""
    table = accuracy_by_category(correctness, per_image)
    hits: Dict[str, list] = {}
    for ok, prompt in zip(correctness.bool().tolist(), per_image):
        hits.setdefault(prompt, []).append(ok)
    by_category: Dict[str, list] = {}
    for prompt, oks in hits.items():
        by_category.setdefault(parse(prompt).category, []).append(oks)
    rows = []
    with_pass = min(len(oks) for oks in hits.values()) >= pass_k
    key = f"pass@{pass_k}"
    for name in CATEGORIES:
        if name not in table:
            continue
        row = table[name]
        row["ci95"] = list(wilson_interval(row["correct"], row["count"]))
        rows.append((row["accuracy"], *row["ci95"]))
        if with_pass:
            row[key] = sum(pass_at_k(len(oks), sum(oks), pass_k) for oks in by_category[name]) / len(by_category[name])
    overall = table["overall"]
    _, low, high = mean_of_intervals(rows)
    overall["ci95"] = [max(0.0, low), min(1.0, high)]
    overall["image_ci95"] = list(wilson_interval(overall["correct"], overall["count"]))
    if with_pass:
        overall[key] = sum(table[c][key] for c in CATEGORIES if c in table) / len(rows)
    return table


def failure_table(images: torch.Tensor, per_image: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """{category: {failure mode: images}} (modes of `detector.FAILURE_MODES`, every one present)."""
    table: Dict[str, Dict[str, int]] = {}
    for prompt, mode in zip(per_image, failure_modes(detect(images), per_image)):
        row = table.setdefault(parse(prompt).category, dict.fromkeys(FAILURE_MODES, 0))
        row[mode] += 1
    return {c: table[c] for c in CATEGORIES if c in table}


def format_words(table: Dict[str, Dict[str, float]]) -> str:
    """The word table: rate when the prompt says the word, rate otherwise (the base rate), their difference (the
    lift) with its 95% interval."""
    head = f"{'word':<10} {'asked':>7} {'images':>7} {'otherwise':>10} {'images':>7} {'lift':>7}"
    lines = [f"{head} {'95% interval':>18}", "-" * 72]
    for word, row in table.items():
        low, high = row["lift_ci95"]
        lines.append(f"{word:<10} {row['asked']:>7.3f} {row['asked_images']:>7d} {row['otherwise']:>10.3f} "
                     f"{row['otherwise_images']:>7d} {row['lift']:>+7.3f} {f'[{low:+.3f}, {high:+.3f}]':>18}")
    return "\n".join(lines)


def format_failures(table: Dict[str, Dict[str, int]]) -> str:
    lines = [f"{'category':<18}" + "".join(f"{m:>14}" for m in FAILURE_MODES), "-" * (18 + 14 * len(FAILURE_MODES))]
    for name, row in table.items():
        lines.append(f"{name:<18}" + "".join(f"{row[m]:>14d}" for m in FAILURE_MODES))
    return "\n".join(lines)


def _interval(row: Dict, key: str = "ci95") -> str:
    return f"[{row[key][0]:.3f}, {row[key][1]:.3f}]" if key in row else ""


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    """The accuracy table: per category accuracy, its 95% interval, pass@k (when measured), correct / images."""
    overall = table["overall"]
    pass_key = next((k for k in overall if k.startswith("pass@")), None)
    pass_head = f" {pass_key:>8}" if pass_key else ""
    lines = [f"{'category':<18} {'accuracy':>8} {'95% interval':>16}{pass_head} {'correct / images':>17}",
             "-" * (62 + len(pass_head))]
    for name in CATEGORIES:
        if name in table:
            row = table[name]
            cell = f" {row[pass_key]:>8.3f}" if pass_key else ""
            lines.append(f"{name:<18} {row['accuracy']:>8.3f} {_interval(row):>16}{cell} "
                         f"{row['correct']:>8d} / {row['count']:<6d}")
    lines.append("-" * (62 + len(pass_head)))
    cell = f" {overall[pass_key]:>8.3f}" if pass_key else ""
    lines.append(f"{'overall':<18} {overall['accuracy']:>8.3f} {_interval(overall):>16}{cell}   "
                 f"(mean of categories, as GenEval)")
    lines.append(f"{'all images':<18} {overall['image_accuracy']:>8.3f} {_interval(overall, 'image_ci95'):>16}"
                 f"{' ' * len(pass_head)} {overall['correct']:>8d} / {overall['count']:<6d}")
    if pass_key:
        lines.append(f"{pass_key}: share of a category's prompts with at least one correct image among "
                     f"{pass_key[5:]} (unbiased, from all images); 95% intervals: Wilson over images (overall: "
                     f"combined over categories)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempflow-fast eval",
        description="Accuracy of a tiny-FLUX model on the shapes task, overall and per category: every prompt of a "
                    "split sampled from fixed initial noises with an Euler ODE and scored by the detector.")
    p.add_argument("--config", default=None, help="YAML file (see configs/shapes_eval.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.path=runs/x (a model folder, a training "
                        "checkpoint or a run's output_dir; repeatable)")
    p.add_argument("--json", default=None, help="write the result JSON here (overrides output_json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def load_command_config(schema, command: str, path, overrides):
    """`load_config` for a shapes command: (config, None), or (None, the one-line error) for a bad file or field.
    A deprecated field name is reported as one stderr line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            cfg = load_config(schema, path, overrides)
        except ValueError as err:
            return None, f"tempflow-fast {command}: {' '.join(str(err).split())}"
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            print(f"tempflow-fast {command}: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cfg, None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cfg, error = load_command_config(ShapesEvalConfig, "eval", args.config, args.overrides)
    if error is None:
        try:
            out_path = args.json if args.json is not None else cfg.output_json
            if out_path is not None:  # before minutes of sampling, not after
                check_output_file(out_path, "--json" if args.json is not None else "output_json")
            model = load_model(cfg.model.path)
        except ValueError as err:
            error = f"tempflow-fast eval: {' '.join(str(err).split())}"
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(model, cfg, out_path, progress=not args.no_progress)
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs in-process (tests, notebooks)


def _run(model, cfg: ShapesEvalConfig, out_path: Optional[str], progress: bool = True) -> int:
    prompts = split_prompts(cfg.eval.split)
    start = time.time()
    per_image = images_prompts(prompts, cfg.eval)
    images = generate(model, prompts, cfg.eval, progress=progress)
    table = accuracy_table(correct(images, per_image), per_image, cfg.eval.pass_k)
    seconds = time.time() - start
    print(f"shapes eval: model {cfg.model.path or 'shipped'}, split {cfg.eval.split} ({len(prompts)} prompts "
          f"× {cfg.eval.images_per_prompt} images), T={cfg.eval.num_steps} Euler ODE, shift {cfg.eval.shift}")
    print(format_table(table))
    if not any(key.startswith("pass@") for key in table["overall"]):
        print(f"pass@{cfg.eval.pass_k} not measured: it needs eval.images_per_prompt >= eval.pass_k "
              f"(got {cfg.eval.images_per_prompt} < {cfg.eval.pass_k})")
    failures = failure_table(images, per_image) if cfg.failures else None
    if failures is not None:
        print("\nimages by failure mode (the first that applies):")
        print(format_failures(failures))
    words = word_table(detect(images), per_image) if cfg.words else None
    if words is not None:
        print("\nper word: its requirement holds when the prompt says it (asked) vs when the prompt says something "
              "else in its place (otherwise: the base rate)")
        print(format_words(words))
    print(f"time: {seconds:.1f} s ({torch.get_num_threads()} threads)")
    if out_path:
        result = {"config": config_to_dict(cfg), "split_version": SPLIT_VERSION, "accuracy": table,
                  "seconds": round(seconds, 2)}
        if failures is not None:
            result["failures"] = failures
        if words is not None:
            result["words"] = words
        write_text_atomic(out_path, json.dumps(result, indent=1))
        print(f"wrote {out_path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
