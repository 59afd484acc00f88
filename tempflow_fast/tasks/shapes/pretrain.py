"""`tempflow-fast pretrain-shapes`: rectified-flow pretraining of the tiny FLUX on rendered pairs.

Loss: x_σ = (1-σ)·x0 + σ·ε with σ ~ logit-normal(m, s) (SD3's lognorm(m, s): σ = sigmoid(m + s·z), z ~ N(0, 1);
default m = 0, s = 1; `--logit-mean`, `--logit-std`), target velocity ε - x0, mean squared error. `--terminal-share p`
trains a share p of each batch at σ = 1 instead, the pure noise every sample starts from, which the logit-normal
almost never draws (P(σ > 0.95) = 0.2%; Lin et al. 2024, "Common diffusion noise schedules and sample steps are
flawed"): only there does the prompt alone decide the layout. Prompts come from the train split only, a category
uniformly at random (or in proportion to `--category-weight`) and then a prompt of it uniformly, so small
categories are not drowned by the 40 position prompts. The shipped model's last stages use both knobs to teach the
relation words (docs/testbed.md, "Item 2, eighth sitting"). Everything is
seeded and the run length is a step count, so a run is reproducible (up to CPU thread-count
dependent float reductions). Checkpoints go to `<out>/step_<n>/` in `TinyFluxAdapter` format.

`--init shipped` (or a checkpoint folder) continues from those weights instead of a fresh init, with a fresh
optimizer and warm-up: supervised fine-tuning on ground-truth renders, the reference an RL run on the same
model and budget can be held against (docs/shapes-rl-tuning.md, fourth round).

A fresh init can be larger than the shipped architecture (`--layers`, `--single-layers`, `--heads`, `--head-dim`:
diffusers' num_layers, num_single_layers, num_attention_heads, attention_head_dim), and a long run can decay its
learning rate (`--lr-schedule cosine`: from --lr after the warm-up to --lr × --min-lr-ratio at the last step) —
docs/testbed.md, issue 19's base-model retraining.

A run of hours never loses finished work: every checkpoint also writes `<out>/resume.pt` (optimizer and schedule
state, the prompt/render and noise generators, the step) atomically, and `--resume` continues the run in --out from
its newest checkpoint with the arguments it was started with (run.json; only --threads, --no-progress and
--stop-after may differ), drawing what the uninterrupted run would have drawn. `--stop-after N` ends a run at step
N with a checkpoint, its learning-rate schedule still planned for --steps (a stage cut from a longer schedule).

A progress bar on stderr counts the steps; the loss lines go to stdout and loss.jsonl; the last line names the
folder of the final weights. A bad argument is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tempflow_fast.models.tiny_flux import DEFAULT_TRANSFORMER_CONFIG, TinyFluxAdapter

from .grammar import CATEGORIES, SPLIT_VERSION, TRAIN_PROMPTS, prompts_by_category
from .render import render
from .task import new_model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempflow-fast pretrain-shapes",
        description="Rectified-flow pretraining of the tiny FLUX on rendered images of the shapes task's train "
                    "prompts; checkpoints are model folders eval, sample and train read.")
    p.add_argument("--out", required=True, help="output folder for checkpoints and the loss log")
    p.add_argument("--init", default=None,
                   help="start from these weights: 'shipped' (the packaged model), a model folder, a training "
                        "checkpoint or a training run's output_dir; default: a fresh init from --seed")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, prompts, renders and noise")
    p.add_argument("--batch-size", type=int, default=64, help="rendered image-prompt pairs per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warm-up: constant, or cosine decay to --lr × --min-lr-ratio at the last step")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: the last step's share of --lr")
    for flag, key in ARCHITECTURE.items():
        p.add_argument(flag, type=int, default=None,
                       help=f"fresh init only: the transformer's {key} (shipped: {DEFAULT_TRANSFORMER_CONFIG[key]})")
    p.add_argument("--logit-mean", type=float, default=0.0,
                   help="σ ~ sigmoid(m + s·z): the location m of the logit-normal noise levels (default 0; > 0 trains "
                        "the high-noise steps, where the layout is decided, more often)")
    p.add_argument("--logit-std", type=float, default=1.0, help="σ ~ sigmoid(m + s·z): the scale s (default 1)")
    p.add_argument("--category-weight", action="append", default=None, metavar="CATEGORY=WEIGHT",
                   help="draw this category's prompts WEIGHT times as often as a category of weight 1 (the default "
                        "for each); repeatable, e.g. --category-weight position=5")
    p.add_argument("--terminal-share", type=float, default=0.0,
                   help="share of each batch trained at σ = 1, where sampling starts (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=int, default=50,
                   help="print and log the mean loss over this many steps (default 50)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is far faster on a shared, busy CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step, the learning-rate schedule still planned for "
                        "--steps; --resume continues it")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (same arguments as it started with)")
    return p


# arguments a resumed run may change: they do not touch what is computed
RESUME_MAY_DIFFER = ("threads", "no_progress", "resume", "stop_after")


# flag -> FluxTransformer2DModel config key a fresh init may change
ARCHITECTURE = {"--layers": "num_layers", "--single-layers": "num_single_layers", "--heads": "num_attention_heads",
                "--head-dim": "attention_head_dim"}


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """The learning rate of 0-based `step` as a share of --lr: linear warm-up, then constant or cosine."""
    warm = min(1.0, (step + 1) / args.warmup)
    if args.lr_schedule == "constant" or step < args.warmup:
        return warm
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - 1 - args.warmup))
    return args.min_lr_ratio + (1.0 - args.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sample_batch_prompts(rng: np.random.Generator, n: int, weights: dict = None) -> list:
    """n train prompts: a category at random (uniformly, or ∝ `weights`: category -> weight, 1 if not named), then
    a prompt of it uniformly."""
    by_cat = prompts_by_category(TRAIN_PROMPTS)
    cats = [c for c in CATEGORIES if by_cat[c]]
    w = np.array([float((weights or {}).get(c, 1.0)) for c in cats])
    if (w == 1.0).all():  # the draws of runs from before --category-weight
        picks = rng.integers(len(cats), size=n)
    else:
        picks = rng.choice(len(cats), size=n, p=w / w.sum())
    return [by_cat[cats[i]][rng.integers(len(by_cat[cats[i]]))] for i in picks]


def parse_category_weights(items) -> dict:
    """['position=3', ...] -> {'position': 3.0}; ValueError naming --category-weight and what is wrong."""
    weights = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or name not in CATEGORIES:
            raise ValueError(f"--category-weight must be CATEGORY=WEIGHT with CATEGORY one of {', '.join(CATEGORIES)}; "
                             f"got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"--category-weight {item!r}: the weight must be a number >= 0")
        weights[name] = weight
    if weights and all(weights.get(c, 1.0) == 0 for c in CATEGORIES):
        raise ValueError("--category-weight: every category has weight 0")
    return weights


def rectified_flow_loss(model: TinyFluxAdapter, images: torch.Tensor, prompts: list, generator: torch.Generator,
                        logit_mean: float = 0.0, logit_std: float = 1.0, terminal_share: float = 0.0) -> torch.Tensor:
    x0 = model.encode_images(images)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(x0.shape[0], generator=generator))  # logit-normal
    if terminal_share > 0:  # no draw at 0, so runs from before the option reproduce
        sigma = torch.where(torch.rand(x0.shape[0], generator=generator) < terminal_share, 1.0, sigma)
    s = sigma.view(-1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    v = model.velocity(x_sigma, sigma, model.encode_prompts(prompts))
    return torch.nn.functional.mse_loss(v, noise - x0)


def _initial_model(args: argparse.Namespace) -> TinyFluxAdapter:
    architecture = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in ARCHITECTURE.items()}
    architecture = {k: v for k, v in architecture.items() if v is not None}
    if args.init is None:
        return new_model(seed=args.seed, transformer_config=architecture)
    if architecture:
        raise ValueError(f"{', '.join(f for f, k in ARCHITECTURE.items() if k in architecture)} shape a fresh init; "
                         f"--init {args.init} brings its own architecture")
    from .model_folder import load_model

    try:
        return load_model(None if args.init == "shipped" else args.init, field="--init")
    except ValueError as e:
        raise ValueError(f"{' '.join(str(e).split())} (or 'shipped')") from None


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "save_every", "log_every", "warmup", "lr", "grad_clip"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):  # NaN passes a bare `<= 0` check
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    for flag in ARCHITECTURE:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not math.isfinite(args.logit_mean):
        raise ValueError(f"--logit-mean must be finite, got {args.logit_mean}")
    if not (math.isfinite(args.logit_std) and args.logit_std > 0):
        raise ValueError(f"--logit-std must be positive, got {args.logit_std}")
    parse_category_weights(args.category_weight)
    if not 0.0 <= args.terminal_share <= 1.0:
        raise ValueError(f"--terminal-share must be in [0, 1], got {args.terminal_share}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        raise ValueError(f"--stop-after must be in 1..--steps = 1..{args.steps}, got {args.stop_after}")


def _resume_state(args: argparse.Namespace):
    """(model, state) of the newest checkpoint in --out, refused when the run was started with other arguments."""
    out = Path(args.out)
    state_file = out / "resume.pt"
    if not state_file.is_file():
        raise ValueError(f"--resume: no resume.pt in {str(out)!r} (nothing to continue; start without --resume)")
    started = json.loads((out / "run.json").read_text())
    if started.get("split_version", 1) != SPLIT_VERSION:  # runs from before the field were on version 1
        raise ValueError(f"--resume: the run in {str(out)!r} trained on the shapes split version "
                         f"{started.get('split_version', 1)}; this code has version {SPLIT_VERSION} (other train "
                         "prompts): start a new run in another --out")
    defaults = _parser()  # a run started before an argument existed ran with its default
    started = {k: started.get(k, defaults.get_default(k)) for k in vars(args)} | started
    changed = [k for k, v in vars(args).items() if k not in RESUME_MAY_DIFFER and started[k] != v]
    if changed:
        raise ValueError("--resume: the run in " + repr(str(out)) + " was started with "
                         + ", ".join(f"--{k.replace('_', '-')} {started[k]!r}" for k in changed)
                         + "; resume with its arguments")
    state = torch.load(state_file, map_location="cpu", weights_only=False)  # our own file: numpy RNG state inside
    return TinyFluxAdapter.from_pretrained(out / f"step_{state['step']:05d}"), state


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        if args.warmup > args.steps:  # allowed (short smoke runs keep the default), but never silently
            print(f"tempflow-fast pretrain-shapes: warning: --warmup {args.warmup} > --steps {args.steps}: the learning "
                  f"rate never reaches --lr (it ends at {args.steps / args.warmup:.0%} of it)", file=sys.stderr)
        # before the output folder is made, so a bad --init leaves none behind
        model, state = _resume_state(args) if args.resume else (_initial_model(args), None)
        if state is not None and args.stop_after is not None and args.stop_after <= state["step"]:
            raise ValueError(f"--stop-after {args.stop_after}: the run in {args.out!r} is already at step "
                             f"{state['step']}")
    except ValueError as err:
        print(f"tempflow-fast pretrain-shapes: {err}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _train(model, args, argv, state)
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs in-process (tests, notebooks)


def _save(model: TinyFluxAdapter, out: Path, step: int, state: dict) -> None:
    """The step's model folder, then resume.pt, each written to a temporary name and renamed into place."""
    folder, tmp = out / f"step_{step:05d}", out / f".step_{step:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    torch.save(state, out / "resume.pt.tmp")
    os.replace(out / "resume.pt.tmp", out / "resume.pt")


