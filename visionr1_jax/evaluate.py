"""COCO / ODINW / REC evaluation (SPEC §7).

The evaluation as planned, end to end:

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
pycocotools and the standard library: no jax, no model, nothing compiled at import.

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
import re
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

    categories: dict[str, int] = {}  # key → id, first-seen order
    images, gt_anns = [], []
    for image_id, target in enumerate(ground_truth, start=1):
        height, width = target.image_size
        images.append({"id": image_id, "height": height, "width": width})
        for box, label in zip(target.boxes, target.labels, strict=True):
            cat = categories.setdefault(_label_key(label), len(categories) + 1)
            xywh = _xywh(box)
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": i, "name": name} for name, i in categories.items()]

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
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": _xywh(box),
                    "score": float(score),
                }
            )

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


# --------------------------------------------------------------------------------------------
# The evaluation run: config, greedy answers, scores, metrics, the command line.
#
# Everything below imports jax (and the model) lazily, inside the functions: the metric
# functions above stay importable without them.

PROTOCOLS = ("detection", "odinw", "rec")
SCORES = ("constant", "logprob")


def eval_config():
    """The `eval` section of a run config, read by `python -m visionr1_jax.evaluate` and by the
    training loop's periodic evaluation (`train.train_loop`).

    Fields:
      every: optimizer steps between evaluations during training, and one at the last step
        (0: none). With GRPO a multiple of `grpo.num_iterations` (the loop is at a rollout
        boundary then).
      batches: batches of the evaluation split (`data.eval_split`, read by
        `data.config.eval_config`: every record once, file order) per evaluation (None: all).
      max_new_tokens: the greedy token budget (512, SPEC §7).
      score: `constant` (every box 0.99, the paper's protocol) or `logprob` (each box scored by
        the geometric-mean probability of its coordinate tokens, `box_scores`, so that AP
        follows the model's own ranking).
      protocol: `detection` (COCO metrics over the prompts' images), `odinw` (per set, one
        query per (image, category); averaged), `rec` (Acc@0.5), or None: from `data.name`
        (`odinw` → odinw, `refcoco` → rec, else detection).
      max_dets: COCOeval's three detection caps (detection and odinw).
      save_predictions: also write every answer (text, boxes, scores) to
        `<workdir>/eval/<tag>_predictions.jsonl`.
    """
    import ml_collections

    c = ml_collections.ConfigDict()
    c.every = 0
    c.batches = ml_collections.config_dict.placeholder(int)
    c.max_new_tokens = 512
    c.score = "constant"
    c.protocol = ml_collections.config_dict.placeholder(str)
    c.max_dets = (1, 10, 100)
    c.save_predictions = True
    return c


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def protocol_of(config) -> str:
    """The run's evaluation protocol: `eval.protocol`, or the one its dataset implies."""
    chosen = config.eval.get("protocol") if "eval" in config else None
    if chosen:
        return chosen
    name = config.data.name if "data" in config else ""
    return {"odinw": "odinw", "refcoco": "rec"}.get(name, "detection")


def validate_config(config):
    """Checks the `eval` section (when present); returns config. Errors name the key; a value
    without effect is an error (a `score` or `max_dets` other than the default for `rec`,
    which scores the first box only)."""
    if "eval" not in config:
        return config
    c = config.eval

    def fail(key, why):
        raise ValueError(f"eval.{key}={c.get(key)!r} {why}")

    known = set(eval_config().keys())
    for key in c.keys():
        if key not in known:
            fail(key, f"is not an eval key; known: {sorted(known)}")
    if not _is_int(c.every) or c.every < 0:
        fail("every", "must be an int >= 0 (0: no evaluation during training)")
    if c.batches is not None and (not _is_int(c.batches) or c.batches < 1):
        fail("batches", "must be None (the whole split) or an int >= 1")
    if not _is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        fail("max_new_tokens", "must be an int >= 1")
    if c.score not in SCORES:
        fail("score", f"must be one of {SCORES}")
    if c.protocol is not None and c.protocol not in PROTOCOLS:
        fail("protocol", f"must be None (from data.name) or one of {PROTOCOLS}")
    dets = tuple(c.max_dets)
    if len(dets) != 3 or not all(_is_int(m) for m in dets) or not 0 < dets[0] < dets[1] < dets[2]:
        fail("max_dets", "must be three increasing positive ints")
    if not isinstance(c.save_predictions, bool):
        fail("save_predictions", "must be a bool")
    if "data" in config and protocol_of(config) == "rec":
        default = eval_config()
        for key in ("score", "max_dets"):
            if tuple(np.atleast_1d(c[key])) != tuple(np.atleast_1d(default[key])):
                fail(key, "has no effect with the rec protocol (Acc@0.5 of the first box)")
    objective = config.get("objective", "grpo")
    mu = int(config.grpo.num_iterations) if "grpo" in config else 1
    if c.every and objective == "grpo" and c.every % mu:
        fail("every", f"must be a multiple of grpo.num_iterations={mu} (a rollout boundary)")
    return config


@dataclasses.dataclass
class Answer:
    """One evaluated query: the greedy answer and what it predicts, in original pixels.

    Attributes:
      record_id: the dataset record (ODINW: `<set>/<split>/<image_id>/<category_id>`).
      completion: the decoded answer (special tokens skipped).
      target: the record's ground truth (`rewards.Target`).
      boxes: f32[M, 4] xyxy original-image pixels, in the answer's order.
      labels: the M predicted labels as written (non-string labels become "").
      scores: f32[M] (`eval.score`).
      truncated: the answer hit `max_new_tokens` without a stop token.
    """

    record_id: str
    completion: str
    target: Target
    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray
    truncated: bool

    def to_json(self) -> dict:
        t = self.target
        return {
            "record_id": self.record_id,
            "completion": self.completion,
            "boxes": np.asarray(self.boxes, np.float64).round(3).tolist(),
            "labels": list(self.labels),
            "scores": np.asarray(self.scores, np.float64).tolist(),
            "truncated": bool(self.truncated),
            "target": {
                "boxes": np.asarray(t.boxes, np.float64).tolist(),
                "labels": list(t.labels),
                "image_size": list(t.image_size),
                "input_size": list(t.input_size),
                "label_to_id": dict(t.label_to_id or {}),
            },
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Answer:
        from visionr1_jax.rewards import Target

        t = d["target"]
        target = Target(
            np.asarray(t["boxes"], np.float32).reshape(-1, 4),
            list(t["labels"]),
            tuple(t["image_size"]),
            tuple(t["input_size"]),
            label_to_id=dict(t["label_to_id"]),
        )
        return cls(
            d["record_id"],
            d["completion"],
            target,
            np.asarray(d["boxes"], np.float32).reshape(-1, 4),
            list(d["labels"]),
            np.asarray(d["scores"], np.float32),
            bool(d["truncated"]),
        )


_BBOX_RE = re.compile(rb'"bbox_2d"\s*:\s*\[([^\]]*)\]')  # an item's box list, in bytes


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each
    byte (printable Latin-1 bytes stand for themselves; the other 68 get 256, 257, ...)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """The UTF-8 bytes each token contributes to `decode(ids, skip_special_tokens=True)`:
    byte-level BPE tokens map back through the GPT-2 byte alphabet; special tokens give b""."""
    inverse = _byte_alphabet()
    special = set(tokenizer.all_special_ids)
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if i in special or piece is None:
            out.append(b"")
        elif all(ch in inverse for ch in piece):
            out.append(bytes(inverse[ch] for ch in piece))
        else:  # not byte-level: the piece's own text
            out.append(tokenizer.decode([i], skip_special_tokens=True).encode())
    return out


def box_scores(
    tokenizer, ids: Sequence[int], logprobs: np.ndarray, model_boxes: Sequence[Sequence[float]]
) -> np.ndarray:
    """Each parsed box's score from the model's own token probabilities: exp of the mean
    log-prob of the tokens that wrote its coordinates (the `[x1, y1, x2, y2]` of its
    `"bbox_2d"` item), a geometric-mean probability in (0, 1].

    The answer's `"bbox_2d"` lists are found in the decoded bytes in order; parsed box k takes
    the first unused list whose four numbers equal its coordinates (in the model's frame), so a
    list the parser dropped is skipped. A box without such a list (a regex-fallback parse with
    other spacing) gets the mean over all the answer's tokens.

    Args:
      tokenizer: the checkpoint's tokenizer; ids: the answer's generated token ids (masked
        tail removed); logprobs: f32[len(ids)] their log-probs under the model (greedy);
      model_boxes: the parsed boxes [M][4] in the model's frame, answer order.
    Returns:
      f32[M] scores.
    """

    pieces = _token_bytes(tokenizer, ids)
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.asarray([len(p) for p in pieces])
    text = b"".join(pieces)
    lp = np.asarray(logprobs, np.float64)[: len(ids)]
    fallback = float(np.exp(lp.mean())) if len(lp) else 0.0
    spans = []
    for m in _BBOX_RE.finditer(text):
        numbers = re.findall(rb"-?\d+(?:\.\d+)?", m.group(1))
        try:
            values = [float(v) for v in numbers]
        except ValueError:
            values = []
        spans.append((m.start(1), m.end(1), values))
    used = [False] * len(spans)
    out = []
    for box in model_boxes:
        score = fallback
        for k, (a, b, values) in enumerate(spans):
            if used[k] or len(values) != 4:
                continue
            if all(abs(float(v) - float(c)) < 1e-6 for v, c in zip(values, box, strict=True)):
                used[k] = True
                inside = (starts < b) & (ends > a)
                if inside.any():
                    score = float(np.exp(lp[inside].mean()))
                break
        out.append(score)
    return np.asarray(out, np.float32)


def _answer_of(tokenizer, record_id, ids, logps, target, truncated, rc, score) -> Answer:
    """One greedy answer (token ids, their log-probs) decoded, parsed as the reward parses it
    (`rewards.parse.parse_answer` with the reward config `rc`; labels kept as written), its
    boxes mapped to original pixels and scored (`score`: constant or `box_scores`)."""
    from visionr1_jax.rewards import parse

    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    parsed = parse.parse_answer(
        text,
        frame=rc.frame,
        input_size=tuple(target.input_size),
        max_boxes=int(rc.max_boxes),
        max_coord=float(rc.max_coord),
    )
    model_boxes = np.asarray(parsed.boxes, np.float64).reshape(-1, 4)
    boxes = parse.to_original_pixels(model_boxes, rc.frame, target.image_size, target.input_size)
    labels = [x if isinstance(x, str) else "" for x in parsed.labels]
    if score == "logprob":
        scores = box_scores(tokenizer, ids, logps, model_boxes)
    else:
        scores = np.full(len(labels), PAPER_SCORE, np.float32)
    return Answer(record_id, text, target, boxes.reshape(-1, 4), labels, scores, bool(truncated))


def predict(model, processor, batches, config, *, max_new_tokens: int, score: str) -> list[Answer]:
    """Greedy answers to the prompts of `batches`, this process's rows, in pipeline order.

    Args:
      model: the policy (`QwenVL`), possibly sharded; call under `jax.set_mesh(mesh)`.
      processor: the checkpoint's processor (its tokenizer decodes).
      batches: `pipeline.DeviceBatch`es of the evaluation pipeline (global arrays sharded over
        the mesh's batch axes; padding rows are dropped).
      config: the run config (the `reward` section's parser settings and frame; without one,
        the `official` reward in the data's frame).
      max_new_tokens: greedy budget; score: `constant` or `logprob`.
    """
    import jax

    from visionr1_jax import sampler, sft, train

    rc = sft._reward_config(config)
    tokenizer = processor.tokenizer
    eos, _ = sampler.default_token_ids(model)
    answers = []
    for batch in batches:
        out = sampler.generate(
            model,
            batch.arrays,
            rng=jax.random.key(0),  # unused: greedy
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            cache_dtype=model.cfg.dtype,
        )
        tokens, mask = train.to_host(out.tokens), train.to_host(out.mask)
        logps = train.to_host(out.logprobs)
        cut = train.truncated(tokens, mask, eos) & (mask.sum(1) >= max_new_tokens)
        host = batch.host
        valid = np.nonzero(np.asarray(host.arrays["valid"], bool))[0]
        rows = train.local_rows(batch.arrays["valid"])  # global row of each local row
        for i, target in zip(valid, host.targets(), strict=True):
            r = rows[i]
            ids = tokens[r][mask[r]]
            answers.append(
                _answer_of(tokenizer, host.record_ids[i], ids, logps[r][mask[r]], target,
                           cut[r], rc, score)
            )  # fmt: skip
    return answers


def gather_answers(answers: list[Answer], tag: str = "eval") -> list[Answer]:
    """Every process's answers, process 0's first (multi-process: exchanged as JSON through
    the `jax.distributed` key-value store; one process: as they are)."""
    import jax

    if jax.process_count() == 1:
        return answers
    import json

    from jax._src import distributed

    client = distributed.global_state.client
    me = jax.process_index()
    client.key_value_set(f"visionr1_eval/{tag}/{me}", json.dumps([a.to_json() for a in answers]))
    out = []
    for p in range(jax.process_count()):
        text = client.blocking_key_value_get(f"visionr1_eval/{tag}/{p}", 600_000)
        out += [Answer.from_json(d) for d in json.loads(text)]
    return out


def _set_of(record_id: str) -> str:
    """The ODINW set of a record id `<set>/<split>/<image_id>/<category_id>`."""
    return record_id.rsplit("/", 3)[0]


def compute_metrics(answers: Sequence[Answer], config) -> dict[str, float]:
    """The protocol's metrics of `answers` (`protocol_of(config)`), plus the reward's view of
    the same answers: `parse_rate` (official format check passed with >= 1 box),
    `matched_iou` (mean IoU over the Hungarian pairs of the reward's matcher),
    `truncated_rate`, `num_examples`.

    detection: `detection_metrics` over all answers (one image each); odinw: per set (from the
    record id), each query its own image holding only its category's boxes, then
    `odinw_average` (`AP/<set>` per set); rec: `Acc@0.5` (`rec_accuracy`, first box).
    """
    from visionr1_jax import sft

    if not answers:
        raise ValueError("no answer to evaluate (the evaluation split is empty?)")
    protocol = protocol_of(config)
    dets = tuple(config.eval.max_dets) if "eval" in config else (1, 10, 100)
    preds = [(a.boxes, a.labels, a.scores) for a in answers]
    targets = [a.target for a in answers]
    if protocol == "detection":
        out = detection_metrics(preds, targets, max_dets=dets)
    elif protocol == "odinw":
        sets: dict[str, list[int]] = {}
        for k, a in enumerate(answers):
            sets.setdefault(_set_of(a.record_id), []).append(k)
        per_set = {
            name: detection_metrics([preds[k] for k in ks], [targets[k] for k in ks],
                                    max_dets=dets)
            for name, ks in sorted(sets.items())
        }  # fmt: skip
        out = odinw_average(per_set)
    else:
        out = {"Acc@0.5": rec_accuracy([a.boxes for a in answers],
                                       [np.asarray(t.boxes)[0] for t in targets])}  # fmt: skip
    terms = sft.score_completions([a.completion for a in answers], targets, config)
    pairs = float(terms["num_matched"].sum())
    iou = float((terms["matched_iou"].astype(np.float64) * terms["num_matched"]).sum())
    out["parse_rate"] = float(terms["parsed"].mean())
    out["matched_iou"] = iou / pairs if pairs else 0.0
    out["truncated_rate"] = float(np.mean([a.truncated for a in answers]))
    out["num_examples"] = len(answers)
    return {k: float(v) for k, v in out.items()}


def evaluate(model, processor, config, mesh, *, tag: str = "eval") -> tuple[dict, list[Answer]]:
    """Greedy evaluation of `model` on the run's evaluation split (`eval` section, defaults
    from `eval_config()`), sharded over `mesh`: every process decodes its rows, process 0
    gathers every answer and computes the metrics (other processes return their own answers
    and the same metrics: every process computes them from the gathered answers).

    Returns:
      `(metrics, answers)`: `compute_metrics` of all answers, and the answers.
    """
    import itertools

    import jax

    from visionr1_jax import metrics as metrics_lib
    from visionr1_jax.data import config as data_config_lib
    from visionr1_jax.data import pipeline

    c = config.eval if "eval" in config else eval_config()
    inner = pipeline.InputPipeline(data_config_lib.eval_config(config.data), processor)
    pipe = pipeline.DevicePrefetch(inner, mesh)
    total = min(c.batches or inner.num_batches, inner.num_batches)
    bar = metrics_lib.Progress(total, enabled=config.get("progress", True), desc=tag)
    try:
        batches = itertools.islice(pipe, c.batches) if c.batches else pipe
        with jax.set_mesh(mesh):
            mine = predict(model, processor, _counted(batches, bar), config,
                           max_new_tokens=int(c.max_new_tokens), score=c.score)  # fmt: skip
    finally:
        bar.close()
        pipe.close()
    answers = gather_answers(mine, tag)
    return compute_metrics(answers, config), answers


def _counted(batches, bar):
    """`batches`, advancing the progress bar after each one is used."""
    for batch in batches:
        yield batch
        bar.update(1, {})


def write_results(workdir: str, tag: str, metrics: Mapping, answers, config, step) -> str:
    """Process 0 writes `<workdir>/eval/<tag>.json` (the metrics, the step, the protocol and
    the `eval` section) and, with `eval.save_predictions`, `<tag>_predictions.jsonl`.
    Returns the JSON path (local mirror of a gs:// workdir: `metrics.local_dir`)."""
    import json
    import os

    import jax

    from visionr1_jax import metrics as metrics_lib

    directory = os.path.join(metrics_lib.local_dir(workdir), "eval")
    path = os.path.join(directory, f"{tag}.json")
    if jax.process_index() != 0:
        return path
    os.makedirs(directory, exist_ok=True)
    c = config.eval if "eval" in config else eval_config()
    record = {
        "tag": tag,
        "step": step,
        "protocol": protocol_of(config),
        "metrics": dict(metrics),
        "eval": c.to_dict(),
    }
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)  # never half-written
    if c.save_predictions:
        lines = os.path.join(directory, f"{tag}_predictions.jsonl")
        with open(lines + ".tmp", "w", encoding="utf-8") as f:
            for a in answers:
                f.write(json.dumps(a.to_json()) + "\n")
        os.replace(lines + ".tmp", lines)
    return path


TABLE_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10",
              "AR100", "Acc@0.5", "parse_rate", "matched_iou", "truncated_rate",
              "num_examples")  # fmt: skip


