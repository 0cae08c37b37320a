"""Evaluation metrics (issue 12, acceptance 1–2): COCO box metrics against a direct pycocotools
evaluation, hand-made detection cases, ODINW queries and averages, REC Acc@0.5.

Pure numpy / pycocotools; no model, nothing compiled.
"""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionr1_jax import eval_metrics, evaluate
from visionr1_jax.rewards.parse import Target

# pycocotools' precision is tp / (tp + fp + np.spacing(1)): a perfect precision is 1 - 2^-52,
# and AP, a mean of such values, lands within a few ulps of the hand value.
TOL = 8 * 2.0**-52
approx = lambda x: pytest.approx(x, rel=0, abs=TOL)

STATS = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip  # COCOeval.summarize's stats order

# Hand-written fixture: 6 images (one without ground truth), 3 categories, all area ranges.
# Ground truth rows: (image, label as the dataset spells it, COCO category id, xyxy box).
SIZES = [(480, 640), (300, 400), (480, 640), (500, 500), (200, 300), (256, 256)]  # (h, w)
GT_ROWS = [
    (0, "cat", 1, [10, 10, 110, 90]),  # 8,000 px²: medium
    (0, "dog", 2, [200, 50, 400, 300]),  # 50,000: large
    (0, "cat", 1, [500, 400, 520, 420]),  # 400: small
    (1, "bird", 3, [30, 30, 50, 45]),
    (1, "dog", 2, [100, 100, 180, 200]),
    (2, "Cat", 1, [0, 0, 320, 240]),  # same category as "cat" (case-insensitive)
    (2, "bird", 3, [400, 100, 460, 150]),
    (3, "dog", 2, [50, 60, 70, 90]),
    (3, "dog", 2, [300, 300, 500, 460]),
    (5, "bird", 3, [10, 10, 100, 100]),
    (5, "cat", 1, [200, 200, 230, 226]),
]
# Predictions in the model's output order: (image, label, category id or None, box, score).
PRED_ROWS = [
    (0, "cat", 1, [12, 8, 108, 92], 0.9),
    (0, "DOG ", 2, [190, 60, 410, 290], 0.8),
    (0, "cat", 1, [12, 8, 108, 92], 0.7),  # duplicate: a false positive
    (0, "horse", None, [0, 0, 50, 50], 0.95),  # unknown label: dropped
    (1, "bird", 3, [28, 31, 49, 46], 0.6),
    (1, "cat", 1, [100, 100, 180, 200], 0.5),  # wrong category
    (1, "dog", 2, [110, 120, 190, 230], 0.4),
    (2, "cat", 1, [5, 5, 300, 250], 0.85),
    (2, "bird", 3, [405, 95, 455, 160], 0.3),
    (2, "bird", 3, [0, 300, 40, 340], 0.75),  # nowhere near a bird
    (3, "dog", 2, [52, 58, 71, 92], 0.65),
    (3, None, None, [300, 300, 500, 460], 0.99),  # non-string label: dropped
    (4, "dog", 2, [10, 10, 60, 60], 0.2),  # image without ground truth
    (5, "bird", 3, [20, 20, 100, 110], 0.55),
    (5, "cat", 1, [198, 199, 231, 229], 0.45),
    (5, "cat", 1, [0, 0, 256, 256], 0.1),
]


