"""The Vision-R1 criterion-driven reward (SPEC §3) and peer rewards (SPEC §9), pure JAX.

Stages of ``vision_r1_reward`` (mirrored in the body):

1. box-prior cost ``L1 − 1[class] − GIoU`` for every (prediction, ground truth) pair;
2. one-to-one matching (``min(M, N)`` pairs) with the configured matcher;
3. overlap ``q`` of each matched pair (GIoU or IoU, by variant);
4. thresholds in force at ``step`` (``schedule.lookup``, inside jit);
5. dual-format reward, inverted for negative samples (``N = 0``);
6. recall reward ``f(TP / N; ξ1, ξ2)`` with ``TP = Σ_pairs f(q; ξ0, ξ0)``: a pair counts 1 when
   ``q > ξ0``, 0 when ``q < ξ0`` and ξ0 when ``q == ξ0`` (the reference's
   ``modify_tensor(q, ξ0, ξ0)`` leaves a value equal to ξ0 unchanged);
7. precision reward ``Σ f(q; ξ1, ξ2)`` over matched pairs, divided by the matched count
   (released code) or by the number of predictions (paper, EasyR1);
8. total: sum (``[0, 3]``) or mean (``[0, 1]``).

Edge cases (SPEC §3): no parsed boxes → recall = precision = 0 if ``N > 0`` else 1; a negative
sample with predicted boxes → recall = precision = 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from visionr1_jax.rewards import boxes as boxes_lib
from visionr1_jax.rewards import matching, schedule

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Predictions:
    """Parsed answers of ``C`` completions on device.

    Attributes:
      boxes: ``f32[C, M, 4]`` xyxy, original-image pixels.
      labels: ``i32[C, M]`` class ids (0 = unknown).
      valid: ``bool[C, M]``.
      format: ``f32[C]`` format flag (official or strict check, by config), before inversion.
    """

    boxes: Array
    labels: Array
    valid: Array
    format: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Ground truth per completion: ``boxes f32[C, N, 4]``, ``labels i32[C, N]``,
    ``valid bool[C, N]``."""

    boxes: Array
    labels: Array
    valid: Array


RewardFn = Callable[[Predictions, GroundTruth, Array], tuple[Array, dict[str, Array]]]


def _count(mask: Array) -> Array:
    return jnp.sum(mask, axis=-1).astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.maximum(den, 1.0)


def vision_r1_reward(
    pred: Predictions, gt: GroundTruth, step: Array, *, config: Mapping
) -> tuple[Array, dict[str, Array]]:
    """Vision-R1 reward of ``C`` completions.

    Args:
      pred, gt: padded predictions and ground truth (``C`` rows each).
      step: ``i32[]`` training step; selects the refinement stage.
      config: the reward config (``overlap``, ``precision_divisor``, ``combine``, ``matcher``,
        ``stages``); static.

    Returns:
      ``(total f32[C], aux)``; aux holds every term (``format``, ``recall``, ``precision``,
      ``total``), counts (``num_pred``, ``num_gt``, ``num_matched``, ``true_positives``; the
      latter is fractional when a pair ties at ξ0), matched-overlap statistics
      (``matched_overlap_mean``, ``matched_iou_mean``, ``matched_giou_mean``,
      ``matched_cost``) per completion, the
      assignment ``pred_to_gt i32[C, M]`` (-1: unmatched or padding) and the thresholds in
      force (scalars).
    """
    # 1. box-prior cost.
    cost, pair = jax.vmap(matching.box_prior_cost)(pred.boxes, pred.labels, gt.boxes, gt.labels)
    # 2. matching.
    pred_to_gt, _ = matching.MATCHERS[config["matcher"]](cost, pred.valid, gt.valid)
    matched = (pred_to_gt >= 0) & pred.valid
    assignment = jnp.where(matched, pred_to_gt, -1)
    # 3. overlap of each matched pair.
    take = lambda x: jnp.take_along_axis(x, jnp.clip(pred_to_gt, 0)[..., None], -1)[..., 0]
    q = jnp.where(matched, take(pair[config["overlap"]]), 0.0)
    iou_pairs = jnp.where(matched, take(pair["iou"]), 0.0)
    giou_pairs = jnp.where(matched, take(pair["giou"]), 0.0)
    # 4. thresholds in force.
    th = schedule.lookup(config["stages"], step)
    num_pred, num_gt, num_matched = _count(pred.valid), _count(gt.valid), _count(matched)
    negative, no_boxes = num_gt == 0, num_pred == 0
    # 5. dual format.
    fmt = jnp.where(negative, 1.0 - pred.format, pred.format)
    # 6. recall: a tie q == ξ0 adds ξ0, as the reference's modify_tensor(q, ξ0, ξ0).
    hits = schedule.differentiate(q, th["recall_tp"], th["recall_tp"])
    tp = jnp.sum(jnp.where(matched, hits, 0.0), axis=-1)
    recall = schedule.differentiate(_safe_div(tp, num_gt), th["recall_lo"], th["recall_hi"])
    # 7. precision.
    per_pair = jnp.where(
        matched, schedule.differentiate(q, th["precision_lo"], th["precision_hi"]), 0.0
    )
    divisor = num_matched if config["precision_divisor"] == "matched" else num_pred
    precision = _safe_div(jnp.sum(per_pair, axis=-1), divisor)
    empty_value = jnp.where(negative, 1.0, 0.0)
    recall = jnp.where(no_boxes, empty_value, jnp.where(negative, 0.0, recall))
    precision = jnp.where(no_boxes, empty_value, jnp.where(negative, 0.0, precision))
    # 8. combine.
    total = fmt + recall + precision
    if config["combine"] == "mean":
        total = total / 3.0
    aux = {
        "format": fmt,
        "recall": recall,
        "precision": precision,
        "total": total,
        "num_pred": num_pred,
        "num_gt": num_gt,
        "num_matched": num_matched,
        "true_positives": tp,
        "matched_overlap_mean": _safe_div(jnp.sum(q, -1), num_matched),
        "matched_iou_mean": _safe_div(jnp.sum(iou_pairs, -1), num_matched),
        "matched_giou_mean": _safe_div(jnp.sum(giou_pairs, -1), num_matched),
        "matched_cost": matching.matched_cost(cost, assignment),
        "pred_to_gt": assignment,
        **{f"threshold/{k}": v for k, v in th.items()},
    }
    return total, aux


