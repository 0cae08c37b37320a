"""Vision-R1 on Qwen2.5-VL-7B-Instruct with LoRA on one 8-chip slice (v4-8 or v5e-8).

    python -m visionr1_jax.main --config=configs/tpu_8_7b_lora.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    make aot CONFIG=configs/tpu_8_7b_lora.py TOPOLOGY=v5e:2x4     # or v4:2x2x1

The recipe of `configs/tpu_v4_64.py` (SPEC §5) with low-rank adapters (rank 64, alpha 128) on
every attention and MLP projection of the decoder: only the adapters (~160M parameters) train
and have optimizer state, the base weights stay as loaded, and the reference model is the base
(the adapters off): no second copy of the 8.3B weights. Every parameter FSDP-sharded over the
slice's chips (`mesh.ici_parallelism = (1, -1, 1)`); the learning rate is LoRA's usual 1e-5
(full fine-tuning's 1e-6 hardly moves low-rank adapters). The merged model exports with
`python -m visionr1_jax.tools.export`. Per chip (`tools/aot.py`, SCALING.md): train state 4.16
GiB of a v5e chip's 15.75 (26%), 8.33 GiB of a v4 chip's 30.75 (27%); the train step 12.77 GiB
on v5e-8 (81%), 25.18 GiB on v4-8 (82%); roofline step on v5e-8 3.1 s (9.0 s by XLA's byte
count; both lower bounds). G = 8 on v5e-8: `--config.grpo.num_generations=8
--config.optim.accumulation_steps=2` (train step 13.38 GiB, 85%; in one batch 17.07 GiB, refused).
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections

_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_v4_64.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_lib.load_config(_BASE + (f":{arg}" if arg else ""))
    config.model.lora.rank = 64
    config.model.lora.alpha = 128.0
    config.optim.learning_rate = 1e-5
    config.mesh = sections.mesh_config(ici=(1, -1, 1))
    # Each chip holds 8 of the 64 completions: `dots_no_batch` would keep every projection's
    # output for the backward pass (38.9 GiB of temporaries on v5e-8, `tools/aot.py`); `full`
    # keeps each layer's input only and recomputes the rest (a third more FLOPs).
    config.model.remat_policy = "full"
    return config
