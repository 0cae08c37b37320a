"""SFT of Qwen2.5-VL-7B-Instruct on Vision-R1-Data: the paper's "+SFT" baseline and the warm start.

    python -m visionr1_jax.data.tfds_cli build vision_r1_data --config qwen25 \\
        --imports visionr1_jax.data.builders --file_format array_record \\
        --data_dir gs://BUCKET/tensorflow_datasets --manual_dir /data/vision_r1_data   # once
    python -m visionr1_jax.main --config=configs/sft_vision_r1_data.py --workdir=gs://BUCKET/sft \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    # then evaluate it (configs/eval_coco.py, configs/eval_odinw.py) and start Vision-R1 from it:
    python -m visionr1_jax.main --config=configs/grpo_vision_r1_data.py --workdir=gs://BUCKET/rl \\
        --config.model.init_from=gs://BUCKET/sft ...

One epoch over the 49K prompts (the target of each is its ground-truth answer in the
reference's SFT format, `sft.answer_text`; the loss is on the answer tokens and `<|im_end|>`),
16 prompts per step (3,063 steps), AdamW lr 1e-5 with 3% warm-up and linear decay, grad-clip
1.0, float32 master weights and bfloat16 compute, parameters FSDP-sharded over every chip of
the slice (a v4-64: 32 chips; `--config.mesh.ici_parallelism=...` for another). The reference
releases no SFT recipe for Qwen2.5-VL (SPEC §7 reports the paper's +SFT row); these are common
full-fine-tuning values, not the paper's. Checkpoints every 500 steps (resumable), metrics and
TensorBoard as in every run.
"""

import ml_collections

from visionr1_jax import sections
from visionr1_jax.data import data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "sft"
    config.total_steps = 3063  # one epoch: 49,000 / 16
    config.progress = True
    config.model = sections.model_config()
    config.model.checkpoint = "gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct"
    config.model.tokenizer = "qwen"
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_no_batch"
    config.model.logprob_chunk = 128
    config.data = data_config()
    config.data.name = "vision_r1_data"
    config.data.builder_config = "qwen25"
    config.data.batch_size = 16
    config.sft = sections.sft_config()
    config.grpo = sections.grpo_config()
    config.optim = sections.optim_config()
    config.optim.learning_rate = 1e-5
    config.optim.warmup_steps = 92  # 3%
    config.mesh = sections.mesh_config(ici=(1, -1, 1))
    config.checkpoint = sections.checkpoint_config()
    config.checkpoint.every = 500
    config.metrics = sections.metrics_config()
    return config
