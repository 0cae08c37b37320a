"""Vision-R1 on Qwen2.5-VL-7B-Instruct over a Cloud TPU v5p-64 slice (32 chips of 95 GiB, 8 hosts).

    python -m visionr1_jax.main --config=configs/tpu_v5p_64.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    make aot CONFIG=configs/tpu_v5p_64.py TOPOLOGY=v5p:4x4x2     # the compiler's check

The recipe of `configs/tpu_v4_64.py` (SPEC §5) on v5p's 32 chips (megacore: one device per
chip), parameters FSDP-sharded over 16 chips x tensor-parallel over 2. Per chip
(`tools/aot.py`, SCALING.md): train step 15.31 GiB of 95.74 (16%); rollout 1.46 GiB beside the
3.87 GiB train state (6%); a decoding step reads at least 0.68 GiB (0.26 ms at HBM
bandwidth; XLA counts 3.48 GiB with VMEM); roofline step 0.36 s (0.92 s by XLA's byte count;
both lower bounds). Config args as `tpu_v4_64.py`'s.
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.mesh = sections.mesh_config(ici=(1, 16, 2))
    return config