def visual_rft_reward(
    pred: Predictions, gt: GroundTruth, step: Array, *, config: Mapping
) -> tuple[Array, dict[str, Array]]:
    """Visual-RFT's IoU reward (Liu et al., 2025; SPEC §9), for ablations.

    Predictions are visited in answer order (Qwen answers carry no confidence, so the order is
    the confidence order and the confidence term is absent); each takes the unmatched ground
    truth of highest IoU if that IoU exceeds ``visual_rft_iou`` (0.5). Reward
    ``format + ΣIoU_matched / max(N_gt, N_pred)``; a negative sample scores 1 for an empty
    answer and 0 otherwise. ``step`` is unused (no schedule).
    """
    del step
    ious, _ = jax.vmap(lambda a, b: boxes_lib.pairwise(boxes_lib.iou, a, b))(pred.boxes, gt.boxes)
    threshold = config.get("visual_rft_iou", 0.5)

    def one(iou_mn, pvalid, gvalid):
        def visit(taken, inputs):
            row, ok = inputs
            cand = jnp.where(gvalid & ~taken & ok, row, -1.0)
            j = jnp.argmax(cand)
            hit = cand[j] > threshold
            return taken | (hit & (jnp.arange(taken.shape[0]) == j)), jnp.where(hit, cand[j], 0.0)

        _, gains = jax.lax.scan(visit, jnp.zeros_like(gvalid), (iou_mn, pvalid))
        return jnp.sum(gains), jnp.sum(gains > 0)

    iou_sum, hits = jax.vmap(one)(ious, pred.valid, gt.valid)
    num_pred, num_gt = _count(pred.valid), _count(gt.valid)
    negative = num_gt == 0
    accuracy = _safe_div(iou_sum, jnp.maximum(num_pred, num_gt))
    accuracy = jnp.where(negative, (num_pred == 0).astype(jnp.float32), accuracy)
    fmt = jnp.where(negative, 1.0 - pred.format, pred.format)
    total = fmt + accuracy
    if config["combine"] == "mean":
        total = total / 2.0
    aux = {
        "format": fmt,
        "iou_accuracy": accuracy,
        "total": total,
        "num_pred": num_pred,
        "num_gt": num_gt,
        "num_matched": hits.astype(jnp.float32),
    }
    return total, aux


REWARD_FAMILIES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "vision_r1": vision_r1_reward,
    "visual_rft": visual_rft_reward,
}
