"""The jitted reward function of a reward config, and the host ``score`` API.

``make_reward_fn(config)`` turns a reward section (``default_config(variant)``, defined with
its variants, families and schedules in the jax-free ``visionr1_jax.sections.reward``) into a
jitted ``(Predictions, GroundTruth, step) -> (f32[C], aux)``; ``prepare`` is its host stage
(parse and pad); ``score`` is the notebook-facing path: host parse → padded arrays → jitted
reward → numpy.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import jax
import numpy as np

from visionr1_jax.rewards import parse
from visionr1_jax.rewards.vision_r1 import REWARD_FAMILIES, GroundTruth, Predictions
from visionr1_jax.sections.reward import default_config, validate_config, validate_stages


def _frozen(config) -> str:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True)


@functools.lru_cache(maxsize=32)
def _compiled(frozen: str) -> Callable:
    config = json.loads(frozen)
    config["stages"] = validate_stages(config["stages"])
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
      ``perception_r1_reward``); and from the parse: ``format_official`` (the official
      format check, whichever check the reward applies), ``format_checked`` (the check the
      reward applies, ``format_check``), ``num_parsed`` (boxes parsed, at most ``max_boxes``)
      and ``num_dropped`` (boxes beyond ``max_boxes``).

    The parsed arrays go to the device and the terms come back in one explicit transfer each.
    """
    config = default_config() if config is None else config
    fn = make_reward_fn(config)
    pred, gt, parsed = prepare(completions, targets, config)
    inputs = jax.device_put((pred, gt, np.asarray(step, np.int32)))
    _, aux = jax.device_get(fn(*inputs))
    out = {k: np.asarray(v) for k, v in aux.items()}
    out["format_official"] = np.asarray(parsed.format_official)
    out["format_checked"] = np.asarray(pred.format)
    out["num_parsed"] = np.asarray(parsed.valid).sum(1)
    out["num_dropped"] = parsed.num_dropped
    return out
