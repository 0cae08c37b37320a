"""Independent per-sample reference of the Vision-R1 reward, written from SPEC §1–4 literally.

numpy float64 + ``scipy.optimize.linear_sum_assignment``; shares no code with the package.
Used by the reward tests as the oracle.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
from scipy.optimize import linear_sum_assignment

ITEM = re.compile(
    r'\{"bbox_2d": \[(\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000)\], '
    r'"label": "([^"]+)"\}'
)


def _json(text):
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def parse(text, max_boxes=64, max_coord=1e5):
    """SPEC §2 for the integer frames: list of (box in model frame, raw label)."""
    body = text.strip()
    lines = body.splitlines()
    if lines and lines[0].startswith("```json"):
        body = "\n".join(lines[1:])
    if "```" in body:
        body = body.split("```")[0]
    ok, data = _json(body)
    out = []
    if ok and isinstance(data, list):
        for item in data:
            if not isinstance(item, dict):
                continue
            box = item.get("bbox_2d")
            if not (isinstance(box, list) and len(box) == 4):
                continue
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
                continue
            if not all(math.isfinite(v) for v in box):
                continue
            box = [int(v) for v in box]
            if max(abs(v) for v in box) > max_coord:
                continue
            if box[0] < box[2] and box[1] < box[3]:
                out.append((box, item.get("label")))
    if not out:
        for m in ITEM.findall(text):
            box = [int(v) for v in m[:4]]
            if box[0] < box[2] and box[1] < box[3]:
                out.append((box, m[4]))
    return out[:max_boxes]


def format_official(text):
    ok, data = _json(re.sub(r"```json\n|\n```", "", text).strip())
    if not ok:
        return 0.0
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and "bbox_2d" in item and "label" in item:
                box = item["bbox_2d"]
                if not (isinstance(box, list) and len(box) == 4):
                    return 0.0
    return 1.0


def format_strict(text, input_size):
    if format_official(text) == 0.0:
        return 0.0
    _, data = _json(re.sub(r"```json\n|\n```", "", text).strip())
    if not isinstance(data, list):
        return 0.0
    h_in, w_in = input_size
    for item in data:
        if not (isinstance(item, dict) and "bbox_2d" in item and "label" in item):
            return 0.0
        box = item["bbox_2d"]
        if not (isinstance(box, list) and len(box) == 4):
            return 0.0
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
            return 0.0
        if not all(math.isfinite(v) for v in box):
            return 0.0
        x1, y1, x2, y2 = (int(v) for v in box)
        if not (x1 < x2 and y1 < y2 and x1 >= 0 and y1 >= 0 and x2 <= w_in and y2 <= h_in):
            return 0.0
    return 1.0


def overlaps(a, b):
    """IoU and GIoU of two xyxy boxes (float64)."""
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    iou = inter / union if union > 0 else 0.0
    hull = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0) * max(max(a[3], b[3]) - min(a[1], b[1]), 0)
    giou = iou - ((hull - union) / hull if hull > 0 else 0.0)
    return iou, giou


def f(x, lo, hi):
    return 0.0 if x < lo else 1.0 if x > hi else x


def reward(text, gt_boxes, gt_labels, label_to_id, image_size, input_size, stage, variant):
    """Per-sample reward. ``stage`` = (tp, recall_lo, recall_hi, precision_lo, precision_hi).

    Returns dict with format, recall, precision, total, and ``min_cost`` (optimal matching
    cost) for the tie check.
    """
    overlap = "giou" if variant in ("official", "easyr1") else "iou"
    divisor = "matched" if variant == "official" else "predictions"
    strict = variant == "paper"
    h, w = image_size
    h_in, w_in = input_size
    mapping = {k.lower(): v for k, v in label_to_id.items()}
    preds = []
    for box, label in parse(text):
        cls = mapping.get(label.strip().lower(), 0) if isinstance(label, str) else 0
        scaled = [box[0] * w / w_in, box[1] * h / h_in, box[2] * w / w_in, box[3] * h / h_in]
        preds.append((scaled, cls))
    gts = [
        (list(map(float, b)), mapping[lab.lower()])
        for b, lab in zip(gt_boxes, gt_labels, strict=False)
    ]
    n, m = len(gts), len(preds)
    fmt = format_strict(text, input_size) if strict else format_official(text)
    if n == 0:
        fmt = 1.0 - fmt
    tp_thr, r_lo, r_hi, p_lo, p_hi = stage
    min_cost = 0.0
    if m == 0:
        rec = prec = 1.0 if n == 0 else 0.0
    elif n == 0:
        rec = prec = 0.0
    else:
        cost = np.zeros((m, n))
        q = np.zeros((m, n))
        for i, (pb, pc) in enumerate(preds):
            for j, (gb, gc) in enumerate(gts):
                iou, giou = overlaps(pb, gb)
                l1 = sum(abs(x - y) for x, y in zip(pb, gb, strict=False))
                cost[i, j] = l1 - (1.0 if pc == gc else 0.0) - giou
                q[i, j] = giou if overlap == "giou" else iou
        rows, cols = linear_sum_assignment(cost)
        min_cost = float(cost[rows, cols].sum())
        pairs = q[rows, cols]
        rec = f(sum(1 for x in pairs if x > tp_thr) / n, r_lo, r_hi)
        mapped = [f(x, p_lo, p_hi) for x in pairs]
        prec = sum(mapped) / (len(pairs) if divisor == "matched" else m)
    total = fmt + rec + prec
    if variant == "easyr1":
        total /= 3.0
    return {"format": fmt, "recall": rec, "precision": prec, "total": total, "min_cost": min_cost}
