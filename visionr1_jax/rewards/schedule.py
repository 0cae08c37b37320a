"""Progressive rule refinement (SPEC §4): the stage in force, looked up inside jit.

The stages are a config value (`visionr1_jax.sections.reward`: presets, validation); a
schedule is a list of stages, each a dict with ``start_step`` and the thresholds in force
from that step on:

* ``recall_tp``  ξ0: a matched pair counts as a true positive when its overlap ``q > ξ0``, as
  ξ0 when ``q == ξ0`` (the reference's ``modify_tensor(q, ξ0, ξ0)``), else 0;
* ``recall_lo``, ``recall_hi``: the differentiation map ``f(recall; lo, hi)``;
* ``precision_lo``, ``precision_hi``: the map ``f(q; lo, hi)`` applied per matched pair.

``f(x; lo, hi) = 0 if x < lo, 1 if x > hi, else x``. The stages are validated at load (sorted,
first at step 0, same keys, values in [0, 1], ``lo <= hi``) and baked into the compiled program
as constant arrays; the stage is picked from the traced step, so a stage change never
recompiles (levanter/optax-style joined schedules).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from visionr1_jax.sections.reward import THRESHOLD_KEYS, Stage


def lookup(stages: Sequence[Stage], step: jax.Array | int) -> dict[str, jax.Array]:
    """Thresholds in force at ``step`` (traced or concrete) plus the stage index, ``f32[]``."""
    starts = jnp.asarray([s["start_step"] for s in stages], jnp.int32)
    index = jnp.sum(jnp.asarray(step, jnp.int32) >= starts) - 1
    out = {k: jnp.asarray([s[k] for s in stages], jnp.float32)[index] for k in THRESHOLD_KEYS}
    out["stage"] = index
    return out


def differentiate(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """The differentiation map ``f(x; lo, hi)`` of SPEC §3 (elementwise)."""
    return jnp.where(x < lo, 0.0, jnp.where(x > hi, 1.0, x))