def _train(model: TinyFluxAdapter, args: argparse.Namespace, argv, resume: dict = None) -> int:
    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model.module.train()
    opt = torch.optim.AdamW(model.module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, args))
    first, running, elapsed = 1, 0.0, 0.0
    if resume is None:
        meta = {"command": "tempflow-fast pretrain-shapes " + " ".join(argv or sys.argv[1:]), **vars(args),
                "split_version": SPLIT_VERSION}
        (out / "run.json").write_text(json.dumps(meta, indent=1))
        (out / "loss.jsonl").unlink(missing_ok=True)
    else:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        rng.bit_generator.state = resume["rng"]
        generator.set_state(resume["generator"])
        first, running, elapsed = resume["step"] + 1, resume["running"], resume["seconds"]
        # the loss log up to the checkpoint (lines a crash left after it are dropped)
        lines = (out / "loss.jsonl").read_text().splitlines() if (out / "loss.jsonl").exists() else []
        (out / "loss.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= resume["step"]))
        done = resume["step"]
        print(f"resumed from {out / f'step_{done:05d}'} (step {done} of {args.steps})", flush=True)
    log = open(out / "loss.jsonl", "a")
    start = time.time() - elapsed
    last = args.steps if args.stop_after is None else args.stop_after
    weights = parse_category_weights(args.category_weight)
    bar = tqdm(range(first, last + 1), initial=first - 1, total=args.steps, desc="pretrain-shapes",
               unit="step", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        prompts = sample_batch_prompts(rng, args.batch_size, weights)
        images = render(prompts, rng)
        loss = rectified_flow_loss(model, images, prompts, generator, args.logit_mean, args.logit_std,
                                   args.terminal_share)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.module.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss became {loss.item()} at step {step}")
        running += loss.item()
        if step % args.log_every == 0:
            rec = {"step": step, "loss": running / args.log_every, "grad_norm": float(grad_norm),
                   "seconds": round(time.time() - start, 1)}
            bar.write(json.dumps(rec))
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            running = 0.0
        if step % args.save_every == 0 or step == last:
            _save(model, out, step, {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                     "rng": rng.bit_generator.state, "generator": generator.get_state(),
                                     "running": running, "seconds": time.time() - start})
    bar.close()
    log.close()
    what = ("the final weights" if last == args.steps
            else f"stopped after step {last} of {args.steps}; --resume continues")
    print(f"saved to {out / f'step_{last:05d}'} ({what}; loss log {out / 'loss.jsonl'}; "
          f"{time.time() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
