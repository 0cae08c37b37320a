"""Vision-R1 on Qwen2.5-VL-7B over a Cloud TPU v4-64 slice (32 chips, 8 hosts).

    python -m visionr1_jax.main --config=configs/tpu_v4_64.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Recipe of SPEC §5: 16 prompts per step, max_pixels 401,408; parameters FSDP-sharded over
16 chips × tensor 2 within a slice. Config args: ``:variant=paper,switch_step=1500`` (the
paper's schedule at STEP), ``:schedule=official_adaptive`` (the released ``--adaptive`` switch at
step 1500; ``switch_step`` moves it); ``switch_step`` is rejected for a schedule without a switch.
"""

import ml_collections

from visionr1_jax import config_lib, rewards
from visionr1_jax.data import data_config
from visionr1_jax.models import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="official", schedule=None, switch_step=None)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 3000
    config.model = model_config()
    config.model.checkpoint = "gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct"
    config.model.tokenizer = "qwen"
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_no_batch"
    config.data = data_config()
    config.data.name = "vision_r1_data"
    config.data.builder_config = "qwen25"
    config.data.batch_size = 16
    config.reward = rewards.default_config(
        args.variant, schedule=args.schedule, switch_step=args.switch_step
    )
    config.mesh = config_lib.mesh_config(ici=(1, 16, 2))
    return config
