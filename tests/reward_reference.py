"""Oracle of the Vision-R1 reward, written from the reference's code (shares no code with ours).

Source: ``jefferyZhan/Griffon``, ``Vision-R1/vision_r1/visionr1_qwen.py`` (the released TRL
code): ``parse_json``, ``extract_bbox_label``, ``extract``, ``dual_format_reward``,
``BoxPriorMatcher`` with ``griffon/coor_utils.py``'s ``box_iou`` / ``generalized_box_iou``,
``modify_tensor``, ``modify_list``, ``recall_reward`` and ``precision_reward``; for the
``easyr1`` variant and the 0–1000 frame, ``Vision-R1/EasyR1/examples/reward_function/
visionr1.py``. Each function keeps the reference's control flow, with Python / numpy / scipy in
place of torch: the reference builds float32 tensors, so the boxes, overlaps and costs here are
numpy float32 arrays computed in the reference's operation order (elementwise IEEE float32
operations round as torch's do), and the assignment is ``scipy.optimize.linear_sum_assignment``
on that float32 cost, as the reference calls it.

Where SPEC deliberately differs from the reference, the code follows SPEC and says so in a
comment starting with ``SPEC:`` (negative samples, the ``paper`` variant, the frames and their
exact rescaling, ``max_boxes``, ``max_coord``, never raising, the greedy matcher).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
from scipy.optimize import linear_sum_assignment

INT_FRAMES = ("qwen25_abs", "rel1000")

# The reference's fallback pattern (extract_bbox_label), verbatim: it is the rule.
ITEM_RE = re.compile(
    r'\{"bbox_2d": \[(\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000)\], '
    r'"label": "([^"]+)"\}'
)
# SPEC: the norm01 frame (Griffon's [0, 1] decimals) has no reference; its fallback reads
# unsigned decimals in the same item layout.
ITEM_DEC_RE = re.compile(
    r'\{"bbox_2d": \[(\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (\d+(?:\.\d+)?), (\d+(?:\.\d+)?)\], '
    r'"label": "([^"]+)"\}'
)


# ------------------------------------------------------------------------------------------
# Parsing: parse_json, extract_bbox_label, extract.


def parse_json(text):
    """The reference's ``parse_json``: strip, drop a leading ```` ```json ```` line, keep the
    text before a remaining fence, ``json.loads``; any failure gives None."""
    try:
        lines = text.strip().splitlines()
        if lines[0].startswith("```json"):
            text = "\n".join(lines[1:])
        if "```" in text:
            text = text.split("```")[0]
        return json.loads(text)
    except Exception:  # the reference's catch-all (IndexError on "", ValueError, RecursionError)
        return None


def cast(c, frame):
    """The reference's ``int(coord)``; raises what ``int()`` raises."""
    if frame in INT_FRAMES:
        return int(c)
    # SPEC: norm01 reads the coordinate with float() (int() would collapse [0, 1] to 0 and 1),
    # and a non-finite value is rejected as int() rejects it.
    value = float(c)
    if not math.isfinite(value):
        raise ValueError(c)
    return value


def in_range(bbox, max_coord):
    # SPEC: finite outputs. A coordinate beyond ±max_coord in the model's frame drops the item
    # (the reference would overflow float32 or fail to build its tensor). Exact comparison.
    return max(abs(c) for c in bbox) <= max_coord


def extract_bbox_label(text, frame, max_coord):
    """The reference's regex fallback: well-ordered ``{"bbox_2d": [...], "label": "..."}``."""
    pattern = ITEM_RE if frame in INT_FRAMES else ITEM_DEC_RE
    out = []
    for match in pattern.findall(text):
        x1, y1, x2, y2, label = match
        bbox = [cast(x1, frame), cast(y1, frame), cast(x2, frame), cast(y2, frame)]
        if bbox[0] < bbox[2] and bbox[1] < bbox[3] and in_range(bbox, max_coord):
            out.append({"bbox": bbox, "category_name": label})
    return out


def extract(completion, frame="qwen25_abs", max_boxes=64, max_coord=1e5):
    """The reference's ``extract``: JSON items first (one bad item is skipped), else the regex.

    Returns ``[{"bbox": [x1, y1, x2, y2] in the model frame, "category_name": raw label}]``.
    """
    completion = completion.strip()  # recall_reward / precision_reward strip before extract
    output = []
    extracted = parse_json(completion)
    if isinstance(extracted, list):
        for item in extracted:
            try:
                category_name = item.get("label")
                bbox = item.get("bbox_2d")
                if isinstance(bbox, list) and len(bbox) == 4:
                    bbox = [cast(coord, frame) for coord in bbox]
                    if bbox[0] < bbox[2] and bbox[1] < bbox[3] and in_range(bbox, max_coord):
                        output.append({"bbox": bbox, "category_name": category_name})
            except Exception:
                continue
    if not output:
        output = extract_bbox_label(completion, frame, max_coord)
    return output[:max_boxes]  # SPEC: a bounded number of boxes (config max_boxes)


