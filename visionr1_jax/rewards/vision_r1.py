"""The Vision-R1 criterion-driven reward (SPEC §3) and peer rewards (SPEC §9), pure JAX.

Families (``config.family``): ``vision_r1`` (``vision_r1_reward``), ``visual_rft``
(``visual_rft_reward``) and ``perception_r1`` (``perception_r1_reward``).

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

**Perception-R1** (``perception_r1_reward``; Yu et al., 2025, arXiv 2504.07954; SPEC §9).
Reference: GitHub ``linkangheng/PR1`` at commit ``b841521`` (PR #12 "detection_update"; the
later snapshot of that repository lacks it, the fork ``philipmit/PR1`` keeps it):
``src/open_r1/rewards.py::pr1_detection_reward``, with ``parse_json``, ``HungarianMatcher``,
``box_iou``, ``generalized_box_iou`` and ``calculate_reward`` of ``src/open_r1/utils.py``, and
the environment of ``local_scripts/train/train_qwen2_2b_vl_detection.sh``. Written from that
code, not copied. The paper describes the matching as "maximising the reward"; the code
matches on DETR's cost and then scores the pairs, which is what is followed here.

Stages of ``perception_r1_reward`` (mirrored in the body):

1. The reference's predictions: ``parse_json`` keeps the items whose label is in the category
   map, so a box with an unknown label (id 0) is not a prediction here.
2. Gate: the reference returns 0 for the whole answer when ``json.loads`` fails, when a box
   cannot be stacked into a tensor, or when no item is kept (``parse_json`` then returns two
   values to three names, and the exception handler scores 0), so an empty answer ``[]``
   scores 0. Here: 0 unless the format flag (``format_check``) is 1 and at least one box with
   a known label was parsed.
3. Format ``= kept / parsed`` (``1 − wrong_format / len(items)``), weighted 0.25.
4. Matching (``HungarianMatcher(threshold=0.5)``): cost ``perception_r1_cost`` over the kept
   predictions and the ground truth, one-to-one (``min(M, N)`` pairs, the configured
   ``matcher``), then only the pairs with ``IoU > perception_r1_iou`` (0.5, strict) count.
5. Negative sample (``N = 0``) or no pair left: the total is the weighted format alone (the
   reference's early ``continue``; no penalty). The reference trains on COCO images with
   objects and has no negative-sample rule: an answer with boxes scores 0.25 and an empty one
   0 (stage 2), the opposite of Vision-R1's inverted format. RL data keeps ``N ≥ 1``
   (SPEC §6), so this only matters when scoring by hand.
6. Count reward: ``precision = K / M_kept``, ``recall = K / N`` over the ``K`` kept pairs,
   ``F1 = 2PR / (P + R + 1e-8)``, weighted 0.75 (``F1_SCALE``).
7. Classification ``= mean over pairs of 1[class ids equal]``, weight 1 (``CLS_COE``);
   location ``= mean IoU over pairs`` (IoU, not GIoU), weight 1 (``IOU_COE``;
   ``IS_SIZE_WEIGHT`` is off by default and not offered).
8. Penalty, only with ``perception_r1_penalty``: ``0.5·((M − K)/M + (N − K)/N)``. The code's
   default (``DO_PENAIlty="True"``) turns it on, but the released detection script exports
   ``DO_PENAIlty="False"``, so it is off by default here.
9. Total ``clamp(0.25·format + 0.75·F1 + cls + loc − penalty, 0, 3)``; the coverage bonus is 0
   (``COVERAGE_SCALE`` defaults to 0) and not offered. ``combine="mean"`` divides by 3 (range
   ``[0, 1]``; ours, by analogy with the ``easyr1`` variant).

Deliberate differences from the Perception-R1 reference (each documented there as a defect or
a difference of the shared pipeline):

* The class term of the matching cost compares the prediction's id with the ground truth's
  id; the reference reads the softmax at ``target_id − 1`` (DETR's 0-based labels) but puts
  the predicted one-hot at the 1-based ``pred_id``, so it favours a prediction whose id is one
  less than the ground truth's. The class term is ≤ 0.019 against pixel L1 × 5, so only exact
  geometric ties are affected.
* Parsing is the project's (SPEC §2): fences, the regex fallback for truncated JSON (gated to
  0 here, as the reference scores invalid JSON 0), digit strings, labels compared after
  ``strip().lower()``, and ``max_boxes``. An item it drops (no ``bbox_2d``, not four values
  ``int()`` accepts, ill-ordered, beyond ``max_coord``) is not counted in the format
  fraction's denominator (``ParsedBatch`` carries no item count); the reference counts an
  item without ``bbox_2d`` as wrong format, fails on a box with strings (tensor conversion)
  and, when ``N > 0``, on an ill-ordered box (``generalized_box_iou``'s assertion), scoring
  the whole answer 0.
* Boxes are compared in original-image pixels (the reference: in model-input pixels). IoU
  and GIoU do not change with the frame; the L1 part of the matching cost scales.
"""

