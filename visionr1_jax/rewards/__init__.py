"""Rewards: host parsing, pure-JAX box/matching kernels, Vision-R1 and peer rewards.

Host API (stable names, used by notebooks and outside checks)::

    from visionr1_jax import rewards
    target = rewards.Target(boxes=[[10, 10, 50, 60]], labels=["cat"],
                            image_size=(480, 640), input_size=(476, 644))
    out = rewards.score(['```json\\n[{"bbox_2d": [10, 10, 50, 60], "label": "cat"}]\\n```'],
                        [target], step=0, config=rewards.default_config("official"))
    out["total"], out["format"], out["recall"], out["precision"]
"""

from visionr1_jax.rewards import boxes, matching, parse, schedule, vision_r1
from visionr1_jax.rewards.api import make_reward_fn, prepare, score
from visionr1_jax.rewards.parse import Target
from visionr1_jax.rewards.vision_r1 import REWARD_FAMILIES, GroundTruth, Predictions
from visionr1_jax.sections.reward import VARIANTS, default_config, validate_config

__all__ = [
    "REWARD_FAMILIES",
    "VARIANTS",
    "GroundTruth",
    "Predictions",
    "Target",
    "boxes",
    "default_config",
    "make_reward_fn",
    "matching",
    "parse",
    "prepare",
    "schedule",
    "score",
    "validate_config",
    "vision_r1",
]
