"""The training sections: `grpo` (the RL objective and sampling), `optim` (AdamW and its
schedule), `sft` (supervised targets), and the run's top-level keys (`objective`,
`total_steps`, `log_rollouts`, `progress`).

Jax-free (a config file loads it without jax). The names of the registries they select from
(`grpo.ESTIMATORS`, `grpo.KL_ESTIMATORS`, `grpo.AGGREGATIONS`) are listed here and checked
against the kernels by the tests.
"""

from __future__ import annotations

import ml_collections

from visionr1_jax.sections.common import check_keys, fail, is_int, is_number
from visionr1_jax.sections.model import lora_options, narrower

OBJECTIVES = ("grpo", "sft")
ESTIMATORS = ("grpo", "drgrpo", "rloo")  # `grpo.ESTIMATORS`' names
KL_ESTIMATORS = ("k1", "k2", "k3")  # `grpo.KL_ESTIMATORS`' names
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")  # `grpo.IMPORTANCE_LEVELS`
REFERENCE_MEMORY = ("device", "host")
# `sft` keys that became keys of the one evaluation (`eval` section).
SFT_MOVED = {
    "eval_every": "eval.every",
    "eval_batches": "eval.batches",
    "eval_max_new_tokens": "eval.max_new_tokens",
}


def grpo_config() -> ml_collections.ConfigDict:
    """The `grpo` config section with the released Vision-R1 script's values (SPEC §5).

    Fields: `num_generations` G (4); `beta` the KL coefficient β (0.04, TRL's default that the
    release kept; the paper says 0.2); `kl` the estimator (`k3`); `epsilon` / `epsilon_high`
    the clip range ε_low / ε_high (0.2, TRL's default / None = ε_low); `importance_level`
    (`token`: GRPO's per-token ratio; `sequence`: GSPO's length-normalised ratio per
    completion, clipped per completion, `grpo.loss`; it changes nothing unless μ > 1);
    `aggregation`
    (`seq-mean-token-mean`); `estimator` the advantage (`grpo`, std + 1e-4); `num_iterations`
    μ, updates per rollout (1: the ratio is exp(logp − stop_gradient(logp)) ≡ 1, so ε has no
    effect); `max_new_tokens` (512) and the sampling settings `temperature` (1.0; the train
    step's log-probs divide the logits by it too), `top_k` (50, 0 = off) and `top_p` (1.0).
    `rollout_copy`: sample from a copy of the trained weight matrices in `model.dtype`, made
    once per rollout with their shardings (the decoding loop then reads half the bytes of
    float32 master weights at every step; the same tokens, since every layer casts its weights
    to `model.dtype` anyway; 1-D parameters stay as they are). None (default): when
    `model.dtype` is narrower than `model.param_dtype`; True there is the same, and an error
    where it would copy nothing; False: sample from the master weights.
    `mask_truncated`: completions cut at `max_new_tokens` (no stop token) get no loss (TRL's
    `mask_truncated_completions`); they still count in their group's advantages and as rows of
    the aggregation. Off by default, as the reference. `reward.overlong` (DAPO's soft overlong
    penalty) is in the reward section.
    `reference_memory`: where the reference's parameters live between their uses, `device`
    (HBM, sharded like the policy) or `host` (pinned host memory with the same sharding,
    brought to the devices inside each program that reads them: once per rollout; frees their
    HBM for the rest of the step, at the cost of a host-to-device copy per use).

    The sampling settings are the `GenerationConfig` defaults that the reference's `generate`
    call inherited; whether Qwen's `generation_config.json` was merged into that call at the
    reference's pinned transformers commit is unverified.
    """
    c = ml_collections.ConfigDict()
    c.num_generations = 4
    c.beta = 0.04
    c.kl = "k3"
    c.epsilon = 0.2
    c.epsilon_high = ml_collections.config_dict.placeholder(float)
    c.importance_level = "token"
    c.aggregation = "seq-mean-token-mean"
    c.estimator = "grpo"
    c.num_iterations = 1
    c.max_new_tokens = 512
    c.mask_truncated = False
    c.temperature = 1.0
    c.top_k = 50
    c.top_p = 1.0
    c.rollout_copy = ml_collections.config_dict.placeholder(bool)
    c.reference_memory = "device"
    return c


def optim_config() -> ml_collections.ConfigDict:
    """The `optim` config section: AdamW as the release ran it (SPEC §5; HF `Trainer` defaults).

    Fields: `learning_rate` (1e-6, decayed linearly to 0 at `total_steps`), `warmup_steps`
    (0: none; else a linear ramp from 0, as HF's `get_linear_schedule_with_warmup`),
    `weight_decay` (0.0: TRL's `GRPOConfig` inherits `TrainingArguments.weight_decay = 0.0`),
    `grad_clip` (1.0, the global-norm clip of `max_grad_norm`; None = no clipping),
    `accumulation_steps` (1: micro-batches of B/k prompts per optimizer step, `lax.scan`
    over them in the train step; must divide the batch), `max_bad_steps` (3: a step whose
    loss or gradients hold a NaN or Inf is skipped, parameters and optimizer state left as
    they were, and counted; that many in a row stop the run with an error, its last
    checkpoint intact; None = never stop), `mu_dtype` (None: Adam's first moment in the
    parameters' dtype; "bfloat16": stored in bfloat16, 2 bytes per trained parameter saved,
    optax's `mu_dtype`). Adam's β1 0.9, β2 0.999, ε 1e-8 are HF's defaults and fixed.
    """
    c = ml_collections.ConfigDict()
    c.learning_rate = 1e-6
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.accumulation_steps = 1
    c.max_bad_steps = 3
    c.mu_dtype = ml_collections.config_dict.placeholder(str)
    return c


