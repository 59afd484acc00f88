"""Real-model runs behind the trainer's task seam (tasks/base.py): prompts from files (`data.train_prompts`,
`data.eval_prompts`: .txt, one per line, or .jsonl with a "prompt" field, e.g. `tempflow-fast prompts geneval`),
the held-out eval the mean of the trained reward on data.eval_prompts (none when it is null), as TempFlow's and
Flow-GRPO's code evaluate."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from tempflow_fast.tasks.base import read_prompts
from tempflow_fast.tasks.reward_eval import REWARD_EVAL_IMAGES_PER_PROMPT, task_reward_eval


class PromptFileTask:
    name = "prompts"
    default_images_per_prompt = REWARD_EVAL_IMAGES_PER_PROMPT
    default_probe_prompts = 0  # off: a real model's probe costs real sampling; set eval.probe_prompts to turn it on

    def __init__(self, cfg):
        self.cfg = cfg
        self.metric = "held-out reward" if cfg.data.eval_prompts is not None else None
        self._eval: Optional[List[str]] = None

    def train_prompts(self) -> List[str]:
        self.cfg.require_train_prompts()  # a real model never trains on the shapes task's toy prompts
        if self.cfg.data.train_prompts is None:
            raise ValueError("config field 'data.train_prompts': data.task 'prompts' trains on a prompt file; give "
                             "one (.txt, one prompt per line, or .jsonl with a \"prompt\" field)")
        return read_prompts(self.cfg.data.train_prompts, "data.train_prompts")

    def eval_prompts(self) -> List[str]:
        if self._eval is None and self.cfg.data.eval_prompts is not None:
            self._eval = read_prompts(self.cfg.data.eval_prompts, "data.eval_prompts")
        return list(self._eval or [])

    def category_pools(self, prompts: Sequence[str]) -> List[List[str]]:
        return [list(prompts)]

    def evaluate(self, model, run) -> Optional[Dict]:
        if self.metric is None:
            return None
        return task_reward_eval(self, model, run)

    def annotate(self, images, prompts):
        return None

    def build_reward(self, reward_cfg):
        from tempflow_fast.rewards.config import build_reward

        return build_reward(reward_cfg)
