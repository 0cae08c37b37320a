"""The run's output sections: `eval` (the one greedy evaluator), `checkpoint`, `metrics`,
and `experiment` (`make demo`'s stages).

Jax-free (a config file loads it without jax).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from visionr1_jax.sections.common import check_keys, fail, is_int

PROTOCOLS = ("detection", "odinw", "rec")
SCORES = ("constant", "logprob")


def eval_config() -> ml_collections.ConfigDict:
    """The `eval` section, read by `python -m visionr1_jax.evaluate` and by the training loop's
    periodic evaluation (GRPO and SFT alike).

    Fields:
      every: optimizer steps between evaluations during training, and one at the last step
        (0: none). With GRPO a multiple of `grpo.num_iterations` (the loop is at a rollout
        boundary then).
      batches: batches of the evaluation split (`data.eval_split`, read by
        `data.config.eval_config`: every record once, file order) per evaluation (None: all).
      max_new_tokens: the greedy token budget (512, SPEC §7).
      batch_size: prompts per evaluation batch (None: `data.batch_size`); greedy decoding
        keeps no optimizer state, so it can take larger batches than training.
      score: `constant` (every box 0.99, the paper's protocol) or `logprob` (each box scored by
        the geometric-mean probability of its coordinate tokens, `evaluate.box_scores`, so
        that AP follows the model's own ranking).
      protocol: `detection` (COCO metrics over the prompts' images), `odinw` (per set, one
        query per (image, category); averaged), `rec` (Acc@0.5), or None: from `data.name`
        (`odinw` → odinw, `refcoco` → rec, else detection).
      max_dets: COCOeval's three detection caps (detection and odinw).
      save_predictions: also write every answer (text, boxes, scores) to
        `<workdir>/eval/<tag>_predictions.jsonl`.
    """
    c = ml_collections.ConfigDict()
    c.every = 0
    c.batches = ml_collections.config_dict.placeholder(int)
    c.max_new_tokens = 512
    c.batch_size = ml_collections.config_dict.placeholder(int)
    c.score = "constant"
    c.protocol = ml_collections.config_dict.placeholder(str)
    c.max_dets = (1, 10, 100)
    c.save_predictions = True
    return c


def protocol_of(config: ml_collections.ConfigDict) -> str:
    """The run's evaluation protocol: `eval.protocol`, or the one its dataset implies."""
    chosen = config.eval.get("protocol") if "eval" in config else None
    if chosen:
        return chosen
    name = config.data.name if "data" in config else ""
    return {"odinw": "odinw", "refcoco": "rec"}.get(name, "detection")


def validate_eval(config: ml_collections.ConfigDict) -> None:
    """Checks the `eval` section. A value without effect is an error (a `score` or `max_dets`
    other than the default for `rec`, which scores the first box only)."""
    c = config.eval
    default = eval_config()
    check_keys(c, default.keys(), "eval")
    if not is_int(c.every) or c.every < 0:
        fail("eval.every", c.every, "must be an int >= 0 (0: no evaluation during training)")
    if c.batches is not None and (not is_int(c.batches) or c.batches < 1):
        fail("eval.batches", c.batches, "must be None (the whole split) or an int >= 1")
    b = c.get("batch_size")
    if b is not None and (not is_int(b) or b < 1):
        fail("eval.batch_size", b, "must be None (data.batch_size) or an int >= 1")
    if not is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        fail("eval.max_new_tokens", c.max_new_tokens, "must be an int >= 1")
    if c.score not in SCORES:
        fail("eval.score", c.score, f"must be one of {SCORES}")
    if c.protocol is not None and c.protocol not in PROTOCOLS:
        fail("eval.protocol", c.protocol, f"must be None (from data.name) or one of {PROTOCOLS}")
    dets = tuple(c.max_dets)
    if len(dets) != 3 or not all(is_int(m) for m in dets) or not 0 < dets[0] < dets[1] < dets[2]:
        fail("eval.max_dets", c.max_dets, "must be three increasing positive ints")
    if not isinstance(c.save_predictions, bool):
        fail("eval.save_predictions", c.save_predictions, "must be a bool")
    if "data" in config and protocol_of(config) == "rec":
        for key in ("score", "max_dets"):
            if tuple(np.atleast_1d(c[key])) != tuple(np.atleast_1d(default[key])):
                fail(f"eval.{key}", c[key], "has no effect with the rec protocol (Acc@0.5 of "
                     "the first box)")  # fmt: skip
    mu = int(config.grpo.num_iterations) if "grpo" in config else 1
    if c.every and config.get("objective", "grpo") == "grpo" and c.every % mu:
        fail("eval.every", c.every, f"must be a multiple of grpo.num_iterations={mu} (a rollout "
             "boundary)")  # fmt: skip


def checkpoint_config() -> ml_collections.ConfigDict:
    """The `checkpoint` section.

    Fields: `every` (save every that many optimizer steps, at a rollout boundary, so a
    multiple of `grpo.num_iterations`; 0 = only at the end and on SIGTERM), `keep` (the
    newest N checkpoints are kept; None = all), `keep_period` (every K-th step is also kept
    for good; None = off), `async_save` (the loop goes on while the arrays are written),
    `resume` (start from the newest complete checkpoint in the workdir when there is one).
    """
    c = ml_collections.ConfigDict()
    c.every = 0
    c.keep = 3
    c.keep_period = ml_collections.config_dict.placeholder(int)
    c.async_save = True
    c.resume = True
    return c


def validate_checkpoint(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `checkpoint.*` value (a run config without the
    section is valid: nothing is saved)."""
    c = config.checkpoint
    mu = int(config.grpo.num_iterations) if "grpo" in config else 1
    if not is_int(c.every) or c.every < 0:
        fail("checkpoint.every", c.every, "must be an integer >= 0")
    if config.get("objective", "grpo") == "grpo" and c.every % mu:
        raise ValueError(
            f"checkpoint.every={c.every} is not a multiple of grpo.num_iterations={mu}: saves "
            "happen between rollouts, so such a value would not be honoured"
        )
    if c.keep is not None and (not is_int(c.keep) or c.keep < 1):
        fail("checkpoint.keep", c.keep, "must be a positive integer or None")
    if c.keep_period is not None and (not is_int(c.keep_period) or c.keep_period < 1):
        fail("checkpoint.keep_period", c.keep_period, "must be a positive integer")
    if c.keep_period is not None and c.every and c.keep_period % c.every:
        raise ValueError(
            f"checkpoint.keep_period={c.keep_period} is not a multiple of "
            f"checkpoint.every={c.every}: no saved step would be kept by it"
        )
    for key in ("async_save", "resume"):
        if not isinstance(c.get(key), bool):
            fail(f"checkpoint.{key}", c.get(key), "must be True or False")


WANDB_MODES = ("online", "offline", "disabled")


def wandb_config() -> ml_collections.ConfigDict:
    """The `metrics.wandb` section: Weights & Biases logging of every metrics row (process 0).

    Fields:
      enabled: log to W&B (off by default; every other field is an error while off).
      project: the W&B project.
      entity: the W&B team or user (None: the account's default entity).
      name: the run's display name (None: the workdir's last path component).
      mode: `online`, `offline` (files only, `wandb sync` later) or `disabled`; None: W&B's
        own choice (the `WANDB_MODE` environment variable, else online).

    The W&B run id is made when the run starts and kept in its checkpoints (`meta`), so that
    a resumed run continues the same W&B run.
    """
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.project = "visionr1_jax"
    c.entity = ml_collections.config_dict.placeholder(str)
    c.name = ml_collections.config_dict.placeholder(str)
    c.mode = ml_collections.config_dict.placeholder(str)
    return c


def metrics_config() -> ml_collections.ConfigDict:
    """The `metrics` section: `tensorboard` (write event files), `render_every` (render
    completions every that many optimizer steps, at a rollout boundary, so a multiple of
    `grpo.num_iterations`; 0 = never), `render_count` (prompts rendered, one completion
    each), `wandb` (Weights & Biases, `wandb_config()`)."""
    c = ml_collections.ConfigDict()
    c.tensorboard = True
    c.render_every = 0
    c.render_count = 4
    c.wandb = wandb_config()
    return c


def validate_wandb(c: ml_collections.ConfigDict) -> None:
    """Checks `metrics.wandb`: a value that would have no effect (any field but `enabled`
    changed while W&B is off) is an error."""
    default = wandb_config()
    check_keys(c, default.keys(), "metrics.wandb")
    if not isinstance(c.enabled, bool):
        fail("metrics.wandb.enabled", c.enabled, "must be a bool")
    if not isinstance(c.project, str) or not c.project:
        fail("metrics.wandb.project", c.project, "must be a non-empty string")
    for key in ("entity", "name"):
        if c[key] is not None and (not isinstance(c[key], str) or not c[key]):
            fail(f"metrics.wandb.{key}", c[key], "must be None or a non-empty string")
    if c.mode is not None and c.mode not in WANDB_MODES:
        fail("metrics.wandb.mode", c.mode, f"must be None (WANDB_MODE, else online) or one of "
             f"{WANDB_MODES}")  # fmt: skip
    if not c.enabled:
        for key in ("project", "entity", "name", "mode"):
            if c[key] != default[key]:
                fail(f"metrics.wandb.{key}", c[key], "has no effect while "
                     "metrics.wandb.enabled=False")  # fmt: skip


def validate_metrics(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad `metrics.*` value."""
    c = config.metrics
    check_keys(c, metrics_config().keys(), "metrics")
    if not isinstance(c.tensorboard, bool):
        fail("metrics.tensorboard", c.tensorboard, "must be a bool")
    for key in ("render_every", "render_count"):
        v = c[key]
        if not is_int(v) or v < (0 if key == "render_every" else 1):
            fail(f"metrics.{key}", v, "must be an integer >= 0 (count: >= 1)")
    if "wandb" in c:
        validate_wandb(c.wandb)
    mu = int(config.grpo.num_iterations) if "grpo" in config else 1
    grpo = config.get("objective", "grpo") == "grpo"
    if c.render_every and grpo and c.render_every % mu:
        raise ValueError(
            f"metrics.render_every={c.render_every} is not a multiple of "
            f"grpo.num_iterations={mu}: completions exist once per rollout, so such a value "
            "would not be honoured"
        )
    if c.render_every and not grpo:
        raise ValueError("metrics.render_every renders GRPO rollouts; set it to 0 for SFT")


def experiment_config() -> ml_collections.ConfigDict:
    """The `experiment` section (`visionr1_jax.experiment`, `make demo`).

    Fields:
      sft_steps: optimizer steps of the SFT warm start.
      sft_learning_rate, sft_warmup_steps: its AdamW learning rate (linear decay to 0) and
        warm-up.
      sft_more_learning_rate: the `sft_more` stage's learning rate (None: the GRPO stage's
        `optim.learning_rate`), no warm-up, linear decay.
      sft_batch_size: prompts per SFT step (None: `data.batch_size`, the GRPO stage's).
      examples: evaluation images drawn per model in `results.png`.
      ood_builder_config, ood_split: the out-of-domain evaluation set, another builder config
        of the run's dataset and its split, evaluated for every model beside the evaluation
        split (empty: none).
      reference_results: a committed multi-seed record (`benchmarks/demo_seeds.py`) whose
        intervals the table prints beside this run's numbers (empty: none).
    """
    c = ml_collections.ConfigDict()
    c.sft_steps = 200
    c.sft_learning_rate = 3e-3
    c.sft_warmup_steps = 20
    c.sft_more_learning_rate = ml_collections.config_dict.placeholder(float)
    c.sft_batch_size = ml_collections.config_dict.placeholder(int)
    c.examples = 4
    c.ood_builder_config = ""
    c.ood_split = "test"
    c.reference_results = ""
    return c


def validate_experiment(config: ml_collections.ConfigDict) -> None:
    """Checks the `experiment` section: positive step counts and rate, an `eval` section, the
    GRPO objective (the config is the Vision-R1 stage's)."""
    c = config.experiment
    check_keys(c, experiment_config().keys(), "experiment")
    for key in ("sft_steps", "examples"):
        if not is_int(c[key]) or c[key] < 1:
            fail(f"experiment.{key}", c[key], "must be an int >= 1")
    if not is_int(c.sft_warmup_steps):
        fail("experiment.sft_warmup_steps", c.sft_warmup_steps, "must be an int")
    if not 0 <= c.sft_warmup_steps <= c.sft_steps:
        raise ValueError(f"experiment.sft_warmup_steps={c.sft_warmup_steps} not in [0, sft_steps]")
    b = c.sft_batch_size
    if b is not None and (not is_int(b) or b < 1):
        fail("experiment.sft_batch_size", b, "must be None or an int >= 1")
    more = c.sft_more_learning_rate
    if more is not None and not float(more) > 0:
        fail("experiment.sft_more_learning_rate", more, "must be None or > 0")
    if not float(c.sft_learning_rate) > 0:
        fail("experiment.sft_learning_rate", c.sft_learning_rate, "must be > 0")
    if config.get("objective", "grpo") != "grpo":
        raise ValueError(
            f"objective={config.objective!r}: an `experiment` config is its GRPO stage's (the "
            "SFT stages are derived from it)"
        )
    if "eval" not in config:
        raise ValueError("an `experiment` needs an `eval` section (sections.eval_config())")
    for key in ("ood_builder_config", "ood_split", "reference_results"):
        if not isinstance(c[key], str):
            fail(f"experiment.{key}", c[key], "must be a string")
    if not c.ood_split:
        fail("experiment.ood_split", c.ood_split, "must name a split")
