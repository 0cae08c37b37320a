"""``synthetic_shapes``: coloured shapes with exact boxes, the embedded demo/test dataset.

Each image holds 1..K shapes (circle, square, triangle, diamond, star, hexagon) of varied
size, position and colour on a plain or textured background; later shapes may partly occlude
earlier ones. Boxes are the exact pixel extent of each full shape (pixel ``i`` spans
``[i, i+1)``, so a shape covering columns 3..7 has x1=3, x2=8). Everything is a pure function
of ``(seed, split, index)``: the same config always builds the same bytes.

Configs: ``detection`` (one prompt per image listing all shape categories) and ``grounding``
(one prompt per image and category present). ``SyntheticShapes(config=ShapesConfig(...))``
gives other sizes and counts.
"""

from __future__ import annotations

import dataclasses
import io
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

from visionr1_jax.data import records
from visionr1_jax.data.builders import base

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
_SPLITS = ("train", "validation")


@dataclasses.dataclass(eq=False)
class ShapesConfig(base.RecordBuilderConfig):
    """Attributes:
    image_size: images are ``image_size`` x ``image_size`` pixels.
    min_shapes, max_shapes: shapes per image, uniform in [min, max].
    min_scale, max_scale: shape extent as a fraction of the image side.
    texture: draw a distractor texture (lines and blobs) on the background.
    max_overlap: largest IoU allowed between two shapes' boxes (0: no occlusion).
    task: ``detection`` or ``grounding``.
    num_train, num_validation: images per split.
    seed: the dataset seed.
    shapes: the shape classes drawn (and listed in the prompt); label ids stay ``SHAPES``'.
    """

    image_size: int = 112
    min_shapes: int = 1
    max_shapes: int = 3
    min_scale: float = 0.15
    max_scale: float = 0.5
    texture: bool = True
    max_overlap: float = 0.3
    task: str = "detection"
    num_train: int = 4096
    num_validation: int = 256
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _polygon(shape: str, x0: int, y0: int, s: int) -> list[tuple[int, int]]:
    """Integer vertices of a polygon shape inside the square [x0, x0+s-1] x [y0, y0+s-1]."""
    e = s - 1
    if shape == "square":
        return [(x0, y0), (x0 + e, y0), (x0 + e, y0 + e), (x0, y0 + e)]
    if shape == "triangle":
        return [(x0 + e // 2, y0), (x0 + e, y0 + e), (x0, y0 + e)]
    if shape == "diamond":
        return [(x0 + e // 2, y0), (x0 + e, y0 + e // 2), (x0 + e // 2, y0 + e), (x0, y0 + e // 2)]
    if shape == "hexagon":
        q = e // 4
        return [
            (x0 + q, y0), (x0 + e - q, y0), (x0 + e, y0 + e // 2),
            (x0 + e - q, y0 + e), (x0 + q, y0 + e), (x0, y0 + e // 2),
        ]  # fmt: skip
    if shape == "star":
        c = e / 2.0
        pts = []
        for k in range(10):
            r = c if k % 2 == 0 else c * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((r * np.cos(a), r * np.sin(a)))
        xs = np.array([p[0] for p in pts])
        ys = np.array([p[1] for p in pts])
        # Stretch so that the vertices span the full square exactly.
        xs = np.round((xs - xs.min()) / (xs.max() - xs.min()) * e).astype(int) + x0
        ys = np.round((ys - ys.min()) / (ys.max() - ys.min()) * e).astype(int) + y0
        return list(zip(xs.tolist(), ys.tolist(), strict=True))
    raise ValueError(shape)


def render(config: ShapesConfig, split: str, index: int) -> tuple[bytes, np.ndarray, list, list]:
    """Renders one image.

    Returns:
      ``(png_bytes, boxes f32[N, 4] xyxy pixels, shape names [N], colour names [N])``.
    """
    rng = np.random.default_rng([config.seed, _SPLITS.index(split), index])
    size = config.image_size
    background = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if config.texture:
        for _ in range(int(rng.integers(3, 9))):
            tone = tuple(int(v + rng.integers(-25, 26)) for v in background)
            tone = tuple(min(255, max(0, v)) for v in tone)
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
            if rng.random() < 0.5:
                draw.line([(x0, y0), (x1, y1)], fill=tone, width=int(rng.integers(1, 4)))
            else:
                r = int(rng.integers(2, max(3, size // 10)))
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tone)
    n = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    color_names = list(COLORS)
    boxes, names, colors = [], [], []
    lo = max(4, int(config.min_scale * size))
    hi = max(lo + 1, int(config.max_scale * size))
    for _ in range(n):
        for _attempt in range(50):
            s = int(rng.integers(lo, hi + 1))
            x0 = int(rng.integers(0, size - s + 1))
            y0 = int(rng.integers(0, size - s + 1))
            box = np.array([x0, y0, x0 + s, y0 + s], np.float64)
            if all(_iou(box, b) <= config.max_overlap for b in boxes):
                break
        else:
            continue  # no room left for this shape
        shape = config.shapes[int(rng.integers(len(config.shapes)))]
        color = color_names[int(rng.integers(len(color_names)))]
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=fill)
        else:
            draw.polygon(_polygon(shape, x0, y0, s), fill=fill)
        boxes.append(box)
        names.append(shape)
        colors.append(color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(boxes, np.float32).reshape(-1, 4), names, colors


class SyntheticShapes(base.RecordBuilder):
    """Synthetic coloured shapes with exact boxes (detection and grounding prompts)."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    BUILDER_CONFIGS: ClassVar[list] = [
        ShapesConfig(name="detection", task="detection", description="one prompt per image"),
        ShapesConfig(
            name="grounding", task="grounding", description="one prompt per (image, category)"
        ),
        # The `make demo` experiment (configs/demo_cpu.py): one large circle per image on a
        # plain background, so that a tiny model's localisation moves within minutes on a CPU.
        ShapesConfig(
            name="localize",
            task="detection",
            min_shapes=1,
            max_shapes=1,
            min_scale=0.35,
            max_scale=0.75,
            texture=False,
            shapes=("circle",),
            num_train=2048,
            num_validation=256,
            description="the make demo experiment's data",
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
        }

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        label_map = {name: SHAPES.index(name) + 1 for name in c.shapes}
        for index in range(num):
            png, boxes, names, colors = render(c, split, index)
            common = dict(
                image=png, width=c.image_size, height=c.image_size, template=c.template,
                source="synthetic_shapes", label_map=label_map,
            )  # fmt: skip
            if c.task == "detection":
                rid = f"{split}/{index}"
                yield rid, records.make_record(
                    record_id=rid, task="detection", categories=list(c.shapes), boxes=boxes,
                    labels=names, meta={"index": index, "colors": colors}, **common,
                )  # fmt: skip
            else:
                for shape in sorted(set(names)):
                    keep = [i for i, name in enumerate(names) if name == shape]
                    rid = f"{split}/{index}/{shape}"
                    yield rid, records.make_record(
                        record_id=rid, task="grounding", categories=[shape], boxes=boxes[keep],
                        labels=[shape] * len(keep), label_map={shape: label_map[shape]},
                        meta={"index": index, "colors": [colors[i] for i in keep]},
                        **{k: v for k, v in common.items() if k != "label_map"},
                    )  # fmt: skip
