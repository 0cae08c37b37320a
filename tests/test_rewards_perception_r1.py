"""The ``perception_r1`` reward family against a numpy/scipy oracle of the reference.

The oracle (``reference_reward``) is written from the reference's code, GitHub
``linkangheng/PR1`` at commit ``b841521`` (kept in the fork ``philipmit/PR1``):
``src/open_r1/rewards.py::pr1_detection_reward`` with ``parse_json``, ``HungarianMatcher``
(``cost_bbox=5``, ``cost_class=1``, ``cost_giou=2``, ``threshold=0.5``), ``box_iou``,
``generalized_box_iou`` and ``calculate_reward`` of ``src/open_r1/utils.py``, under the
environment of ``local_scripts/train/train_qwen2_2b_vl_detection.sh`` (``DO_PENAIlty=False``;
``F1_SCALE``, ``CLS_COE``, ``IOU_COE``, ``COVERAGE_SCALE``, ``IS_SIZE_WEIGHT`` at their
defaults). It works on the answer text with ``json`` and ``scipy.optimize.linear_sum_assignment``
in float64, and shares no code with the implementation.

One documented difference is built in: the reference's class cost reads the softmax of the
one-hot at ``target_id − 1`` while the one-hot sits at the 1-based ``pred_id`` (an off-by-one);
the oracle compares equal ids (``class_offset=0``), and ``class_offset=1`` reproduces the code
as written for the test that shows the difference.

All answers stay in the domain where the project's parser (SPEC §2) and the reference's
``json.loads`` + ``parse_json`` read the same boxes: integer, well-ordered boxes, lower-case
labels, images whose model input equals the original (no rescaling).
"""

import json
import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from visionr1_jax import rewards

# float32: the IoU of two integer boxes rounds once (areas are exact), each mean over ≤ 16
# pairs adds ≤ 16 roundings and the weighted sum 5 more, each ≤ 2^-24 relative on values ≤ 3:
# < 5e-6 absolute; 1e-5 holds on any x86-64 CPU, FMA or not.
TOL = dict(rtol=1e-5, atol=1e-5)
TERMS = ("total", "format", "f1", "classification", "location")
CATS = {"cat": 1, "dog": 2, "bird": 3}


# ----------------------------------------------------------------------------- the oracle


def _iou_giou(a, b):
    """``box_iou`` / ``generalized_box_iou`` of the reference for one pair (float64)."""
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = area(a) + area(b) - inter
    iou = inter / (union + 1e-8)
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1])) + 1e-8
    return iou, iou - (hull - union) / hull


def _cxcywh(b):
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]])


