"""JPEG compressibility / incompressibility on the tiny model (issue 19, item 3): the classic sanity tasks of
diffusion RL (DDPO; Flow-GRPO's `jpeg_compressibility` / `jpeg_incompressibility`, rewards/jpeg.py), a continuous
reward whose learning curves separate quickly.

Prompts are the shapes grammar's splits (the tiny model reads only its words; the reward ignores them): training
draws from the train split (by category with data.balance_categories), the held-out eval samples the 17 held-out
prompts × eval.images_per_prompt (default 16) from fixed noises with an Euler ODE and reports the mean reward
with its 95% interval (tasks/reward_eval.py).

The reward is the `reward:` section's name, one of the two JPEG rewards, in DDPO's units: -kB of the quality-95
JPEG (compressibility) or +kB (incompressibility). Flow-GRPO divides compressibility by 500 (rewards/jpeg.py) for
512 px images of hundreds of kB; a 16×16 image is 0.63 kB (blank) to about 0.9 kB, so at /500 a group's reward
std (~1e-4) would be as small as the ε = 1e-4 of the advantage (r - mean) / (std + ε) and halve every advantage.
The order of images, and so what is learned, is the same.
"""

from __future__ import annotations

from typing import Dict

from tempflow_fast.tasks.reward_eval import task_reward_eval
from tempflow_fast.tasks.shapes.task import ShapesTask

REWARDS = {"jpeg_compressibility": -1.0, "jpeg_incompressibility": 1.0}  # name -> kB multiplier (DDPO's units)


class CompressibilityTask(ShapesTask):
    """The shapes task's prompts and category pools (ShapesTask), scored and evaluated by a JPEG reward."""

    name = "compressibility"
    metric = "held-out reward (kB)"
    default_images_per_prompt = 16
    default_probe_prompts = 24

    def evaluate(self, model, run) -> Dict:
        return task_reward_eval(self, model, run)

    def annotate(self, images, prompts):
        return None

    def build_reward(self, reward_cfg):
        from tempflow_fast.rewards.jpeg import JpegReward

        check_reward(reward_cfg.name)
        return JpegReward(reward_cfg.label or reward_cfg.name, REWARDS[reward_cfg.name])


def check_reward(name: str) -> None:
    if name not in REWARDS:
        raise ValueError(f"config field 'reward.name': the compressibility task trains {' or '.join(REWARDS)}, "
                         f"got {name!r}")