from __future__ import annotations

import dataclasses
import math
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


def _take(pair_values: Array, pred_to_gt: Array) -> Array:
    """``f32[C, M, N], i32[C, M] -> f32[C, M]``: each prediction's value with its assigned
    ground truth (that of ground truth 0 where unassigned: the caller masks it)."""
    return jnp.take_along_axis(pair_values, jnp.clip(pred_to_gt, 0)[..., None], -1)[..., 0]


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
    q = jnp.where(matched, _take(pair[config["overlap"]], pred_to_gt), 0.0)
    iou_pairs = jnp.where(matched, _take(pair["iou"], pred_to_gt), 0.0)
    giou_pairs = jnp.where(matched, _take(pair["giou"], pred_to_gt), 0.0)
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


# Perception-R1 constants: linkangheng/PR1 (commit b841521, PR #12 "detection_update").
_PR1_COST_BBOX, _PR1_COST_CLASS, _PR1_COST_GIOU = 5.0, 1.0, 2.0  # HungarianMatcher defaults
_PR1_NUM_CLASSES = 90  # width of the one-hot "logits" (COCO's 90 category-id slots)
_PR1_FORMAT_WEIGHT = 0.25  # ``reward += format_reward * 0.25``
_PR1_F1_WEIGHT = 0.75  # env F1_SCALE, default 0.75
_PR1_CLS_WEIGHT = 1.0  # env CLS_COE, default 1.0
_PR1_IOU_WEIGHT = 1.0  # env IOU_COE, default 1.0
_PR1_PENALTY_WEIGHT = 0.5  # ``reward -= (fp + fn) * 0.5``
_PR1_MAX = 3.0  # ``reward.clamp(0, 3)``
_PR1_F1_EPS = 1e-8  # ``2PR / (P + R + 1e-8)``


def _l1_cxcywh(a: Array, b: Array) -> tuple[Array, dict[str, Array]]:
    """``f32[4], f32[4] -> f32[]``: L1 distance of two xyxy boxes in ``(cx, cy, w, h)`` form
    (DETR's ``cdist(box_xyxy_to_cxcywh(·), ·, p=1)``)."""
    to_cxcywh = lambda x: jnp.stack(
        [(x[0] + x[2]) / 2, (x[1] + x[3]) / 2, x[2] - x[0], x[3] - x[1]]
    )
    return jnp.sum(jnp.abs(to_cxcywh(a) - to_cxcywh(b))), {}


def perception_r1_cost(
    pred_boxes: Array, pred_labels: Array, gt_boxes: Array, gt_labels: Array
) -> tuple[Array, dict[str, Array]]:
    """Perception-R1's matching cost for one completion (DETR's ``HungarianMatcher``).

    ``C[i, j] = 5·L1_cxcywh(pred_i, gt_j) − 1·p(gt_j | pred_i) − 2·GIoU(pred_i, gt_j)`` with
    ``p`` the softmax of a one-hot over 90 class slots: ``e / (e + 89)`` when the class ids
    agree, ``1 / (e + 89)`` otherwise (the reference offsets the ground-truth ids by one
    here; see the module docstring's deliberate differences). L1 in absolute pixels, so it
    dominates, as in Vision-R1's box-prior cost.

    Args:
      pred_boxes: ``f32[M, 4]``; pred_labels: ``i32[M]``; gt_boxes: ``f32[N, 4]``;
        gt_labels: ``i32[N]``.

    Returns:
      ``(cost f32[M, N], aux)`` with aux ``{"iou", "giou", "l1_cxcywh", "class_match"}``.
    """
    g, aux = boxes_lib.pairwise(boxes_lib.giou, pred_boxes, gt_boxes)
    l1, _ = boxes_lib.pairwise(_l1_cxcywh, pred_boxes, gt_boxes)
    same = (pred_labels[:, None] == gt_labels[None, :]).astype(jnp.float32)
    denom = math.e + _PR1_NUM_CLASSES - 1
    prob = jnp.where(same > 0, math.e / denom, 1.0 / denom)
    cost = _PR1_COST_BBOX * l1 - _PR1_COST_CLASS * prob - _PR1_COST_GIOU * g
    return cost, {"iou": aux["iou"], "giou": g, "l1_cxcywh": l1, "class_match": same}


