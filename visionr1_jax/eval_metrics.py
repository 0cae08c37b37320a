"""The evaluation metrics of SPEC §7, pure: COCO box metrics (pycocotools), ODINW's per-set
average, REC accuracy. The greedy evaluator that produces their inputs is `evaluate.py`.

The evaluation end to end:

1. **Decoding.** Greedy decoding with our sampler (``sampler.py``, temperature 0, 512 new
   tokens), one prompt per query, with the images resized for evaluation (SPEC §5:
   ``max_pixels = 12,800·28·28``).
2. **Parsing.** The reward's parser (``rewards.parse.parse_answer``, the same rules for reward
   and evaluation, SPEC §2) turns each answer into boxes in the model's frame;
   ``rewards.parse.to_original_pixels`` maps them to xyxy original-image pixels. The boxes keep
   the order in which the model wrote them.
3. **COCO val2017.** One prompt listing all 80 categories per image; every prediction gets the
   constant score 0.99 (``constant_scores``); ``detection_metrics`` runs pycocotools
   ``COCOeval(iouType="bbox")``; labels outside the ground-truth categories are dropped.
4. **ODINW-13.** One query per (image, category present in its ground truth),
   "Locate every {category} ..." (``odinw_queries``); each set is scored by
   ``detection_metrics`` over its queries' predictions, and ``odinw_average`` averages the
   sets' AP (COCO mAP@[.5:.95]) over the 13 sets.
5. **REC** (RefCOCO/+/g): Acc@0.5 (``rec_accuracy``), the first predicted box against the
   single ground-truth box.

This module holds the pure metric functions (steps 3–5 after decoding). It imports only numpy,
pycocotools, the standard library and the data's `Target`: no jax, no model.

Conventions (decided here, tested in ``tests/test_evaluate.py``):

- **Undefined metrics are -1**, as pycocotools reports them: an area range with no
  ground-truth box (e.g. ``AP_small`` on a set without small objects), or no ground truth at
  all. Averages skip -1 entries exactly as ``COCOeval.summarize`` does. Predictions that are
  all empty give 0 for every metric that is defined. Values are pycocotools' own, not
  rounded: its precision is ``tp / (tp + fp + np.spacing(1))``, so perfect predictions give
  an AP of ``1 - 2^-52`` (recall has no such term: AR is exactly 1).
- **Labels match case-insensitively**, as the reward does (SPEC §2 rule 4): a label is
  compared as ``label.strip().lower()``, on both sides. Ground-truth labels differing only in
  case (or surrounding spaces) form one category. Category ids follow first-seen order over
  the ground truth (the order only changes the summation order of the means, by an ulp).
- **Order matters.** COCOeval sorts the detections of each (image, category) by score with a
  stable sort and keeps the first ``max_dets[-1]`` (100); with the constant score every
  prediction keeps the model's output order, which then decides which detections count, which
  one is matched first, and the precision–recall curve. ``detection_metrics`` hands the
  detections to pycocotools in the given order.
- **Box areas.** Ground-truth areas (which choose small / medium / large) are box areas
  ``w·h``: a ``Target`` carries no masks. Official COCO annotations use the segmentation area,
  so ``AP_small`` / ``AP_medium`` / ``AP_large`` can differ slightly from numbers computed on
  the official annotation file; ``AP``, ``AP50``, ``AP75`` and ``AR*`` over all areas do not
  use areas.
- **REC ties count as hits**: IoU ``>= threshold``, the convention of the common RefCOCO
  evaluations (MDETR's ``RefExpEvaluator``, Qwen-VL's grounding evaluation) and of COCOeval's
  own matching (``ious < t`` is skipped, so IoU = t matches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

if TYPE_CHECKING:
    from visionr1_jax.rewards.parse import Target

Prediction = tuple[np.ndarray, Sequence[str], np.ndarray]
"""One image's predictions: ``(f32[M, 4] xyxy original pixels, labels[M], f32[M] scores)``."""

PAPER_SCORE = 0.99  # SPEC §7: every prediction gets this constant score
_AREAS = ("small", "medium", "large")


def _label_key(label: object) -> str | None:
    """The matching key of a label (SPEC §2 rule 4), or None for a non-string label."""
    return label.strip().lower() if isinstance(label, str) else None


def constant_scores(predictions: Sequence[Prediction], value: float = PAPER_SCORE) -> list:
    """``predictions`` with every score replaced by ``value`` (the paper's protocol: 0.99).

    Boxes and labels are kept as they are, in the same order.
    """
    out = []
    for boxes, labels, _ in predictions:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        out.append((boxes, list(labels), np.full(len(boxes), value, dtype=np.float32)))
    return out