def reference_reward(text, target, *, penalty=False, threshold=0.5, class_offset=0,
                     assignment=None):  # fmt: skip
    """``pr1_detection_reward`` for one answer, as a dict of the total and its terms.

    ``assignment``: optional ``{kept prediction index: gt index}`` to score instead of scipy's
    (to re-score the implementation's choice among equal-cost assignments). Also returns
    ``cost`` (the matcher's matrix over kept predictions) and ``kept`` (their item indices).
    """
    zero = dict(total=0.0, format=0.0, f1=0.0, classification=0.0, location=0.0, K=0)
    # Step 1: json.loads of the text without fences; parse_json.
    try:
        items = json.loads(text.replace("```json", "").replace("```", ""))
        pred_id, pred_box, kept, wrong = [], [], [], 0
        for k, item in enumerate(items):
            try:
                box = item["bbox_2d"]
                pid = int(target.label_to_id[item["label"]])  # exact-case lookup
            except (KeyError, TypeError, IndexError, ValueError):
                wrong += 1
                continue
            pred_id.append(pid)
            pred_box.append(box)
            kept.append(k)
    except (ValueError, TypeError):
        return zero  # json.loads failed or the JSON is not iterable: exception → 0.0
    if not pred_id:
        return zero  # parse_json returns two values to three names: exception → 0.0
    boxes = np.array(pred_box, dtype=np.float64)
    if boxes.shape != (len(pred_id), 4):
        return zero  # torch.tensor of ragged boxes fails
    fmt = 1.0 - wrong / len(items)
    out = dict(zero, format=fmt, total=0.25 * fmt, kept=kept)
    gt_boxes = np.asarray(target.boxes, np.float64)
    gt_ids = [target.label_to_id[x] for x in target.labels]
    m, n = len(pred_id), len(gt_ids)
    if n == 0:
        return out  # num_target == 0: format only
    # Step 2: HungarianMatcher.
    assert np.all(boxes[:, 2:] >= boxes[:, :2])  # generalized_box_iou's assertion
    hi, lo = math.e / (math.e + 89), 1.0 / (math.e + 89)  # softmax of a one-hot over 90 slots
    cost = np.zeros((m, n))
    iou = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            iou[i, j], giou = _iou_giou(boxes[i], gt_boxes[j])
            l1 = np.abs(_cxcywh(boxes[i]) - _cxcywh(gt_boxes[j])).sum()
            prob = hi if pred_id[i] == gt_ids[j] - class_offset else lo
            cost[i, j] = 5 * l1 - 1 * prob - 2 * giou
    out["cost"] = cost
    if assignment is None:
        rows, cols = linear_sum_assignment(cost)
    else:
        pairs = sorted(assignment.items())
        rows, cols = np.array([i for i, _ in pairs], int), np.array([j for _, j in pairs], int)
    keep = iou[rows, cols] > threshold
    rows, cols = rows[keep], cols[keep]
    k = len(rows)
    out["K"] = k
    if k == 0:
        return out
    # Step 3: F1; step 4: classification and IoU; step 5: penalty; clamp.
    p, r = k / m, k / n
    f1 = 2 * p * r / (p + r + 1e-8)
    cls = float(np.mean([pred_id[i] == gt_ids[j] for i, j in zip(rows, cols, strict=True)]))
    loc = float(np.mean(iou[rows, cols]))
    total = 0.25 * fmt + 0.75 * f1 + cls + loc
    if penalty:
        total -= ((m - k) / m + (n - k) / n) * 0.5
    out.update(total=min(max(total, 0.0), 3.0), f1=f1, classification=cls, location=loc)
    return out


# ------------------------------------------------------------------------------- helpers


def _target(boxes, labels, size=(400, 600)):
    return rewards.Target(np.reshape(boxes, (-1, 4)), labels, size, size, dict(CATS))


def _answer(boxes, labels, fence=True):
    body = json.dumps(
        [{"bbox_2d": [int(c) for c in b], "label": s} for b, s in zip(boxes, labels, strict=True)]
    )
    return f"```json\n{body}\n```" if fence else body


def _config(**overrides):
    config = rewards.default_config(family="perception_r1")
    for key, value in overrides.items():
        config[key] = value
    return config


def _padded(texts, targets, rows=32):
    """Cases padded to ``rows`` with a filler of 8 boxes on 3, so that small tests share one
    compiled reward (shapes ``[32, 8, 4]``; ``score`` compiles per distinct shape)."""
    if len(texts) >= rows:
        return texts, targets
    filler = _answer(B3 + _shift(B3, 7) + _shift(B3[:2], 50), L3 * 2 + L3[:2])
    return [*texts, *[filler] * (rows - len(texts))], [*targets, *[T3] * (rows - len(texts))]


def _compare(texts, targets, config=None, **oracle_kw):
    """Scores all cases in one call and checks each against the oracle; returns the outputs
    and how many cases needed the tie rule (ours chose another equal-cost assignment)."""
    config = config or _config()
    out = rewards.score(*_padded(texts, targets), config=config)
    out = {key: value[: len(texts)] for key, value in out.items()}
    ties = 0
    for c, (text, target) in enumerate(zip(texts, targets, strict=True)):
        want = reference_reward(text, target, **oracle_kw)
        got = {key: float(out[key][c]) for key in TERMS}
        if config.combine == "mean":
            got["total"] *= 3.0
        if not all(np.isclose(got[k], want[k], **TOL) for k in TERMS) and "cost" in want:
            # Ours chose another assignment: it must cost the same as scipy's under the
            # oracle's (float64) costs — float32 costs ≤ 5e4 round by ≤ 2^-24 each — and the
            # oracle scoring *our* assignment must give our terms.
            kept = want["kept"]
            ours = {kept.index(i): int(j) for i, j in enumerate(out["pred_to_gt"][c]) if j >= 0}
            cost = want["cost"]
            best = cost[linear_sum_assignment(cost)].sum()
            mine = sum(cost[i, j] for i, j in ours.items())
            assert (
                len(ours) == min(cost.shape) and mine <= best + 64 * 2**-24 * np.abs(cost).sum()
            ), (c, text)
            want = reference_reward(text, target, assignment=ours, **oracle_kw)
            ties += 1
        for key in TERMS:
            np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=f"{key} of {text!r}")
        assert out["num_matched"][c] == want["K"], text
    return out, ties


