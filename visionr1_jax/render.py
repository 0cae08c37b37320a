"""Box renderings for training telemetry: batch pixels back to images, boxes drawn on them.

Host-side numpy + PIL only (no jax, no transformers import), for TensorBoard images and PNG
files every K steps::

    images = render.images_from_pixel_values(
        batch.arrays["pixel_values"], batch.arrays["image_grid_thw"], processor.image_processor)
    panels = render.render_examples(images, batch.targets(), predictions, captions)
    render.save_png(f"{workdir}/boxes/{step:07d}_0.png", panels[0])

Stages:

1. ``images_from_pixel_values``: invert the Qwen2-VL / Qwen2.5-VL image processor's
   normalisation and patchify, recovering the resized image the model saw (``H = h·patch``,
   ``W = w·patch`` for ``image_grid_thw = (t, h, w)``).
2. ``render_examples``: scale boxes from the original image (``Target.image_size``) to the
   model input (``Target.input_size``), both ``(height, width)``, then ``draw_boxes``.
3. ``draw_boxes``: nearest upscale to a legible size, ground truth in green, predictions in
   red, a label next to each box, an optional caption strip above the image.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionr1_jax import fs

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
CAPTION_BG = (40, 40, 40)
CAPTION_FG = (255, 255, 255)
FONT_SIZE = 12


# ------------------------------------------------------------------------------ pixels -> images


def _unpatchify(patches: np.ndarray, grid: tuple[int, int], patch: int, merge: int):
    """[t·h·w, C, T', p, p] patches in the HF order -> [h·p, w·p, C] of the first frame.

    The processor cuts a ``[C, h·p, w·p]`` image as ``reshape(C, h/m, m, p, w/m, m, p)``,
    ``transpose(1, 4, 2, 5, 0, 3, 6)`` -> ``(h/m, w/m, m, m, C, p, p)``; this is the inverse
    (temporal copy 0 of temporal frame 0).
    """
    h, w = grid  # (h, w) in patches; frame 0 is the first h·w patches
    c = patches.shape[1]
    x = patches[: h * w, :, 0].reshape(h // merge, w // merge, merge, merge, c, patch, patch)
    x = x.transpose(0, 2, 5, 1, 3, 6, 4)  # (h/m, m, p, w/m, m, p, C)
    return x.reshape(h * patch, w * patch, c)


def images_from_pixel_values(
    pixel_values: Any, image_grid_thw: Any, image_processor: Any
) -> list[np.ndarray]:
    """The resized images the model saw, recovered from the processor's patches.

    Inverts ``Qwen2VLImageProcessor._preprocess``: ``v = (x·rescale_factor − mean[c]) /
    std[c]`` per channel, then patchify (see ``_unpatchify``). The float round trip is exact
    to far below one grey level (|error| ~1e-4), so the result equals the processor's resized
    uint8 image.

    Args:
      pixel_values: either f32[B, S, F] per row (row i's patches first, zero padding after:
        ``data.pipeline`` with ``pixels=float32``), or f32[P, F] packed (rows with
        ``t·h·w > 0`` take consecutive patch ranges: ``processing.encode_batch``),
        F = 3·T·p·p. Also the raw u8 patches of ``pixels=uint8`` (``pixel_patches``,
        u8[B, S, 3·p·p] or u8[P, 3·p·p]), which are not normalised and have no temporal copy.
      image_grid_thw: i32[B, 3] (or i32[I, 3] packed), (t, h, w) in patches; zeros = no image.
      image_processor: the HF image processor (``processor.image_processor``); reads
        ``patch_size``, ``temporal_patch_size``, ``merge_size``, ``image_mean``,
        ``image_std``, ``rescale_factor`` (and ``do_rescale`` / ``do_normalize``).

    Returns:
      one uint8[H, W, 3] per grid row, ``H = h·patch_size``, ``W = w·patch_size`` (the first
      frame when t > 1); uint8[0, 0, 3] for a row without image.
    """
    pv = np.asarray(pixel_values)
    grids = np.asarray(image_grid_thw).astype(np.int64).reshape(-1, 3)
    patch = int(image_processor.patch_size)
    merge = int(getattr(image_processor, "merge_size", 1) or 1)
    temporal = int(getattr(image_processor, "temporal_patch_size", 1) or 1)
    raw = pv.dtype == np.uint8
    copies = 1 if raw else temporal
    feat = pv.shape[-1]
    if feat % (copies * patch * patch):
        raise ValueError(
            f"pixel_values feature size {feat} is not a multiple of "
            f"{copies}·{patch}·{patch} (temporal copies · patch²)"
        )
    channels = feat // (copies * patch * patch)
    starts = _patch_starts(pv, grids)
    mean, std, rescale = _normalisation(image_processor, channels, raw)
    images = []
    for i, (grid, start) in enumerate(zip(grids, starts, strict=True)):
        t, h, w = (int(v) for v in grid)
        n = t * h * w
        if n == 0:
            images.append(np.zeros((0, 0, 3), np.uint8))
            continue
        if h % merge or w % merge:
            raise ValueError(f"row {i}: grid {(t, h, w)} is not a multiple of merge={merge}")
        rows = pv[i] if pv.ndim == 3 else pv
        if start + n > rows.shape[0]:
            raise ValueError(
                f"row {i}: grid {(t, h, w)} needs patches [{start}, {start + n}) but only "
                f"{rows.shape[0]} are present"
            )
        patches = rows[start : start + n].reshape(n, channels, copies, patch, patch)
        x = _unpatchify(patches.astype(np.float64), (h, w), patch, merge)
        x = (x * std + mean) / rescale
        images.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return images


def _patch_starts(pv: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """i64[I]: where each grid row's patches start, in its own row of per-row ``pv``
    f32[B, S, F] (0) or in packed ``pv`` f32[P, F] (after the previous rows' ``t·h·w``)."""
    if pv.ndim == 3:
        if pv.shape[0] != grids.shape[0]:
            raise ValueError(
                f"per-row pixel_values has {pv.shape[0]} rows but image_grid_thw has "
                f"{grids.shape[0]}"
            )
        return np.zeros(len(grids), np.int64)
    if pv.ndim == 2:
        return np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))[:-1]])
    raise ValueError(f"pixel_values must be [B, S, F] or [P, F], got {pv.shape}")


