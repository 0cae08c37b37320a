"""The record schema shared by every builder, and the checks that find bad records.

A record is one prompt: an encoded image, the prompt text, the ground truth and where it came
from. All builders write the same features, so the input pipeline is builder-agnostic.

Fields (numpy values as returned by ``tfds.data_source``; strings come back as ``bytes``):

=============  ===============  ==========================================================
``id``         str              unique record id (dataset-specific, stable across builds)
``image``      bytes            encoded image (PNG/JPEG...), empty when the file was missing
``width``      i32              original image width W
``height``     i32              original image height H
``task``       str              ``detection`` | ``grounding`` | ``rec``
``prompt``     str              user prompt in the builder's template
``categories`` str[K]           categories named by the prompt (detection/grounding)
``expression`` str              referring expression (REC), else empty
``boxes``      f32[N, 4]        ground truth, xyxy in original image pixels
``labels``     str[N]           label of each box
``label_map``  str              JSON ``{label: id}``, ids >= 1 (0 = background)
``source``     str              dataset name (``coco_detection``, ``odinw/Aquarium``, ...)
``meta``       str              JSON with dataset ids (image_id, category_id, ref_id...)
=============  ===============  ==========================================================

Three outcomes for a record, each counted under its own metric by the input pipeline:

- **selected out** (``select_record``): its instance count is outside the run's
  ``[min_instances, max_instances]`` (SPEC §6: RL keeps 1 <= N <= 30, as the reference's
  ``filter_has_instance``). A choice of the run, not a fault of the record: never an error,
  never a warning. Builders keep every record; evaluation turns the selection off.
- **bad** (``check_record`` without the image, ``decode_image`` with it): a reason string;
  the pipeline applies the configured ``skip``/``error`` policy.
- **kept with a note** (``box_notes``): usable as it is, counted for visibility.

Ground-truth boxes follow the reference (``Vision-R1/vision_r1/visionr1_qwen.py``): it feeds
the ``solution`` boxes unchanged into ``generalized_box_iou`` (``griffon/coor_utils.py``),
whose only guard is ``assert (boxes[:, 2:] >= boxes[:, :2]).all()``; COCO evaluation
(pycocotools) also scores the raw annotations. So:

- a box is never clipped or dropped: one that sticks out of the image (``box_outside_image``)
  or has zero width or height (``empty_box``: the reference's ``>=`` accepts it and its GIoU
  with any prediction is finite) is kept unchanged and only counted as a note;
- a box with ``x2 < x1`` or ``y2 < y1`` (the reference's assertion fails and the run crashes,
  SPEC §8) or a non-finite coordinate is bad data (``degenerate_box``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from visionr1_jax.data import templates

BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image before it gets a note


def features() -> tfds.features.FeaturesDict:
    """The tfds feature spec of a record; strings and images are stored as raw bytes (no TF)."""
    text = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict(
        {
            "id": text(),
            "image": text(),
            "width": tfds.features.Tensor(shape=(), dtype=np.int32),
            "height": tfds.features.Tensor(shape=(), dtype=np.int32),
            "task": text(),
            "prompt": text(),
            "categories": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "expression": text(),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "label_map": text(),
            "source": text(),
            "meta": text(),
        }
    )


def make_record(
    *,
    record_id: str,
    image: bytes,
    width: int,
    height: int,
    task: str,
    template: str,
    categories: Sequence[str] = (),
    expression: str = "",
    boxes: Any = (),
    labels: Sequence[str] = (),
    label_map: Mapping[str, int],
    source: str,
    meta: Mapping[str, Any] | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """A record dict ready for a builder to yield; renders the prompt unless given.

    Args:
      boxes: xyxy in original pixels, anything reshapeable to f32[N, 4].
    """
    if prompt is None:
        prompt = templates.render_prompt(template, task, categories, expression)
    return {
        "id": record_id,
        "image": image,
        "width": int(width),
        "height": int(height),
        "task": task,
        "prompt": prompt,
        "categories": np.array(list(categories), dtype=object).reshape(-1),
        "expression": expression,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.array(list(labels), dtype=object).reshape(-1),
        "label_map": json.dumps(dict(label_map), sort_keys=True),
        "source": source,
        "meta": json.dumps(dict(meta or {}), sort_keys=True),
    }


def as_text(value: Any) -> str:
    """Decodes a tfds string value (bytes or str) to str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def text_list(values: Any) -> list[str]:
    return [as_text(v) for v in np.asarray(values, dtype=object).reshape(-1)]


class BadRecord(Exception):
    """A record that fails a data check; carries the record id and the reason."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(f"bad record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason

    @property
    def kind(self) -> str:
        """The reason's category (text before ':'), used as the metrics key."""
        return self.reason.split(":", 1)[0]