def reference_on_host(config: ml_collections.ConfigDict) -> bool:
    """`grpo.reference_memory == "host"`: the reference parameters live in pinned host
    memory."""
    return (config.get("grpo") or {}).get("reference_memory", "device") == "host"


def rollout_dtype(config: ml_collections.ConfigDict) -> str | None:
    """The dtype name of the weight copy the rollout samples from (`grpo.rollout_copy`), or
    None: the master weights."""
    copy = (config.get("grpo") or {}).get("rollout_copy")
    m = config.get("model")
    if m is None or copy is False or not narrower(m):
        return None
    return m.dtype


def sft_config() -> ml_collections.ConfigDict:
    """The `sft` config section (read when `config.objective == "sft"`).

    Fields:
      max_answer_len: the longest target L in tokens, `<|im_end|>` included (1024: 30 boxes
        of ~25 Qwen tokens each fit). L is the next power of two >= the batch's longest
        answer (at least 16), capped here; a longer answer is truncated (no `<|im_end|>`)
        and counted as `sft/truncated`.

    Held-out evaluation during SFT is the `eval` section's, as for GRPO (`eval.every`).
    """
    c = ml_collections.ConfigDict()
    c.max_answer_len = 1024
    return c


def validate_sft(config: ml_collections.ConfigDict) -> None:
    """Checks the `sft` section. A value without effect is an error: an `sft` section that
    differs from `sft_config()` when `config.objective` is not `sft`; a key of the old SFT
    evaluation names the `eval` key that replaced it."""
    c = config.sft
    default = sft_config()
    check_keys(c, default.keys(), "sft", moved=SFT_MOVED)
    objective = config.get("objective", "sft")
    if objective != "sft":
        for key in sorted(default.keys()):
            if c.get(key) != default[key]:
                fail(f"sft.{key}", c.get(key), f"has no effect with objective={objective!r}")
    if not is_int(c.max_answer_len) or c.max_answer_len < 1:
        fail("sft.max_answer_len", c.max_answer_len, "must be an int >= 1")


def validate_run_keys(config: ml_collections.ConfigDict) -> None:
    """Checks the top-level keys `objective`, `log_rollouts`, `progress`."""
    objective = config.get("objective", "grpo")
    if objective not in OBJECTIVES:
        fail("objective", objective, f"must be one of {list(OBJECTIVES)}")
    if objective == "sft" and "sft" not in config:
        fail("objective", objective, "needs an `sft` section (sections.sft_config())")
    for key in ("log_rollouts",):
        if key in config and (not is_int(config[key]) or config[key] < 0):
            fail(key, config[key], "must be an int >= 0")
    if "progress" in config and not isinstance(config.progress, bool):
        fail("progress", config.progress, "must be True or False")


