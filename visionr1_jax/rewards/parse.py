"""Host-side parsing of model answers into padded box arrays (SPEC §1–2).

The only host hop of the reward: ragged text in, fixed-shape numpy out. The same rules serve
the reward and the evaluation. Parsing never raises, whatever the string (garbage, truncated,
10⁶ characters, 10⁴-deep nesting, NaN/Infinity, huge numbers), returns at most ``max_boxes``
boxes, and every number it returns is finite.

Rules ("official", the released Vision-R1 code):

1. Strip; if the first line starts with ```` ```json ```` drop it; if ```` ``` ```` remains keep the
   text before it; ``json.loads``.
2. A list: for each item take ``label`` and ``bbox_2d``; keep it when the box is a list of 4
   values that the reference's ``[int(c) for c in box]`` accepts, with ``x1 < x2`` and
   ``y1 < y2``: numbers truncate toward zero (``int(-0.5) == 0``), booleans count as 0/1, and
   strings are read by ``int()`` (``"95"``, ``" 95 "``, ``"+95"``, ``"-3"``, ``"1_0"``, other
   Unicode decimal digits). Whatever ``int()`` rejects (``"9.5"``, ``None``, lists, NaN,
   Infinity) drops that item only, never the answer.
3. Nothing extracted: fall back to a regex over ``{"bbox_2d": [a, b, c, d], "label": "..."}``
   items (integers ≤ 1000; decimals in the ``norm01`` frame), same ordering filter.
4. Labels ``strip().lower()`` are looked up in the sample's label→id map (keys lower-cased);
   unknown or non-string labels get id 0 (background).

Additions of ours, documented because the reference code has no answer for them (it raises or
overflows): a box with a coordinate beyond ``±max_coord`` in the model's frame is dropped (the
reference would build ``inf``/NaN float32 tensors or fail to convert a huge ``int``); the check
runs on the exact Python integer, before any float conversion, so ``int(1e300)`` or a
4,000-digit string can never overflow. The ``norm01`` frame reads coordinates with
``float()`` instead of ``int()`` (same accepted types, finite values only), since ``int()``
would collapse ``[0, 1]`` to two values. The ``paper`` strict format flag additionally requires
the coordinates to be JSON numbers: a box written with strings or booleans is extracted and
scored, but fails that format check.

Coordinate frames (config value, never guessed): ``qwen25_abs`` integer pixels of the resized
model input (``x·W/w_in``), ``rel1000`` integers in 0–1000 (``x·W/1000``), ``norm01`` floats in
[0, 1] (``x·W``). The rescaling runs in float64 and rounds once to float32. The reference
computes ``x / w_in * W`` in float32, two roundings that move about 8% of integer coordinates
by one ulp even when ``w_in == W``; rounding once keeps integer pixels exact, so the overlap of
two integer boxes, and with it the recall tie at ξ0 (SPEC §3), is the same on every CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import orjson

from visionr1_jax.data.target import Target
from visionr1_jax.sections.reward import FRAMES

_INT_FRAMES = ("qwen25_abs", "rel1000")

_MAX_FINITE = 1e300  # larger integers are rejected before float() could overflow
_FENCE_RE = re.compile(r"```json\n|\n```")
_INT = r"(\d{1,3}|1000)"
_ITEM_INT_RE = re.compile(
    r"\{\"bbox_2d\": \[" + ", ".join([_INT] * 4) + r"\], \"label\": \"([^\"]+)\"\}"
)
_DEC = r"(\d+(?:\.\d+)?)"
_ITEM_DEC_RE = re.compile(
    r"\{\"bbox_2d\": \[" + ", ".join([_DEC] * 4) + r"\], \"label\": \"([^\"]+)\"\}"
)


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """One parsed completion (host): boxes in the model's frame, as returned by the rules."""

    boxes: list[list[float]]
    labels: list[object]
    format_official: float
    format_strict: float
    num_dropped: int


