"""The jitted update: what it reads (`UpdateBatch`), the log-prob pass it differentiates, the
loss (GRPO or SFT), gradient accumulation, and the optax step.

`make_train_step(graphdef, config)` returns `train_step(state, update) -> (state, metrics)`,
jitted once with the state donated. The rollout (`rollout.py`) and SFT (`sft.py`) each yield an
`UpdateBatch`; `update_shapes` describes the one the rollout yields, so the step compiles
before the first batch exists, and the AOT tool compiles the same program for TPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from visionr1_jax import grpo, sampler, sharding
from visionr1_jax.models.logprobs import completion_logprobs
from visionr1_jax.sections.training import (
    OBJECTIVES,
    grpo_config,
    reference_on_host,
    validate_training,
)
from visionr1_jax.state import (
    TrainState,
    frozen_filter,
    learning_rate_schedule,
    make_optimizer,
    on_device,
)

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """What one optimizer update reads, rows sharded over the batch axes.

    Attributes:
      prompts: the B prompts as the model reads them (`MODEL_KEYS`: input_ids i32[B, T],
        attention_mask i32[B, T], pixel_values f32[B, S, F], image_grid_thw i32[B, 3]).
      tokens: i32[B*G, L] completion tokens (row `b*G + g`: completion g of prompt b; SFT: the
        targets, G = 1).
      mask: bool[B*G, L] the tokens scored (a padding prompt's rows: none).
      advantages: f32[B*G] (GRPO), None for SFT.
      old_logps: f32[B*G, L] the sampling policy's log-probs when μ > 1, else None (ratio ≡ 1).
      ref_logps: f32[B*G, L] the reference's log-probs when β > 0 and computed outside the
        step (the loop's reference phase), else None.
    """

    prompts: Mapping[str, jax.Array]
    tokens: jax.Array
    mask: jax.Array
    advantages: jax.Array | None = None
    old_logps: jax.Array | None = None
    ref_logps: jax.Array | None = None


def model_inputs(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The `MODEL_KEYS` of a pipeline batch (`UpdateBatch.prompts`)."""
    return {k: arrays[k] for k in MODEL_KEYS if k in arrays}


def update_shapes(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, prompts: Mapping[str, Any]
) -> UpdateBatch:
    """The `UpdateBatch` a GRPO rollout of prompt batch `prompts` (B rows) yields, as
    `jax.ShapeDtypeStruct`s with the rollout's row sharding: tokens i32[B·G, L], mask
    bool[B·G, L], advantages f32[B·G], old_logps f32[B·G, L] when μ > 1, ref_logps f32[B·G, L]
    when β > 0, L = the sampler's completion width of `grpo.max_new_tokens`."""
    c = config.grpo
    r = prompts["input_ids"].shape[0] * int(c.num_generations)
    length = sampler.completion_width(int(c.max_new_tokens))
    rows = sharding.rows_sharding(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    logps = sds((r, length), jnp.float32)
    return UpdateBatch(
        prompts=model_inputs(prompts),
        tokens=sds((r, length), jnp.int32),
        mask=sds((r, length), jnp.bool_),
        advantages=sds((r,), jnp.float32),
        old_logps=logps if int(c.num_iterations) > 1 else None,
        ref_logps=logps if float(c.beta) != 0 else None,
    )


def log_memory(name: str, jitted: Callable[..., Any], *args: Any) -> dict[str, int]:
    """Compiles `jitted` for `args` (the call that follows reuses the executable) and logs its
    `memory_analysis()`: argument, output, temporary and generated-code bytes per device."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f: int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0) for f in fields}
    logging.info(
        "%s memory per device: %s",
        name,
        ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in out.items()),
    )
    return out


def sft_loss(logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised cross-entropy on the target tokens: `−Σ mask·logp / Σ mask` (the token mean
    of HF's `CrossEntropyLoss` over label tokens). logps, mask: [R, L]. aux: `num_tokens`."""
    m = mask.astype(jnp.float32)
    n = m.sum()
    return -(logps * m).sum() / jnp.maximum(n, 1.0), {"num_tokens": n}


def _logps_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, temperature: float):
    """`(params, frozen, prompts, tokens, mask, image_embeds=None) -> f32[B*G, L]`: the
    teacher-forced `completion_logprobs` of `nnx.merge(graphdef, params, frozen)` (G = rows of
    tokens / rows of the prompts)."""
    chunk = (config.get("model") or {}).get("logprob_chunk")

    def logps(params, frozen, prompts, tokens, mask, image_embeds=None):
        model = nnx.merge(graphdef, params, frozen)
        g = tokens.shape[0] // prompts["input_ids"].shape[0]
        return completion_logprobs(
            model, prompts, tokens, mask, num_generations=g, temperature=temperature,
            chunk_size=chunk, image_embeds=image_embeds,
        )  # fmt: skip

    return logps


def make_logprob_fn(
    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict
) -> Callable[..., jax.Array]:
    """Jitted `logps(params, frozen, prompts, tokens, mask) -> f32[B*G, L]` at
    `grpo.temperature`: the loop's old log-probs of μ > 1 (the policy before the rollout's
    first update) and the reference's, once per rollout (parameters in host memory under
    `grpo.reference_memory = "host"` are brought to the devices inside the program)."""
    temperature = float(config.grpo.temperature) if "grpo" in config else 1.0
    inner = _logps_fn(graphdef, config, temperature)
    host = reference_on_host(config)

    def logps(params, frozen, prompts, tokens, mask):
        return inner(on_device(params) if host else params, frozen, prompts, tokens, mask)

    return jax.jit(logps)


def _make_grads(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    c: ml_collections.ConfigDict,
    sft: bool,
):
    """`grads(params, state, update) -> ((loss, aux), grads)` of one (micro-)batch (`c`: the
    `grpo` section, its defaults for SFT): stage 1 (the reference's log-probs, unless given)
    and stage 2 (the loss and its gradient w.r.t. the trained parameters) of
    `make_train_step`."""
    beta = 0.0 if sft else float(c.beta)
    loss_kwargs = dict(
        beta=beta,
        epsilon=float(c.epsilon),
        epsilon_high=None if c.epsilon_high is None else float(c.epsilon_high),
        kl=c.kl,
        aggregation=c.aggregation,
        importance_level=c.get("importance_level", "token"),
    )
    logps_of = _logps_fn(graphdef, config, 1.0 if sft else float(c.temperature))
    frozen_tower = frozen_filter(config) is not nnx.Nothing
    host = reference_on_host(config)

    def shared_features(state, prompts):
        """A frozen tower's features of the B images, computed once for both passes."""
        pixels = prompts.get("pixel_values")
        if not frozen_tower or pixels is None or pixels.size == 0:
            return None
        model = nnx.merge(graphdef, state.params, state.frozen)
        grid = jnp.asarray(prompts["image_grid_thw"], jnp.int32)
        return jax.lax.stop_gradient(model.encode_images(pixels, grid))

    def grads(params, state, u: UpdateBatch):
        # 1. reference (a frozen tower's image features are shared with the policy pass)
        emb, ref_logps = None, u.ref_logps
        if beta != 0 and ref_logps is None:
            if state.ref_params is None:
                raise ValueError("grpo.beta > 0 needs ref_params or ref_logps")
            emb = shared_features(state, u.prompts)
            ref = on_device(state.ref_params) if host else state.ref_params
            ref_logps = jax.lax.stop_gradient(
                logps_of(ref, state.frozen, u.prompts, u.tokens, u.mask, emb)
            )

        # 2. policy loss and gradient
        def loss_fn(params):
            logps = logps_of(params, state.frozen, u.prompts, u.tokens, u.mask, emb)
            if sft:
                return sft_loss(logps, u.mask)
            ref = ref_logps if beta != 0 else None
            return grpo.loss(logps, u.old_logps, ref, u.advantages, u.mask, **loss_kwargs)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return grads


def _accumulated(grads: Callable[..., Any], k: int, token_weighted: bool):
    """Stages 1-2 over k micro-batches of B/k prompts (and their completions) under
    `lax.scan`, gradients summed with the weights that make the sum the full batch's: each
    micro-batch's share of the scored tokens for token means (`token-mean`, SFT), 1/k for the
    per-sequence aggregations (equal rows and length per micro-batch)."""

    def accumulated(params, state, u: UpdateBatch):
        b = u.prompts["input_ids"].shape[0]
        if b % k:
            raise ValueError(f"optim.accumulation_steps={k} does not divide the {b} prompts")
        pixels = u.prompts.get("pixel_values")
        if pixels is not None and pixels.ndim != 3:
            raise ValueError("gradient accumulation needs per-row images (pixel_values [B,S,F])")
        split = lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:])
        prompts = {key: jnp.asarray(v) for key, v in u.prompts.items() if jnp.ndim(v) >= 1}
        micro = jax.tree.map(split, dataclasses.replace(u, prompts=prompts))  # split once
        counts = jnp.sum(micro.mask, axis=(1, 2), dtype=jnp.float32)
        weights = counts / jnp.maximum(counts.sum(), 1.0) if token_weighted else jnp.full(k, 1 / k)

        def body(carry, inp):
            w, mu = inp
            out = grads(params, state, mu)
            return jax.tree.map(lambda acc, x: acc + w * x, carry, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                            jax.eval_shape(lambda: grads(params, state, first)))  # fmt: skip
        out, _ = jax.lax.scan(body, zero, (weights, micro))
        return out

    return accumulated


