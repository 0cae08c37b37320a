"""Your own COCO-format detection data: the laptop demo's tiny model trained on it.

    python -m visionr1_jax.main --workdir=/tmp/mine \\
        --config=configs/coco_format_example.py:annotations=/data/mine/train.json,images=/data/mine/images,val_annotations=/data/mine/val.json

The files are a COCO instances JSON per split (``images``, ``annotations`` with xywh pixel
``bbox``, ``categories`` whose names are the classes: every one is listed in each prompt) and
the folder the JSON's ``file_name``s are relative to. The first run builds them into a tfds
dataset under ``data.data_dir`` (``~/tensorflow_datasets/coco_format/files_<hash>``; an edited
JSON is built anew), then trains as ``configs/demo_cpu.py`` does (Vision-R1 GRPO, 40 steps;
``--config.objective=sft`` for the supervised warm start). Evaluate a workdir's checkpoint on
the evaluation split with
``python -m visionr1_jax.evaluate --config=<the same> --workdir=/tmp/mine``. Without any
file arguments it trains on a COCO-format export of the synthetic shapes, written on first
load to ``<tmp>/visionr1_jax_coco_format_example`` (``data.shapes.write_coco_example``).

Config args (``key=value,...``):

* ``annotations``: the training JSON; ``images``: its image folder (default: the JSON's);
* ``val_annotations``, ``val_images``: the evaluation split (default images: ``images``);
  without them the run trains on the first 90% of the training JSON's images
  (``data.split='train[:90%]'``) and evaluates on the last 10%;
* ``variant``, ``schedule``, ``switch_step``: the reward, as in ``configs/demo_cpu.py``.

Real runs override the model and image sizes, e.g. ``--config.model.checkpoint=/ckpt/
Qwen2.5-VL-3B-Instruct --config.data.max_pixels=401408 --config.data.max_prompt_len=1024``
(see ``configs/tpu_v4_64.py``). Several processes: build the dataset first, once, with the
same ``--config`` (``python -m visionr1_jax.data.tfds_cli prepare --config=...``) into a
``--config.data.data_dir`` every host reads.
"""

import ml_collections

from visionr1_jax import config_lib, sections
from visionr1_jax.data import data_config, shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg, annotations=None, images=None, val_annotations=None, val_images=None,
        variant="official", schedule=None, switch_step=None,
    )  # fmt: skip
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "grpo"
    config.total_steps = 40
    config.progress = True
    config.log_rollouts = 2
    config.model = sections.model_config()
    config.model.dtype = "float32"

    config.data = data = data_config()
    data.name = "coco_format"
    if args.annotations is None:
        if args.images or args.val_annotations or args.val_images:
            raise ValueError("config args images/val_annotations/val_images need annotations")
        annotations, images = shapes.write_coco_example()
        args.annotations, args.images = annotations["train"], images["train"]
        args.val_annotations, args.val_images = annotations["validation"], images["validation"]
    data.annotations.train, data.images.train = args.annotations, args.images
    if args.val_annotations:
        data.annotations.validation = args.val_annotations
        data.images.validation = args.val_images or args.images
        data.split, data.eval_split = "train", "validation"
    else:
        if args.val_images:
            raise ValueError("config arg val_images needs val_annotations")
        data.split, data.eval_split = "train[:90%]", "train[90%:]"
    data.batch_size = 4
    data.max_pixels = 112 * 112
    data.min_pixels = 56 * 56
    data.max_prompt_len = 256

    config.reward = sections.reward_config(
        args.variant, schedule=args.schedule, switch_step=args.switch_step
    )
    config.grpo = sections.grpo_config()  # SPEC §5: β 0.04, k3, G 4, temperature 1, top-k 50
    config.grpo.max_new_tokens = 48
    config.optim = sections.optim_config()
    config.optim.learning_rate = 1e-4
    config.sft = sections.sft_config()  # read with --config.objective=sft
    config.mesh = sections.mesh_config(ici=(-1, 1, 1))
    config.checkpoint = sections.checkpoint_config()
    config.checkpoint.every = 20
    config.metrics = sections.metrics_config()
    config.metrics.render_every = 10
    return config
