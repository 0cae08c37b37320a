"""Vision-R1 on Qwen2.5-VL-3B-Instruct on a single Cloud TPU v4-8 (4 megacore chips, one host).

    python -m visionr1_jax.main --config=configs/tpu_v4_8_3b.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-3B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    make aot CONFIG=configs/tpu_v4_8_3b.py TOPOLOGY=v4:2x2x1     # the compiler's check

The recipe of `configs/tpu_v4_64.py` (SPEC §5: 16 prompts x G 4, 512 new tokens, β 0.04,
AdamW 1e-6, 3,000 steps) for the 3B model, every parameter FSDP-sharded over the slice's
chips, the reference model's weights in host memory between its uses
(`grpo.reference_memory = "host"`). Per chip (`tools/aot.py`, SCALING.md): train state 10.50
GiB of 30.75 in HBM (34%) + 3.50 GiB of reference on the host; the train step 24.27 GiB
(79%; with the reference in HBM 27.77 GiB, 90.3%: no 10% headroom); the rollout 15.39 GiB
with the train state held (50%); roofline step 2.3 s (5.5 s by XLA's byte count; both lower
bounds). G = 8: `--config.grpo.num_generations=8 --config.optim.accumulation_steps=4` (train
step 25.44 GiB, 83%). Config args as `tpu_v4_64.py`'s.
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.model.checkpoint = "gs://YOUR_BUCKET/Qwen2.5-VL-3B-Instruct"
    config.mesh = sections.mesh_config(ici=(1, 4, 1))
    # `dots_no_batch` keeps every projection's output for the backward pass: 25.1 GiB of
    # temporaries per v5e-8 chip (`tools/aot.py`); `full` keeps each layer's input only.
    config.model.remat_policy = "full"
    # With the reference's 3.50 GiB per chip in HBM the train step needs 90.3% of it; in
    # pinned host memory it is copied in once per step, for the reference pass.
    config.grpo.reference_memory = "host"
    return config
