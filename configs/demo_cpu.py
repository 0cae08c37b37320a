"""Laptop demo run: tiny Qwen2.5-VL-architecture model, synthetic shapes, Vision-R1 reward.

    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=/tmp/visionr1_demo

Nothing is downloaded: the tiny checkpoint is written locally (``model.tiny``) and the
``synthetic_shapes`` dataset is generated from its seed. Variants:
``configs/demo_cpu.py:variant=paper`` (reward variant), ``...:switch_step=200``.
"""

import ml_collections

from visionr1_jax import config_lib, rewards
from visionr1_jax.data import data_config
from visionr1_jax.models import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="official", switch_step=1500)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 200
    config.model = model_config()
    config.model.dtype = "float32"
    config.data = data_config()
    config.data.batch_size = 4
    config.data.max_pixels = 112 * 112
    config.data.min_pixels = 56 * 56
    config.data.max_prompt_len = 256
    config.reward = rewards.default_config(args.variant, switch_step=args.switch_step)
    config.mesh = config_lib.mesh_config(ici=(-1, 1, 1))
    return config
