"""Does a shapes model know which way each relation word points? β of its σ = 1 prediction, per relation and split.
Not a test: it prints a markdown table and writes CSV (docs/testbed.md, "Item 2, eighth sitting", holds runs).

    python bench/shapes_direction.py                                  # the shipped model
    python bench/shapes_direction.py runs/pre_s0/step_05000 runs/s3b/step_02000 --noises 64

Every sample starts at σ = 1, pure noise, where the prompt alone decides the layout; there the model's x0 estimate
x̂0 = x - v, averaged over noises, is E[x0 | prompt] if the model is right. For each position prompt P = "a A square
R a B square" and its opposite Q (the other relation on the same axis, same words otherwise: the mirrored scene),

    D_true = mean render(P) - mean render(Q)         (ground-truth scenes, `--scenes` each)
    D_pred = mean x̂0(P) - mean x̂0(Q)               (the same `--noises` noises for both)
    β = <D_pred, D_true> / |D_true|²

β = 1: the prediction moves the colours the way the relation says, as far as the data does; β = 0: it ignores the
relation's direction (the colours are placed the same for P and Q). Split "train" is the pairs where P and Q are
both train prompts, "held_out" the pairs with a held-out prompt (split version 2 holds out one relation word per
colour pair: β there is the word applied to a pair it was never heard with). The opposite axis' pairs (below,
right of) are the same pairs with the sign flipped, so each pair is counted once (P's relation: above, left of).

CSV columns: model, relation, split, pairs, beta (mean over pairs), beta_min, beta_max.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from tempflow_fast.outputs import check_output_arg

OPPOSITE = {"above": "below", "left of": "right of"}


def direction_betas(model, noises: int = 64, scenes: int = 1000, seed: int = 0) -> list:
    """[(prompt, opposite, split, β)] for every position prompt whose relation is 'above' or 'left of'."""
    from tempflow_fast.models.tiny_flux import unpack
    from tempflow_fast.tasks.shapes.grammar import SPECS, TRAIN_PROMPTS, parse
    from tempflow_fast.tasks.shapes.render import draw, sample_scene

    rng = np.random.default_rng(seed)
    noise = torch.randn((noises,) + tuple(model.latent_shape), generator=torch.Generator().manual_seed(seed))
    train = set(TRAIN_PROMPTS)
    was_training = model.module.training
    model.module.eval()

    @torch.no_grad()
    def predicted(prompt):
        v = model.velocity(noise, torch.ones(noises), model.encode_prompts([prompt] * noises))
        return unpack(((noise - v).clamp(-1, 1) + 1) / 2).mean(0)

    def rendered(prompt):
        return draw([sample_scene(parse(prompt), rng) for _ in range(scenes)]).mean(0)

    rows = []
    try:
        for p in sorted(SPECS):
            spec = SPECS[p]
            if spec.category != "position" or spec.relation not in OPPOSITE:
                continue
            q = p.replace(spec.relation, OPPOSITE[spec.relation])
            d_true, d_pred = rendered(p) - rendered(q), predicted(p) - predicted(q)
            beta = float((d_pred * d_true).sum() / (d_true * d_true).sum())
            rows.append((p, q, "train" if p in train and q in train else "held_out", beta))
    finally:
        model.module.train(was_training)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model folders or checkpoints (default: the shipped model)")
    p.add_argument("--noises", type=int, default=64, help="noises per prompt (default 64)")
    p.add_argument("--scenes", type=int, default=1000, help="ground-truth renders per prompt (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noises and renders (default 0)")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    args = p.parse_args(argv)
    for name in ("noises", "scenes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    check_output_arg(p, args.csv, "--csv")
    from tempflow_fast.tasks.shapes.model_folder import load_model

    table = []
    for path in args.models or [None]:
        try:
            model = load_model(path, field="model")
        except ValueError as err:
            p.error(str(err))
        rows = direction_betas(model, args.noises, args.scenes, args.seed)
        for relation in OPPOSITE:
            for split in ("train", "held_out"):
                betas = [b for prompt, _, s, b in rows if s == split and f" {relation} " in prompt]
                if betas:
                    table.append((path or "shipped", relation, split, len(betas), float(np.mean(betas)),
                                  float(np.min(betas)), float(np.max(betas))))
    print("| model | relation (vs opposite) | split | pairs | β | min | max |")
    print("|---|---|---|---|---|---|---|")
    for model, relation, split, n, beta, lo, hi in table:
        print(f"| {model} | {relation} | {split} | {n} | {beta:+.3f} | {lo:+.3f} | {hi:+.3f} |")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "relation", "split", "pairs", "beta", "beta_min", "beta_max"])
            w.writerows(table)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