# ------------------------------------------------------------------------------- targets

T3 = _target([[20, 30, 120, 150], [200, 40, 300, 120], [60, 200, 180, 300]], ["cat", "dog", "cat"])
B3, L3 = T3.boxes.astype(int).tolist(), list(T3.labels)
NEG = _target(np.zeros((0, 4)), [])


def _shift(boxes, dx=0, dy=0):
    return [[x1 + dx, y1 + dy, x2 + dx, y2 + dy] for x1, y1, x2, y2 in boxes]


def _scale(boxes, s):
    out = []
    for x1, y1, x2, y2 in boxes:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * s / 2, (y2 - y1) * s / 2
        out.append([round(cx - w), round(cy - h), round(cx + w), round(cy + h)])
    return out


# ------------------------------------------------------------------------------- scenarios


def test_perfect_answer():
    texts = [_answer(B3, L3), _answer(B3[::-1], L3[::-1], fence=False)]
    out, _ = _compare(texts, [T3, T3])
    np.testing.assert_array_equal(out["total"], [3.0, 3.0])  # 0.25 + 0.75 + 1 + 1, exact
    for key in ("format", "f1", "classification", "location", "precision", "recall"):
        np.testing.assert_allclose(out[key], 1.0, **TOL)
    np.testing.assert_array_equal(out["num_matched"], [3, 3])
    np.testing.assert_array_equal(out["penalty"], [0.0, 0.0])


def test_aux_names():
    out = rewards.score(*_padded([_answer(B3, L3)], [T3]), config=_config())
    for key in ("format", "total", "num_pred", "num_gt", "num_matched", "matched_iou_mean",
                "f1", "classification", "location", "penalty", "precision", "recall"):  # fmt: skip
        assert out[key].shape == (32,), key


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shifted_and_scaled_boxes(n):
    target = _target(B3[:n], L3[:n])
    texts = [_answer(_shift(B3[:n], dx, dy), L3[:n]) for dx in (0, 5, 20, 33, 34, 60, 150)
             for dy in (0, 15)]  # fmt: skip
    texts += [_answer(_scale(B3[:n], s), L3[:n]) for s in (0.5, 0.7, 0.8, 1.2, 1.4, 1.5, 2.0)]
    out, _ = _compare(texts, [target] * len(texts))
    # The location term falls with the shift until a pair drops below IoU 0.5 (then F1 falls).
    loc = out["location"][:14:2]
    assert np.all(np.diff(loc[out["num_matched"][:14:2] == n]) < 0)
    assert out["num_matched"].min() == 0 and out["num_matched"].max() == n


def test_extra_and_duplicate_boxes():
    rng = np.random.default_rng(0)
    spam = [[int(x), int(y), int(x + w), int(y + h)]
            for x, y, w, h in rng.integers([0, 0, 10, 10], [500, 300, 90, 90], (8, 4))]  # fmt: skip
    texts = [
        _answer(B3 + spam[:3], [*L3, "cat", "dog", "bird"]),
        _answer([B3[0]] * 5, ["cat"] * 5),
        _answer(B3 + [B3[0]] * 3, L3 + ["cat"] * 3),
        _answer(B3 + _shift([B3[1]], 3), [*L3, "dog"]),
        _answer(spam, ["cat"] * 8),
        _answer([[0, 0, 600, 400]], ["cat"]),  # one giant box
    ]
    out, _ = _compare(texts, [T3] * len(texts))
    # Extra boxes lower only the count precision: F1 = 2·(3/6)·1 / (3/6 + 1) = 2/3.
    np.testing.assert_allclose(out["f1"][0], 2 / 3, **TOL)
    np.testing.assert_allclose(out["total"][0], 0.25 + 0.75 * 2 / 3 + 2, **TOL)
    assert out["num_matched"][1] == 1  # duplicates: one-to-one, one pair


