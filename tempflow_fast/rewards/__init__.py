"""Rewards: in-process reward models, the reward-server client and reference server, composite
rewards, asynchronous scoring, and the `reward:` config section.

Every reward is `reward(images (B, 3, H, W) in [0, 1], prompts: list[str]) -> (B,) float32` with a
`.name` (base.py). Model-backed rewards import their libraries when built, so importing this package
stays light.
"""

from .async_scorer import AsyncScorer
from .base import Reward, check_batch
from .composite import CompositeReward
from .config import REWARD_NAMES, RewardConfig, build_reward
from .reference_server import RewardHTTPServer
from .server_client import RewardServerClient, load_prompt_metadata
from .unified_reward import UnifiedRewardClient

__all__ = ["AsyncScorer", "Reward", "check_batch", "CompositeReward", "REWARD_NAMES", "RewardConfig", "build_reward",
           "RewardHTTPServer", "RewardServerClient", "load_prompt_metadata", "UnifiedRewardClient"]
