"""The shapes task behind the trainer's task seam (tasks/base.py): train on the grammar's train split, evaluate
held-out accuracy by GenEval category (eval_cmd.evaluate: 64 images per prompt by default, 95% intervals and
pass@24), frame sample images by the detector's verdict."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from tempflow_fast.images import to_unit_float
from tempflow_fast.tasks.base import take_turns

from .detector import correct
from .eval_cmd import EvalSettings, evaluate
from .grammar import (CATEGORIES, COLORS, HELD_OUT_PROMPTS, MAX_WORDS, NUMBERS, SPLIT_VERSION, TRAIN_PROMPTS, VOCAB,
                      parse)


def new_model(seed: int = 0, transformer_config: Optional[dict] = None):
    """A freshly initialised tiny FLUX that reads the shapes grammar's words (its text encoder's vocabulary)."""
    from tempflow_fast.models.tiny_flux import TinyFluxAdapter

    return TinyFluxAdapter.create(seed=seed, transformer_config=transformer_config, vocab=VOCAB, max_words=MAX_WORDS)


def category_pools(prompts: Sequence[str]) -> List[List[str]]:
    """`prompts` by GenEval category, in CATEGORIES order, empty categories left out."""
    by = {c: [] for c in CATEGORIES}
    for p in prompts:
        by[parse(p).category].append(p)
    return [by[c] for c in CATEGORIES if by[c]]


def _kinds(prompt: str) -> tuple:
    """What tells prompts of one category apart, most telling first: the relation or number word, then the colours
    in the order the prompt names them."""
    spec = parse(prompt)
    words = prompt.split()
    lead = spec.relation or next((w for w in words if w in NUMBERS), "")
    return (lead, *[w for w in words if w in COLORS])


def spread(pool: Sequence[str], level: int = 0) -> List[str]:
    """`pool` reordered so that every prefix covers its kinds (`_kinds`): grouped by the kind at `level`, each group
    spread by the next level (group g rotated to start at its g-th), then the groups taken in turn. (A stride over
    the sorted pool aliases with the grammar's cycles: every 10th of the 40 position prompts is an "above" one.)"""
    if len(pool) <= 1 or level >= max(len(_kinds(p)) for p in pool):
        return list(pool)
    groups: Dict[str, List[str]] = {}
    for p in pool:
        k = _kinds(p)
        groups.setdefault(k[level] if level < len(k) else "", []).append(p)
    spreads = [spread(g, level + 1) for g in groups.values()]
    # group g starts at its g-th prompt, so the groups' first prompts differ at the next level too
    return take_turns([s[g % len(s):] + s[:g % len(s)] for g, s in enumerate(spreads)], len(pool))


def probe_prompts(prompts: Sequence[str], n: int) -> List[str]:
    """n of `prompts` for the probe set: the categories in turn and, inside each, its kinds in turn (position: the
    four relations; counting: both numbers; then the colours), topped up from the larger categories when a small
    one (3 single-object prompts) runs out."""
    return take_turns([spread(pool) for pool in category_pools(prompts)], n)


class ShapesTask:
    name = "shapes"
    metric = "held-out accuracy"
    default_images_per_prompt = 64
    default_probe_prompts = 24  # 4 train prompts per category (3 single-object ones exist)
    split_version = SPLIT_VERSION  # recorded in summary.json: held-out numbers compare only within one version

    def __init__(self, cfg):
        self.cfg = cfg

    def train_prompts(self) -> List[str]:
        return list(TRAIN_PROMPTS)

    def eval_prompts(self) -> List[str]:
        return list(HELD_OUT_PROMPTS)

    def category_pools(self, prompts: Sequence[str]) -> List[List[str]]:
        return category_pools(prompts)

    def probe_prompts(self, prompts: Sequence[str], n: int) -> List[str]:
        return probe_prompts(prompts, n)

    def evaluate(self, model, run) -> Dict:
        e = self.cfg.eval
        settings = EvalSettings(split="held_out", images_per_prompt=e.images_per_prompt or self.default_images_per_prompt,
                                seed=e.seed, num_steps=e.num_steps, shift=self.cfg.sampling.shift)
        return evaluate(model, self.eval_prompts(), settings, progress=run.progress)

    def annotate(self, images: torch.Tensor, prompts: Sequence[str]) -> List[bool]:
        return correct(to_unit_float(images, "cpu"), list(prompts)).tolist()

    def build_reward(self, reward_cfg):
        from tempflow_fast.rewards.config import build_reward

        return build_reward(reward_cfg)