def test_missing_boxes():
    texts = [_answer(B3[:2], L3[:2]), _answer(B3[1:2], L3[1:2]), _answer(B3[2:], L3[2:])]
    out, _ = _compare(texts, [T3] * len(texts))
    np.testing.assert_allclose(out["recall"], [2 / 3, 1 / 3, 1 / 3], **TOL)
    np.testing.assert_allclose(out["f1"][1], 2 * (1 / 3) / (1 + 1 / 3), **TOL)


def test_wrong_labels():
    texts = [
        _answer(B3, ["dog", "cat", "cat"]),  # known but wrong: matched by geometry, cls < 1
        _answer(B3, ["cat", "zebra", "cat"]),  # unknown label: not a prediction, format 2/3
        _answer(B3, ["zebra", "horse", "zebra"]),  # none known: the reference scores 0
        _answer(B3, ["bird", "bird", "bird"]),
    ]
    out, _ = _compare(texts, [T3] * len(texts))
    np.testing.assert_allclose(out["classification"][0], 1 / 3, **TOL)
    np.testing.assert_allclose(out["format"][1], 2 / 3, **TOL)
    assert out["num_known"][1] == 2 and out["num_pred"][1] == 3
    np.testing.assert_array_equal(out["total"][2], 0.0)
    np.testing.assert_allclose(out["classification"][3], 0.0, **TOL)


def test_empty_and_unparseable_answers():
    texts = [
        "[]",
        "```json\n[]\n```",
        "",
        "I see a cat.",
        "{}",
        "null",
        '{"bbox_2d": [1, 2, 3, 4]}',
        _answer(B3, L3)[:-30],
    ]  # fmt: skip  (the last: truncated JSON)
    out, _ = _compare(texts, [T3] * len(texts))
    np.testing.assert_array_equal(out["total"], 0.0)  # the reference: an exception → 0.0
    np.testing.assert_array_equal(out["format"], 0.0)


def test_negative_sample():
    texts = [_answer(B3[:1], ["cat"]), _answer(B3[:2], ["cat", "zebra"]), "[]", "garbage",
             _answer(B3[:1], ["zebra"])]  # fmt: skip
    out, _ = _compare(texts, [NEG] * len(texts))
    # The reference has no negative-sample rule: format only (0.25·kept/items) with boxes,
    # 0 without (no kept item raises).
    np.testing.assert_allclose(out["total"], [0.25, 0.125, 0.0, 0.0, 0.0], **TOL)
    np.testing.assert_array_equal(out["num_matched"], 0)


def test_matching_ties():
    two = _target([[0, 0, 100, 100], [20, 0, 120, 100]], ["cat", "dog"])
    one = _target([[0, 0, 100, 100]], ["cat"])
    texts = [
        # Midway between two ground truths: equal L1 and GIoU, the class term decides.
        _answer([[10, 0, 110, 100]], ["dog"]),
        _answer([[10, 0, 110, 100]], ["cat"]),
        # Identical duplicates: equal cost rows, either one gets the pair.
        _answer([[0, 0, 100, 90]] * 2, ["cat"] * 2),
        # Symmetric shifts: equal cost and equal IoU.
        _answer([[10, 0, 110, 100], [-10, 0, 90, 100]], ["cat"] * 2),
        # IoU exactly 0.5 is not a pair (strict >); 0.51 is.
        _answer([[0, 0, 100, 50]], ["cat"]),
        _answer([[0, 0, 100, 51]], ["cat"]),
    ]
    targets = [two, two, one, one, one, one]
    out, _ = _compare(texts, targets)
    np.testing.assert_allclose(out["classification"][:2], [1.0, 1.0], **TOL)
    np.testing.assert_array_equal(out["num_matched"][4:], [0, 1])
    np.testing.assert_allclose(out["total"][4], 0.25, **TOL)


def test_class_cost_offset_of_the_reference_is_fixed():
    """The documented difference: the code as written (``class_offset=1``) pairs a "cat"
    prediction midway between a cat and a dog with the dog (id − 1 = cat's id)."""
    two = _target([[0, 0, 100, 100], [20, 0, 120, 100]], ["cat", "dog"])
    text = _answer([[10, 0, 110, 100]], ["cat"])
    as_written = reference_reward(text, two, class_offset=1)
    assert as_written["classification"] == 0.0
    out, _ = _compare([text], [two])
    assert out["classification"][0] == 1.0 and out["pred_to_gt"][0][0] == 0