def make_train_step(
    graphdef: nnx.GraphDef,
    config: ml_collections.ConfigDict,
    *,
    objective: str = "grpo",
    state_sharding: Any = None,
) -> Callable[[TrainState, UpdateBatch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted update `train_step(state, update) -> (state, metrics)`, compiled once per
    input shape, the state donated (do not reuse the argument).

    1. reference log-probs: `update.ref_logps` when given (the loop computes them once per
       rollout, as their own timed phase), else (β > 0) the reference's teacher-forced
       `completion_logprobs` at the sampling temperature inside the step (a frozen tower's
       features then shared with the policy pass); with β = 0 no reference forward;
    2. policy log-probs at `grpo.temperature` and `grpo.loss(logps, old_logps, ref_logps,
       advantages, mask, β, ε, ε_high, kl, aggregation)`, or for `objective="sft"` the
       `sft_loss` of the targets at temperature 1 (advantages and the logps unused); the
       gradient w.r.t. `state.params` (frozen parameters get none);
    3. the optax update (`make_optimizer`) and `step + 1`; when the loss or the gradients
       hold a NaN or Inf the parameters and the optimizer state stay as they were (a skipped
       step, `bad_step` = 1; the step still counts).

    `optim.accumulation_steps` = k > 1: stages 1-2 run over k micro-batches of B/k prompts
    under `lax.scan`, gradients summed with the weights that make the result the full
    batch's (`_accumulated`); one optimizer update. Aux metrics are the same weighted sums
    (exact for means over tokens or rows, a weighted mean of micro-batch extremes for
    `ratio_min`/`ratio_max`).

    `state_sharding`: the `TrainState`'s shardings; given, the state comes out with exactly
    these, so the parameters keep their FSDP/tensor layout and the sampler's program, keyed
    on it, is never recompiled after an update. None: XLA chooses the output layout.

    Metrics (f32[]): `loss`, `grad_norm` (before clipping), `learning_rate` (of this step),
    `bad_step` (1: skipped) and the loss's aux (`kl` when β > 0, clip fractions, ratio stats;
    SFT: `num_tokens`).
    """
    validate_training(config)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
    sft = objective == "sft"
    c = config.grpo if "grpo" in config else grpo_config()  # SFT reads none of it
    grads = _make_grads(graphdef, config, c, sft)
    k = int((config.get("optim") or {}).get("accumulation_steps", 1) or 1)
    if k > 1:
        grads = _accumulated(grads, k, token_weighted=sft or c.aggregation == "token-mean")
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)

    def train_step(state: TrainState, update: UpdateBatch):
        (value, aux), g = grads(state.params, state, update)

        # 3. update, unless the loss or a gradient is not finite (then a skipped step)
        grad_norm = optax.tree.norm(g)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
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
