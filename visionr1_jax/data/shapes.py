"""Coloured shapes with exact boxes, drawn from a seed: the pixels of the `synthetic_shapes`
dataset and of the COCO-format example (`write_coco_example`). Pure numpy and PIL (no tfds):
a config file may write the example it trains on.

Each image holds 1..K shapes (circle, square, triangle, diamond, star, hexagon) of varied
size, position and colour on a plain or textured background; later shapes may partly occlude
earlier ones. Boxes are the exact pixel extent of each full shape (pixel ``i`` spans
``[i, i+1)``, so a shape covering columns 3..7 has x1=3, x2=8). Everything is a pure function
of ``(seed, split, index)``: the same parameters always draw the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile

import numpy as np
from etils import epath
from PIL import Image, ImageDraw

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
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class ShapeParams:
    """What `render` draws (`synthetic_shapes.ShapesConfig` is one, with the dataset's own
    fields).

    Attributes:
      image_size: images are ``image_size`` x ``image_size`` pixels.
      min_shapes, max_shapes: shapes per image, uniform in [min, max].
      min_scale, max_scale: shape extent as a fraction of the image side.
      texture: draw a distractor texture (lines and blobs) on the background.
      max_overlap: largest IoU allowed between two shapes' boxes (0: no occlusion).
      seed: the dataset seed.
      shapes: the shape classes drawn.
      colors: the colour names (keys of ``COLORS``) drawn from.
    """

    image_size: int = 112
    min_shapes: int = 1
    max_shapes: int = 3
    min_scale: float = 0.15
    max_scale: float = 0.5
    texture: bool = True
    max_overlap: float = 0.3
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)


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


def render(config: ShapeParams, split: str, index: int) -> tuple[bytes, np.ndarray, list, list]:
    """Renders one image.

    Returns:
      ``(png_bytes, boxes f32[N, 4] xyxy pixels, shape names [N], colour names [N])``.
    """
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
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
    color_names = list(config.colors)
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


def write_coco_example(
    directory: str | os.PathLike | None = None, num_train: int = 64, num_validation: int = 16
) -> tuple[dict[str, str], dict[str, str]]:
    """Writes ``synthetic_shapes`` images as a COCO-format dataset (unless already there):
    ``images/<split>_<i>.png``, ``train.json`` and ``validation.json`` (category ids 10..60).
    The example a ``coco_format`` run trains on without files of its own
    (``configs/coco_format_example.py``).

    Args:
      directory: where (None: ``<tmp>/visionr1_jax_coco_format_example``).

    Returns:
      ``({split: annotation JSON}, {split: image folder})``.
    """
    if directory is None:
        directory = os.path.join(tempfile.gettempdir(), "visionr1_jax_coco_format_example")
    root = epath.Path(directory)
    splits = {"train": num_train, "validation": num_validation}
    annotations = {split: str(root / f"{split}.json") for split in splits}
    images = {split: str(root / "images") for split in splits}
    if all(epath.Path(p).exists() for p in annotations.values()):
        return annotations, images
    config = ShapeParams(texture=False)
    ids = {name: 10 * (i + 1) for i, name in enumerate(SHAPES)}  # not 1..K on purpose
    categories = [{"id": k, "name": name, "supercategory": "shape"} for name, k in ids.items()]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, num in splits.items():
        entries, anns = [], []
        for i in range(num):
            png, boxes, names, _ = render(config, split, i)
            file_name = f"{split}_{i:05d}.png"
            (root / "images" / file_name).write_bytes(png)
            entries.append({"id": i + 1, "file_name": file_name, "width": config.image_size,
                            "height": config.image_size})  # fmt: skip
            for box, name in zip(np.asarray(boxes).tolist(), names, strict=True):
                x1, y1, x2, y2 = box
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": ids[name],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                             "iscrowd": 0})  # fmt: skip
        text = json.dumps({"images": entries, "annotations": anns, "categories": categories})
        tmp = root / f".{split}.json.{os.getpid()}"  # the JSON last: its presence means done
        tmp.write_text(text)
        tmp.rename(annotations[split])
    return annotations, images
