"""Reward demo: scores a handful of hand-written answers and prints the term table.

    python -m visionr1_jax.rewards.demo --config=configs/rewards_demo.py:official
    python -m visionr1_jax.rewards.demo --config=configs/rewards_demo.py:variant=paper,step=2000
    python -m visionr1_jax.rewards.demo \
        --config=configs/rewards_demo.py:schedule=official_adaptive,switch_step=100,step=200

Expect one row per answer (perfect, shifted, duplicated, truncated, garbage, negative, ...)
with format / recall / precision / total; ``make demo`` runs this until the trainer lands.
Args: ``variant``, ``step``, ``schedule`` (default: the variant's) and ``switch_step`` (only for a
schedule with a switch: ``official_adaptive`` or ``paper``).
"""

import ml_collections

from visionr1_jax import config_lib, sections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="official", step=0, schedule=None, switch_step=None)
    config = ml_collections.ConfigDict()
    config.reward = sections.reward_config(
        args.variant, schedule=args.schedule, switch_step=args.switch_step
    )
    config.step = args.step
    config.seed = 0
    return config