def strip_fences(text: str) -> str:
    """Rule 1 up to ``json.loads``: drop a leading ```` ```json ```` line and a closing fence."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("```json"):
        text = "\n".join(lines[1:])
    if "```" in text:
        text = text.split("```")[0]
    return text


_INVALID = object()


def _loads(text: str):
    """``json.loads`` semantics, or ``_INVALID`` (bad JSON, too deep, …); never raises.

    ``orjson`` parses the common case ~3x faster; whatever it rejects (NaN, Infinity, 1e400,
    lone surrogates, …) goes to ``json``, which decides. Where orjson accepts, the two agree up
    to integers beyond 2**64 coming back as floats, which no rule distinguishes (any such
    coordinate is beyond ``max_coord``; a non-string label is unknown either way).
    """
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError):
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


def _cast(c, integer: bool):
    """One coordinate as the reference's ``int(c)`` (``float(c)`` in ``norm01``), or None.

    JSON gives int, float, bool, str, None, list or dict. Numbers and booleans cast (floats
    truncate toward zero in integer frames; NaN and ±Infinity are rejected, as ``int()``
    rejects them); strings go through ``int()`` / ``float()`` (a non-finite ``float()`` result
    is rejected); anything else is None. Integers stay exact Python ints, so the caller can
    range-check them before any float conversion.
    """
    kind = type(c)
    if kind is int or kind is bool:
        return int(c)
    if kind is float:
        if not math.isfinite(c):
            return None
        return int(c) if integer else c
    if kind is str:
        try:
            value = int(c) if integer else float(c)
        except ValueError:  # includes strings beyond the interpreter's int digit limit
            return None
        return value if integer or math.isfinite(value) else None
    return None


def _coords(bbox, integer: bool, max_coord: float) -> list[float] | None:
    """A valid ``[x1, y1, x2, y2]`` in the model's frame, or None (rule 2 + our range guard).

    Each value is cast by ``_cast`` (the reference's ``int(c)``), must lie within
    ``±max_coord`` (checked on the exact value, so nothing overflows), and ``x1 < x2``,
    ``y1 < y2``.
    """
    if type(bbox) is not list or len(bbox) != 4:
        return None
    x1, y1, x2, y2 = bbox
    if not (type(x1) is int and type(y1) is int and type(x2) is int and type(y2) is int):
        x1, y1, x2, y2 = (_cast(c, integer) for c in bbox)
        if x1 is None or y1 is None or x2 is None or y2 is None:
            return None
    # max_coord <= 1e300 (capped by the callers), so float() below never overflows.
    if max(abs(x1), abs(y1), abs(x2), abs(y2)) > max_coord or not (x1 < x2 and y1 < y2):
        return None
    return [float(x1), float(y1), float(x2), float(y2)]


def _numeric(bbox) -> bool:
    """Whether every coordinate is a JSON number (the strict format's requirement)."""
    return all(type(c) is int or type(c) is float for c in bbox)


def _official_format(data) -> float:
    """Dual-format check of the released code on the JSON of the fence-stripped text: valid
    JSON, and every dict item carrying both keys has a 4-element list box. Non-list JSON and
    ``[]`` pass."""
    if data is _INVALID:
        return 0.0
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and "bbox_2d" in item and "label" in item:
                bbox = item["bbox_2d"]
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    return 0.0
    return 1.0


def _strict_format(data, official: float, frame: str, extent: tuple[float, float]) -> float:
    """The paper's content check on top of the official one: a JSON list whose every item is a
    dict with ``bbox_2d`` (4 finite numbers, well ordered, inside the image) and ``label``."""
    if official == 0.0 or not isinstance(data, list):
        return 0.0
    width, height = extent
    for item in data:
        if not (isinstance(item, dict) and "bbox_2d" in item and "label" in item):
            return 0.0
        box = _coords(item["bbox_2d"], frame in _INT_FRAMES, max_coord=_MAX_FINITE)
        if box is None or not _numeric(item["bbox_2d"]):
            return 0.0
        x1, y1, x2, y2 = box
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            return 0.0
    return 1.0


def _frame_extent(frame: str, input_size: tuple[int, int]) -> tuple[float, float]:
    """``(width, height)`` of the image in the model's coordinate frame."""
    if frame == "qwen25_abs":
        return float(input_size[1]), float(input_size[0])
    return (1000.0, 1000.0) if frame == "rel1000" else (1.0, 1.0)


def parse_answer(
    text: str,
    *,
    frame: str = "qwen25_abs",
    input_size: tuple[int, int] = (1, 1),
    max_boxes: int = 64,
    max_coord: float = 1e5,
    label_to_id: Mapping[str, int] | None = None,
) -> ParsedAnswer:
    """Parses one completion by the official rules (module docstring). Never raises.

    With ``label_to_id`` (keys lower-case) the labels come back as class ids (rule 4).
    """
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    boxes: list[list[float]] = []
    labels: list[object] = []
    answer = strip_fences(text)
    format_text = _FENCE_RE.sub("", text).strip()
    data = _loads(answer)
    shared = format_text == answer.strip()
    format_data = data if shared else _loads(format_text)
    integer = frame in _INT_FRAMES
    max_coord = min(float(max_coord), _MAX_FINITE)
    width, height = _frame_extent(frame, input_size)
    # One pass extracts the boxes and, when the format checks read the same JSON, also decides
    # the official flag (dict items with both keys need a 4-element list box) and the strict one.
    official_ok = strict_ok = type(data) is list
    if type(data) is list:
        for item in data:
            if type(item) is not dict:
                strict_ok = False
                continue
            bbox = item.get("bbox_2d")
            has_label = "label" in item
            if has_label and "bbox_2d" in item and (type(bbox) is not list or len(bbox) != 4):
                official_ok = False
            box = _coords(bbox, integer, max_coord)
            if box is None:
                strict_ok = False
                continue
            if strict_ok and (
                not has_label
                or box[0] < 0
                or box[1] < 0
                or box[2] > width
                or box[3] > height
                or not _numeric(bbox)
            ):
                strict_ok = False
            boxes.append(box)
            labels.append(item.get("label"))
            if len(boxes) > max_boxes and not shared:
                break
    if not boxes:
        pattern = _ITEM_DEC_RE if frame == "norm01" else _ITEM_INT_RE
        for match in pattern.finditer(text):
            box = [float(g) if frame == "norm01" else int(g) for g in match.groups()[:4]]
            if box[0] < box[2] and box[1] < box[3] and max(box) <= max_coord:
                boxes.append([float(c) for c in box])
                labels.append(match.group(5))
    if shared:
        official = 0.0 if data is _INVALID else float(official_ok or type(data) is not list)
        strict = float(official == 1.0 and strict_ok)
    else:
        official = _official_format(format_data)
        strict = _strict_format(format_data, official, frame, (width, height))
    dropped = max(len(boxes) - max_boxes, 0)
    boxes, labels = boxes[:max_boxes], labels[:max_boxes]
    if label_to_id is not None:
        labels = [label_to_id.get(x.strip().lower(), 0) if type(x) is str else 0 for x in labels]
    return ParsedAnswer(boxes, labels, official, strict, dropped)


def label_id(label: object, label_to_id: Mapping[str, int]) -> int:
    """Rule 4: ``strip().lower()`` lookup; unknown or non-string labels are 0 (background)."""
    if not isinstance(label, str):
        return 0
    return int(label_to_id.get(label.strip().lower(), 0))


def _pixel_scale(frame: str, image_size, input_size) -> list[float]:
    """Per-coordinate factors (x, y, x, y) from the model's frame to original pixels."""
    height, width = image_size
    ext_w, ext_h = _frame_extent(frame, input_size)
    return [width / ext_w, height / ext_h] * 2


def to_original_pixels(
    boxes: np.ndarray, frame: str, image_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """``f[M, 4]`` in the model's frame → ``f32[M, 4]`` xyxy in original-image pixels."""
    scale = np.array(_pixel_scale(frame, image_size, input_size), dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ParsedBatch:
    """Padded parse results for ``C`` completions (numpy, host).

    Attributes:
      boxes: ``f32[C, M, 4]`` xyxy in original-image pixels (0 where padded).
      labels: ``i32[C, M]`` class ids (0 = unknown / background).
      valid: ``bool[C, M]``.
      format_official, format_strict: ``f32[C]`` in {0, 1}, before the negative inversion.
      num_dropped: ``i32[C]`` boxes beyond ``max_boxes``.
    """

    boxes: np.ndarray
    labels: np.ndarray
    valid: np.ndarray
    format_official: np.ndarray
    format_strict: np.ndarray
    num_dropped: np.ndarray


def bucket(n: int, cap: int) -> int:
    """Static size for ``n`` items: the next power of two ≥ max(n, 1), at most ``cap``."""
    size = 1
    while size < n:
        size *= 2
    return max(1, min(size, max(cap, 1)))


def parse_batch(
    completions: Sequence[str],
    targets: Sequence[Target],
    *,
    frame: str = "qwen25_abs",
    max_boxes: int = 64,
    max_coord: float = 1e5,
    pad_to: int | None = None,
) -> ParsedBatch:
    """Parses ``C`` completions against their targets into padded arrays.

    Args:
      completions: ``C`` strings.
      targets: ``C`` targets (their image/input sizes and label maps are used).
      frame: coordinate frame of the answers.
      max_boxes: per-completion cap on boxes.
      pad_to: static ``M``; defaults to ``bucket(max boxes found, max_boxes)``.
    """
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completions but {len(targets)} targets")
    # Parsing allocates many short-lived containers; pausing the cyclic GC (nothing here makes
    # cycles) keeps a full collection from landing in the middle of a batch.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        parsed = [
            parse_answer(
                text,
                frame=frame,
                input_size=t.input_size,
                max_boxes=max_boxes,
                max_coord=max_coord,
                label_to_id=t.label_to_id,
            )
            for text, t in zip(completions, targets, strict=True)
        ]
    finally:
        if gc_was_enabled:
            gc.enable()
    width = pad_to or bucket(max((len(p.boxes) for p in parsed), default=0), max_boxes)
    count = len(parsed)
    counts = np.array([min(len(p.boxes), width) for p in parsed], np.int64)
    rows = np.repeat(np.arange(count), counts)
    slots = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    flat = [b for p, m in zip(parsed, counts, strict=True) for b in p.boxes[:m]]
    flat = np.array(flat, np.float64).reshape(-1, 4)
    # Per-row frame → original-pixel scale, applied to all boxes at once.
    scale = np.array(
        [_pixel_scale(frame, t.image_size, t.input_size) for t in targets], np.float64
    ).reshape(count, 4)
    boxes = np.zeros((count, width, 4), np.float32)
    boxes[rows, slots] = (flat * scale[rows]).astype(np.float32)
    labels = np.zeros((count, width), np.int32)
    labels[rows, slots] = [x for p, m in zip(parsed, counts, strict=True) for x in p.labels[:m]]
    valid = np.zeros((count, width), bool)
    valid[rows, slots] = True
    return ParsedBatch(
        boxes=boxes,
        labels=labels,
        valid=valid,
        format_official=np.array([p.format_official for p in parsed], np.float32),
        format_strict=np.array([p.format_strict for p in parsed], np.float32),
        num_dropped=np.array([p.num_dropped for p in parsed], np.int32),
    )