def _xywh(box):
    x1, y1, x2, y2 = (float(c) for c in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _direct_stats(images, gt_anns, categories, dets, max_dets=(1, 10, 100)):
    """A plain pycocotools evaluation of hand-built COCO dicts: ``COCOeval.stats``."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _fixture(constant):
    """The fixture as our API takes it, and as hand-built COCO dicts."""
    targets = [
        Target(
            boxes=np.array([r[3] for r in GT_ROWS if r[0] == i], np.float32).reshape(-1, 4),
            labels=[r[1] for r in GT_ROWS if r[0] == i],
            image_size=size,
            input_size=size,
        )
        for i, size in enumerate(SIZES)
    ]
    predictions = []
    for i in range(len(SIZES)):
        rows = [r for r in PRED_ROWS if r[0] == i]
        boxes = np.array([r[3] for r in rows], np.float32).reshape(-1, 4)
        scores = np.array([0.99 if constant else r[4] for r in rows], np.float32)
        predictions.append((boxes, [r[1] for r in rows], scores))
    images = [{"id": i + 1, "height": h, "width": w} for i, (h, w) in enumerate(SIZES)]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    gt_anns = [
        {"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": _xywh(b), "iscrowd": 0,
         "area": float((b[2] - b[0]) * (b[3] - b[1]))}
        for k, (i, _, c, b) in enumerate(GT_ROWS)
    ]  # fmt: skip
    score = lambda s: float(np.float32(0.99 if constant else s))  # the f32 value we pass
    dets = [
        {"image_id": i + 1, "category_id": c, "bbox": _xywh(b), "score": score(s)}
        for i, _, c, b, s in PRED_ROWS
        if c is not None
    ]
    return predictions, targets, (images, gt_anns, categories, dets)


@pytest.mark.parametrize("constant", [False, True])
def test_matches_direct_pycocotools(constant):
    predictions, targets, coco = _fixture(constant)
    got = evaluate.detection_metrics(predictions, targets)
    want = _direct_stats(*coco)
    # Same pycocotools run on the same inputs (ids 1-3 are also the first-seen order, so the
    # per-category means sum in the same order), same selection and mean: equal exactly.
    assert [got[k] for k in STATS] == [float(x) for x in want]
    assert got["num_dropped_labels"] == 2 and got["num_detections"] == len(coco[3])
    assert 0 < got["AP"] < 1 and all(got[k] >= 0 for k in STATS)  # every area range present


def test_matches_direct_pycocotools_random():
    """Seeded fixture: 8 images, 4 categories, random scores, float boxes, unknown labels."""
    rng = np.random.default_rng(0)
    names = ["person", "car", "Traffic Light", "dog"]
    targets, predictions, gt_anns, dets = [], [], [], []
    images = [{"id": i + 1} for i in range(8)]
    categories = [{"id": k + 1, "name": n.lower()} for k, n in enumerate(names)]
    for i in range(8):
        n = int(rng.integers(0, 12))
        xy = rng.uniform(0, 400, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 250, (n, 2))], 1).astype(np.float32)
        cats = rng.integers(0, 4, n)
        targets.append(Target(gt, [names[c] for c in cats], (700, 700), (700, 700)))
        for box, c in zip(gt.astype(np.float64), cats, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            gt_anns.append(
                {"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                 "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        m = int(rng.integers(0, 20))
        src = gt[rng.integers(0, n, m)] if n else rng.uniform(0, 400, (m, 4))
        noisy = src + rng.normal(0, 8, (m, 4))
        lo, hi = np.minimum(noisy[:, :2], noisy[:, 2:]), np.maximum(noisy[:, :2], noisy[:, 2:])
        boxes = np.concatenate([lo, hi], 1).astype(np.float32)
        pcats = rng.integers(0, 5, m)  # 4 = unknown
        labels = [names[c].upper() if c < 4 else "zebra" for c in pcats]
        scores = rng.uniform(0, 1, m).astype(np.float32)
        predictions.append((boxes, labels, scores))
        for box, c, s in zip(boxes.astype(np.float64), pcats, scores, strict=True):
            if c < 4:
                xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
                dets.append(
                    {"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh, "score": float(s)}
                )
    got = evaluate.detection_metrics(predictions, targets)
    want = _direct_stats(images, gt_anns, categories, dets)
    # Our category ids follow first-seen order, these follow `names`: np.mean then sums the
    # per-category values in another order, off by <= log2(n)·2^-53 relative (n <= 16,160).
    assert [got[k] for k in STATS] == pytest.approx(list(want), rel=0, abs=1e-14)
    zebras = sum(labels.count("zebra") for _, labels, _ in predictions)
    assert got["num_dropped_labels"] == zebras
    assert 0 < got["AP"] < 1


def _one(gt_boxes, pred_boxes, labels=None, scores=None, gt_labels=None, size=(1000, 1000)):
    gt_labels = gt_labels or ["cat"] * len(gt_boxes)
    target = Target(np.array(gt_boxes, np.float32).reshape(-1, 4), gt_labels, size, size)
    boxes = np.array(pred_boxes, np.float32).reshape(-1, 4)
    labels = ["cat"] * len(boxes) if labels is None else labels
    scores = np.full(len(boxes), 0.99, np.float32) if scores is None else np.float32(scores)
    return [(boxes, labels, scores)], [target]


def test_perfect_predictions_give_one():
    _, targets, _ = _fixture(constant=True)
    shouted = lambda labels: [f"  {x.upper()} " for x in labels]  # matched case-insensitively
    perfect = [(t.boxes, shouted(t.labels), np.full(len(t.labels), 0.99)) for t in targets]
    got = evaluate.detection_metrics(perfect, targets)
    rest = [k for k in STATS if k != "AR1"]
    assert [got[k] for k in rest] == approx([1.0] * len(rest)), got
    # AR1 keeps one detection per (image, category): 3 of 4 cats, 3 of 4 dogs, 3 of 3 birds.
    assert got["AR1"] == approx((0.75 + 0.75 + 1.0) / 3)
    assert got["num_dropped_labels"] == 0


def test_shifted_box_lowers_ap():
    # IoU of a 100x100 box shifted by 20: 8000/12000 = 2/3, a match at 0.50, 0.55, 0.60, 0.65
    # only: AP = 4/10 thresholds (404 ones over 1010 entries, exactly 0.4 in float).
    got = evaluate.detection_metrics(*_one([[0, 0, 100, 100]], [[20, 0, 120, 100]]))
    assert (got["AP"], got["AP50"], got["AP75"]) == approx((0.4, 1.0, 0.0))
    perfect = evaluate.detection_metrics(*_one([[0, 0, 100, 100]], [[0, 0, 100, 100]]))
    assert perfect["AP"] == approx(1.0) and perfect["AR100"] == 1.0  # recall has no epsilon


def test_iou_tie_at_half_matches():
    # 10000 / 20000 = 0.5 exactly in float: COCOeval matches at IoU >= t, so AP50 = 1 and
    # AP = 1 threshold of 10 (101 / 1010 == 0.1 in float).
    got = evaluate.detection_metrics(*_one([[0, 0, 200, 100]], [[0, 0, 100, 100]]))
    assert (got["AP"], got["AP50"], got["AP75"]) == approx((0.1, 1.0, 0.0))


def test_unknown_labels_are_dropped_and_counted():
    gt = [[0, 0, 100, 100], [200, 200, 300, 260]]
    kept = [[0, 0, 100, 100], [200, 210, 300, 260]]
    with_unknown = [[0, 0, 100, 100], [500, 500, 600, 600], [200, 210, 300, 260], [1, 1, 9, 9]]
    base = evaluate.detection_metrics(*_one(gt, kept, labels=["cat", "cat"]))
    got = evaluate.detection_metrics(
        *_one(gt, with_unknown, labels=["cat", "horse", "Cat", 7], scores=[0.9, 1.0, 0.8, 1.0])
    )
    assert got["num_dropped_labels"] == 2 and base["num_dropped_labels"] == 0
    assert got == {**base, "num_dropped_labels": 2}


def test_empty_predictions_give_zero():
    _, targets, _ = _fixture(constant=True)
    empty = [(np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32)) for _ in targets]
    got = evaluate.detection_metrics(empty, targets)
    assert all(got[k] == 0.0 for k in STATS), got  # every area range has ground truth here
    assert got["num_detections"] == 0
    # Small objects only: the undefined medium / large entries are -1, as pycocotools says.
    got = evaluate.detection_metrics(*_one([[0, 0, 10, 10]], []))
    assert got["AP"] == 0.0 and got["AP_small"] == 0.0 and got["AP_large"] == -1.0
    nothing = evaluate.detection_metrics(*_one([], [[0, 0, 10, 10]]))  # no ground truth at all
    assert all(nothing[k] == -1.0 for k in STATS) and nothing["num_dropped_labels"] == 1


def test_constant_scores_respect_output_order():
    # One ground-truth cat; a miss and a hit with equal scores. COCOeval's stable sort keeps
    # the given order: hit first → precision 1 at recall 1 (AP 1, AR1 1); miss first → the
    # hit comes at precision 1/2 (AP 0.5) and is not among the first detection (AR1 0).
    gt, hit, miss = [[0, 0, 100, 100]], [0, 0, 100, 100], [500, 500, 600, 600]
    first = evaluate.detection_metrics(*_one(gt, [hit, miss]))
    second = evaluate.detection_metrics(*_one(gt, [miss, hit]))
    assert (first["AP"], first["AR1"]) == approx((1.0, 1.0))
    assert (second["AP"], second["AR1"], second["AR10"]) == approx((0.5, 0.0, 1.0))
    # More than max_dets[-1] = 100 per (image, category): the first 100 are kept, so a hit
    # written last is never seen (AP 0), written first it is (AP 1). Scores decide when given.
    misses = [[500 + i, 500, 600 + i, 600] for i in range(100)]
    assert evaluate.detection_metrics(*_one(gt, [*misses, hit]))["AP"] == 0.0
    assert evaluate.detection_metrics(*_one(gt, [hit, *misses]))["AP"] == approx(1.0)
    scored = evaluate.detection_metrics(*_one(gt, [*misses, hit], scores=[0.5] * 100 + [0.9]))
    assert scored["AP"] == approx(1.0)


def test_constant_scores_helper():
    predictions, _, _ = _fixture(constant=False)
    const = eval_metrics.constant_scores(predictions)
    for (b0, l0, _), (b1, l1, s1) in zip(predictions, const, strict=True):
        np.testing.assert_array_equal(b0, b1)
        assert l0 == l1 and s1.dtype == np.float32 and np.all(s1 == np.float32(0.99))
    assert np.all(eval_metrics.constant_scores(predictions, value=0.5)[0][2] == 0.5)


def test_detection_metrics_rejects_bad_input():
    predictions, targets, _ = _fixture(constant=True)
    with pytest.raises(ValueError, match="predictions"):
        evaluate.detection_metrics(predictions[:-1], targets)
    with pytest.raises(ValueError, match="must match"):
        evaluate.detection_metrics([(np.zeros((1, 4)), [], np.zeros(1))], targets[:1])
    with pytest.raises(ValueError, match="max_dets"):
        evaluate.detection_metrics(predictions, targets, max_dets=(10, 1, 100))
    got = evaluate.detection_metrics(predictions, targets, max_dets=(1, 5, 50))
    assert {"AR1", "AR5", "AR50"} <= set(got)


# --- ODINW -----------------------------------------------------------------------------------


def test_odinw_queries_one_per_present_category():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4], [7, 7, 9, 9], [2, 2, 8, 8]])
    target = Target(boxes, ["cat", "dog", "Cat", "bird", "dog"], (60, 80), (56, 84))
    queries = eval_metrics.odinw_queries(target)
    assert [name for name, _ in queries] == ["cat", "dog", "bird"]
    (_, cat), (_, dog), (_, bird) = queries
    np.testing.assert_array_equal(cat.boxes, boxes[[0, 2]])
    np.testing.assert_array_equal(dog.boxes, boxes[[1, 4]])
    np.testing.assert_array_equal(bird.boxes, boxes[[3]])
    assert cat.labels == ["cat", "Cat"] and dog.labels == ["dog", "dog"] and bird.labels == ["bird"]
    maps = (cat.label_to_id, dog.label_to_id, bird.label_to_id)
    assert maps == ({"cat": 1}, {"dog": 2}, {"bird": 3})
    assert all(q.image_size == (60, 80) and q.input_size == (56, 84) for _, q in queries)
    negative = Target(np.zeros((0, 4)), [], (60, 80), (56, 84))
    assert eval_metrics.odinw_queries(negative) == []


def test_odinw_average():
    per_set = {
        "aerial": {"AP": 0.5, "AP50": 0.75, "AP75": 0.5},
        "pets": {"AP": 0.25, "AP50": 0.5, "AP75": 0.125},
        "pothole": {"AP": 0.125, "AP50": 0.25, "AP75": 0.0},
    }
    got = eval_metrics.odinw_average(per_set)  # dyadic values: the means are exact
    assert got["AP"] == 0.875 / 3 and got["AP50"] == 0.5 and got["AP75"] == 0.625 / 3
    assert got["num_sets"] == 3 and got["AP/pets"] == 0.25
    assert "AP50" not in eval_metrics.odinw_average({"a": {"AP": 0.5}, "b": {"AP": 0.5, "AP50": 1}})
    with pytest.raises(ValueError, match="undefined"):
        eval_metrics.odinw_average({"a": {"AP": 0.5}, "b": {"AP": -1.0}})
    with pytest.raises(ValueError):
        eval_metrics.odinw_average({})


# --- REC -------------------------------------------------------------------------------------


def test_rec_accuracy_hand_computed():
    gt = [
        [0, 0, 3, 1],
        [0, 0, 3, 1],
        [0, 0, 3, 1],
        [0.5, 0, 2, 1],
        [0, 0, 2, 2],
        [0, 0, 10, 10],
        [0, 0, 10, 10],
        [0, 0, 10, 10],
    ]
    preds = [
        [[1, 0, 4, 1]],  # inter 2, union 4: IoU 0.5 exactly → hit (>=)
        [[1 + 2**-20, 0, 4, 1]],  # inter 2 - 2^-20, union 4 (exact): just below 0.5 → miss
        [[0, 0, 1, 1]],  # 1/3 → miss
        [[0.5, 0, 1.25, 1]],  # 0.75 / 1.5 = 0.5 exactly (dyadic) → hit
        np.array([[0, 0, 2, 1], [5, 5, 6, 6]], np.float32),  # 2 / 4 = 0.5 → hit
        [[50, 50, 60, 60], [0, 0, 10, 10]],  # only the first box counts → miss
        None,  # no prediction → miss
        np.zeros((0, 4)),  # parsed nothing → miss
    ]
    assert eval_metrics.rec_accuracy(preds, gt) == 3 / 8
    assert eval_metrics.rec_accuracy(preds, np.array(gt), threshold=0.3) == 5 / 8  # + 0.5 - ε, 1/3
    assert eval_metrics.rec_accuracy([[[0, 0, 10, 10]]], [[0, 0, 10, 10]]) == 1.0
    assert eval_metrics.rec_accuracy([[[5, 5, 5, 9]]], [[5, 5, 5, 9]]) == 0.0  # empty union: IoU 0
    with pytest.raises(ValueError):
        eval_metrics.rec_accuracy(preds[:2], gt)
    with pytest.raises(ValueError):
        eval_metrics.rec_accuracy([], np.zeros((0, 4)))
