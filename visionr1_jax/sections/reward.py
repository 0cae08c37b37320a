"""The `reward` section: variants, families, the rule-refinement schedule, validation.

Jax-free (a config file loads it without jax); the kernels that read it are in
`visionr1_jax.rewards` (`rewards.make_reward_fn`).

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

**The schedule** (progressive rule refinement, SPEC §4) is a list of stages, each a dict with
``start_step`` and the thresholds in force from that step on:

* ``recall_tp``  ξ0: a matched pair counts as a true positive when its overlap ``q > ξ0``, as
  ξ0 when ``q == ξ0`` (the reference's ``modify_tensor(q, ξ0, ξ0)``), else 0;
* ``recall_lo``, ``recall_hi``: the differentiation map ``f(recall; lo, hi)``;
* ``precision_lo``, ``precision_hi``: the map ``f(q; lo, hi)`` applied per matched pair.

It is chosen by name, independently of the variant: ``schedule="official_adaptive"`` is the
released code's ``--adaptive`` switch (at ``switch_step``, 1500 by default), e.g.
``default_config("official", schedule="official_adaptive")`` or, from a run config,
``--config=configs/demo_cpu.py:schedule=official_adaptive,switch_step=1500``. A reward config
records ``schedule``, ``switch_step`` (None for a schedule without a switch) and the derived
``stages``; ``schedule="custom"`` means hand-written ``stages``. Validation rejects a value
that would have no effect: a ``switch_step`` for a schedule without a switch, or a
``schedule`` / ``switch_step`` changed without the ``stages`` they derive. The stages are
validated at load (sorted, first at step 0, same keys, values in [0, 1], ``lo <= hi``) and
looked up inside jit from the step (`rewards.schedule.lookup`), so a stage change never
recompiles.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import ml_collections

FAMILIES = ("vision_r1", "visual_rft", "perception_r1")  # `rewards.REWARD_FAMILIES`' names
MATCHERS = ("hungarian", "greedy")  # `rewards.matching.MATCHERS`' names
# The answer coordinate frames: the resized input's pixels, thousandths of the image, fractions
# of it (`data.templates` writes prompts in them, `rewards.parse` reads answers in them).
FRAMES = ("qwen25_abs", "rel1000", "norm01")

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


def validate_stages(stages: Sequence[Stage], name: str = "reward.stages") -> list[dict]:
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
    "family": FAMILIES,
    "variant": tuple(VARIANTS),
    "overlap": ("giou", "iou"),
    "precision_divisor": ("matched", "predictions"),
    "combine": ("sum", "mean"),
    "format_check": ("official", "strict"),
    "matcher": MATCHERS,
    "frame": FRAMES,
}


SCHEDULES = (*PRESETS, "custom")
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
    if family not in FAMILIES:
        raise ValueError(f"reward.family={family!r} must be one of {list(FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"reward.variant={variant!r} must be one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    name = v["schedule"] if schedule is None else schedule
    if name not in PRESETS:
        raise ValueError(
            f"reward.schedule={name!r} must be one of {list(PRESETS)} "
            "(hand-written stages: set reward.schedule='custom' and reward.stages)"
        )
    if isinstance(switch_step, str):
        try:
            switch_step = int(switch_step)
        except ValueError:
            raise ValueError(f"reward.switch_step={switch_step!r} must be an integer") from None
    if name not in SWITCHED:
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
    c.overlong = 0  # DAPO's soft overlong penalty over the last `overlong` tokens (0: off)
    c.schedule = name
    c.switch_step = ml_collections.config_dict.placeholder(int)  # None, or an int override
    c.switch_step = switch_step
    c.stages = preset(name, switch_step or _DEFAULT_SWITCH_STEP)
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
    if sched in SWITCHED:
        if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
            raise ValueError(
                f"{name}.switch_step={switch!r} must be an integer >= 1 with "
                f"{name}.schedule={sched!r} (set both through the config arg, e.g. "
                f"':schedule={sched},switch_step=1500')"
            )
    else:
        _no_switch(sched, switch, name)
    stages = validate_stages(config.get("stages") or [], f"{name}.stages")
    if sched != "custom" and stages != preset(sched, switch or _DEFAULT_SWITCH_STEP):
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
    overlong = config.get("overlong", 0)
    if isinstance(overlong, bool) or not isinstance(overlong, int) or overlong < 0:
        raise ValueError(f"{name}.overlong={overlong!r} must be an integer >= 0 (0: off)")
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