def format_table(metrics: Mapping[str, float], title: str = "") -> str:
    """The metrics as a two-column Markdown table (the main ones first, then the rest)."""
    keys = [k for k in TABLE_KEYS if k in metrics]
    keys += sorted(k for k in metrics if k not in keys)
    lines = [f"{title}\n" if title else "", "| metric | value |", "|---|---|"]
    for k in keys:
        v = metrics[k]
        lines.append(f"| {k} | {int(v) if k.startswith('num_') else f'{v:.4f}'} |")
    return "\n".join(lines).lstrip("\n")


def load_for_eval(config, workdir: str, checkpoint: str | None, mesh):
    """The model to evaluate and its tag/step: `checkpoint` None → the newest checkpoint of the
    run in `workdir` (the config's base model when it has none), an int → that step, `base`
    → the config's model (`model.checkpoint`, or the tiny one), a directory → that Hugging
    Face checkpoint (e.g. an export). Returns `(model, processor, tag, step)`."""
    import os

    import jax
    from flax import nnx

    from visionr1_jax import checkpoint as checkpoint_lib
    from visionr1_jax import processing, train

    path = train.checkpoint_path(config, workdir)
    step = None
    if checkpoint not in (None, "", "base") and not str(checkpoint).isdigit():
        path, tag = str(checkpoint), "hf_" + os.path.basename(os.path.normpath(str(checkpoint)))
    else:
        tag = "base"
    with jax.set_mesh(mesh):
        model = train.load_model(config, path, mesh)
    if tag == "base" and checkpoint != "base":
        ckpt_dir = os.path.join(workdir, "checkpoints")
        wanted = int(checkpoint) if checkpoint else None
        if wanted is not None or (
            "://" in workdir or os.path.isdir(ckpt_dir)
        ):  # a run's checkpoint: its trainable parameters into the model
            _, _, like = nnx.split(model, train.frozen_filter(config), ...)
            try:
                loaded, step = checkpoint_lib.load_params(workdir, wanted, like)
            except FileNotFoundError:
                if wanted is not None:
                    raise
                loaded = None
            if loaded is not None:
                nnx.update(model, loaded)
                tag = f"step_{step}"
    return model, processing.load_processor(path), tag, step


