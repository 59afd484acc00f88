"""`tempflow-fast prompts geneval --out DIR`: prompt files to train and evaluate a real model with.

Writes DIR/geneval_train.{jsonl,txt} and DIR/geneval_test.{jsonl,txt} (geneval_prompts.py: GenEval's six
categories over the 80 COCO objects, fixed splits that never share a prompt); docs/prompts.md describes the
formats and how a config uses them.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from . import geneval_prompts

FORMATS = ("jsonl", "txt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tempflow-fast prompts",
        description="Write prompt files a training run can start from (docs/prompts.md describes the formats "
                    "and how to bring your own).")
    sub = p.add_subparsers(dest="prompt_set", required=True, metavar="SET")
    g = sub.add_parser(
        "geneval", help="GenEval-style compositional prompts over the 80 COCO objects, fixed train/test splits",
        description="GenEval's six categories (single_object, two_object, counting, colors, position, color_attr) "
                    "over the 80 COCO object names, ten colours, counts 2-4 and four relations. A prompt's split "
                    "is fixed by a hash of what it says, so train and test files never share a prompt, whatever "
                    "the seed and sizes. The .jsonl lines carry GenEval's metadata (tag, include, exclude), so "
                    "the file also serves as the GenEval reward server's reward.metadata_path.")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="folder for geneval_train.* and geneval_test.* (created)")
    g.add_argument("--train-per-category", type=int, default=1000, metavar="N",
                   help="train prompts per category (default 1000; a category with fewer gives all it has)")
    g.add_argument("--test-per-category", type=int, default=100, metavar="N",
                   help="test prompts per category (default 100, GenEval's size; fewer when a category has fewer)")
    g.add_argument("--seed", type=int, default=0, help="which prompts of each split are drawn (default 0); the "
                                                       "splits themselves do not depend on it")
    g.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="files to write: jsonl (prompt, category and GenEval metadata per line), txt (one prompt "
                        "per line); default both")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in ("train_per_category", "test_per_category"):
        if getattr(args, name) < 1:
            print(f"tempflow-fast prompts: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if not args.out.strip():  # Path("") is the current folder: a blank --out is a slip, not a choice
        print("tempflow-fast prompts: --out is blank; give a folder (e.g. --out prompts)", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"tempflow-fast prompts: --out {str(out)!r} is a file; give a folder", file=sys.stderr)
        return 2
    splits = {"train": geneval_prompts.generate("train", args.train_per_category, args.seed),
              "test": geneval_prompts.generate("test", args.test_per_category, args.seed)}
    counts = {split: Counter(r["category"] for r in records) for split, records in splits.items()}
    print(f"{'category':<16} {'train':>6} {'test':>6}  (prompts)")
    for category in geneval_prompts.CATEGORIES:
        print(f"{category:<16} {counts['train'][category]:>6} {counts['test'][category]:>6}")
    print(f"{'total':<16} {len(splits['train']):>6} {len(splits['test']):>6}")
    written = {}
    for split, records in splits.items():
        for fmt in args.format:
            written[split, fmt] = geneval_prompts.write(records, out / f"geneval_{split}.{fmt}")
            print(f"wrote {written[split, fmt]}")
    fmt = "jsonl" if "jsonl" in args.format else "txt"
    print(f"use: --set data.train_prompts={written['train', fmt]} --set data.eval_prompts={written['test', fmt]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