def perception_r1_reward(
    pred: Predictions, gt: GroundTruth, step: Array, *, config: Mapping
) -> tuple[Array, dict[str, Array]]:
    """Perception-R1's detection reward (Yu et al., 2025, arXiv 2504.07954; SPEC §9).

    The reference, the nine stages (mirrored in the body) and the deliberate differences from
    the reference are in the module docstring ("Perception-R1"). ``step`` is unused (no
    schedule).

    Args:
      pred, gt: padded predictions and ground truth (``C`` rows each).
      step: ``i32[]`` training step (unused).
      config: the reward config (``matcher``, ``combine``, ``perception_r1_iou``,
        ``perception_r1_penalty``); static.

    Returns:
      ``(total f32[C], aux)``; aux holds the terms before their weights (``format``, ``f1``,
      ``classification``, ``location``, ``penalty``), the count ``precision`` and ``recall``
      behind F1, ``total``, counts (``num_pred`` parsed boxes, ``num_known`` of them with a
      known label, ``num_gt``, ``num_matched`` pairs above the IoU threshold), matched
      overlaps (``matched_iou_mean``, equal to ``location``, and ``matched_giou_mean``) and
      the one-to-one assignment of stage 4 before the threshold, ``pred_to_gt i32[C, M]``
      (-1: unassigned, unknown label or padding).
    """
    del step
    threshold = float(config.get("perception_r1_iou", 0.5))
    # 1. the reference's predictions.
    known = pred.valid & (pred.labels > 0)
    num_pred, num_known, num_gt = _count(pred.valid), _count(known), _count(gt.valid)
    # 2. gate.
    parsed = (pred.format > 0) & (num_known > 0)
    # 3. format.
    fmt = jnp.where(parsed, _safe_div(num_known, num_pred), 0.0)
    # 4. matching, then the IoU threshold.
    cost, pair = jax.vmap(perception_r1_cost)(pred.boxes, pred.labels, gt.boxes, gt.labels)
    pred_to_gt, _ = matching.MATCHERS[config["matcher"]](cost, known, gt.valid)
    iou_pairs = _take(pair["iou"], pred_to_gt)
    matched = (pred_to_gt >= 0) & known & (iou_pairs > threshold) & parsed[:, None]
    num_matched = _count(matched)
    # 5. only format unless there are pairs (N = 0 gives none).
    scored = num_matched > 0
    # 6. count reward.
    precision = _safe_div(num_matched, num_known)
    recall = _safe_div(num_matched, num_gt)
    f1 = 2.0 * precision * recall / (precision + recall + _PR1_F1_EPS)
    # 7. classification and location.
    cls = _matched_mean(_take(pair["class_match"], pred_to_gt), matched, num_matched)
    loc = _matched_mean(iou_pairs, matched, num_matched)
    giou_mean = _matched_mean(_take(pair["giou"], pred_to_gt), matched, num_matched)
    # 8. penalty.
    if config.get("perception_r1_penalty", False):
        penalty = _pr1_penalty(num_known, num_gt, num_matched, scored)
    else:
        penalty = jnp.zeros_like(fmt)
    # 9. total.
    total = _pr1_total(fmt, f1, cls, loc, penalty, scored, config["combine"])
    aux = {
        "format": fmt,
        "f1": f1,
        "classification": cls,
        "location": loc,
        "penalty": penalty,
        "precision": precision,
        "recall": recall,
        "total": total,
        "num_pred": num_pred,
        "num_known": num_known,
        "num_gt": num_gt,
        "num_matched": num_matched,
        "matched_iou_mean": loc,
        "matched_giou_mean": giou_mean,
        "pred_to_gt": jnp.where((pred_to_gt >= 0) & known, pred_to_gt, -1),
    }
    return total, aux


def _matched_mean(per_pred: Array, matched: Array, num_matched: Array) -> Array:
    """``f32[C, M] -> f32[C]``: the mean of ``per_pred`` over the matched predictions (0 with
    none)."""
    return _safe_div(jnp.sum(jnp.where(matched, per_pred, 0.0), -1), num_matched)


def _pr1_penalty(num_known: Array, num_gt: Array, num_matched: Array, scored: Array) -> Array:
    """Stage 8 of ``perception_r1_reward``: ``0.5·((M − K)/M + (N − K)/N)`` where pairs are
    scored, else 0."""
    missed = _safe_div(num_known - num_matched, num_known) + _safe_div(num_gt - num_matched, num_gt)
    return jnp.where(scored, _PR1_PENALTY_WEIGHT * missed, 0.0)


def _pr1_total(
    fmt: Array, f1: Array, cls: Array, loc: Array, penalty: Array, scored: Array, combine: str
) -> Array:
    """Stage 9 of ``perception_r1_reward``: the clamped weighted sum where pairs are scored,
    the weighted format alone elsewhere; ``combine="mean"`` divides by the maximum 3."""
    full = (
        _PR1_FORMAT_WEIGHT * fmt
        + _PR1_F1_WEIGHT * f1
        + _PR1_CLS_WEIGHT * cls
        + _PR1_IOU_WEIGHT * loc
        - penalty
    )
    total = jnp.where(scored, jnp.clip(full, 0.0, _PR1_MAX), _PR1_FORMAT_WEIGHT * fmt)
    if combine == "mean":
        total = total / _PR1_MAX
    return total


REWARD_FAMILIES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "vision_r1": vision_r1_reward,
    "visual_rft": visual_rft_reward,
    "perception_r1": perception_r1_reward,
}