def run(config, workdir: str, checkpoint: str | None = None) -> dict[str, float]:
    """`python -m visionr1_jax.evaluate`: loads the model (`load_for_eval`), evaluates it
    (`evaluate`), writes `<workdir>/eval/<tag>.json` (+ predictions), TensorBoard scalars
    `eval/*` at the checkpoint's step, and prints the table. Returns the metrics."""
    import jax

    from visionr1_jax import config_lib, train
    from visionr1_jax import metrics as metrics_lib

    config_lib.validate(config)
    mesh = train.make_run_mesh(config)
    model, processor, tag, step = load_for_eval(config, workdir, checkpoint, mesh)
    out, answers = evaluate(model, processor, config, mesh, tag=tag)
    path = write_results(workdir, tag, out, answers, config, step)
    if jax.process_index() == 0:
        if (config.get("metrics") or {}).get("tensorboard", True):
            tb = metrics_lib.TensorBoardWriter(workdir)
            tb.scalars(step or 0, {f"eval/{k}": v for k, v in out.items()})
            tb.close()
        print(format_table(out, f"{protocol_of(config)} evaluation of {tag} ({path})"))
    return out


def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from visionr1_jax import host

    host.initialize_distributed(
        _FLAGS["coordinator_address"].value,
        _FLAGS["num_processes"].value,
        _FLAGS["process_id"].value,
    )
    run(_FLAGS["config"].value, _FLAGS["workdir"].value, _FLAGS["checkpoint"].value)


_FLAGS: dict = {}

if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Run config file.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run's directory (or gs://).")
    _FLAGS["checkpoint"] = flags.DEFINE_string(
        "checkpoint", None, "Step of the run's checkpoint (default: newest), 'base', or a "
        "Hugging Face checkpoint directory.",
    )  # fmt: skip
    _FLAGS["coordinator_address"] = flags.DEFINE_string("coordinator_address", None, "host:port")
    _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Processes.")
    _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
