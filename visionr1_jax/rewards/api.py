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
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionr1_jax.rewards import matching, parse, schedule
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


def default_config(variant: str = "official", switch_step: int = 1500) -> ml_collections.ConfigDict:
    """The reward config of a named variant.

    Args:
      variant: ``official`` (default), ``paper`` or ``easyr1``.
      switch_step: STEP of the beginner → advanced switch for schedules that have one
        (``paper``; ``official_adaptive`` via ``schedule.preset``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"reward.variant={variant!r} must be one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    c = ml_collections.ConfigDict()
    c.family = "vision_r1"
    c.variant = variant
    c.overlap = v["overlap"]
    c.precision_divisor = v["precision_divisor"]
    c.combine = v["combine"]
    c.format_check = v["format_check"]
    c.matcher = "hungarian"
    c.frame = "qwen25_abs"
    c.max_boxes = 64
    c.max_coord = 1e5
    c.visual_rft_iou = 0.5
    c.stages = schedule.preset(v["schedule"], switch_step)
    return c


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
    iou = config.get("visual_rft_iou")
    if not isinstance(iou, int | float) or not 0.0 <= float(iou) < 1.0:
        raise ValueError(f"{name}.visual_rft_iou={iou!r} must be in [0, 1)")
    schedule.validate(config.get("stages") or [], f"{name}.stages")


def _frozen(config) -> str:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True)


@functools.lru_cache(maxsize=32)
def _compiled(frozen: str) -> Callable:
    config = json.loads(frozen)
    config["stages"] = schedule.validate(config["stages"])
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
      numpy arrays ``[C]``: ``format``, ``recall``, ``precision``, ``total`` (Vision-R1
      family), the counts and overlap statistics of ``vision_r1_reward``'s aux, and
      ``num_dropped`` (boxes beyond ``max_boxes``); scalar thresholds under ``threshold/*``.
    """
    config = default_config() if config is None else config
    fn = make_reward_fn(config)
    pred, gt, parsed = prepare(completions, targets, config)
    _, aux = fn(pred, gt, jnp.asarray(step, jnp.int32))
    out = {k: np.asarray(v) for k, v in aux.items()}
    out["num_dropped"] = parsed.num_dropped
    return out