def validate_grpo(config: ml_collections.ConfigDict) -> None:
    """Checks the `grpo` section. A value without effect is an error: `epsilon_high` with
    `num_iterations == 1` (the ratio is 1 and never clipped), the reference in host memory
    when no reference parameters are held, a rollout copy that would copy nothing."""
    c = config.grpo
    g = c.num_generations
    if not is_int(g) or g < 1:
        fail("grpo.num_generations", g, "must be an int >= 1")
    if c.estimator not in ESTIMATORS:
        fail("grpo.estimator", c.estimator, f"must be one of {list(ESTIMATORS)}")
    if c.estimator in ("grpo", "rloo") and g < 2:
        fail("grpo.num_generations", g, f"must be >= 2 for estimator {c.estimator!r}")
    if not is_number(c.beta) or c.beta < 0:
        fail("grpo.beta", c.beta, "must be a number >= 0")
    if c.kl not in KL_ESTIMATORS:
        fail("grpo.kl", c.kl, f"must be one of {list(KL_ESTIMATORS)}")
    if c.aggregation not in AGGREGATIONS:
        fail("grpo.aggregation", c.aggregation, f"must be one of {list(AGGREGATIONS)}")
    if not is_number(c.epsilon) or c.epsilon < 0:
        fail("grpo.epsilon", c.epsilon, "must be a number >= 0")
    mu = c.num_iterations
    if not is_int(mu) or mu < 1:
        fail("grpo.num_iterations", mu, "must be an int >= 1")
    if c.epsilon_high is not None:
        if not is_number(c.epsilon_high) or c.epsilon_high < 0:
            fail("grpo.epsilon_high", c.epsilon_high, "must be a number >= 0 or None")
        if mu == 1:
            fail(
                "grpo.epsilon_high",
                c.epsilon_high,
                "has no effect with num_iterations=1 (the ratio is 1, never clipped)",
            )
    level = c.get("importance_level", "token")
    if level not in IMPORTANCE_LEVELS:
        fail("grpo.importance_level", level, f"must be one of {list(IMPORTANCE_LEVELS)}")
    if level != "token" and mu == 1:
        fail(
            "grpo.importance_level",
            level,
            "has no effect with num_iterations=1 (the ratio is 1: GSPO's gradient is GRPO's)",
        )
    if not is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        fail("grpo.max_new_tokens", c.max_new_tokens, "must be an int >= 1")
    if not isinstance(c.get("mask_truncated", False), bool):
        fail("grpo.mask_truncated", c.get("mask_truncated"), "must be True or False")
    overlong = (config.get("reward") or {}).get("overlong", 0)
    if is_int(overlong) and overlong > c.max_new_tokens:
        fail(
            "reward.overlong",
            overlong,
            f"must be <= grpo.max_new_tokens={c.max_new_tokens} (the penalty's window is the "
            "last reward.overlong tokens of the budget)",
        )
    if not is_number(c.temperature) or c.temperature <= 0:
        fail("grpo.temperature", c.temperature, "must be > 0 (GRPO samples)")
    if not is_int(c.top_k) or c.top_k < 0:
        fail("grpo.top_k", c.top_k, "must be an int >= 0 (0 = off)")
    if not is_number(c.top_p) or not 0 < c.top_p <= 1:
        fail("grpo.top_p", c.top_p, "must be in (0, 1]")
    memory = c.get("reference_memory", "device")
    if memory not in REFERENCE_MEMORY:
        fail("grpo.reference_memory", memory, f"must be one of {list(REFERENCE_MEMORY)}")
    if memory == "host" and (c.beta == 0 or lora_options(config)):
        fail(
            "grpo.reference_memory",
            memory,
            "has no effect: no reference parameters are held (beta = 0, or LoRA: the "
            "reference is the base model)",
        )
    copy = c.get("rollout_copy")
    if copy is not None and not isinstance(copy, bool):
        fail("grpo.rollout_copy", copy, "must be True, False or None")
    if copy and "model" in config and not narrower(config.model):
        fail(
            "grpo.rollout_copy",
            copy,
            f"has no effect: model.dtype={config.model.dtype!r} is not narrower than "
            f"model.param_dtype={config.model.param_dtype!r}",
        )


def validate_optim(config: ml_collections.ConfigDict) -> None:
    """Checks the `optim` section and `total_steps` (the learning rate decays over it)."""
    o = config.optim
    if not is_number(o.learning_rate) or o.learning_rate <= 0:
        fail("optim.learning_rate", o.learning_rate, "must be a number > 0")
    if not is_int(o.warmup_steps) or o.warmup_steps < 0:
        fail("optim.warmup_steps", o.warmup_steps, "must be an int >= 0")
    if not is_number(o.weight_decay) or o.weight_decay < 0:
        fail("optim.weight_decay", o.weight_decay, "must be a number >= 0")
    if o.grad_clip is not None and (not is_number(o.grad_clip) or o.grad_clip <= 0):
        fail("optim.grad_clip", o.grad_clip, "must be a number > 0 or None")
    acc = o.get("accumulation_steps", 1)
    if not is_int(acc) or acc < 1:
        fail("optim.accumulation_steps", acc, "must be an int >= 1")
    batch = (config.get("data") or {}).get("batch_size")
    if is_int(batch) and batch % acc:
        fail("optim.accumulation_steps", acc, f"must divide data.batch_size={batch}")
    mu_dtype = o.get("mu_dtype")
    if mu_dtype not in (None, "bfloat16"):
        fail("optim.mu_dtype", mu_dtype, "must be None (the parameters' dtype) or 'bfloat16'")
    if mu_dtype and (config.get("model") or {}).get("param_dtype") == mu_dtype:
        fail("optim.mu_dtype", mu_dtype, "has no effect: the parameters are already bfloat16")
    bad = o.get("max_bad_steps", 3)
    if bad is not None and (not is_int(bad) or bad < 1):
        fail("optim.max_bad_steps", bad, "must be an int >= 1 or None")
    total = config.get("total_steps")
    if not is_int(total) or total < 1:
        fail("total_steps", total, "must be an int >= 1 (the learning rate decays over it)")
    if o.warmup_steps > total:
        fail("optim.warmup_steps", o.warmup_steps, f"exceeds total_steps={total}")


def validate_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training checks of a config: its top-level keys and the `grpo` and `optim`
    sections when present (what the optimizer and the train step read); returns config."""
    validate_run_keys(config)
    if "grpo" in config:
        validate_grpo(config)
    if "optim" in config:
        validate_optim(config)
    return config