@dataclasses.dataclass(frozen=True)
class Limits:
    """The run's selection of records by instance count N (number of ground-truth boxes).

    A record is kept when ``min_instances <= N`` and, unless ``max_instances`` is None,
    ``N <= max_instances``. ``Limits(0, None)`` keeps every record (evaluation).
    """

    min_instances: int = 1
    max_instances: int | None = 30


def select_record(record: Mapping[str, Any], limits: Limits) -> str | None:
    """``None`` when the record's instance count is selected, else
    ``"too_few_instances: ..."`` / ``"too_many_instances: ..."`` (a ``SELECTION_KINDS`` kind).

    Needs only the ``boxes`` field: a record outside the selection is never checked further.
    """
    n = len(np.asarray(record["boxes"]).reshape(-1, 4))
    if n < limits.min_instances:
        return f"too_few_instances: {n} < min_instances={limits.min_instances}"
    if limits.max_instances is not None and n > limits.max_instances:
        return f"too_many_instances: {n} > max_instances={limits.max_instances}"
    return None


def check_record(record: Mapping[str, Any]) -> str | None:
    """Checks everything but the image bytes' decodability (the box rules are in the module
    docstring).

    Returns:
      ``None`` when the record is good, else ``"<kind>: <details>"`` with kind one of
      ``missing_image``, ``bad_size``, ``bad_prompt``, ``degenerate_box``,
      ``unknown_category``.
    """
    if len(record["image"]) == 0:
        return "missing_image: no image bytes (file missing at build time)"
    width, height = int(record["width"]), int(record["height"])
    if width <= 0 or height <= 0:
        return f"bad_size: width={width} height={height}"
    task = as_text(record["task"])
    if task not in templates.TASKS:
        return f"bad_prompt: unrecognised prompt/task {task!r}"
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    labels = text_list(record["labels"])
    if len(labels) != len(boxes):
        return f"bad_prompt: {len(boxes)} boxes but {len(labels)} labels"
    if not np.isfinite(boxes).all():
        return "degenerate_box: non-finite coordinates"
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        i = int(np.argmax(inverted))
        return f"degenerate_box: box {i} {boxes[i].tolist()} has x2<x1 or y2<y1"
    label_map = {k.lower(): v for k, v in json.loads(as_text(record["label_map"])).items()}
    for label in labels:
        if label.lower() not in label_map:
            return f"unknown_category: label {label!r} not in the label map"
    if any(int(v) <= 0 for v in label_map.values()):
        return "unknown_category: label map ids must be >= 1 (0 is background)"
    return None


def box_notes(record: Mapping[str, Any]) -> tuple[str, ...]:
    """Kinds of the notes a good record gets (each kind at most once): ``box_outside_image``
    (a box sticks out of the image by more than ``BOX_TOLERANCE`` pixels) and ``empty_box``
    (a box with zero width or height). Such boxes are kept unchanged (module docstring)."""
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    width, height, t = int(record["width"]), int(record["height"]), BOX_TOLERANCE
    notes = []
    outside = (
        (boxes[:, 0] < -t)
        | (boxes[:, 1] < -t)
        | (boxes[:, 2] > width + t)
        | (boxes[:, 3] > height + t)
    )
    if outside.any():
        notes.append("box_outside_image")
    if ((boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])).any():
        notes.append("empty_box")
    return tuple(notes)


# Reasons that select records rather than flag bad data: never an error under policy 'error',
# counted as ``data/selected_out/<kind>``.
SELECTION_KINDS = frozenset({"too_few_instances", "too_many_instances"})
# Notes on kept records, counted as ``data/noted/<kind>``.
NOTE_KINDS = frozenset({"box_outside_image", "empty_box"})


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the HF image processors make it: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(record: Mapping[str, Any], *, draft: bool = False) -> Image.Image:
    """Decodes the record's image to RGB and checks its size against the record.

    Args:
      draft: decode JPEGs at reduced scale (only to check decodability quickly).

    Raises:
      BadRecord: ``corrupt_image`` (undecodable or truncated bytes) or ``bad_size`` (decoded
        size differs from the record's width/height).
    """
    record_id = as_text(record["id"])
    try:
        image = Image.open(io.BytesIO(record["image"]))
        size = image.size
        if draft:
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        image = to_rgb(image)
    except Exception as e:  # PIL raises many types for bad bytes
        raise BadRecord(record_id, f"corrupt_image: {type(e).__name__}: {e}") from None
    expected = (int(record["width"]), int(record["height"]))
    if size != expected:
        raise BadRecord(
            record_id,
            f"bad_size: decoded {size[0]}x{size[1]}, record says {expected[0]}x{expected[1]}",
        )
    return image
