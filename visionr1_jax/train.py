"""GRPO training (issue #10): the log-prob pass of the policy and the reference model.

This module holds the teacher-forced completion log-probs that the GRPO loss needs for the
policy (differentiated) and the frozen reference (`grpo.loss`'s `logps`, `old_logps`,
`ref_logps`), the GRPO and optimizer config sections (`grpo_config`, `optim_config`,
`validate_config`), the train state (`TrainState`, `init_train_state`), the optimizer
(`make_optimizer`), the jitted update (`make_train_step`) and the run: `run(config, workdir)`
= `train_loop(setup(config, workdir))` (rollout → reward → updates per batch, metrics,
checkpoints and resume through `checkpoint.Checkpointer`, SIGTERM, skipped non-finite steps).

`completion_logprobs` recomputes, for each of the B*G rollout rows (row `b*G + g` is completion
g of prompt b, as `sampler.generate` lays them out), log p(token_i | prompt_b, tokens_<i):

1. **Encode once.** The B prompts' images go through the vision tower once (not B*G times)
   and the B prompts are embedded once (`QwenVL.embed`, image tokens replaced by their image's
   embeddings) with their M-RoPE positions (`QwenVL.rope_index`).
2. **Share the prefix.** Each decoder layer runs the B prompts once (causal self-attention,
   as `QwenVL.decode`); the G completions of prompt b attend to its keys and values and to
   their own earlier tokens with one softmax over both (`_shared_layer`). Gradients of the G
   completions flow into the one prompt pass, as they would into G copies.
3. **Completions are text.** Completion tokens are embedded with the token table only
   (`embed_tokens`), so a sampled `<|image_pad|>` is never read as an image placeholder, and
   token i sits at M-RoPE position `n_valid_prompt_tokens + i + rope_delta` on all three
   axes, as the sampler fed it (Qwen2-VL paper, Sec. 2.1).
4. **Head.** The hidden state before token i (the last valid prompt position for i = 0) goes
   through `qwen_vl.chunked_logprobs` (the vocabulary head in chunks under `jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from visionr1_jax import grpo, sharding
from visionr1_jax.models import qwen_vl, rope


def completion_logprobs(
    model: qwen_vl.QwenVL,
    batch: Mapping[str, Any],
    tokens: jax.Array,
    mask: jax.Array,
    *,
    num_generations: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    image_embeds: jax.Array | None = None,
) -> jax.Array:
    """Teacher-forced log-probs of the rollout's completion tokens (see the module docstring).

    `log softmax(logits / temperature)[token]` of completion token i of row r given prompt
    `r // G` and the row's tokens before i; differentiable w.r.t. the model's parameters and
    jittable (`nnx.jit`, or `nnx.merge` inside `jax.jit`).

    Args:
      model: the policy or the reference (`QwenVL`).
      batch: the B prompts as `sampler.generate` took them: input_ids i32[B, T],
        attention_mask i32[B, T] (any padding side; None or absent = all valid), and the
        images per row (pixel_values f32[B, S, F], image_grid_thw i32[B, 3], zeros = none) or
        packed (f32[P, F], i32[I, 3]); no pixel_values (or an empty array) = text only.
      tokens: i32[B*G, L] completion tokens (row `b*G + g` is completion g of prompt b).
      mask: bool[B*G, L] tokens to score. It only zeroes outputs: every completion token is
        context for the tokens after it, as in the rollout (with the sampler's prefix masks
        this is the same as dropping the masked tail).
      num_generations: G (static).
      temperature: the sampling temperature (static; logits are divided by it).
      chunk_size: positions per vocabulary-head chunk (`qwen_vl.chunked_logprobs`).
      image_embeds: the B prompts' image features (`model.encode_images` of the batch's
        images); given, the vision tower does not run (policy and reference share a frozen
        tower's features this way).
    Returns:
      f32[B*G, L], 0 where `mask` is False.
    """
    cfg = model.cfg
    rules = cfg.logical_axis_rules
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    b, t = ids.shape
    r, big_l = tokens.shape
    g = int(num_generations)
    if r != b * g:
        raise ValueError(f"tokens has {r} rows, expected B * G = {b} * {g}")
    prompt_mask = batch.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = jnp.ones((b, t), jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    pixels = batch.get("pixel_values")
    grid = batch.get("image_grid_thw")
    has_images = pixels is not None and pixels.size > 0
    per_row = has_images and pixels.ndim == 3
    if not has_images:
        grid = jnp.zeros((0, 3), jnp.int32)
    grid = jnp.asarray(grid, jnp.int32)

    # 1. The B prompts: images encoded once, embedded once, their positions and rope deltas.
    if not has_images:
        emb = None
    elif image_embeds is not None:
        emb = image_embeds
    else:
        emb = model.encode_images(pixels, grid)
    x_p = model.embed(ids, emb, grid if has_images else None, prompt_mask)  # [B, T, D]
    pos_p, delta = model.rope_index(ids, grid, prompt_mask, per_row)  # [3, B, T], [B, 1]

    # 3. Completion tokens as text, at n_valid_prompt_tokens + i + rope_delta.
    tokens = jnp.asarray(tokens, jnp.int32)
    x_c = model.model.embed_tokens(tokens)  # [R, L, D]
    first = jnp.repeat(prompt_mask.sum(1) + delta[:, 0], g)  # [R] position of token 0
    pos_c = jnp.broadcast_to((first[:, None] + jnp.arange(big_l))[None], (3, r, big_l))

    # 2. The decoder, prompt once per group.
    h_p, h_c = _decode_shared(model, x_p, pos_p, prompt_mask.astype(bool), x_c, pos_c)

    # 4. Token i is predicted by the hidden state before it.
    last = jnp.max(jnp.where(prompt_mask.astype(bool), jnp.arange(t)[None], 0), axis=1)  # [B]
    h_last = jnp.take_along_axis(h_p, last[:, None, None], axis=1)  # [B, 1, D]
    hidden = jnp.concatenate([jnp.repeat(h_last, g, axis=0), h_c[:, :-1]], axis=1)
    hidden = sharding.constrain(hidden, ("batch", "length", "act_embed"), rules)
    lp = qwen_vl.chunked_logprobs(
        model, hidden, tokens, chunk_size=chunk_size, temperature=temperature
    )
    return jnp.where(mask, lp, 0.0)


def _decode_shared(
    model: qwen_vl.QwenVL,
    x_p: jax.Array,
    pos_p: jax.Array,
    valid_p: jax.Array,
    x_c: jax.Array,
    pos_c: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`QwenVL.decode` of prompt + completion with the prompt run once per group.

    Args:
      x_p: f32[B, T, D] prompt embeddings; pos_p: i32[3, B, T]; valid_p: bool[B, T].
      x_c: f32[B*G, L, D] completion embeddings; pos_c: i32[3, B*G, L].
    Returns:
      final-norm hidden states f32[B, T, D] (prompts) and f32[B*G, L, D] (completions).
    """
    cfg = model.cfg
    cos_p, sin_p = rope.mrope_cos_sin(pos_p, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    cos_c, sin_c = rope.mrope_cos_sin(pos_c, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    x_p, x_c = qwen_vl.run_layers(
        model.model.layers,
        _shared_layer,
        (x_p, x_c),
        cos_p,
        sin_p,
        cos_c,
        sin_c,
        valid_p,
        remat_policy=cfg.remat_policy,
        scan=cfg.scan_layers,
        dtype=cfg.dtype,
    )
    return model.model.norm(x_p), model.model.norm(x_c)


def _shared_layer(layer, carry, cos_p, sin_p, cos_c, sin_c, valid_p):
    """One `DecoderLayer` over B prompts [B, T, D] and their B*G completions [B*G, L, D].

    The prompts attend causally to themselves (`qwen_vl.causal_attention`, as `decode`);
    completion query i of row r attends to prompt `r // G`'s valid keys and to the row's own
    keys 0..i, with one float32 softmax over both (the model's `_attention`; the prompt keys
    and values are repeated G times, the prompt's queries, MLP and projections are not), so
    the result equals attention over `concat(prompt, completion)`. `carry` is `(x_p, x_c)`,
    returned updated.
    """
    x_p, x_c = carry
    attn = layer.self_attn
    cfg = attn.cfg
    rules = cfg.logical_axis_rules
    b, t, _ = x_p.shape
    r, big_l, _ = x_c.shape
    g = r // b
    hd = cfg.head_dim
    scale = hd**-0.5

    def qkv(x, cos, sin):
        n, s, _ = x.shape
        q = attn.q_proj(x).reshape(n, s, cfg.num_heads, hd)
        k = attn.k_proj(x).reshape(n, s, cfg.num_kv_heads, hd)
        v = attn.v_proj(x).reshape(n, s, cfg.num_kv_heads, hd)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None), rules)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        return q, k.astype(q.dtype), v.astype(q.dtype)

    q_p, k_p, v_p = qkv(layer.input_layernorm(x_p), cos_p, sin_p)
    q_c, k_c, v_c = qkv(layer.input_layernorm(x_c), cos_c, sin_c)
    o_p = qwen_vl.causal_attention(q_p, k_p, v_p, valid_p, scale)  # [B, T, H, hd]

    # Completion queries in blocks [lo, hi) that see the prompt and completion keys [0, hi).
    k_all = jnp.concatenate([jnp.repeat(k_p, g, axis=0), k_c], axis=1)  # [R, T + L, KV, hd]
    v_all = jnp.concatenate([jnp.repeat(v_p, g, axis=0), v_c], axis=1)
    prompt_keys = jnp.repeat(valid_p, g, axis=0)[:, None, None, :]  # [R, 1, 1, T]
    chunk = max(qwen_vl.CAUSAL_CHUNK, -(-big_l // qwen_vl.CAUSAL_MAX_CHUNKS))
    outs = []
    for lo in range(0, big_l, chunk):
        hi = min(lo + chunk, big_l)
        causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]  # [hi - lo, hi]
        m = jnp.concatenate(
            [
                jnp.broadcast_to(prompt_keys, (r, 1, hi - lo, t)),
                jnp.broadcast_to(causal[None, None], (r, 1, hi - lo, hi)),
            ],
            axis=-1,
        )
        outs.append(
            qwen_vl._attention(q_c[:, lo:hi], k_all[:, : t + hi], v_all[:, : t + hi], m, scale)
        )
    o_c = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # [R, L, H, hd]

    names = ("batch", "length", "act_embed")
    out = []
    for x, o in ((x_p, o_p), (x_c, o_c)):
        n, s, _ = x.shape
        x = x + attn.o_proj(o.astype(x.dtype).reshape(n, s, cfg.num_heads * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        out.append(sharding.constrain(x, names, rules))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Config sections


OBJECTIVES = ("grpo", "sft")


def grpo_config() -> ml_collections.ConfigDict:
    """The `grpo` config section with the released Vision-R1 script's values (SPEC §5).

    Fields: `num_generations` G (4); `beta` the KL coefficient β (0.04, TRL's default that the
    release kept; the paper says 0.2); `kl` the estimator (`k3`); `epsilon` / `epsilon_high`
    the clip range ε_low / ε_high (0.2, TRL's default / None = ε_low); `aggregation`
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
    c.aggregation = "seq-mean-token-mean"
    c.estimator = "grpo"
    c.num_iterations = 1
    c.max_new_tokens = 512
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


REFERENCE_MEMORY = ("device", "host")


def reference_on_host(config: ml_collections.ConfigDict) -> bool:
    """`grpo.reference_memory == "host"`: the reference parameters live in pinned host
    memory."""
    return (config.get("grpo") or {}).get("reference_memory", "device") == "host"


def _on_device(tree: Any) -> Any:
    """Inside a jitted program: `tree`'s arrays in device memory (a no-op for those already
    there), same shardings."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def _narrower(model: ml_collections.ConfigDict) -> bool:
    return jnp.dtype(model.dtype).itemsize < jnp.dtype(model.param_dtype).itemsize


def rollout_dtype(config: ml_collections.ConfigDict) -> Any:
    """The dtype of the weight copy the rollout samples from (`grpo.rollout_copy`), or None:
    the master weights."""
    copy = (config.get("grpo") or {}).get("rollout_copy")
    model = config.get("model")
    if model is None or copy is False or not _narrower(model):
        return None
    return jnp.dtype(model.dtype)


def make_rollout_copy(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
    """Jitted `(params, frozen) -> (params, frozen)` copy in `rollout_dtype(config)` with each
    array's sharding (the sampler's program is keyed on them), or None when the rollout reads
    the master weights. Frozen weights are copied too (under LoRA they are the base model,
    which every decoding step reads)."""
    dtype = rollout_dtype(config)
    if dtype is None:
        return None
    cast = functools.partial(qwen_vl.cast_matrices, dtype=dtype)  # one function: jit's cache hits

    def copy(tree: Any) -> Any:
        return jax.jit(cast, out_shardings=shardings_of(tree))(tree)

    return copy


def rollout_shapes_of(config: ml_collections.ConfigDict, params: Any) -> Any:
    """The abstract (`ShapeDtypeStruct`) parameters the rollout samples from: the
    `make_rollout_copy` of `params` (a tree of arrays or of abstract values), or `params`
    themselves."""
    dtype = rollout_dtype(config)

    def one(x):
        cast = dtype is not None and qwen_vl.is_matrix(x)
        return jax.ShapeDtypeStruct(x.shape, dtype if cast else x.dtype, sharding=x.sharding)

    return jax.tree.map(one, params)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `grpo` and `optim` sections (when present) and `total_steps`; returns config.

    A value without effect is an error: `epsilon_high` with `num_iterations == 1` (the ratio is
    1 and never clipped).
    """

    def fail(key: str, value: Any, why: str) -> None:
        raise ValueError(f"{key}={value!r} {why}")

    objective = config.get("objective", "grpo")
    if objective not in OBJECTIVES:
        fail("objective", objective, f"must be one of {list(OBJECTIVES)}")
    if objective == "sft" and "sft" not in config:
        fail("objective", objective, "needs an `sft` section (sft.sft_config())")
    for key in ("log_rollouts",):
        if key in config and (not _is_int(config[key]) or config[key] < 0):
            fail(key, config[key], "must be an int >= 0")
    if "progress" in config and not isinstance(config.progress, bool):
        fail("progress", config.progress, "must be True or False")
    if "grpo" in config:
        c = config.grpo
        g = c.num_generations
        if not _is_int(g) or g < 1:
            fail("grpo.num_generations", g, "must be an int >= 1")
        if c.estimator not in grpo.ESTIMATORS:
            fail("grpo.estimator", c.estimator, f"must be one of {list(grpo.ESTIMATORS)}")
        if c.estimator in ("grpo", "rloo") and g < 2:
            fail("grpo.num_generations", g, f"must be >= 2 for estimator {c.estimator!r}")
        if not _is_number(c.beta) or c.beta < 0:
            fail("grpo.beta", c.beta, "must be a number >= 0")
        if c.kl not in grpo.KL_ESTIMATORS:
            fail("grpo.kl", c.kl, f"must be one of {list(grpo.KL_ESTIMATORS)}")
        if c.aggregation not in grpo.AGGREGATIONS:
            fail("grpo.aggregation", c.aggregation, f"must be one of {list(grpo.AGGREGATIONS)}")
        if not _is_number(c.epsilon) or c.epsilon < 0:
            fail("grpo.epsilon", c.epsilon, "must be a number >= 0")
        mu = c.num_iterations
        if not _is_int(mu) or mu < 1:
            fail("grpo.num_iterations", mu, "must be an int >= 1")
        if c.epsilon_high is not None:
            if not _is_number(c.epsilon_high) or c.epsilon_high < 0:
                fail("grpo.epsilon_high", c.epsilon_high, "must be a number >= 0 or None")
            if mu == 1:
                fail(
                    "grpo.epsilon_high",
                    c.epsilon_high,
                    "has no effect with num_iterations=1 (the ratio is 1, never clipped)",
                )
        if not _is_int(c.max_new_tokens) or c.max_new_tokens < 1:
            fail("grpo.max_new_tokens", c.max_new_tokens, "must be an int >= 1")
        if not _is_number(c.temperature) or c.temperature <= 0:
            fail("grpo.temperature", c.temperature, "must be > 0 (GRPO samples)")
        if not _is_int(c.top_k) or c.top_k < 0:
            fail("grpo.top_k", c.top_k, "must be an int >= 0 (0 = off)")
        if not _is_number(c.top_p) or not 0 < c.top_p <= 1:
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
        if copy and "model" in config and not _narrower(config.model):
            fail(
                "grpo.rollout_copy",
                copy,
                f"has no effect: model.dtype={config.model.dtype!r} is not narrower than "
                f"model.param_dtype={config.model.param_dtype!r}",
            )
    if "optim" in config:
        o = config.optim
        if not _is_number(o.learning_rate) or o.learning_rate <= 0:
            fail("optim.learning_rate", o.learning_rate, "must be a number > 0")
        if not _is_int(o.warmup_steps) or o.warmup_steps < 0:
            fail("optim.warmup_steps", o.warmup_steps, "must be an int >= 0")
        if not _is_number(o.weight_decay) or o.weight_decay < 0:
            fail("optim.weight_decay", o.weight_decay, "must be a number >= 0")
        if o.grad_clip is not None and (not _is_number(o.grad_clip) or o.grad_clip <= 0):
            fail("optim.grad_clip", o.grad_clip, "must be a number > 0 or None")
        acc = o.get("accumulation_steps", 1)
        if not _is_int(acc) or acc < 1:
            fail("optim.accumulation_steps", acc, "must be an int >= 1")
        batch = (config.get("data") or {}).get("batch_size")
        if _is_int(batch) and batch % acc:
            fail("optim.accumulation_steps", acc, f"must divide data.batch_size={batch}")
        mu_dtype = o.get("mu_dtype")
        if mu_dtype not in (None, "bfloat16"):
            fail("optim.mu_dtype", mu_dtype, "must be None (the parameters' dtype) or 'bfloat16'")
        if mu_dtype and (config.get("model") or {}).get("param_dtype") == mu_dtype:
            fail("optim.mu_dtype", mu_dtype, "has no effect: the parameters are already bfloat16")
        bad = o.get("max_bad_steps", 3)
        if bad is not None and (not _is_int(bad) or bad < 1):
            fail("optim.max_bad_steps", bad, "must be an int >= 1 or None")
        total = config.get("total_steps")
        if not _is_int(total) or total < 1:
            fail("total_steps", total, "must be an int >= 1 (the learning rate decays over it)")
        if o.warmup_steps > total:
            fail("optim.warmup_steps", o.warmup_steps, f"exceeds total_steps={total}")
    return config


# --------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """lr(step) of HF's `get_linear_schedule_with_warmup`: `lr · s / W` for s < W, then
    `lr · (T − s) / (T − W)` down to 0 at T = `total_steps` (W = `optim.warmup_steps`)."""
    o = config.optim
    lr, warm, total = float(o.learning_rate), int(o.warmup_steps), int(config.total_steps)
    decay = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (ndim >= 2): HF `Trainer` exempts biases and norm
    weights (`get_decay_parameter_names`), which are this model's 1-D parameters."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW as the reference's HF `Trainer` runs it (SPEC §5, `optim_config`).

    `clip_by_global_norm(grad_clip)` then `adamw(learning_rate_schedule, b1=0.9, b2=0.999,
    eps=1e-8, weight_decay, mask=matrices)`: torch's AdamW (decoupled decay `lr·wd·p`) after
    `clip_grad_norm_`, with the linear schedule stepped once per optimizer step.
    """
    validate_config(config)
    o = config.optim
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=float(o.weight_decay),
        mask=_decay_mask,
        mu_dtype=o.get("mu_dtype"),
    )
    if o.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), adamw)


# --------------------------------------------------------------------------------------------
# Train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a train step reads and updates; the model's graph definition stays outside
    (static, `nnx.GraphDef`, returned by `init_train_state`).

    Attributes:
      params: the trainable parameters (`nnx.State`); only these get gradients and optimizer
        state.
      frozen: parameters that never change (`nnx.State`): the vision tower under
        `model.freeze_vision_tower`, else empty. Policy and reference share them.
      opt_state: the optax state of `params`.
      step: i32[] optimizer steps taken.
      rng: the run's PRNG key (per-step keys are `fold_in(rng, step)`; the update itself
        draws none and carries it unchanged).
      ref_params: the frozen reference, a copy of the start `params` with their shardings;
        under `model.lora` the adapters zeroed (the reference is the base model, whose weights
        `frozen` already holds: no second copy); None when β = 0 (no reference tree is held
        and no reference forward runs).
    """

    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    ref_params: nnx.State | None


def frozen_filter(config: ml_collections.ConfigDict) -> Any:
    """The nnx filter of parameters that are not trained: every parameter but the adapters
    under `model.lora` (rank > 0); the vision tower (`visual`) when
    `config.model.freeze_vision_tower` is set; else nothing."""
    model_cfg = config.get("model") or {}
    if lora_options(config):
        return nnx.All(nnx.Param, nnx.Not(qwen_vl.LoRAParam))
    if model_cfg.get("freeze_vision_tower", False):
        return nnx.All(nnx.Param, nnx.PathContains("visual"))
    return nnx.Nothing


def init_train_state(
    model: qwen_vl.QwenVL,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    *,
    beta: float | None = None,
    abstract: bool = False,
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` into its graph definition and a fresh `TrainState`.

    Args:
      model: the policy at its start checkpoint (its parameters keep their shardings).
      config: the run config (`grpo`, `optim`, `total_steps`, `model.freeze_vision_tower`).
      rng: a PRNG key.
      beta: the KL coefficient (None: `config.grpo.beta`); with 0 no reference tree is made,
        else `ref_params` is a copy of the trainable start parameters (same shardings).
      abstract: the optimizer state and the reference as `jax.ShapeDtypeStruct`s with the
        shardings the concrete ones get (nothing allocated), to compile the train step
        before they exist; the other fields are the concrete arrays.
    Returns:
      `(graphdef, state)`: `nnx.merge(graphdef, state.params, state.frozen)` is the policy.
      The state holds the model's own arrays, which the first (donating) step consumes: use
      the merged state afterwards, not `model`. The optimizer's moments have their
      parameter's sharding (FSDP/tensor layout), its counters are replicated.
    """
    validate_config(config)
    beta = float(config.grpo.beta if beta is None else beta)
    graphdef, frozen, params = nnx.split(model, frozen_filter(config), ...)
    optimizer = make_optimizer(config)
    opt_sharding = _opt_shardings(optimizer, params)
    step = jnp.zeros((), jnp.int32)
    host = reference_on_host(config) and beta != 0
    ref_sharding = lambda p: p.sharding.with_memory_kind("pinned_host") if host else p.sharding
    if abstract:
        sds = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        opt_state = jax.tree.map(sds, jax.eval_shape(optimizer.init, params), opt_sharding)
        ref = jax.tree.map(lambda p: sds(p, ref_sharding(p)), params) if beta != 0 else None
        return graphdef, TrainState(params, frozen, opt_state, step, rng, ref)
    if opt_sharding is None:
        opt_state = optimizer.init(params)
    else:
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sharding)(params)
    # LoRA: adapters off (zero: the adapted layers add exactly 0) is the base model.
    start = jnp.zeros_like if lora_options(config) else jnp.copy
    ref = jax.tree.map(start, params) if beta != 0 else None
    if host:  # `grpo.reference_memory = "host"`: kept in pinned host memory between uses
        ref = jax.tree.map(lambda r, p: jax.device_put(r, ref_sharding(p)), ref, params)
    return graphdef, TrainState(params, frozen, opt_state, step, rng, ref)


