"""Vision-R1 on Qwen2.5-VL-7B-Instruct over a Cloud TPU v5e-64 slice (64 chips of 16 GiB, 16 hosts).

    python -m visionr1_jax.main --config=configs/tpu_v5e_64.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    make aot CONFIG=configs/tpu_v5e_64.py TOPOLOGY=v5e:8x8     # the compiler's check, no TPU

The recipe of `configs/tpu_v4_64.py` (SPEC §5: 16 prompts x G 4, 512 new tokens, β 0.04, AdamW
1e-6, 3,000 steps); the parameters FSDP-sharded over 16 chips x tensor-parallel over 4 (the 16
prompts take one row per FSDP group: a 64-way batch axis would leave 48 chips without a row).
Per chip (`tools/aot.py`, SCALING.md): train step 7.92 GiB of 15.75 (50%); rollout 1.62 GiB
beside the 1.94 GiB train state (23%); a decoding step reads at least 0.42 GiB (0.55 ms at
HBM bandwidth; XLA counts 2.08 GiB with VMEM); roofline step 0.55 s (1.67 s by XLA's byte
count; both lower bounds). Config args as `tpu_v4_64.py`'s.
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.mesh = sections.mesh_config(ici=(1, 16, 4))
    return config