def _normalisation(
    image_processor: Any, channels: int, raw: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(mean f64[channels], std f64[channels], rescale_factor)`` the processor applied
    (``v = (x·rescale − mean) / std``); the identity for raw u8 patches and where the
    processor's ``do_normalize`` / ``do_rescale`` are off."""
    if raw:
        return np.zeros(channels), np.ones(channels), 1.0
    mean = np.broadcast_to(np.asarray(image_processor.image_mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(image_processor.image_std, np.float64), (channels,))
    if not getattr(image_processor, "do_normalize", True):
        mean, std = np.zeros(channels), np.ones(channels)
    rescale = float(image_processor.rescale_factor)
    if not getattr(image_processor, "do_rescale", True):
        rescale = 1.0
    return mean, std, rescale


# ---------------------------------------------------------------------------------- drawing


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, TypeError):
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a longer word
    stays on its own line)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The outline pixels ``(x0, y0, x1, y1)`` (inclusive) of a continuous xyxy box on a
    ``width`` x ``height`` canvas: the first and last pixel columns/rows inside the box,
    clipped to the canvas; None for a NaN/inf, empty or fully outside box."""
    if not np.all(np.isfinite(box)):
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0 or x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None
    px0 = min(max(round(x0), 0), width - 1)
    py0 = min(max(round(y0), 0), height - 1)
    px1 = min(max(round(x1) - 1, px0), width - 1)
    py1 = min(max(round(y1) - 1, py0), height - 1)
    return px0, py0, px1, py1


def _label(draw: ImageDraw.ImageDraw, text: str, at: tuple[int, int, int, int], color, font,
           canvas: tuple[int, int]) -> None:  # fmt: skip
    """``text`` on a ``color`` tag just above the outline ``at`` (inside it if there is no
    room above), shifted left to stay on the canvas."""
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 2
    x = max(0, min(at[0], canvas[0] - tw))
    y = at[1] - th if at[1] - th >= 0 else at[1] + 1
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=color)
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 128 else (255, 255, 255)
    draw.text((x + 2 - left, y + 1 - top), text, fill=ink, font=font)


def draw_boxes(
    image: np.ndarray,
    pred_boxes: Any,
    pred_labels: Sequence[str],
    gt_boxes: Any,
    gt_labels: Sequence[str],
    title: str = "",
    *,
    min_side: int = 256,
    line_width: int = 2,
) -> np.ndarray:
    """Ground-truth (green) and predicted (red) boxes with labels, over ``image``.

    The image is upscaled by the nearest-neighbour integer factor ``k = ceil(min_side /
    min(H, W))`` (1 if already large enough), so that 56–112 px demo images stay legible;
    boxes are scaled by the same ``k``. A box's outline covers the first and last pixel
    rows/columns inside it (``[x0·k, x1·k)``), drawn ``line_width`` pixels inwards; boxes
    partly outside are clipped, NaN/inf, empty (``x1 <= x0`` or ``y1 <= y0``) and fully
    outside boxes are skipped. Labels sit on a tag above each box's top-left corner;
    predictions are drawn after (over) the ground truth.

    Args:
      image: uint8[H, W, 3] (H, W >= 1).
      pred_boxes: f32[M, 4] xyxy in pixels of ``image``. pred_labels: M strings (missing
        ones are drawn without text).
      gt_boxes: f32[N, 4] xyxy in pixels of ``image``. gt_labels: N strings.
      title: caption (e.g. ``"reward 1.83 | IoU 0.71"``), word-wrapped in a dark strip above
        the image; "" for none.
      min_side: the short side the image is upscaled to at least.
      line_width: outline width in output pixels.

    Returns:
      uint8[k·H + S, k·W, 3], S the caption strip height (0 without title).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image must be uint8[H, W, 3] with H, W >= 1, got {img.shape}")
    h, w = img.shape[:2]
    k = max(1, math.ceil(min_side / min(h, w)))
    canvas = Image.fromarray(img.astype(np.uint8)).resize((w * k, h * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    size = canvas.size
    for boxes, labels, color in (
        (gt_boxes, gt_labels, GT_COLOR),
        (pred_boxes, pred_labels, PRED_COLOR),
    ):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * k
        tags = []
        for j, box in enumerate(boxes):
            at = _pixel_box(box, *size)
            if at is None:
                continue
            draw.rectangle(at, outline=color, width=line_width)
            tags.append((labels[j] if j < len(labels) else "", at))
        for text, at in tags:  # labels after outlines: no outline of this set crosses a tag
            _label(draw, str(text), at, color, font, size)
    if not title:
        return np.asarray(canvas)
    lines = _wrap(draw, title, font, size[0] - 8)
    left, top, _, bottom = draw.textbbox((0, 0), "Ag|", font=font)
    line_h = bottom - top + 3
    strip = Image.new("RGB", (size[0], line_h * len(lines) + 6), CAPTION_BG)
    strip_draw = ImageDraw.Draw(strip)
    for n, line in enumerate(lines):
        strip_draw.text((4 - left, 3 + n * line_h - top), line, fill=CAPTION_FG, font=font)
    out = Image.new("RGB", (size[0], strip.size[1] + size[1]))
    out.paste(strip, (0, 0))
    out.paste(canvas, (0, strip.size[1]))
    return np.asarray(out)


def _to_input(boxes: Any, image_size: Sequence[int], input_size: Sequence[int]) -> np.ndarray:
    """f[K, 4] xyxy from original-image pixels (``image_size`` = (H, W)) to model-input
    pixels (``input_size`` = (h_in, w_in)), as f64[K, 4]."""
    (height, width), (h_in, w_in) = image_size, input_size
    scale = np.array([w_in / width, h_in / height, w_in / width, h_in / height], np.float64)
    return np.asarray(boxes, np.float64).reshape(-1, 4) * scale


def render_examples(
    images: Sequence[np.ndarray],
    targets: Sequence[Any],
    predictions: Sequence[tuple[Any, Sequence[str]]],
    captions: Sequence[str] | None = None,
    **draw_kwargs: Any,
) -> list[np.ndarray]:
    """One ``draw_boxes`` panel per example, boxes moved from original to model-input pixels.

    Args:
      images: K model-input images uint8[h_in, w_in, 3] (``images_from_pixel_values``).
      targets: K ``visionr1_jax.data.target.Target``: ``boxes`` f[N, 4] xyxy in original-image
        pixels, ``labels``, ``image_size`` = (H, W) original, ``input_size`` = (h_in, w_in).
      predictions: K pairs (boxes f32[M, 4] xyxy in ORIGINAL-image pixels, M labels), e.g.
        the parsed completions of a prompt.
      captions: K titles (None: no caption strip).
      **draw_kwargs: ``min_side``, ``line_width`` of ``draw_boxes``.

    Returns:
      K uint8[H', W', 3] panels.

    Raises:
      ValueError: mismatched lengths, or an image whose shape is not its target's
        ``input_size`` (boxes would be drawn in the wrong frame).
    """
    captions = [""] * len(images) if captions is None else list(captions)
    if not len(images) == len(targets) == len(predictions) == len(captions):
        raise ValueError(
            f"{len(images)} images, {len(targets)} targets, {len(predictions)} predictions and "
            f"{len(captions)} captions: one of each per example"
        )
    panels = []
    for i, (image, target, (boxes, labels), caption) in enumerate(
        zip(images, targets, predictions, captions, strict=True)
    ):
        if tuple(np.shape(image)[:2]) != tuple(target.input_size):
            raise ValueError(
                f"example {i}: image is {np.shape(image)[:2]} but target.input_size "
                f"(h_in, w_in) is {tuple(target.input_size)}"
            )
        panels.append(
            draw_boxes(
                image,
                _to_input(boxes, target.image_size, target.input_size),
                list(labels),
                _to_input(target.boxes, target.image_size, target.input_size),
                list(target.labels),
                caption,
                **draw_kwargs,
            )
        )
    return panels


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes uint8[H, W, 3] ``image`` to ``path`` (local or remote, `fs.write_bytes`: whole
    and atomic, parent folders created) as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    fs.write_bytes(path, buf.getvalue())
