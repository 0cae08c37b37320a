"""COCO val2017 detection evaluation of a Qwen2.5-VL-7B checkpoint (SPEC §7, the paper's Table 1).

    python -m visionr1_jax.data.tfds_cli build coco_detection --config all \\
        --imports visionr1_jax.data.builders --file_format array_record \\
        --data_dir gs://BUCKET/tensorflow_datasets --manual_dir /data/coco   # once
    python -m visionr1_jax.evaluate --config=configs/eval_coco.py --workdir=gs://BUCKET/eval \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    # a trained run: its newest checkpoint (or --checkpoint=STEP), written to its workdir/eval
    python -m visionr1_jax.evaluate --config=configs/eval_coco.py --workdir=gs://BUCKET/run \\
        --config.model.checkpoint=gs://BUCKET/Qwen2.5-VL-7B-Instruct ...

The protocol: one prompt per val2017 image listing all 80 categories (`coco_detection/all`),
images resized with max_pixels = 12,800·28·28 (SPEC §5's evaluation bound), greedy decoding of
up to 512 new tokens, answers parsed by the reward's parser, every box scored 0.99, unknown
labels dropped, pycocotools `COCOeval(iouType="bbox")` over all 5,000 images (the ones without
objects and with more than 30 included). `--config.eval.score=logprob` ranks the boxes by the
model's own coordinate-token probabilities instead. Writes WORKDIR/eval/<tag>.json (AP, AP50,
AP75, AP small/medium/large, AR1/10/100, parse rate, matched IoU), the predictions
(<tag>_predictions.jsonl), TensorBoard scalars and a printed table. Every host runs the same
command on a pod (each decodes its share of the images; host 0 scores). The paper: Qwen2.5-VL-7B
17.7 mAP → +SFT 23.6 → +Vision-R1 26.6.
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
    config.model.param_dtype = "bfloat16"  # inference only: no float32 master copy
    config.model.dtype = "bfloat16"
    config.data = data_config()
    config.data.name = "coco_detection"
    config.data.builder_config = "all"
    config.data.eval_split = "validation"
    config.data.batch_size = 16
    config.data.max_pixels = 12800 * 28 * 28
    config.data.max_prompt_len = 8192
    # COCO / ODINW images are ~640 px: most pad to 2,048 patches (~512 image tokens), not to the
    # 51,200 of max_pixels.
    config.data.patch_buckets = (1024, 2048, 4096, 16384)
    config.data.length_buckets = (1024, 2048, 4096, 8192)
    config.mesh = sections.mesh_config(ici=(1, -1, 1))  # parameters FSDP over every chip
    config.eval = sections.eval_config()  # greedy, 512 new tokens, score 0.99, detection
    return config