def test_penalty_and_mean_options():
    texts = [_answer(B3, L3), _answer(B3[:1] + [[400, 300, 450, 350]] * 2, ["cat"] * 3),
             _answer(_shift(B3, 30), L3), _answer(B3[:1], ["cat"])]  # fmt: skip
    targets = [T3] * len(texts)
    out, _ = _compare(texts, targets, _config(perception_r1_penalty=True), penalty=True)
    # One of three found, two of three spurious: 0.25 + 0.75·(1/3) + 1 + 1 − 0.5·(2/3 + 2/3).
    np.testing.assert_allclose(out["total"][1], 0.25 + 0.25 + 2 - 2 / 3, **TOL)
    assert out["penalty"][1] > 0
    out, _ = _compare(texts, targets, _config(combine="mean"))
    assert np.all(out["total"] <= 1.0)
    out, _ = _compare(texts, targets, _config(perception_r1_iou=0.75), threshold=0.75)


def test_random_answers_match_reference():
    """300 answers on 0–6 ground-truth boxes: perturbed copies (label flips, unknown labels),
    duplicates, spurious boxes, shuffled; a few empty or truncated."""
    rng = np.random.default_rng(1234)
    names = list(CATS)
    texts, targets = [], []
    for _ in range(300):
        n = int(rng.integers(0, 7))
        cells = rng.choice(24, n, replace=False)
        gt = [[int(c % 6) * 100 + 5, int(c // 6) * 100 + 5, int(c % 6) * 100 + 95,
               int(c // 6) * 100 + 95] for c in cells]  # fmt: skip
        labels = [names[int(k)] for k in rng.integers(0, 3, n)]
        boxes, said = [], []
        for b, lab in zip(gt, labels, strict=True):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
                d = rng.integers(-35, 36, 4)
                x1, y1 = b[0] + d[0], b[1] + d[1]
                boxes.append([int(x1), int(y1), int(max(b[2] + d[2], x1 + 5)),
                              int(max(b[3] + d[3], y1 + 5))])  # fmt: skip
                u = rng.random()
                said.append(lab if u < 0.75 else "zebra" if u < 0.85 else names[rng.integers(3)])
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.integers(0, 550, 2)
            boxes.append(
                [int(x), int(y), int(x + rng.integers(5, 120)), int(y + rng.integers(5, 90))]
            )
            said.append(names[rng.integers(3)])
        order = rng.permutation(len(boxes))
        text = _answer([boxes[k] for k in order], [said[k] for k in order], rng.random() < 0.7)
        u = rng.random()
        if u < 0.03:
            text = "[]"
        elif u < 0.06:
            text = text[: int(rng.integers(1, len(text)))]
        texts.append(text)
        targets.append(_target(gt, labels))
    out, ties = _compare(texts, targets)
    # The cases cover every branch: gated to 0, format only, and scored pairs.
    assert (out["total"] == 0).sum() > 5 and (out["num_matched"] > 0).sum() > 150
    assert ((out["num_gt"] > 0) & (out["num_matched"] == 0) & (out["total"] > 0)).sum() > 0
    print(f"{ties} cases with another equal-cost assignment")


# ---------------------------------------------------------------------------- the config


def test_config_family_and_validation():
    config = rewards.default_config("paper", family="perception_r1")
    assert config.family == "perception_r1" and config.perception_r1_penalty is False
    rewards.validate_config(config)
    with pytest.raises(ValueError, match="family"):
        rewards.default_config(family="detr")
    base = rewards.default_config()
    for key, value in (("perception_r1_iou", 0.6), ("perception_r1_penalty", True),
                       ("visual_rft_iou", 0.3)):  # fmt: skip
        config = rewards.default_config()
        config[key] = value
        with pytest.raises(ValueError, match=f"{key}.*no effect"):
            rewards.validate_config(config)
    bad = _config()
    bad.perception_r1_iou = 1.0
    with pytest.raises(ValueError, match="perception_r1_iou"):
        rewards.validate_config(bad)
    bad = dict(_config().to_dict(), perception_r1_penalty=1)
    with pytest.raises(ValueError, match="perception_r1_penalty"):
        rewards.validate_config(bad)
    rewards.validate_config(base)
