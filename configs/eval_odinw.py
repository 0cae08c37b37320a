"""ODINW-13 evaluation of a Qwen2.5-VL-7B checkpoint (SPEC §7, the paper's Table 1).

    python -m visionr1_jax.data.tfds_cli build odinw --config grounding \\
        --imports visionr1_jax.data.builders --file_format array_record \\
        --data_dir gs://BUCKET/tensorflow_datasets --manual_dir /data/odinw   # once
    python -m visionr1_jax.evaluate --config=configs/eval_odinw.py --workdir=gs://BUCKET/eval \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The protocol: one query per (image, category present in its ground truth), "Locate every
{category} ..." (`odinw/grounding` builds them), greedy decoding of up to 512 new tokens,
every box scored 0.99; each set (the record's `<set>` path, e.g. `AerialMaritimeDrone/large`)
is scored by pycocotools over its queries, and `AP` is the unweighted mean of the sets' COCO
mAP (`AP/<set>` per set in WORKDIR/eval/<tag>.json). The manual directory holds the 13 sets
(`<Set>/[<variant>/]{train,valid,test}/_annotations.coco.json` with their images); the split
read is `data.eval_split` (`test`, as GLIP's ODinW protocol). The paper: Qwen2.5-VL-7B 37.0 →
+SFT 35.0 → +Vision-R1 46.0.
"""

import ml_collections

from visionr1_jax import sections
from visionr1_jax.data import data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = sections.model_config()
    config.model.checkpoint = "gs://YOUR_BUCKET/Qwen2.5-VL-7B-Instruct"
    config.model.tokenizer = "qwen"
    config.model.param_dtype = "bfloat16"
    config.model.dtype = "bfloat16"
    config.data = data_config()
    config.data.name = "odinw"
    config.data.builder_config = "grounding"
    config.data.eval_split = "test"
    config.data.batch_size = 16
    config.data.max_pixels = 12800 * 28 * 28
    config.data.max_prompt_len = 8192
    # COCO / ODINW images are ~640 px: most pad to 2,048 patches (~512 image tokens), not to the
    # 51,200 of max_pixels.
    config.data.patch_buckets = (1024, 2048, 4096, 16384)
    config.data.length_buckets = (1024, 2048, 4096, 8192)
    config.mesh = sections.mesh_config(ici=(1, -1, 1))
    config.eval = sections.eval_config()
    config.eval.protocol = "odinw"
    return config
