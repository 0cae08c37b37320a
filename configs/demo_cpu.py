"""The paper's experiment in miniature, on a laptop (`make demo`): SFT → Vision-R1 vs more SFT.

    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=runs/demo
    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=runs/demo_s1 --config.seed=1

Nothing is downloaded: a small Qwen2.5-VL-architecture checkpoint (`model.tiny`, random
weights, seeded by `seed`) with the demo tokenizer (`model.tokenizer = "demo"`: a byte-level
BPE whose tokens are the demo's words, digits and JSON punctuation, so that a prompt is 61
tokens with its 16 image tokens and a one-box answer 21) and the `synthetic_shapes/demo`
dataset (one coloured circle per 112 px image, 35-75% of its side; 4,096 training, 256
validation and 1,024 test images) are made locally. The run (`visionr1_jax.experiment`) trains
and evaluates, each stage in WORKDIR/<stage>:

1. `start`: the initial model, evaluated (greedy answers on the 1,024 test images, COCO
   metrics through pycocotools, every box scored 0.99 as in the paper), and on the
   out-of-domain set `synthetic_shapes/demo_ood` (colours, textured backgrounds and sizes the
   training never shows; the paper's Table 2 in miniature);
2. `sft`: supervised warm start (`experiment.sft_steps`), evaluated;
3. `grpo`: Vision-R1 GRPO from the warm start (the `official` reward, β 0.04, k3, G 4,
   temperature 1, top-k 50: SPEC §5; `total_steps` steps), evaluated;
4. `sft_more`: more SFT from the warm start for the GRPO stage's wall-clock compute, evaluated;

then prints the paper's Tables 1 and 2 in miniature (WORKDIR/results.md, results.json), each
row beside the committed 5-seed record's mean and 95% interval (`experiment.reference_results`,
written by `benchmarks/demo_seeds.py`; labelled as such), and draws the training curves and
example predictions (WORKDIR/results.png). The learning rates were chosen on the `validation`
split (`benchmarks/demo_seeds.py --sweep`), never on `test`. About 10 minutes on 2 cores,
progress bars throughout; every stage is resumable (run the same command after a kill:
finished stages are skipped, the current one resumes from its checkpoint). Each training
stage writes metrics.jsonl, TensorBoard events (``make tensorboard WORKDIR=...``) and
checkpoints; the GRPO stage renders completions over their images every 10 steps.

Config args (``key=value,...``):

* ``variant``: reward variant, ``official`` (default), ``paper`` or ``easyr1``
  (``configs/demo_cpu.py:variant=paper``);
* ``schedule``: rule-refinement preset, default the variant's (``off`` for official/easyr1);
  ``configs/demo_cpu.py:schedule=official_adaptive`` is the released ``--adaptive`` switch;
* ``switch_step``: its STEP (default 1500), e.g. ``...:schedule=official_adaptive,switch_step=20``
  or ``...:variant=paper,switch_step=20``; rejected for a schedule without a switch;
* ``experiment``: ``False`` runs one GRPO job alone instead
  (``configs/demo_cpu.py:experiment=False``): the tiny model from random weights on
  ``synthetic_shapes/detection``, 40 steps of 4 prompts x 48 new tokens, checkpoints at 20
  and 40 in WORKDIR/checkpoints (the reward stays near 0: answers do not parse yet); with
  ``--config.objective=sft --config.metrics.render_every=0`` one SFT job. The tests run it.
"""

import os

import ml_collections

from visionr1_jax import config_lib, sections
from visionr1_jax.data import data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg, variant="official", schedule=None, switch_step=None, experiment=True
    )
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.objective = "grpo"
    config.total_steps = 40
    config.progress = True
    config.log_rollouts = 2
    config.model = sections.model_config()
    config.model.dtype = "float32"
    config.data = data_config()
    config.data.batch_size = 4
    config.data.max_pixels = 112 * 112
    config.data.min_pixels = 56 * 56
    config.data.max_prompt_len = 256
    config.reward = sections.reward_config(
        args.variant, schedule=args.schedule, switch_step=args.switch_step
    )
    config.grpo = sections.grpo_config()  # SPEC §5: β 0.04, k3, G 4, temperature 1, top-k 50
    config.grpo.max_new_tokens = 48
    config.optim = sections.optim_config()
    config.optim.learning_rate = 1e-4  # the tiny random model moves visibly in 40 steps
    config.mesh = sections.mesh_config(ici=(-1, 1, 1))
    config.checkpoint = sections.checkpoint_config()
    config.checkpoint.every = 20
    config.metrics = sections.metrics_config()  # TensorBoard under WORKDIR/tensorboard
    config.metrics.render_every = 10  # PNGs of completions under WORKDIR/renderings
    if not args.experiment:
        return config

    # The experiment: a model and data where a few minutes of CPU training localise.
    config.total_steps = 300  # the GRPO stage
    config.model.tiny = "qwen2_5_vl_demo"
    config.model.tokenizer = "demo"  # words, digits, JSON punctuation: 61-token prompts
    config.data.builder_config = "demo"
    config.data.eval_split = "test"  # `validation` chose the learning rates
    config.data.batch_size = 8
    config.data.max_prompt_len = 64
    config.data.max_instances = 1
    config.grpo.max_new_tokens = 32  # a one-box answer is 21 tokens and <|im_end|>
    config.optim.learning_rate = 1e-4  # GRPO: of 1e-4, 5e-4, 2e-3 the best on validation
    config.eval = sections.eval_config()
    config.eval.max_new_tokens = 32
    config.eval.batch_size = 64
    config.experiment = sections.experiment_config()
    config.experiment.sft_steps = 2400
    config.experiment.sft_learning_rate = 1e-3
    config.experiment.sft_warmup_steps = 50
    config.experiment.sft_more_learning_rate = 5e-4  # of 1e-4, 5e-4, 2e-3 (validation)
    config.experiment.sft_batch_size = 4
    config.experiment.ood_builder_config = "demo_ood"
    config.experiment.reference_results = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "demo_cpu_seeds.json"
    )
    return config
