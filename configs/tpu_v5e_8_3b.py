"""Vision-R1 on Qwen2.5-VL-3B-Instruct on a single Cloud TPU v5e-8 (8 chips of 16 GiB, one host).

    python -m visionr1_jax.main --config=configs/tpu_v5e_8_3b.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-3B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    make aot CONFIG=configs/tpu_v5e_8_3b.py TOPOLOGY=v5e:2x4     # the compiler's check

The recipe of `configs/tpu_v4_64.py` (SPEC §5: 16 prompts x G 4, 512 new tokens, β 0.04,
AdamW 1e-6, 3,000 steps) for the 3B model, every parameter FSDP-sharded over the slice's
chips, the reference model's weights in host memory between its uses
(`grpo.reference_memory = "host"`). Per chip (`tools/aot.py`, SCALING.md): train state 5.25
GiB of 15.75 in HBM (33%) + 1.75 GiB of reference on the host; the train step 13.49 GiB
(86%; 15.24 GiB, 97%, with the reference in HBM: no 10% headroom); the rollout 8.04 GiB with
the train state held (51%); roofline step 1.7 s (4.5 s by XLA's byte count; both lower
bounds). G = 8 does not fit a v5e-8; on a v5e-16: `--config.grpo.num_generations=8
--config.mesh.ici_parallelism=(1,16,1)` (train step 7.98 GiB, 51%). Config args as
`tpu_v4_64.py`'s.
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.model.checkpoint = "gs://YOUR_BUCKET/Qwen2.5-VL-3B-Instruct"
    config.mesh = sections.mesh_config(ici=(1, 8, 1))
    # `dots_no_batch` keeps every projection's output for the backward pass: 25.1 GiB of
    # temporaries per v5e-8 chip (`tools/aot.py`); `full` keeps each layer's input only.
    config.model.remat_policy = "full"
    # The train step peaks at 15.24 GiB of 15.75 with the reference's 1.75 GiB in HBM
    # (`optim.accumulation_steps = 2` adds a gradient accumulator: 17.16 GiB); in pinned host
    # memory it is copied in once per step, for the reference pass.
    config.grpo.reference_memory = "host"
    return config
