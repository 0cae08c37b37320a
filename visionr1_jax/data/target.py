"""The ground truth of one prompt, host side: what the reward and the evaluation score
against (numpy only: the reward's host API and the pipeline both build it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Target:
    """Ground truth of one prompt, host side.

    Attributes:
      boxes: ``float[N, 4]`` xyxy in original-image pixels (``N = 0`` for a negative sample).
      labels: ``list[str]`` of length ``N``.
      image_size: ``(height, width)`` of the original image.
      input_size: ``(height, width)`` of the resized model input (``grid·14``); used by the
        ``qwen25_abs`` frame.
      label_to_id: category → id (0 = background). Defaults to the labels numbered from 1 in
        first-seen order. Keys are matched case-insensitively.
    """

    boxes: np.ndarray
    labels: Sequence[str]
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    label_to_id: Mapping[str, int] | None = None

    def __post_init__(self):
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not np.all(np.isfinite(boxes)):
            raise ValueError("Target.boxes must be finite")
        if len(self.labels) != len(boxes):
            raise ValueError(
                f"Target has {len(boxes)} boxes but {len(self.labels)} labels; they must match"
            )
        for name in ("image_size", "input_size"):
            size = tuple(getattr(self, name))
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"Target.{name} must be (height, width) > 0, got {size}")
            object.__setattr__(self, name, (int(size[0]), int(size[1])))
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", [str(x) for x in self.labels])
        if self.label_to_id is None:
            mapping: dict[str, int] = {}
            for label in self.labels:
                mapping.setdefault(label.lower(), len(mapping) + 1)
        else:
            mapping = {str(k).lower(): int(v) for k, v in self.label_to_id.items()}
            missing = [x for x in self.labels if x.lower() not in mapping]
            if missing:
                raise ValueError(f"Target labels {missing} are not in label_to_id")
        object.__setattr__(self, "label_to_id", mapping)

    @property
    def label_ids(self) -> np.ndarray:
        """``i32[N]`` ids of the ground-truth labels."""
        return np.array([self.label_to_id[x.lower()] for x in self.labels], dtype=np.int32)
