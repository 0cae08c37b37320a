"""Reading COCO-format annotation files (COCO, ODINW) into per-image ground truth."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any

import numpy as np
from etils import epath


@dataclasses.dataclass
class CocoImage:
    """One image of a COCO-format file.

    Attributes:
      boxes: f32[N, 4] xyxy original pixels (converted from COCO xywh, not clipped).
      category_ids: i64[N] COCO category ids (may be unknown to ``categories``).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    category_ids: np.ndarray


def load_coco(path: os.PathLike | str) -> tuple[dict[int, str], list[CocoImage]]:
    """Parses a COCO instances JSON.

    Crowd annotations (``iscrowd=1``) are left out: they are ignore regions, not targets.

    Returns:
      ``({category_id: name}, images in file order)``.
    """
    data: dict[str, Any] = json.loads(epath.Path(path).read_text())
    categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
    per_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        if not ann.get("iscrowd", 0):
            per_image[int(ann["image_id"])].append(ann)
    images = []
    for img in data.get("images", []):
        anns = per_image.get(int(img["id"]), [])
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        images.append(
            CocoImage(
                image_id=int(img["id"]),
                file_name=str(img["file_name"]),
                width=int(img.get("width", 0)),
                height=int(img.get("height", 0)),
                boxes=boxes.astype(np.float32),
                category_ids=np.array([int(a["category_id"]) for a in anns], np.int64),
            )
        )
    return categories, images


def read_bytes(path: epath.Path) -> bytes:
    """The file's bytes, or b"" when it does not exist (flagged later as a missing image)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return b""


def label_of(category_id: int, categories: dict[int, str]) -> str:
    """The category name; an id missing from the file's categories gets a marker label that
    is absent from every label map, so the record is caught as ``unknown_category``."""
    return categories.get(category_id, f"<unknown category id {category_id}>")
