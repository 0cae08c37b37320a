"""Progressive rule refinement (SPEC §4) as a step-indexed schedule looked up inside jit.

A schedule is a list of stages, each a dict with ``start_step`` and the thresholds in force
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

import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

THRESHOLD_KEYS = ("recall_tp", "recall_lo", "recall_hi", "precision_lo", "precision_hi")
Stage = Mapping[str, float]


def stage(start_step: int, tp: float, r_lo: float, r_hi: float, p_lo: float, p_hi: float):
    """One stage as a plain dict (the config representation)."""
    return dict(
        start_step=int(start_step),
        recall_tp=float(tp),
        recall_lo=float(r_lo),
        recall_hi=float(r_hi),
        precision_lo=float(p_lo),
        precision_hi=float(p_hi),
    )


PRESETS = ("off", "official_adaptive", "paper")
SWITCHED = ("official_adaptive", "paper")  # the presets that have a switch step


def preset(name: str, switch_step: int = 1500) -> list[dict]:
    """Named schedules of SPEC §4.

    * ``off``: the released recipe (no ``--adaptive``): TP at ``q > 0.5`` (0.5 at a tie),
      identity recall map, precision ``q`` clamped at 0; ``switch_step`` is unused.
    * ``official_adaptive``: the released ``--adaptive`` code: beginner (0.5, 0.5, 0.75); from
      ``switch_step`` TP at 0.75 and precision map (0.75, 0.9), recall map stays (0.5, 0.75).
    * ``paper``: beginner (ξ0, ξ1, ξ2) = (0.5, 0.5, 0.75) → advanced (0.75, 0.75, 0.9) at
      ``switch_step`` for both terms.
    """
    if name == "off":
        return [stage(0, 0.5, 0.0, 1.0, 0.0, 1.0)]
    if name == "official_adaptive":
        return [stage(0, 0.5, 0.5, 0.75, 0.5, 0.75), stage(switch_step, 0.75, 0.5, 0.75, 0.75, 0.9)]
    if name == "paper":
        return [stage(0, 0.5, 0.5, 0.75, 0.5, 0.75), stage(switch_step, 0.75, 0.75, 0.9, 0.75, 0.9)]
    raise ValueError(f"unknown schedule preset {name!r}; choose off, official_adaptive or paper")


def validate(stages: Sequence[Stage], name: str = "reward.stages") -> list[dict]:
    """Checks a stage list and returns it as plain dicts; errors name the offending key."""
    stages = [dict(s) for s in stages]
    if not stages:
        raise ValueError(f"{name} must hold at least one stage")
    keys = set(stages[0])
    expected = {"start_step", *THRESHOLD_KEYS}
    for k, s in enumerate(stages):
        if set(s) != keys:
            raise ValueError(f"{name}[{k}] has keys {sorted(s)}, stage 0 has {sorted(keys)}")
        if set(s) != expected:
            raise ValueError(f"{name}[{k}] must have exactly the keys {sorted(expected)}")
        step = s["start_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{name}[{k}].start_step={step!r} must be an integer >= 0")
        for key in THRESHOLD_KEYS:
            value = s[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}[{k}].{key}={value!r} must be a number")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name}[{k}].{key}={value} must be in [0, 1]")
        for term in ("recall", "precision"):
            if s[f"{term}_lo"] > s[f"{term}_hi"]:
                raise ValueError(
                    f"{name}[{k}].{term}_lo={s[f'{term}_lo']} must be <= "
                    f"{term}_hi={s[f'{term}_hi']}"
                )
    if stages[0]["start_step"] != 0:
        raise ValueError(f"{name}[0].start_step must be 0, got {stages[0]['start_step']}")
    starts = [s["start_step"] for s in stages]
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"{name} start_step values must be strictly increasing, got {starts}")
    return stages


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
