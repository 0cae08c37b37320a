"""The train state and what builds it: the optimizer and its schedule, the frozen/trained
split of the parameters, the reference, the shardings of it all, and the rollout's weight copy.

`init_train_state(model, config, rng)` splits a loaded model into its static graph and a
`TrainState` (parameters, frozen parameters, optimizer state, step, rng, reference), every
array with its parameter's sharding; `abstract=True` gives the same shapes and shardings
without allocating, to compile the train step before the state exists (STYLE: shapes first).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from visionr1_jax.models import qwen_vl
from visionr1_jax.sections.model import lora_options
from visionr1_jax.sections.training import reference_on_host, rollout_dtype, validate_training

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
    validate_training(config)
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
    validate_training(config)
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
# Placement


def shardings_of(tree: Any) -> Any:
    """The shardings of a pytree of arrays (None leaves stay None)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def on_device(tree: Any) -> Any:
    """Inside a jitted program: `tree`'s arrays in device memory (a no-op for those already
    there), same shardings."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def make_rollout_copy(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
    """Jitted `(params, frozen) -> (params, frozen)` copy in `rollout_dtype(config)` with each
    array's sharding (the sampler's program is keyed on them), or None when the rollout reads
    the master weights. Frozen weights are copied too (under LoRA they are the base model,
    which every decoding step reads)."""
    if rollout_dtype(config) is None:
        return None
    dtype = jnp.dtype(rollout_dtype(config))
    cast = functools.partial(qwen_vl.cast_matrices, dtype=dtype)  # one function: jit's cache hits

    def copy(tree: Any) -> Any:
        return jax.jit(cast, out_shardings=shardings_of(tree))(tree)

    return copy


def rollout_shapes_of(config: ml_collections.ConfigDict, params: Any) -> Any:
    """The abstract (`ShapeDtypeStruct`) parameters the rollout samples from: the
    `make_rollout_copy` of `params` (a tree of arrays or of abstract values), or `params`
    themselves."""
    name = rollout_dtype(config)
    dtype = None if name is None else jnp.dtype(name)

    def one(x):
        cast = dtype is not None and qwen_vl.is_matrix(x)
        return jax.ShapeDtypeStruct(x.shape, dtype if cast else x.dtype, sharding=x.sharding)

    return jax.tree.map(one, params)