def _xywh(box) -> list[float]:
    """xyxy → COCO's ``[x, y, w, h]`` as Python floats (float64 arithmetic)."""
    x1, y1, x2, y2 = (float(c) for c in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _coco_from(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` over an in-memory dataset dict (it prints; callers silence it)."""
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _summary(ev: COCOeval, ap: bool, *, iou: float | None = None, area="all", max_det: int):
    """One entry of ``COCOeval.summarize`` (same selection and mean, without its print).

    ``summarize`` hard-codes ``maxDets=100`` for its first AP; here AP uses ``max_det``, which
    is the same for the default ``max_dets=(1, 10, 100)``.
    """
    p = ev.params
    s = ev.eval["precision" if ap else "recall"]  # [T, R, K, A, M] / [T, K, A, M]
    if iou is not None:
        s = s[np.where(iou == p.iouThrs)[0]]
    s = s[..., [p.areaRngLbl.index(area)], [list(p.maxDets).index(max_det)]]
    defined = s[s > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def detection_metrics(
    predictions: Sequence[Prediction],
    ground_truth: Sequence[Target],
    *,
    max_dets: Sequence[int] = (1, 10, 100),
) -> dict[str, float]:
    """COCO box metrics of per-image predictions through pycocotools ``COCOeval("bbox")``.

    Categories are the distinct ground-truth labels (matched case-insensitively, module
    docstring); predicted labels outside them are dropped and counted. Detections reach
    pycocotools in the given order with the given scores (use ``constant_scores`` for the
    paper's protocol), so with equal scores the model's output order decides which boxes count.

    Args:
      predictions: one ``(boxes f32[M, 4] xyxy original pixels, labels list[str], scores
        f32[M])`` per image (``M`` may be 0).
      ground_truth: one ``rewards.Target`` per image, same order (``boxes`` xyxy original
        pixels; ``image_size`` is ``(height, width)``).
      max_dets: COCOeval's ``maxDets``: three increasing detection caps per (image, category);
        AP uses the last, ``AR{m}`` each.

    Returns:
      ``AP`` (mAP@[.5:.95]), ``AP50``, ``AP75``, ``AP_small``, ``AP_medium``, ``AP_large``,
      ``AR{max_dets[0]}``, ``AR{max_dets[1]}``, ``AR{max_dets[2]}``, ``AR_small``,
      ``AR_medium``, ``AR_large`` (COCOeval's ``stats`` order; floats in [0, 1], -1 where
      undefined), ``num_dropped_labels`` and ``num_detections`` (those evaluated).
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions but {len(ground_truth)} targets")
    max_dets = [int(m) for m in max_dets]
    if len(max_dets) != 3 or not 0 < max_dets[0] < max_dets[1] < max_dets[2]:
        raise ValueError(f"max_dets must be three increasing positive ints, got {max_dets}")

    images, gt_anns, categories = _coco_ground_truth(ground_truth)
    detections, dropped = _coco_detections(predictions, categories)
    cats = [{"id": i, "name": name} for name, i in categories.items()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _coco_from({"images": images, "categories": cats, "annotations": gt_anns})
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes cannot take an empty list; an empty result set evaluates to 0
            coco_dt = _coco_from({"images": images, "categories": cats, "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()

    top = max_dets[-1]
    out = {
        "AP": _summary(ev, True, max_det=top),
        "AP50": _summary(ev, True, iou=0.5, max_det=top),
        "AP75": _summary(ev, True, iou=0.75, max_det=top),
    }
    out.update({f"AP_{a}": _summary(ev, True, area=a, max_det=top) for a in _AREAS})
    out.update({f"AR{m}": _summary(ev, False, max_det=m) for m in max_dets})
    out.update({f"AR_{a}": _summary(ev, False, area=a, max_det=top) for a in _AREAS})
    out["num_dropped_labels"] = dropped
    out["num_detections"] = len(detections)
    return out


def _coco_ground_truth(ground_truth: Sequence[Target]) -> tuple[list, list, dict[str, int]]:
    """COCO `images` and `annotations` of the targets (image ids from 1) and the categories:
    label key → id, in first-seen order."""
    categories: dict[str, int] = {}
    images, gt_anns = [], []
    for image_id, target in enumerate(ground_truth, start=1):
        height, width = target.image_size
        images.append({"id": image_id, "height": height, "width": width})
        for box, label in zip(target.boxes, target.labels, strict=True):
            cat = categories.setdefault(_label_key(label), len(categories) + 1)
            xywh = _xywh(box)
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": cat,
                            "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})  # fmt: skip
    return images, gt_anns, categories


def _coco_detections(
    predictions: Sequence[Prediction], categories: dict[str, int]
) -> tuple[list[dict], int]:
    """COCO detections of the predictions, in their order, and how many were dropped (a label
    outside the ground-truth categories)."""
    detections, dropped = [], 0
    for image_id, (boxes, labels, scores) in enumerate(predictions, start=1):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(
                f"image {image_id - 1}: {len(boxes)} boxes, {len(labels)} labels, "
                f"{len(scores)} scores; they must match"
            )
        if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
            raise ValueError(f"image {image_id - 1}: boxes and scores must be finite")
        for box, label, score in zip(boxes, labels, scores, strict=True):
            cat = categories.get(_label_key(label))
            if cat is None:
                dropped += 1
                continue
            detections.append({"image_id": image_id, "category_id": cat, "bbox": _xywh(box),
                               "score": float(score)})  # fmt: skip
    return detections, dropped


def odinw_queries(target: Target) -> list[tuple[str, Target]]:
    """ODINW's queries for one image: one per category present in its ground truth.

    Categories are grouped case-insensitively (module docstring) in first-seen order; each
    query is ``(name, target)`` with ``name`` the first-seen spelling (stripped), for the
    prompt "Locate every {name} ...", and ``target`` a copy of ``target`` holding only that
    category's boxes and labels (same sizes; ``label_to_id`` restricted to that category, with
    its original id). A target without boxes gives no query.
    """
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(target.labels):
        groups.setdefault(_label_key(label), []).append(i)
    queries = []
    for indices in groups.values():
        labels = [target.labels[i] for i in indices]
        label_to_id = {x.lower(): target.label_to_id[x.lower()] for x in labels}
        query = dataclasses.replace(
            target, boxes=target.boxes[indices], labels=labels, label_to_id=label_to_id
        )
        queries.append((labels[0].strip(), query))
    return queries


def odinw_average(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """ODINW-13's summary: the mean over sets of each set's ``AP`` (COCO mAP@[.5:.95]).

    SPEC §7 / the paper report "mAP averaged over the 13 sets" (GLIP's ODinW protocol: COCO AP
    per set, unweighted mean). ``AP50`` and ``AP75`` are averaged too where every set has them.
    A set whose AP is undefined (-1: no ground truth) is an error, not skipped, since it would
    silently change the denominator.

    Args:
      per_set: set name → ``detection_metrics`` of that set.

    Returns:
      ``AP`` (and ``AP50``, ``AP75``): unweighted means (``math.fsum`` / number of sets);
      ``num_sets``; ``AP/{name}`` per set.
    """
    if not per_set:
        raise ValueError("odinw_average needs at least one set")
    out: dict[str, float] = {}
    for key in ("AP", "AP50", "AP75"):
        if key != "AP" and not all(key in m for m in per_set.values()):
            continue
        values = []
        for name, metrics in per_set.items():
            value = float(metrics[key])
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"set {name!r}: {key} = {value} is undefined or out of [0, 1]")
            values.append(value)
        out[key] = math.fsum(values) / len(values)
    out["num_sets"] = len(per_set)
    out.update({f"AP/{name}": float(m["AP"]) for name, m in per_set.items()})
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes in float64; areas clipped at 0, an empty union gives 0."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def rec_accuracy(pred_boxes: Sequence, gt_boxes, threshold: float = 0.5) -> float:
    """REC Acc@``threshold``: fraction of expressions whose first predicted box has IoU
    ``>= threshold`` with the ground-truth box (ties count as hits, module docstring).

    Args:
      pred_boxes: one entry per expression: ``f[M, 4]`` xyxy predicted boxes in the model's
        output order (only the first is used; ``M = 0`` or None counts as a miss).
      gt_boxes: ``f[E, 4]`` xyxy, the single ground-truth box of each expression (same pixel
        frame as the predictions).
      threshold: the IoU threshold (0.5 for Acc@0.5).

    Returns:
      ``hits / E`` as a float.
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(gt) != len(pred_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions but {len(gt)} ground-truth boxes")
    if len(gt) == 0:
        raise ValueError("rec_accuracy needs at least one expression")
    hits = 0
    for pred, box in zip(pred_boxes, gt, strict=True):
        if pred is None:
            continue
        pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
        if len(pred) and np.all(np.isfinite(pred[0])) and _iou(pred[0], box) >= threshold:
            hits += 1
    return hits / len(gt)