def _opt_shardings(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """Shardings of `optimizer.init(params)`: each per-parameter tree (Adam's moments) as the
    parameters, other leaves (counters) replicated; None when the parameters are not laid out
    on a mesh (`NamedSharding`)."""
    leaves = jax.tree.leaves(params)
    if not leaves or not all(isinstance(x.sharding, NamedSharding) for x in leaves):
        return None
    replicated = NamedSharding(leaves[0].sharding.mesh, PartitionSpec())
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, p: p.sharding,
        jax.eval_shape(optimizer.init, params),
        params,
        transform_non_params=lambda _: replicated,
    )


# --------------------------------------------------------------------------------------------
# Train step


def sft_loss(logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised cross-entropy on the target tokens: `−Σ mask·logp / Σ mask` (the token mean
    of HF's `CrossEntropyLoss` over label tokens). logps, mask: [R, L]. aux: `num_tokens`."""
    m = mask.astype(jnp.float32)
    n = m.sum()
    return -(logps * m).sum() / jnp.maximum(n, 1.0), {"num_tokens": n}


def make_logprob_fn(
    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict
) -> Callable[..., jax.Array]:
    """Jitted `logps(params, frozen, batch, tokens, mask) -> f32[B*G, L]`: the teacher-forced
    `completion_logprobs` of `nnx.merge(graphdef, params, frozen)` at `grpo.temperature`
    (G = rows of tokens / rows of the batch). The loop uses it for the old log-probs of μ > 1
    (the policy before the rollout's first update) and the reference's once per rollout."""
    temperature = float(config.grpo.temperature) if "grpo" in config else 1.0
    chunk = (config.get("model") or {}).get("logprob_chunk")
    host = reference_on_host(config)

    def logps(params, frozen, batch, tokens, mask):
        model = nnx.merge(graphdef, _on_device(params) if host else params, frozen)
        g = tokens.shape[0] // batch["input_ids"].shape[0]
        return completion_logprobs(
            model, batch, tokens, mask, num_generations=g, temperature=temperature,
            chunk_size=chunk,
        )  # fmt: skip

    return jax.jit(logps)


def make_train_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    *,
    objective: str = "grpo",
    state_sharding: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted update, compiled once per input shape (state donated).

    `state_sharding`: the `TrainState`'s shardings (`jax.tree.map(lambda x: x.sharding,
    state)`); given, the state comes out with exactly these (out shardings; it goes in with
    them, as committed arrays, and is donated), so the parameters keep their FSDP/tensor
    layout and the sampler's program, keyed on it, is never recompiled after an update.
    None: XLA chooses the output layout.

    `objective`: `grpo` (below) or `sft`, supervised fine-tuning on target tokens (`tokens`
    are the answers, one row per prompt, `mask` the answer tokens; the loss is `sft_loss` of
    the policy's log-probs at temperature 1; `advantages`, `old_logps`, `ref_logps` unused).

    `train_step(state, batch, tokens, mask, advantages, old_logps=None, ref_logps=None)
    -> (state, metrics)`:

    1. reference log-probs: `ref_logps` when given (the loop computes them once per rollout,
       as their own timed phase), else (β > 0) the reference's teacher-forced
       `completion_logprobs` at the sampling temperature inside the step (a frozen tower's
       features then shared with the policy pass); with β = 0 no reference forward;
    2. policy log-probs `completion_logprobs(policy, ...)` at `grpo.temperature`, and
       `grpo.loss(logps, old_logps, ref_logps, advantages, mask, β, ε, ε_high, kl,
       aggregation)` with its gradient w.r.t. `state.params` (frozen parameters get none);
    3. the optax update (`make_optimizer`) and `step + 1`; when the loss or the gradients
       hold a NaN or Inf the parameters and the optimizer state stay as they were (a skipped
       step, `bad_step` = 1; the step still counts).

    Args of `train_step`:
      state: `TrainState` (donated: do not reuse the argument).
      batch: the B prompts, the arrays `completion_logprobs` reads (input_ids i32[B, T],
        attention_mask, pixel_values, image_grid_thw).
      tokens: i32[B*G, L] completion tokens; mask: bool[B*G, L] tokens scored.
      advantages: f32[B*G].
      old_logps: f32[B*G, L] or None (μ = 1: ratio ≡ 1).
      ref_logps: f32[B*G, L] or None (computed from `state.ref_params` when β > 0).
    Metrics (f32[]): `loss`, `grad_norm` (before clipping), `learning_rate` (of this step),
    `bad_step` (1: skipped) and `grpo.loss`'s aux (`kl` when β > 0, clip fractions, ratio stats).

    `optim.accumulation_steps` = k > 1: stages 1-2 run over k micro-batches of B/k prompts
    under `lax.scan` and the gradients are summed with the weights that make the result the
    full batch's (`accumulated`); one optimizer update. Aux metrics are the same weighted sums
    (exact for means over tokens or rows, a weighted mean of micro-batch extremes for
    `ratio_min`/`ratio_max`).

    With `model.freeze_vision_tower` and β > 0 the tower runs once per step on the B images
    and the policy and reference passes share its features; with a trained tower each pass
    runs it (the policy's tower moves away from the reference's).
    """
    validate_config(config)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
    sft = objective == "sft"
    c = config.grpo if "grpo" in config else grpo_config()  # SFT reads none of it
    beta = 0.0 if sft else float(c.beta)
    use_kl = beta != 0
    loss_kwargs = dict(
        beta=beta,
        epsilon=float(c.epsilon),
        epsilon_high=None if c.epsilon_high is None else float(c.epsilon_high),
        kl=c.kl,
        aggregation=c.aggregation,
    )
    temperature = 1.0 if sft else float(c.temperature)
    chunk = (config.get("model") or {}).get("logprob_chunk")
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)

    frozen_tower = frozen_filter(config) is not nnx.Nothing

    def logps_of(params, frozen, batch, tokens, mask, emb=None):
        model = nnx.merge(graphdef, params, frozen)
        g = tokens.shape[0] // batch["input_ids"].shape[0]
        return completion_logprobs(
            model, batch, tokens, mask, num_generations=g, temperature=temperature,
            chunk_size=chunk, image_embeds=emb,
        )  # fmt: skip

    def shared_features(state, batch):
        """A frozen tower's features of the B images, computed once for both passes."""
        pixels = batch.get("pixel_values")
        if not frozen_tower or pixels is None or pixels.size == 0:
            return None
        model = nnx.merge(graphdef, state.params, state.frozen)
        grid = jnp.asarray(batch["image_grid_thw"], jnp.int32)
        return jax.lax.stop_gradient(model.encode_images(pixels, grid))

    k = int((config.get("optim") or {}).get("accumulation_steps", 1) or 1)
    token_weighted = sft or c.aggregation == "token-mean"

    def micro_grads(params, state, batch, tokens, mask, advantages, old_logps, ref_logps):
        """Loss, aux and gradient of one (micro-)batch (stages 1 and 2)."""
        # 1. reference (a frozen tower's image features are shared with the policy pass)
        emb = None
        if use_kl and ref_logps is None:
            if state.ref_params is None:
                raise ValueError("grpo.beta > 0 needs ref_params or ref_logps")
            emb = shared_features(state, batch)
            ref = _on_device(state.ref_params) if reference_on_host(config) else state.ref_params
            ref_logps = jax.lax.stop_gradient(logps_of(ref, state.frozen, batch, tokens, mask, emb))

        # 2. policy loss and gradient
        def loss_fn(params):
            logps = logps_of(params, state.frozen, batch, tokens, mask, emb)
            if sft:
                return sft_loss(logps, mask)
            ref = ref_logps if use_kl else None
            return grpo.loss(logps, old_logps, ref, advantages, mask, **loss_kwargs)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated(state, batch, tokens, mask, advantages, old_logps, ref_logps):
        """Stages 1-2 over k micro-batches of B/k prompts (and their completions) under
        `lax.scan`, gradients summed with the weights that make the sum the full batch's:
        each micro-batch's share of the scored tokens for token means (`token-mean`, SFT),
        1/k for the per-sequence aggregations (equal rows and length per micro-batch)."""
        b = batch["input_ids"].shape[0]
        if b % k:
            raise ValueError(f"optim.accumulation_steps={k} does not divide the {b} prompts")
        if batch.get("pixel_values") is not None and batch["pixel_values"].ndim != 3:
            raise ValueError("gradient accumulation needs per-row images (pixel_values [B,S,F])")
        split = lambda x: None if x is None else x.reshape(k, x.shape[0] // k, *x.shape[1:])
        rows = {key: split(jnp.asarray(v)) for key, v in batch.items() if jnp.ndim(v) >= 1}
        xs = (rows, split(tokens), split(mask), split(advantages), split(old_logps),
              split(ref_logps))  # fmt: skip
        counts = jnp.sum(xs[2], axis=(1, 2), dtype=jnp.float32)
        weights = counts / jnp.maximum(counts.sum(), 1.0) if token_weighted else jnp.full(k, 1 / k)

        def body(carry, inp):
            (w, (mb, tok, m, adv, old, ref)) = inp
            (value, aux), grads = micro_grads(state.params, state, mb, tok, m, adv, old, ref)
            add = lambda acc, x: acc + w * x
            return jax.tree.map(add, carry, ((value, aux), grads)), None

        zero = jax.eval_shape(
            lambda: micro_grads(state.params, state, *jax.tree.map(lambda x: x[0], xs))
        )
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)
        out, _ = jax.lax.scan(body, zero, (weights, xs))
        return out

    def train_step(state, batch, tokens, mask, advantages=None, old_logps=None, ref_logps=None):
        args = (batch, tokens, mask, advantages, old_logps, ref_logps)
        if k == 1:
            (value, aux), grads = micro_grads(state.params, state, *args)
        else:
            (value, aux), grads = accumulated(state, *args)

        # 3. update, unless the loss or a gradient is not finite (then a skipped step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "bad_step": 1.0 - finite.astype(jnp.float32),
            **aux,
        }
        new = dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)
        return new, metrics

    if state_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None))


# --------------------------------------------------------------------------------------------
# The RL loop


@dataclasses.dataclass
class Run:
    """What the loop holds across steps, built once by `setup`.

    Attributes:
      config: the validated run config; workdir: where metrics (and later checkpoints) go.
      mesh: the device mesh (`config.mesh`).
      graphdef: the model's static graph; `nnx.merge(graphdef, state.params, state.frozen)`
        is the policy.
      state: the `TrainState` (replaced after every update; the old one is donated).
      processor: the checkpoint's processor (tokenizer + image processor).
      pipe: the device-prefetching input pipeline (`data.pipeline.DevicePrefetch`).
      train_step: `make_train_step(graphdef, config, objective=config.objective)`.
      logprob_fn: `make_logprob_fn` (old and reference log-probs once per rollout, μ > 1).
      reward_fn: the jitted reward of `config.reward` (`rewards.make_reward_fn`; None
        without a reward section, as SFT may run).
      eos_ids: the checkpoint's stop ids (a completion without one at its end is truncated).
      score_fn: `(run, host_batch, completions, step) -> per-row terms` (None: `score_rows`,
        the Vision-R1 reward); must give `reward/total` and `valid`.
      memory: the GRPO train step's compiled `memory_analysis()` (logged at start-up;
        SFT: at its first call).
      checkpointer: the run's `checkpoint.Checkpointer` (None without a `checkpoint`
        section: nothing is saved).
      resumed_from: the checkpoint step the run resumed from (None: a fresh start).
      term: the `TermSignal` installed first thing in `setup` (a SIGTERM during start-up
        stops the run after its first iteration, saved).
      renderings: step -> {name: uint8[H, W, 3]} rendered completions (`render_rollout`,
        every `metrics.render_every` steps) not yet written by the loop.
      rollout_copy: `make_rollout_copy(config)`: the weights the rollout samples from, made
        from the state's parameters once per rollout (None: the master weights).
    """

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: TrainState
    processor: Any
    pipe: Any
    train_step: Callable[..., Any]
    logprob_fn: Callable[..., jax.Array]
    reward_fn: Callable[..., Any]
    eos_ids: tuple[int, ...]
    score_fn: Callable[..., dict[str, np.ndarray]] | None = None
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpointer: Any = None
    resumed_from: int | None = None
    term: Any = None
    renderings: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    rollout_copy: Callable[[Any], Any] | None = None

    @property
    def policy(self) -> qwen_vl.QwenVL:
        """The current policy as a module (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state.params, self.state.frozen)

    def sampling_policy(self) -> qwen_vl.QwenVL:
        """The policy the rollout samples from: `policy`, with its weight matrices copied to
        `model.dtype` first when `rollout_copy` is set (same tokens, fewer bytes per step)."""
        if self.rollout_copy is None:
            return self.policy
        params, frozen = self.rollout_copy((self.state.params, self.state.frozen))
        return nnx.merge(self.graphdef, params, frozen)


def checkpoint_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`model.checkpoint`, or (empty) a tiny checkpoint `model.tiny` written once under
    `<workdir>/tiny_checkpoint` with `model.tokenizer` and the data's pixel bounds."""
    import os

    from visionr1_jax.models import tiny

    m = config.model
    if m.checkpoint:
        return str(m.checkpoint)
    path = os.path.join(workdir, "tiny_checkpoint")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(path, "config.json")):
        tiny.write_tiny_checkpoint(
            path + ".tmp",
            m.tiny,
            tokenizer=m.tokenizer,
            seed=int(config.seed),
            min_pixels=int(config.data.min_pixels),
            max_pixels=int(config.data.max_pixels),
        )
        os.replace(path + ".tmp", path)  # never a half-written checkpoint
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tiny_checkpoint")
    return path


def load_model(
    config: ml_collections.ConfigDict, path: str, mesh: jax.sharding.Mesh
) -> qwen_vl.QwenVL:
    """The Hugging Face checkpoint `path` as the run's model (`model.param_dtype`,
    `model.dtype`, `model.remat_policy`, the data's image-patch bound) sharded over `mesh`
    (call it under `jax.set_mesh(mesh)`)."""
    from visionr1_jax import config_lib
    from visionr1_jax.models import hf_weights

    m = config.model
    return hf_weights.from_pretrained(
        path,
        dtype=jnp.dtype(m.param_dtype),
        compute_dtype=jnp.dtype(m.dtype),
        mesh=mesh,
        remat_policy=m.remat_policy,
        scan_layers=bool(m.get("scan_layers", False)),
        max_image_patches=config_lib.max_image_patches(config),
        **lora_options(config),
    )


def lora_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`model.lora` as `hf_weights.from_pretrained` keywords (empty when off or absent)."""
    lora = (config.get("model") or {}).get("lora")
    if not lora or not lora.get("rank"):
        return {}
    return dict(
        lora_rank=int(lora.rank),
        lora_alpha=float(lora.alpha),
        lora_targets=tuple(lora.targets),
        lora_seed=int(lora.get("seed", 0)),
    )


def make_run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of `config.mesh`. A fully specified mesh (no -1) smaller than the devices of a
    single process uses the first devices (a 1-device reference run on an 8-device host);
    multi-process runs must use every device."""
    ici, dcn = config.mesh.ici_parallelism, config.mesh.dcn_parallelism
    size = int(np.prod([*ici, *dcn]))
    devices = jax.devices()
    if -1 not in ici and jax.process_count() == 1 and size < len(devices):
        devices = devices[:size]
    return sharding.make_mesh(ici, dcn, devices=devices)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Validates the config, builds the mesh, loads the policy (and reference), the processor,
    the input pipeline and the reward; nothing is compiled before the config is validated."""
    import os

    from visionr1_jax import checkpoint, config_lib, host, processing, rewards, sampler
    from visionr1_jax.data import pipeline

    config_lib.validate(config)
    term = TermSignal()
    if config.get("objective", "grpo") == "grpo" and "reward" not in config:
        raise ValueError("objective='grpo' needs a `reward` section (rewards.default_config())")
    if "sft" in config and config.sft.eval_every and jax.process_count() > 1:
        raise ValueError("sft.eval_every > 0 evaluates on one process; set it to 0 on multi-host")
    if jax.default_backend() == "cpu":
        host.keep_freed_memory()
    host.watch_compiles(release_memory=jax.default_backend() == "cpu")
    mesh = make_run_mesh(config)
    path = checkpoint_path(config, workdir)
    m = config.model
    with jax.set_mesh(mesh):
        model = load_model(config, path, mesh)
        objective = config.get("objective", "grpo")
        beta = 0.0 if objective == "sft" else None
        key = jax.random.key(int(config.seed))
        graphdef, abstract = init_train_state(model, config, key, beta=beta, abstract=True)
    processor = processing.load_processor(path)
    ckpt = checkpoint.Checkpointer(workdir, config) if "checkpoint" in config else None
    resume = ckpt.latest_step() if ckpt is not None and config.checkpoint.resume else None
    inner = pipeline.InputPipeline(config.data, processor)
    if resume is not None:
        inner.set_state(ckpt.restore_data(resume))  # before the prefetch thread reads on
    pipe = pipeline.DevicePrefetch(inner, mesh)
    train_step = make_train_step(
        graphdef, config, objective=objective, state_sharding=shardings_of(abstract)
    )
    memory = {}
    if objective == "grpo":
        # Compiled before the optimizer state and the reference exist: XLA's working memory
        # (~0.6 GB for the tiny model on CPU) never coexists with them. The first batch's
        # shapes; the loop's call reuses the executable.
        with jax.set_mesh(mesh):
            args = rollout_shapes(config, mesh, pipe.peek().arrays)
            memory = log_memory("train_step", train_step, abstract, *args)
    if m.get("init_from") and resume is None:  # resuming: the checkpoint holds the reference
        from absl import logging

        _, _, start = nnx.split(model, frozen_filter(config), ...)
        loaded, at = checkpoint.load_params(m.init_from, m.get("init_step"), start)
        nnx.update(model, loaded)
        logging.info("initialised from %s (checkpoint step %d)", m.init_from, at)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, config, key, beta=beta)
    if shardings_of(state) != shardings_of(abstract):
        raise AssertionError("the train state's shardings differ from the compiled ones")
    if resume is not None:
        from absl import logging

        from visionr1_jax import metrics as metrics_lib

        state = ckpt.restore(resume, state).state
        for name in ("metrics.jsonl", "rollouts.jsonl"):  # steps after it are redone
            metrics_lib.truncate_jsonl(os.path.join(metrics_lib.local_dir(workdir), name), resume)
        logging.info("resuming from checkpoint step %d (%s)", resume, ckpt.directory)
    eos_ids, _ = sampler.default_token_ids(nnx.merge(graphdef, state.params, state.frozen))
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        graphdef=graphdef,
        state=state,
        processor=processor,
        pipe=pipe,
        train_step=train_step,
        logprob_fn=make_logprob_fn(graphdef, config),
        reward_fn=rewards.make_reward_fn(config.reward) if "reward" in config else None,
        eos_ids=eos_ids,
        memory=memory,
        checkpointer=ckpt,
        resumed_from=resume,
        term=term,
        rollout_copy=make_rollout_copy(config) if objective == "grpo" else None,
    )


def rows_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows sharded over the batch axes present in `mesh` (`data`, `fsdp`), other dims
    replicated: the layout of the input pipeline's arrays (`pipeline.rows_sharding`, one rule)
    and of every rollout array."""
    from visionr1_jax.data import pipeline

    return pipeline.rows_sharding(mesh)


def rollout_shapes(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch: Mapping[str, Any]
) -> tuple[Any, ...]:
    """The GRPO train step's arguments after the state for prompt batch `batch` (B rows), as
    `grpo_iteration` passes them: `(batch, tokens i32[B·G, L], mask bool[B·G, L],
    advantages f32[B·G], old_logps, ref_logps)`, L = the sampler's completion width of
    `grpo.max_new_tokens`; `old_logps` f32[B·G, L] when μ > 1, `ref_logps` f32[B·G, L] when
    β > 0 (the loop computes them as their own phase), else None. Rows: `rows_sharding`."""
    from visionr1_jax import sampler

    c = config.grpo
    r = batch["input_ids"].shape[0] * int(c.num_generations)
    length = sampler.completion_width(int(c.max_new_tokens))
    sh = rows_sharding(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    logps = sds((r, length), jnp.float32)
    return (
        batch,
        sds((r, length), jnp.int32),
        sds((r, length), jnp.bool_),
        sds((r,), jnp.float32),
        logps if int(c.num_iterations) > 1 else None,
        logps if float(c.beta) != 0 else None,
    )


def shardings_of(tree: Any) -> Any:
    """The shardings of a pytree of arrays (None leaves stay None)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def log_memory(name: str, jitted: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Compiles `jitted` for `args` (the call that follows reuses the executable) and logs its
    `memory_analysis()`: argument, output, temporary and generated-code bytes per device."""
    from absl import logging

    analysis = jitted.lower(*args).compile().memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f: int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    logging.info(
        "%s memory per device: %s",
        name,
        ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in out.items()),
    )
    return out


def local_rows(x: jax.Array) -> np.ndarray:
    """The global row indices of a batch-sharded array that this process holds, in the order
    `make_array_from_process_local_data` takes (and the input pipeline gives) local rows."""
    rows = set()
    for shard in x.addressable_shards:
        rows.update(range(*shard.index[0].indices(x.shape[0])))
    return np.array(sorted(rows), np.int64)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array in full on every process (one all-gather when multi-process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def decode_completions(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each row's generated tokens as text, special tokens skipped (a trailing `<|im_end|>`
    would fail the official format check's `json.loads`). tokens, mask: [R, L]."""
    rows = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def truncated(tokens: np.ndarray, mask: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """bool[R]: rows whose last generated token is not a stop token (cut at the budget)."""
    n = mask.sum(1)
    last = tokens[np.arange(len(tokens)), np.maximum(n - 1, 0)]
    return (n == 0) | ~np.isin(last, np.asarray(list(eos_ids) or [-1]))


def score_rows(
    run: Run, host_batch: Any, completions: Sequence[str], step: int
) -> dict[str, np.ndarray]:
    """The Vision-R1 reward of this process's completions (host parse, then the jitted
    reward of `config.reward` with the thresholds of `step`); the loop's default `score_fn`.

    Args:
      host_batch: this process's `HostBatch` (b prompt rows); completions: its b·G texts,
        row `i·G + g` for prompt i.
    Returns:
      per-row f32[b·G] terms: `reward/total` (0 for padding rows), each term of the reward
      family (`reward/format`, `reward/recall`, `reward/precision` for Vision-R1), `parse_rate`
      (official format check passed), `parse_failure` (the configured check failed),
      `matched_iou` and `matched_giou` (mean over the completion's matched pairs),
      `boxes/pred`, `boxes/gt`, `boxes/matched`, the thresholds in force `threshold/*` (the
      same in every row), and `valid` (1 for real rows).
    """
    from visionr1_jax import rewards

    g = len(completions) // len(host_batch.record_ids)
    valid = np.repeat(np.asarray(host_batch.arrays["valid"], bool), g)
    targets = host_batch.targets()
    if not targets:
        raise ValueError("a training batch has no valid rows")
    per_row, it = [], iter(targets)
    for ok in host_batch.arrays["valid"]:
        per_row.append(next(it) if ok else targets[0])  # padding rows: scored, then zeroed
    targets = [t for t in per_row for _ in range(g)]
    pred, gt, parsed = rewards.prepare(completions, targets, run.config.reward)
    total, aux = run.reward_fn(pred, gt, jnp.asarray(step, jnp.int32))
    f32 = lambda x: np.broadcast_to(np.asarray(x, np.float32), total.shape).copy()
    out = {"reward/total": np.where(valid, f32(total), 0.0).astype(np.float32)}
    family_terms = ("format", "recall", "precision", "iou_accuracy",  # vision_r1, visual_rft
                    "f1", "classification", "location", "penalty")  # perception_r1  # fmt: skip
    for name in family_terms:  # the family's terms
        if name in aux:
            out[f"reward/{name}"] = f32(aux[name])
    out["parse_rate"] = f32(parsed.format_official)
    out["parse_failure"] = 1.0 - f32(pred.format)
    named = {
        "matched_iou_mean": "matched_iou",
        "matched_giou_mean": "matched_giou",
        "num_pred": "boxes/pred",
        "num_gt": "boxes/gt",
        "num_matched": "boxes/matched",
    }
    out |= {new: f32(aux[old]) for old, new in named.items() if old in aux}
    out |= {k: f32(v) for k, v in aux.items() if k.startswith("threshold/")}
    out["valid"] = f32(valid)
    return out


def _global_rows(run: Run, local: np.ndarray, num_rows: int) -> jax.Array:
    """This process's rows `local` of a `num_rows`-row array, as a global array with its rows
    sharded over the batch axes (`rows_sharding`: as the input pipeline's and the rollout's)."""
    sh = rows_sharding(run.mesh)
    return jax.make_array_from_process_local_data(sh, local, (num_rows, *local.shape[1:]))


def write_rollout(
    run: Run, step: int, tokens: np.ndarray, mask: np.ndarray, rewards: np.ndarray
) -> None:
    """Appends one rollout to `<workdir>/rollouts.jsonl` (process 0): the step, each row's
    generated token ids (masked tail dropped) and reward, all B·G rows in rollout order.
    `config.log_rollouts` = how many first rollouts to record (0: none)."""
    import json
    import os

    if jax.process_index() != 0:
        return
    row = {
        "step": int(step),
        "tokens": [t[m].tolist() for t, m in zip(tokens, mask, strict=True)],
        "rewards": [float(x) for x in rewards],
    }
    from visionr1_jax import metrics

    path = os.path.join(metrics.local_dir(run.workdir), "rollouts.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def render_rollout(
    run: Run, host_batch: Any, completions: Sequence[str], terms: Mapping[str, np.ndarray],
    step: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Images of this process's first `metrics.render_count` prompts, each with its
    best-rewarded completion: the image the model saw, the ground truth (green) and the
    predicted boxes (red, parsed as the reward parses them), captioned with the reward and the
    matched IoU. Returns {`rollout/<i>`: uint8[H, W, 3]} (empty off process 0)."""
    from visionr1_jax import render, rewards

    if jax.process_index() != 0:
        return {}
    rc = run.config.reward
    count = int(run.config.metrics.render_count)
    g = len(completions) // len(host_batch.record_ids)
    a = host_batch.arrays
    pixels = a["pixel_patches"] if "pixel_patches" in a else a["pixel_values"]  # u8 or f32
    images = render.images_from_pixel_values(
        pixels, a["image_grid_thw"], run.processor.image_processor
    )
    rows = np.nonzero(a["valid"])[0][:count]
    targets = dict(zip(np.nonzero(a["valid"])[0].tolist(), host_batch.targets(), strict=True))
    best = [int(i * g + np.argmax(terms["reward/total"][i * g : (i + 1) * g])) for i in rows]
    chosen = [completions[j] for j in best]
    parsed = rewards.parse.parse_batch(
        chosen, [targets[int(i)] for i in rows], frame=rc.frame, max_boxes=rc.max_boxes,
        max_coord=rc.max_coord,
    )  # fmt: skip
    out = {}
    for k, (i, j) in enumerate(zip(rows, best, strict=True)):
        target = targets[int(i)]
        names = {v: n for n, v in target.label_to_id.items()}
        keep = parsed.valid[k]
        labels = [names.get(int(x), "?") for x in parsed.labels[k][keep]]
        caption = f"step {step} | reward {terms['reward/total'][j]:.2f}"
        if "matched_iou" in terms:
            caption += f" | IoU {terms['matched_iou'][j]:.2f}"
        (image,) = render.render_examples(
            [images[int(i)]], [target], [(parsed.boxes[k][keep], labels)], [caption]
        )
        out[f"rollout/{k}"] = image
    return out


def grpo_iteration(run: Run, device_batch: Any) -> list[dict[str, Any]]:
    """One rollout and its μ updates (`grpo.num_iterations`); returns one metrics dict per
    optimizer step and leaves the new state in `run.state`.

    Stages: rollout (G completions per prompt; the vision special tokens are never sampled)
    → host decode (special tokens skipped) and parse → reward (jitted, thresholds at the
    step) → advantages → [renderings, every `metrics.render_every` steps] → reference
    log-probs (β > 0) → [old log-probs once, μ > 1] → μ train steps. Each phase is timed
    (`time/rollout`, `time/reward`, `time/reference`, `time/update`).
    """
    import time

    from visionr1_jax import sampler

    c = run.config.grpo
    g = int(c.num_generations)
    arrays, host_batch = device_batch.arrays, device_batch.host
    step = int(run.state.step)
    times = {}

    # 1. rollout
    t0 = time.perf_counter()
    with jax.set_mesh(run.mesh):
        rollout = sampler.generate(
            run.sampling_policy(),
            arrays,
            rng=jax.random.fold_in(run.state.rng, step),
            num_generations=g,
            max_new_tokens=int(c.max_new_tokens),
            temperature=float(c.temperature),
            top_k=int(c.top_k),
            top_p=float(c.top_p),
        )
        tokens_all, mask_all = to_host(rollout.tokens), to_host(rollout.mask)
        entropy_all = to_host(rollout.entropy)
    times["time/rollout"] = time.perf_counter() - t0

    # 2. host decode + parse, 3. reward (this process's rows)
    t0 = time.perf_counter()
    rows = np.concatenate([np.arange(r * g, r * g + g) for r in local_rows(arrays["valid"])])
    tokens, mask = tokens_all[rows], mask_all[rows]
    n_rows = tokens_all.shape[0]
    completions = decode_completions(run.processor.tokenizer, tokens, mask)
    terms = (run.score_fn or score_rows)(run, host_batch, completions, step)
    terms["completion/truncated"] = truncated(tokens, mask, run.eos_ids).astype(np.float32)
    terms["completion/length"] = mask.sum(1).astype(np.float32)
    gathered = {k: to_host(_global_rows(run, v, n_rows)) for k, v in terms.items()}

    # 4. advantages (groups of G rows; padding rows get 0 and no scored tokens)
    valid_rows = gathered.pop("valid") > 0
    total = gathered["reward/total"]
    adv = grpo.advantages(jnp.asarray(total), g, estimator=c.estimator)
    adv = np.where(valid_rows, np.asarray(adv), 0.0).astype(np.float32)
    advantages = _global_rows(run, adv[rows], n_rows)
    score_mask = rollout.mask & _global_rows(run, valid_rows[rows], n_rows)[:, None]
    times["time/reward"] = time.perf_counter() - t0
    if step // int(c.num_iterations) < int(run.config.get("log_rollouts", 0)):
        write_rollout(run, step, tokens_all, mask_all, total)
    render_every = int((run.config.get("metrics") or {}).get("render_every", 0) or 0)
    if render_every and step % render_every == 0:
        run.renderings[step] = render_rollout(run, host_batch, completions, terms, step)

    # 5. reference log-probs (β > 0), once per rollout, as their own phase
    old_logps = ref_logps = None
    mu = min(int(c.num_iterations), int(run.config.total_steps) - step)
    with jax.set_mesh(run.mesh):
        # Every rollout array laid out as `rollout_shapes` says, as the program compiled at
        # start-up expects (a no-op where it already is).
        sh = rows_sharding(run.mesh)
        as_rows = lambda x: x if x is None or x.sharding == sh else jax.device_put(x, sh)
        seqs, score_mask, advantages = map(as_rows, (rollout.tokens, score_mask, advantages))
        s = run.state
        t0 = time.perf_counter()
        if float(c.beta) != 0:
            ref = run.logprob_fn(s.ref_params, s.frozen, arrays, seqs, score_mask)
            ref_logps = as_rows(ref).block_until_ready()
        times["time/reference"] = time.perf_counter() - t0

        # 6. μ updates (μ > 1: the sampling policy's log-probs first, once)
        t0 = time.perf_counter()
        if int(c.num_iterations) > 1:
            old_logps = as_rows(run.logprob_fn(s.params, s.frozen, arrays, seqs, score_mask))
        if not run.memory:
            run.memory = log_memory(
                "train_step", run.train_step, run.state, arrays, seqs, score_mask,
                advantages, old_logps, ref_logps,
            )  # fmt: skip
        out = []
        for _ in range(mu):
            run.state, m = run.train_step(
                run.state, arrays, seqs, score_mask, advantages, old_logps, ref_logps
            )
            out.append(m)
        out = jax.device_get(out)
    times["time/update"] = time.perf_counter() - t0

    group = total.reshape(-1, g)[valid_rows.reshape(-1, g)[:, 0]]  # real prompts' groups
    scored = mask_all[valid_rows]
    spread = {k: x for k, x in gathered.items() if k.startswith("reward/")}
    rollout_metrics = {
        **{k: float(x[valid_rows].mean()) for k, x in gathered.items()},
        **{f"{k}_std": float(x[valid_rows].std()) for k, x in spread.items()},
        "reward/group_std": float(group.std(1, ddof=1).mean()) if g > 1 else 0.0,
        "reward/zero_std_groups": float((group.std(1) == 0).mean()),
        "entropy": float(entropy_all[valid_rows].sum() / max(scored.sum(), 1)),
        "completion/tokens": float(scored.sum()),
        "throughput/rollout_tokens_per_s": float(scored.sum() / times["time/rollout"]),
        **times,
    }
    return [{**rollout_metrics, **{k: float(x) for k, x in m.items()}} for m in out]


def evaluate_sft(r: Run) -> dict[str, float]:
    """`sft.evaluate` of the current policy on `sft.eval_batches` batches of the evaluation
    split (`data.eval_config`: every record, one epoch, file order): `eval/parse_rate`,
    `eval/matched_iou`, ... (single process; multi-host evaluation is separate work)."""
    import itertools

    from visionr1_jax import sft
    from visionr1_jax.data import config as data_config_lib
    from visionr1_jax.data import pipeline

    c = r.config.sft
    pipe = pipeline.InputPipeline(data_config_lib.eval_config(r.config.data), r.processor)
    try:
        batches = itertools.islice(pipe, c.eval_batches) if c.eval_batches else pipe
        out = sft.evaluate(
            r.policy, r.processor, batches, r.config, max_new_tokens=int(c.eval_max_new_tokens)
        )
    finally:
        pipe.close()
    return {f"eval/{k}": float(v) for k, v in out.items()}


def evaluate_now(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether the loop evaluates after optimizer step `step` (`eval.every`, and the last)."""
    every = int(config.eval.every) if "eval" in config else 0
    return bool(every) and (step % every == 0 or step == int(config.total_steps))


def evaluate_run(r: Run) -> dict[str, float]:
    """`evaluate.evaluate` of the current policy (the `eval` section: greedy answers on the
    evaluation split, the protocol's metrics), written to `<workdir>/eval/step_<N>.json`;
    returns `eval/<metric>` for the metrics row, and `time/eval`."""
    import time

    from visionr1_jax import evaluate

    t0 = time.perf_counter()
    step = int(r.state.step)
    out, answers = evaluate.evaluate(r.policy, r.processor, r.config, r.mesh, tag=f"step_{step}")
    evaluate.write_results(r.workdir, f"step_{step}", out, answers, r.config, step)
    return {**{f"eval/{k}": v for k, v in out.items()}, "time/eval": time.perf_counter() - t0}


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """The training job: `train_loop(setup(config, workdir))`. Returns the metrics rows.
    A config with an `experiment` section runs that experiment's stages instead
    (`experiment.run`: `make demo`'s SFT → evaluation → GRPO vs more SFT → table)."""
    if "experiment" in config:
        from visionr1_jax import experiment

        return experiment.run(config, workdir)
    return train_loop(setup(config, workdir))


def train_loop(r: Run) -> list[dict[str, Any]]:
    """Runs `config.total_steps` optimizer steps of `config.objective` (`grpo`: rollout →
    reward → reference → μ updates per batch, `grpo_iteration`; `sft`: supervised warm start,
    `sft.sft_iteration`), writing each step's metrics (the keys are listed in
    `visionr1_jax.metrics`) to `<workdir>/metrics.jsonl` and TensorBoard
    (`metrics.tensorboard`), and the renderings of `metrics.render_every`, under a progress bar.

    With a checkpointer (`config.checkpoint`) it saves every `checkpoint.every` steps and at
    the end (the seconds the loop was blocked by a save, `time/checkpoint`, are reported with
    the next step), and a SIGTERM (a preemption notice) makes it save after the current iteration
    and return (every process stops at the same step).
    """
    import time

    from visionr1_jax import host
    from visionr1_jax import metrics as metrics_lib

    config = r.config
    objective = config.get("objective", "grpo")
    mc = config.get("metrics") or metrics_lib.metrics_config()
    writer = metrics_lib.Writer(r.workdir, bool(mc.tensorboard), purge_step=r.resumed_from)
    total = int(config.total_steps)
    bar = metrics_lib.Progress(total, int(r.state.step), enabled=config.get("progress", True))
    rows: list[dict[str, Any]] = []
    term = r.term or TermSignal()
    max_bad = (config.get("optim") or {}).get("max_bad_steps", 3)
    bad_run = bad_total = 0
    saved_s = None
    try:
        while int(r.state.step) < total:
            t0 = time.perf_counter()
            device_batch = next(r.pipe)
            t_data = time.perf_counter() - t0
            if objective == "sft":
                from visionr1_jax import sft

                with jax.set_mesh(r.mesh):
                    r.state, m = sft.sft_iteration(
                        r.train_step, r.state, device_batch.arrays, device_batch.host,
                        r.processor.tokenizer, config,
                    )  # fmt: skip
                step_rows = [{k: float(v) for k, v in jax.device_get(m).items()}]
                every = int(config.sft.eval_every) if "sft" in config else 0
                if every and int(r.state.step) % every == 0:
                    step_rows[0].update(evaluate_sft(r))
            else:
                step_rows = grpo_iteration(r, device_batch)
            seconds = time.perf_counter() - t0
            step = int(r.state.step)
            if evaluate_now(config, step):
                step_rows[-1].update(evaluate_run(r))
            first = step - len(step_rows)
            data_counts = metrics_lib.sum_over_processes(r.pipe.metrics())
            compiles = sum(host.compile_counts().values())
            for i, m in enumerate(step_rows):
                bad_run = bad_run + 1 if m.get("bad_step") else 0
                bad_total += bool(m.get("bad_step"))
                m = {**m, "time/data": t_data, "time/step": seconds / len(step_rows)}
                if "completion/tokens" in m:
                    m["throughput/tokens_per_s"] = m["completion/tokens"] / seconds
                if i == 0 and saved_s is not None:  # the save after the previous iteration
                    m["time/checkpoint"], saved_s = saved_s, None
                m.update(data_counts, bad_steps_total=bad_total, compiles=compiles)
                writer.write(first + i, m)
                rows.append({"step": first + i, **m})
            for at, images in sorted(r.renderings.items()):
                writer.images(at, images)
            r.renderings.clear()
            bar.update(len(step_rows), rows[-1])
            if max_bad is not None and bad_run >= max_bad:
                last = r.checkpointer.latest_step() if r.checkpointer is not None else None
                raise FloatingPointError(
                    f"{bad_run} optimizer steps in a row (to step {step - 1}) had a NaN or Inf "
                    f"in the loss or the gradients (optim.max_bad_steps={max_bad}); each was "
                    "skipped, and the run stops here without saving. "
                    + (f"The last checkpoint (step {last}) is intact." if last is not None
                       else "No checkpoint was saved.")
                )  # fmt: skip
            stop = term.received()
            if r.checkpointer is not None and (
                stop or step == total or r.checkpointer.should_save(step)
            ):
                t_save = time.perf_counter()
                save_checkpoint(r)
                saved_s = time.perf_counter() - t_save  # the loop's blocked time (async save)
            if stop:
                from absl import logging

                if r.checkpointer is not None:
                    r.checkpointer.wait()
                logging.warning("SIGTERM: stopped after step %d (checkpoint saved)", step)
                break
    finally:
        term.restore()
        bar.close()
        writer.close()
        r.pipe.close()
        if r.checkpointer is not None:
            r.checkpointer.close()  # waits for the last save to commit
    if int(r.state.step) >= total:
        from absl import logging

        logging.info("run finished: %d steps", int(r.state.step))  # scripts/tpu_pod.sh reads it
    return rows


def save_checkpoint(r: Run) -> None:
    """Saves the run at its current step (`checkpoint.Checkpointer.save`): the state, this
    host's pipeline position after the last batch consumed, and the thresholds in force."""
    step = int(r.state.step)
    meta = {}
    if "reward" in r.config and r.config.reward.get("stages"):
        stages = [dict(s) for s in r.config.reward.stages]
        meta["thresholds"] = max(
            (s for s in stages if s["start_step"] <= step), key=lambda s: s["start_step"]
        )
    r.checkpointer.save(step, r.state, r.pipe.get_state(), meta)


class TermSignal:
    """Records a SIGTERM instead of dying (installed from the main thread only; elsewhere it
    never fires); `received()` is agreed over the processes, so all stop at the same step."""

    def __init__(self):
        import signal
        import threading

        self._flag = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def received(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self._flag))
        return bool(np.max(flags))

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
