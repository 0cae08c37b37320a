"""Vision-R1 GRPO of Qwen2.5-VL-7B-Instruct on Vision-R1-Data (SPEC §5), on any TPU slice.

    python -m visionr1_jax.main --config=configs/grpo_vision_r1_data.py --workdir=gs://BUCKET/rl \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    # from an SFT warm start (configs/sft_vision_r1_data.py), which is also the reference model:
    ... --config.model.init_from=gs://BUCKET/sft
    # evaluate the result on COCO val2017 and ODINW-13:
    python -m visionr1_jax.evaluate --config=configs/eval_coco.py --workdir=gs://BUCKET/rl \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct ...

The released recipe (`configs/tpu_v4_64.py`, which this extends): 16 prompts × G 4 completions
of up to 512 tokens per step, temperature 1, β 0.04 (k3), AdamW lr 1e-6 with linear decay,
3,000 steps, the `official` reward; parameters FSDP-sharded over every chip
(`mesh.ici_parallelism = (1, -1, 1)`: any slice size). Config args as `tpu_v4_64.py`'s
(``:variant=paper,switch_step=1500``...).
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.mesh = sections.mesh_config(ici=(1, -1, 1))
    return config
