"""Laptop demo run: tiny Qwen2.5-VL-architecture model, synthetic shapes, Vision-R1 reward.

    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=/tmp/visionr1_demo

`make demo` runs this: Vision-R1 GRPO on the tiny random checkpoint (β 0.04, k3, G 4,
temperature 1, top-k 50; 4 prompts × 48 new tokens per step, 40 steps, AdamW lr 1e-4). Expect a
progress bar, one JSON line per step in WORKDIR/metrics.jsonl (and TensorBoard events in
WORKDIR/tensorboard: ``tensorboard --logdir WORKDIR``), the first rollouts in
WORKDIR/rollouts.jsonl and, every 10 steps, completions drawn over their images in
WORKDIR/renderings; about a minute of compilation, then well under a second per step on
2 cores. Checkpoints go to WORKDIR/checkpoints (steps 20 and 40): run the same command again
after a kill and it resumes (``make demo`` starts afresh: it clears them).
From random weights the reward stays near 0 (answers do not parse yet): the demo shows
the job runs end to end; an SFT warm start (``--config.objective=sft
--config.metrics.render_every=0``) teaches the format.
Nothing is downloaded: the tiny checkpoint is written locally (``model.tiny``) and the
``synthetic_shapes`` dataset is generated from its seed. Config args (``key=value,...``):

* ``variant``: reward variant, ``official`` (default), ``paper`` or ``easyr1``
  (``configs/demo_cpu.py:variant=paper``);
* ``schedule``: rule-refinement preset, default the variant's (``off`` for official/easyr1);
  ``configs/demo_cpu.py:schedule=official_adaptive`` is the released ``--adaptive`` switch;
* ``switch_step``: its STEP (default 1500), e.g. ``...:schedule=official_adaptive,switch_step=200``
  or ``...:variant=paper,switch_step=200``; rejected for a schedule without a switch.
"""

import ml_collections

from visionr1_jax import checkpoint, config_lib, metrics, rewards, train
from visionr1_jax.data import data_config
from visionr1_jax.models import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, variant="official", schedule=None, switch_step=None)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "grpo"
    config.total_steps = 40
    config.progress = True
    config.log_rollouts = 2
    config.model = model_config()
    config.model.dtype = "float32"
    config.data = data_config()
    config.data.batch_size = 4
    config.data.max_pixels = 112 * 112
    config.data.min_pixels = 56 * 56
    config.data.max_prompt_len = 256
    config.reward = rewards.default_config(
        args.variant, schedule=args.schedule, switch_step=args.switch_step
    )
    config.grpo = train.grpo_config()  # SPEC §5: β 0.04, k3, G 4, temperature 1, top-k 50
    config.grpo.max_new_tokens = 48
    config.optim = train.optim_config()
    config.optim.learning_rate = 1e-4  # the tiny random model moves visibly in 40 steps
    config.mesh = config_lib.mesh_config(ici=(-1, 1, 1))
    config.checkpoint = checkpoint.checkpoint_config()
    config.checkpoint.every = 20
    config.metrics = metrics.metrics_config()  # TensorBoard under WORKDIR/tensorboard
    config.metrics.render_every = 10  # PNGs of completions under WORKDIR/renderings
    return config
