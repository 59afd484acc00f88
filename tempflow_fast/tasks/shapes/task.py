"""The shapes task behind the trainer's task seam (tasks/base.py): train on the grammar's train split, evaluate
held-out accuracy by GenEval category (eval_cmd.evaluate: 64 images per prompt by default, 95% intervals and
pass@24), frame sample images by the detector's verdict."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from tempflow_fast.images import to_unit_float

from .detector import correct
from .eval_cmd import EvalSettings, evaluate
from .grammar import CATEGORIES, HELD_OUT_PROMPTS, SPLIT_VERSION, TRAIN_PROMPTS, VOCAB, MAX_WORDS, parse


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