# ------------------------------------------------------------------------------------------
# Format rewards.


def _format_json(text):
    return json.loads(re.sub(r"```json\n|\n```", "", text).strip())


def dual_format(text):
    """The reference's ``validate_bbox_label`` (dual_format_reward), before the inversion."""
    reward = 1.0
    try:
        data = _format_json(text)
        if isinstance(data, list):
            for item in data:
                if isinstance(item, dict) and "bbox_2d" in item and "label" in item:
                    bbox = item["bbox_2d"]
                    if not (isinstance(bbox, list) and len(bbox) == 4):
                        reward = 0.0
    except json.JSONDecodeError:
        reward = 0.0
    except (ValueError, RecursionError):
        # SPEC: never raise. The reference lets these escape (an integer beyond Python's digit
        # limit, very deep nesting) and stops the run; not valid JSON for us.
        reward = 0.0
    return reward


def strict_format(text, frame, input_size):
    """SPEC (``paper`` variant): the official check plus content: a JSON list whose every item
    is a dict with a label and a box of 4 JSON numbers, well ordered, inside the image."""
    if dual_format(text) == 0.0:
        return 0.0
    data = _format_json(text)
    if not isinstance(data, list):
        return 0.0
    if frame == "qwen25_abs":
        width, height = input_size[1], input_size[0]
    else:
        width = height = 1000 if frame == "rel1000" else 1
    for item in data:
        if not (isinstance(item, dict) and "bbox_2d" in item and "label" in item):
            return 0.0
        bbox = item["bbox_2d"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            return 0.0
        if not all(type(c) is int or (type(c) is float and math.isfinite(c)) for c in bbox):
            return 0.0
        x1, y1, x2, y2 = (cast(c, frame) for c in bbox)
        if not (x1 < x2 and y1 < y2 and x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height):
            return 0.0
    return 1.0


# ------------------------------------------------------------------------------------------
# Boxes and matching (BoxPriorMatcher, coor_utils), float32 as the reference's tensors.


def to_pixels(bbox, frame, image_size, input_size):
    """Model frame → original pixels, ``f32[4]``.

    The reference computes ``x / input_width * width`` in float32 (``rel1000``: EasyR1 divides
    by 1000). SPEC: ``x·W/w_in``; ours rounds once (exact arithmetic here, then float32), which
    keeps integer pixels exact (see ``parse.py``).
    """
    height, width = image_size
    if frame == "qwen25_abs":
        ext_h, ext_w = input_size
    else:
        ext_h = ext_w = 1000 if frame == "rel1000" else 1
    x1, y1, x2, y2 = bbox
    return np.array(
        [x1 * width / ext_w, y1 * height / ext_h, x2 * width / ext_w, y2 * height / ext_h],
        np.float32,
    )


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1, boxes2):
    """coor_utils.box_iou: ``(iou [M, N], union [M, N])``."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = np.maximum(boxes1[:, None, :2], boxes2[:, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """coor_utils.generalized_box_iou: ``iou − (hull − union) / hull``, ``[M, N]``."""
    iou, union = box_iou(boxes1, boxes2)
    lt = np.minimum(boxes1[:, None, :2], boxes2[:, :2])
    rb = np.maximum(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area


def box_prior_cost(pred_boxes, pred_ids, gt_boxes, gt_ids):
    """BoxPriorMatcher's ``C = cdist_L1 + cost_class + cost_giou``, float32 ``[M, N]``.

    ``cost_class = −onehot(pred)[:, gt_ids]`` is −1 exactly where the class ids agree.
    """
    cost_bbox = np.abs(pred_boxes[:, None, :] - gt_boxes[None, :, :]).sum(-1)
    cost_class = -(np.asarray(pred_ids)[:, None] == np.asarray(gt_ids)[None, :]).astype(np.float32)
    cost_giou = -generalized_box_iou(pred_boxes, gt_boxes)
    return cost_bbox + cost_class + cost_giou


def greedy(cost):
    """SPEC: our registered alternative matcher: repeatedly take the cheapest remaining pair
    (lowest flat index among equal costs). Returns ``(rows, cols)`` in pick order."""
    free = cost.astype(np.float64)
    rows, cols = [], []
    for _ in range(min(cost.shape)):
        i, j = np.unravel_index(np.argmin(free), free.shape)
        rows.append(int(i))
        cols.append(int(j))
        free[i, :] = np.inf
        free[:, j] = np.inf
    return np.array(rows, int), np.array(cols, int)


def is_greedy_order(cost, pairs, tol):
    """Whether ``pairs`` is what a greedy matcher can pick on ``cost`` when costs closer than
    ``tol`` may compare either way (another evaluation of the same float32 costs)."""
    free = cost.astype(np.float64)
    todo = sorted(pairs, key=lambda p: free[p])
    for _ in range(len(todo)):
        best = np.min(free)
        pick = next((p for p in todo if free[p] <= best + tol), None)
        if pick is None:
            return False
        todo.remove(pick)
        free[pick[0], :] = np.inf
        free[:, pick[1]] = np.inf
    return not todo and len(pairs) == min(cost.shape)


def modify_tensor(tensor, minimal, maximum):
    """The reference's modify_tensor: ``< minimal`` → 0, then ``> maximum`` → 1, in float32
    (a Python float threshold compares as float32, as torch's wrapped scalars)."""
    tensor = np.array(tensor, np.float32)
    tensor[tensor < minimal] = 0
    tensor[tensor > maximum] = 1
    return tensor


def modify_list(lst, minimal, maximum):
    """The reference's modify_list."""
    return [0 if x < minimal else 1 if x > maximum else x for x in lst]


# ------------------------------------------------------------------------------------------
# The schedule and the reward.


def thresholds(schedule, step, switch_step=1500):
    """``(ξ0, recall_lo, recall_hi, precision_lo, precision_hi)`` in force at ``step``.

    ``off`` / ``official_adaptive``: the branches of the reference's recall_reward and
    precision_reward, whose ``step`` is None without ``--adaptive`` and the trainer's global
    step with it (the switch is hard-coded at 1500 there; ``switch_step`` here).
    SPEC (``paper``): (ξ0, ξ1, ξ2) = (0.5, 0.5, 0.75) → (0.75, 0.75, 0.9) at the switch, both
    maps using (ξ1, ξ2).
    """
    if schedule == "paper":
        if step < switch_step:
            return (0.5, 0.5, 0.75, 0.5, 0.75)
        return (0.75, 0.75, 0.9, 0.75, 0.9)
    step = None if schedule == "off" else step
    # recall_reward
    recall_map = (0.5, 0.75) if step is not None else (0, 1)
    tp = 0.5 if step is None or step < switch_step else 0.75
    # precision_reward
    if step is not None:
        precision_map = (0.5, 0.75) if step < switch_step else (0.75, 0.9)
    else:
        precision_map = (0, 1)
    return (tp, *recall_map, *precision_map)


VARIANTS = {  # SPEC §4 table: overlap, precision divisor, combine, format check
    "official": ("giou", "matched", "sum", "official"),  # visionr1_qwen.py
    "easyr1": ("giou", "predictions", "mean", "official"),  # EasyR1 port: sum / len(dt), mean
    "paper": ("iou", "predictions", "sum", "strict"),  # SPEC: the paper
}


def reward(
    text,
    target,
    *,
    variant="official",
    stage=(0.5, 0, 1, 0, 1),
    frame="qwen25_abs",
    max_boxes=64,
    max_coord=1e5,
    matcher="hungarian",
    assignment=None,
    q_override=None,
):
    """One completion's reward terms, the way recall_reward / precision_reward /
    dual_format_reward compute them.

    Args:
      text: the completion. target: ``rewards.Target``-like (``boxes``, ``labels``,
        ``label_to_id``, ``image_size``, ``input_size``); read as plain data.
      stage: ``thresholds(...)``.
      assignment: ``[(pred, gt), ...]`` to score instead of the matcher's (another optimal
        assignment). q_override: ``{pair index: q}`` replacing matched overlaps (a float32
        rounding that falls on the other side of a threshold).

    Returns:
      dict with ``format``, ``recall``, ``precision``, ``total`` (Python floats), ``labels``
      (class ids), ``boxes`` (``f32[M, 4]`` pixels), ``pairs``, ``q`` (``f32`` per pair),
      ``exact`` (per pair: all coordinates integers, so the overlap arithmetic is exact),
      ``cost`` (of ``pairs``), ``min_cost`` (the matcher's), ``cost_matrix``.
    """
    overlap, divisor, combine, format_check = VARIANTS[variant]
    height, width = target.image_size
    num_instance = len(target.boxes)
    target_id_map = {str(k).lower(): v for k, v in target.label_to_id.items()}
    # dual_format_reward
    if format_check == "official":
        fmt = dual_format(text)
    else:
        fmt = strict_format(text, frame, target.input_size)
    fmt = fmt if num_instance > 0 else 1.0 - fmt
    # recall_reward / precision_reward: process dt
    dt = extract(text, frame, max_boxes, max_coord)
    dt_class_id, dt_bboxes = [], []
    for item in dt:
        try:
            class_id = target_id_map[item["category_name"].strip().lower()]
        except Exception:
            class_id = 0
        dt_class_id.append(class_id)
        dt_bboxes.append(to_pixels(item["bbox"], frame, (height, width), target.input_size))
    boxes = np.array(dt_bboxes, np.float32).reshape(-1, 4)
    out = {"format": fmt, "labels": dt_class_id, "boxes": boxes, "pairs": [], "q": []}
    out.update(exact=[], cost=0.0, min_cost=0.0, cost_matrix=np.zeros((len(dt), num_instance)))
    tp_thr, r_lo, r_hi, p_lo, p_hi = stage
    if not dt:
        recall = precision = 0.0 if num_instance > 0 else 1.0
    elif num_instance == 0:
        # SPEC: a negative sample with predicted boxes gets 0 (the reference divides by zero).
        recall = precision = 0.0
    else:
        # process gt
        gt_class_id = [int(target_id_map[str(c).lower()]) for c in target.labels]
        gt_bboxes = np.asarray(target.boxes, np.float64).astype(np.float32).reshape(-1, 4)
        with np.errstate(divide="ignore", invalid="ignore"):
            cost = box_prior_cost(boxes, dt_class_id, gt_bboxes, gt_class_id)
            giou = generalized_box_iou(boxes, gt_bboxes)
            iou, _ = box_iou(boxes, gt_bboxes)
        if matcher == "hungarian":
            rows, cols = linear_sum_assignment(cost)
        else:
            rows, cols = greedy(cost)
        min_cost = float(cost[rows, cols].astype(np.float64).sum())
        if assignment is not None:
            rows = np.array([p[0] for p in assignment], int)
            cols = np.array([p[1] for p in assignment], int)
        # SPEC: q is GIoU in the released code, IoU in the paper.
        q = (giou if overlap == "giou" else iou)[rows, cols].astype(np.float32)
        for k, value in (q_override or {}).items():
            q[k] = value
        pixel = np.concatenate([boxes[rows], gt_bboxes[cols]], 1)
        # recall_reward: tp = sum(modify_tensor(q, ξ0, ξ0)), a tie q == ξ0 counts ξ0
        tp = sum(modify_tensor(q, tp_thr, tp_thr))
        recall = modify_list([tp / num_instance], r_lo, r_hi)[0]
        # precision_reward: mean over the matched pairs; EasyR1 (and SPEC's paper): / len(dt)
        mapped = modify_tensor(q, p_lo, p_hi).astype(np.float64)
        precision = mapped.sum() / (len(q) if divisor == "matched" else len(dt))
        out.update(
            pairs=list(zip(rows.tolist(), cols.tolist(), strict=True)),
            q=q,
            exact=[bool(np.all(p == np.round(p))) for p in pixel],
            cost=float(cost[rows, cols].astype(np.float64).sum()),
            min_cost=min_cost,
            cost_matrix=cost,
        )
    recall, precision = float(recall), float(precision)
    total = fmt + recall + precision
    if combine == "mean":  # EasyR1's compute_score
        total /= 3.0
    out.update(recall=recall, precision=precision, total=total)
    return out


def near_thresholds(result, stage, ulps=4):
    """Indices of matched pairs whose overlap lies within ``ulps`` float32 ulps of a threshold
    while its boxes are not integer-valued: another float32 evaluation (FMA contraction,
    operation order) may put such a value on the other side, or on the threshold."""
    near = []
    for k, (value, exact) in enumerate(zip(result["q"], result["exact"], strict=True)):
        for t in {float(np.float32(t)) for t in stage}:
            if not exact and abs(float(value) - t) <= ulps * float(np.spacing(np.float32(t))):
                near.append((k, t))
    return near


def rounding_alternatives(result, stage):
    """``q_override`` dicts putting each near-threshold overlap just below, on, or just above
    its threshold (at most 3 such pairs; none when the result has none)."""
    near = near_thresholds(result, stage)[:3]
    choices = []
    for _, t in near:
        t32 = np.float32(t)
        choices.append([np.nextafter(t32, np.float32(-2)), t32, np.nextafter(t32, np.float32(2))])
    for values in itertools.product(*choices):
        yield {k: v for (k, _), v in zip(near, values, strict=True)}
