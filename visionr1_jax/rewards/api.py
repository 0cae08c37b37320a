"""Reward configuration, the jitted reward function, and the host ``score`` API.

``default_config(variant)`` gives the reward section of a run config; ``make_reward_fn``
turns it into a jitted ``(Predictions, GroundTruth, step) -> (f32[C], aux)``; ``score`` is
the notebook-facing path: host parse → padded arrays → jitted reward → numpy.

Variants (SPEC §4 table):

=========  =========  =================  =======  ==============================
variant    overlap    precision divisor  combine  schedule default
=========  =========  =================  =======  ==============================
official   GIoU       matched pairs      sum      ``off`` (as released)
paper      IoU        predictions M      sum      beginner → advanced at STEP
easyr1     GIoU       predictions M      mean     ``off``
=========  =========  =================  =======  ==============================

Families (``family``, ``rewards.vision_r1``): ``vision_r1`` (default; the table above),
``visual_rft`` and ``perception_r1`` (SPEC §9 peers, for ablations), e.g.
``default_config("official", family="perception_r1")``. A peer family reads ``format_check``,
``combine``, the parsing keys and its own (``visual_rft``: ``visual_rft_iou``;
``perception_r1``: ``matcher``, ``perception_r1_iou``, ``perception_r1_penalty``), not the
variant's overlap, divisor or schedule. A family's own key set away from its default under
another family would have no effect, and is rejected.

The schedule is chosen by name, independently of the variant: ``schedule="official_adaptive"``
is the released code's ``--adaptive`` switch (at ``switch_step``, 1500 by default), e.g.
``default_config("official", schedule="official_adaptive")`` or, from a run config,
``--config=configs/demo_cpu.py:schedule=official_adaptive,switch_step=1500``. A reward config
records ``schedule``, ``switch_step`` (None for a schedule without a switch) and the derived
``stages``; ``schedule="custom"`` means hand-written ``stages``. Validation rejects a value
that would have no effect: a ``switch_step`` for a schedule without a switch, or a
``schedule`` / ``switch_step`` changed without the ``stages`` they derive.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionr1_jax.rewards import matching, parse
from visionr1_jax.rewards import schedule as schedule_lib
from visionr1_jax.rewards.vision_r1 import REWARD_FAMILIES, GroundTruth, Predictions

VARIANTS = {
    "official": dict(
        overlap="giou", precision_divisor="matched", combine="sum", format_check="official",
        schedule="off",
    ),
    "paper": dict(
        overlap="iou", precision_divisor="predictions", combine="sum", format_check="strict",
        schedule="paper",
    ),
    "easyr1": dict(
        overlap="giou", precision_divisor="predictions", combine="mean", format_check="official",
        schedule="off",
    ),
}  # fmt: skip

_CHOICES = {
    "family": tuple(REWARD_FAMILIES),
    "variant": tuple(VARIANTS),
    "overlap": ("giou", "iou"),
    "precision_divisor": ("matched", "predictions"),
    "combine": ("sum", "mean"),
    "format_check": ("official", "strict"),
    "matcher": tuple(matching.MATCHERS),
    "frame": parse.FRAMES,
}


SCHEDULES = (*schedule_lib.PRESETS, "custom")
_DEFAULT_SWITCH_STEP = 1500  # the released code's hard-coded switch (SPEC §4)
# Keys read by one family only: key -> (family, default). Elsewhere they must keep the default.
FAMILY_KEYS = {
    "visual_rft_iou": ("visual_rft", 0.5),
    "perception_r1_iou": ("perception_r1", 0.5),  # HungarianMatcher(threshold=0.5)
    "perception_r1_penalty": ("perception_r1", False),  # DO_PENAIlty="False" (detection script)
}


def default_config(
    variant: str = "official",
    switch_step: int | str | None = None,
    schedule: str | None = None,
    family: str = "vision_r1",
) -> ml_collections.ConfigDict:
    """The reward config of a named variant.

    Args:
      variant: ``official`` (default), ``paper`` or ``easyr1``.
      switch_step: STEP of the beginner → advanced switch (default 1500), for the schedules that
        have one (``official_adaptive``, ``paper``); an int or a digit string (config args).
        Given for a schedule without a switch it would have no effect, and is rejected.
      schedule: rule-refinement preset (``rewards.schedule.preset``): ``off``, ``official_adaptive``
        (the released ``--adaptive`` code) or ``paper``; None: the variant's default (table in
        the module docstring).
      family: reward family (``vision_r1``, ``visual_rft``, ``perception_r1``; module
        docstring).
    """
    if family not in REWARD_FAMILIES:
        raise ValueError(f"reward.family={family!r} must be one of {list(REWARD_FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"reward.variant={variant!r} must be one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    name = v["schedule"] if schedule is None else schedule
    if name not in schedule_lib.PRESETS:
        raise ValueError(
            f"reward.schedule={name!r} must be one of {list(schedule_lib.PRESETS)} "
            "(hand-written stages: set reward.schedule='custom' and reward.stages)"
        )
    if isinstance(switch_step, str):
        try:
            switch_step = int(switch_step)
        except ValueError:
            raise ValueError(f"reward.switch_step={switch_step!r} must be an integer") from None
    if name not in schedule_lib.SWITCHED:
        _no_switch(name, switch_step, "reward")
    elif switch_step is None:
        switch_step = _DEFAULT_SWITCH_STEP
    c = ml_collections.ConfigDict()
    c.family = family
    c.variant = variant
    c.overlap = v["overlap"]
    c.precision_divisor = v["precision_divisor"]
    c.combine = v["combine"]
    c.format_check = v["format_check"]
    c.matcher = "hungarian"
    c.frame = "qwen25_abs"
    c.max_boxes = 64
    c.max_coord = 1e5
    for key, (_, default) in FAMILY_KEYS.items():
        c[key] = default
    c.schedule = name
    c.switch_step = ml_collections.config_dict.placeholder(int)  # None, or an int override
    c.switch_step = switch_step
    c.stages = schedule_lib.preset(name, switch_step or _DEFAULT_SWITCH_STEP)
    return c


def _no_switch(name: str, switch_step, prefix: str) -> None:
    """Rejects a ``switch_step`` given for a schedule that has no switch."""
    if switch_step is not None:
        why = (
            "has no switch"
            if name == "off"
            else "takes its stage starts from the stages' start_step"
        )
        raise ValueError(
            f"{prefix}.switch_step={switch_step!r} has no effect: {prefix}.schedule={name!r} "
            f"{why}; leave switch_step unset, or choose schedule='official_adaptive' or 'paper'"
        )


def _validate_schedule(config, name: str) -> None:
    """``schedule``, ``switch_step`` and ``stages`` agree; each error names the key."""
    sched, switch = config.get("schedule"), config.get("switch_step")
    if sched not in SCHEDULES:
        raise ValueError(f"{name}.schedule={sched!r} must be one of {list(SCHEDULES)}")
    if sched in schedule_lib.SWITCHED:
        if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
            raise ValueError(
                f"{name}.switch_step={switch!r} must be an integer >= 1 with "
                f"{name}.schedule={sched!r} (set both through the config arg, e.g. "
                f"':schedule={sched},switch_step=1500')"
            )
    else:
        _no_switch(sched, switch, name)
    stages = schedule_lib.validate(config.get("stages") or [], f"{name}.stages")
    if sched != "custom" and stages != schedule_lib.preset(sched, switch or _DEFAULT_SWITCH_STEP):
        raise ValueError(
            f"{name}.stages do not follow {name}.schedule={sched!r} with "
            f"{name}.switch_step={switch!r}: one of them was changed alone and would have no "
            f"effect. Choose the schedule through the config arg (e.g. "
            f"':schedule={sched},switch_step=N'), or set {name}.schedule='custom' and "
            f"{name}.switch_step=None to write the stages by hand"
        )


def validate_config(config, name: str = "reward") -> None:
    """Rejects a bad reward config with a message naming the key and the allowed values."""
    for key, allowed in _CHOICES.items():
        if config.get(key) not in allowed:
            raise ValueError(f"{name}.{key}={config.get(key)!r} must be one of {list(allowed)}")
    max_boxes = config.get("max_boxes")
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or not 1 <= max_boxes <= 4096:
        raise ValueError(f"{name}.max_boxes={max_boxes!r} must be an integer in [1, 4096]")
    max_coord = config.get("max_coord")
    if not isinstance(max_coord, int | float) or not 1.0 <= float(max_coord) <= 1e7:
        raise ValueError(f"{name}.max_coord={max_coord!r} must be a number in [1, 1e7]")
    for key in ("visual_rft_iou", "perception_r1_iou"):
        iou = config.get(key, FAMILY_KEYS[key][1])
        if isinstance(iou, bool) or not isinstance(iou, int | float) or not 0.0 <= iou < 1.0:
            raise ValueError(f"{name}.{key}={iou!r} must be in [0, 1)")
    penalty = config.get("perception_r1_penalty", False)
    if not isinstance(penalty, bool):
        raise ValueError(f"{name}.perception_r1_penalty={penalty!r} must be True or False")
    family = config.get("family")
    for key, (owner, default) in FAMILY_KEYS.items():
        value = config.get(key, default)
        if family != owner and value != default:
            raise ValueError(
                f"{name}.{key}={value!r} has no effect: only {name}.family={owner!r} reads it "
                f"({name}.family={family!r}); leave it at {default!r} or set the family"
            )
    _validate_schedule(config, name)


def _frozen(config) -> str:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True)


@functools.lru_cache(maxsize=32)
def _compiled(frozen: str) -> Callable:
    config = json.loads(frozen)
    config["stages"] = schedule_lib.validate(config["stages"])
    family = REWARD_FAMILIES[config["family"]]
    return jax.jit(functools.partial(family, config=config))


def make_reward_fn(config) -> Callable[[Predictions, GroundTruth, jax.Array], tuple]:
    """The jitted reward ``(pred, gt, step) -> (total f32[C], aux)`` for a reward config.

    The config is validated first; the function is built once per distinct config, and
    ``step`` is a traced argument, so schedule stages never trigger a recompilation.
    """
    validate_config(config)
    return _compiled(_frozen(config))


def _targets_to_arrays(targets: Sequence[parse.Target], width: int) -> GroundTruth:
    count = len(targets)
    boxes = np.zeros((count, width, 4), np.float32)
    labels = np.zeros((count, width), np.int32)
    valid = np.zeros((count, width), bool)
    for c, t in enumerate(targets):
        n = len(t.boxes)
        boxes[c, :n], labels[c, :n], valid[c, :n] = t.boxes, t.label_ids, True
    return GroundTruth(boxes=boxes, labels=labels, valid=valid)


def prepare(
    completions: Sequence[str], targets: Sequence[parse.Target], config
) -> tuple[Predictions, GroundTruth, parse.ParsedBatch]:
    """Host stage of the reward: parse and pad to static buckets (powers of two)."""
    parsed = parse.parse_batch(
        completions,
        targets,
        frame=config.frame,
        max_boxes=config.max_boxes,
        max_coord=config.max_coord,
    )
    fmt = parsed.format_strict if config.format_check == "strict" else parsed.format_official
    pred = Predictions(parsed.boxes, parsed.labels, parsed.valid, fmt)
    width = parse.bucket(max((len(t.boxes) for t in targets), default=0), 1 << 30)
    return pred, _targets_to_arrays(targets, width), parsed


def score(
    completions: Sequence[str],
    targets: Sequence[parse.Target],
    *,
    step: int = 0,
    config=None,
) -> dict[str, np.ndarray]:
    """Scores completions against their targets (one target per completion).

    Args:
      completions: ``C`` model answers.
      targets: ``C`` ``Target``s (repeat a prompt's target for each of its G completions).
      step: training step, selects the rule-refinement stage.
      config: a reward config (``default_config(...)``); defaults to ``official``.

    Returns:
      numpy arrays ``[C]``: the family's aux (Vision-R1: ``format``, ``recall``,
      ``precision``, ``total``, the counts and overlap statistics of ``vision_r1_reward``,
      scalar thresholds under ``threshold/*``; peers: see ``visual_rft_reward`` and
      ``perception_r1_reward``), and ``num_dropped`` (boxes beyond ``max_boxes``).
    """
    config = default_config() if config is None else config
    fn = make_reward_fn(config)
    pred, gt, parsed = prepare(completions, targets, config)
    _, aux = fn(pred, gt, jnp.asarray(step, jnp.int32))
    out = {k: np.asarray(v) for k, v in aux.items()}
    out["num_dropped"] = parsed.num_dropped
    return out
