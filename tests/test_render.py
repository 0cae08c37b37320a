"""Telemetry renderings: pixel_values -> images inverts the real Qwen2-VL processor (packed and
per-row layouts, float and uint8 patches, patch 14 and 16); boxes land where they should."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from visionr1_jax import processing, render
from visionr1_jax.data import data_config, pipeline
from visionr1_jax.models import tiny
from visionr1_jax.rewards import Target

MIN_PIXELS, MAX_PIXELS = 3136, 224 * 168
SIZES = [(100, 150), (60, 60), (37, 200), (224, 168)]  # (height, width), resized differently
# Tolerance of the inversion: pixel_values = (x/255 − mean)/std in float32 is within ~1e-6 of
# the exact value (|v| <= 2.2, a few roundings); back to grey levels that is 1e-6·std·255
# < 1e-4, far below the 0.5 that rounding to uint8 absorbs, so the recovered uint8 image
# equals the processor's resized uint8 image exactly.
TOL = 0

RED, GREEN, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 0)


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _resized(image: Image.Image, patch: int, merge: int = 2) -> np.ndarray:
    """uint8[h_in, w_in, 3]: the processor's own resize (smart resize, PIL bicubic on uint8)."""
    h, w = smart_resize(image.height, image.width, patch * merge, MIN_PIXELS, MAX_PIXELS)
    return np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= TOL


@pytest.fixture(scope="module")
def processor():
    tok = tiny.small_tokenizer()
    tok.chat_template = processing.CHAT_TEMPLATE
    return processing.build_processor(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


# ------------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("patch", [14, 16])
def test_inverts_image_processor_packed(patch):
    ip = Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ims = _images(patch)
    out = ip(images=ims, return_tensors="np")
    got = render.images_from_pixel_values(out["pixel_values"], out["image_grid_thw"], ip)
    assert len(got) == len(ims)
    for g, im, (_, h, w) in zip(got, ims, out["image_grid_thw"], strict=True):
        assert g.shape == (h * patch, w * patch, 3)
        _assert_same(g, _resized(im, patch))


def test_inverts_encode_batch_packed_with_padding(processor):
    """encode_batch's layout: packed f32[P, F] with padding patches, zero grid rows."""
    ims = _images(1)
    texts = [
        processing.render_prompt(processor, "two", num_images=2),
        processing.render_prompt(processor, "none", num_images=0),
        processing.render_prompt(processor, "two more", num_images=2),
    ]
    batch = processing.encode_batch(
        processor, texts, [ims[:2], [], ims[2:]], patch_buckets=(4096,), max_images=6
    )
    assert batch["pixel_values"].shape[0] == 4096
    got = render.images_from_pixel_values(
        batch["pixel_values"], batch["image_grid_thw"], processor.image_processor
    )
    assert len(got) == 6
    for g, im in zip(got[:4], ims, strict=True):
        _assert_same(g, _resized(im, 14))
    assert all(g.shape == (0, 0, 3) for g in got[4:])


@pytest.mark.parametrize("pixels", ["float32", "uint8"])
def test_inverts_pipeline_rows(processor, pixels):
    """The input pipeline's per-row layout: [B, S, F] zero-padded per row, a padding row."""
    c = data_config()
    c.min_pixels, c.max_pixels, c.pixels = MIN_PIXELS, MAX_PIXELS, pixels
    enc = pipeline.Encoder(processor, c)
    ims = _images(2)
    rows, grids = [], []
    for im in ims:
        size = enc.input_size(im.height, im.width)
        rows.append(enc.pixels(im, size) if pixels == "float32" else enc.raw_patches(im, size))
        grids.append([1, size[0] // 14, size[1] // 14])
    s = max(len(r) for r in rows) + 8
    dtype = np.float32 if pixels == "float32" else np.uint8
    pv = np.zeros((len(ims) + 1, s, rows[0].shape[1]), dtype)
    for i, r in enumerate(rows):
        pv[i, : len(r)] = r
    grid = np.array([*grids, [0, 0, 0]], np.int32)
    got = render.images_from_pixel_values(pv, grid, processor.image_processor)
    for g, im in zip(got[:-1], ims, strict=True):
        _assert_same(g, _resized(im, 14))
    assert got[-1].shape == (0, 0, 3)


def test_per_row_from_processor_split(processor):
    """Per-row f32[B, S, F] built by splitting the HF processor's own packed output."""
    ip = processor.image_processor
    ims = _images(3)
    out = ip(images=ims, return_tensors="np")
    counts = np.prod(out["image_grid_thw"], axis=1)
    pv = np.zeros((len(ims), counts.max() + 4, out["pixel_values"].shape[1]), np.float32)
    for i, (a, n) in enumerate(zip(np.cumsum(counts) - counts, counts, strict=True)):
        pv[i, :n] = out["pixel_values"][a : a + n]
    got = render.images_from_pixel_values(pv, out["image_grid_thw"], ip)
    for g, im in zip(got, ims, strict=True):
        _assert_same(g, _resized(im, 14))


def test_inversion_rejects_too_few_patches(processor):
    ip = processor.image_processor
    pv = np.zeros((16, 3 * 2 * 14 * 14), np.float32)
    with pytest.raises(ValueError, match="patches"):
        render.images_from_pixel_values(pv, np.array([[1, 4, 8]]), ip)


# --------------------------------------------------------------------------------- drawing


def _is(img: np.ndarray, color) -> np.ndarray:
    return np.all(img == np.array(color, np.uint8), axis=-1)


def _check_box(out: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    """Outline pixels ``color`` on all four edges (first/last pixel inside the box), nothing
    of that colour well inside."""
    mid_x, mid_y = slice(x0 + 8, x1 - 8), slice(y0 + 8, y1 - 8)
    assert _is(out[mid_y, x0], color).all() and _is(out[mid_y, x1 - 1], color).all()
    assert _is(out[y0, mid_x], color).all() and _is(out[y1 - 1, mid_x], color).all()
    assert not _is(out[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4], color).any()


@pytest.mark.parametrize("kind", ["pred", "gt"])
def test_box_edges_at_scaled_coordinates(kind):
    image = np.zeros((64, 64, 3), np.uint8)
    box = np.array([[10.0, 12.0, 30.0, 40.0]])
    none = np.zeros((0, 4))
    args = (box, ["cat"], none, []) if kind == "pred" else (none, [], box, ["cat"])
    color, other = (RED, GREEN) if kind == "pred" else (GREEN, RED)
    out = render.draw_boxes(image, *args)
    assert out.shape == (256, 256, 3)  # k = 4
    _check_box(out, 40, 48, 120, 160, color)
    assert not _is(out, other).any()
    assert _is(out[:48, 40:80], color).any()  # the label tag sits above the top-left corner
    assert not out[:, 130:].any() and not out[170:].any()  # nothing away from box and tag


def test_upscale_factor_scales_boxes():
    box = np.array([[8.0, 8.0, 40.0, 48.0]])
    for side, k, min_side in [(56, 5, 256), (112, 3, 256), (64, 1, 64), (300, 1, 256)]:
        out = render.draw_boxes(np.zeros((side, side, 3), np.uint8), box, [""], [], [],
                                min_side=min_side)  # fmt: skip
        assert out.shape == (side * k, side * k, 3)
        _check_box(out, 8 * k, 8 * k, 40 * k, 48 * k, RED)


def test_upscale_is_nearest():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    out = render.draw_boxes(image, [], [], [], [])
    np.testing.assert_array_equal(out, image.repeat(5, 0).repeat(5, 1))


def test_bad_boxes_are_skipped_or_clipped():
    image = np.zeros((64, 64, 3), np.uint8)
    nan = float("nan")
    pred = np.array(
        [
            [nan, 1, 2, 3],
            [1, 2, np.inf, 30],
            [30, 30, 10, 10],  # x1 < x0
            [20, 20, 20, 40],  # zero width
            [100, 100, 200, 200],  # fully outside
            [-10, -10, 20, 20],  # partly outside: clipped
        ]
    )
    out = render.draw_boxes(image, pred, ["a"], np.full((2, 4), nan), ["x", "y"], "t")
    body = out[out.shape[0] - 256 :]
    assert _is(body[40, 0], RED) and _is(body[40, 79], RED) and _is(body[79, 40], RED)
    assert not _is(body[:, 90:], RED).any()  # nothing from the skipped boxes
    assert not _is(body, GREEN).any()


def test_empty_and_malformed_images():
    with pytest.raises(ValueError, match="image"):
        render.draw_boxes(np.zeros((0, 0, 3), np.uint8), [], [], [], [])
    out = render.draw_boxes(np.zeros((1, 3, 3), np.uint8), [[0, 0, 3, 1]], ["p"], [], [])
    assert out.shape == (256, 768, 3)


def test_title_strip_above_image():
    image = np.zeros((56, 56, 3), np.uint8)
    plain = render.draw_boxes(image, [], [], [], [])
    short = render.draw_boxes(image, [], [], [], [], "reward 1.83 | IoU 0.71")
    long = render.draw_boxes(image, [], [], [], [], "reward 1.83 | IoU 0.71 " * 8)
    assert plain.shape == (280, 280, 3)
    strip = short.shape[0] - 280
    assert short.shape[1] == 280 and 10 < strip < 40
    assert long.shape[0] - 280 > 2 * strip - 10  # wrapped onto several lines
    np.testing.assert_array_equal(short[strip:], plain)
    assert (short[:strip] == render.CAPTION_BG).all(-1).mean() > 0.5
    assert (short[:strip] == 255).all(-1).any()  # white caption text


def test_render_examples_scales_original_to_input():
    # Original 100 x 200 (H x W), model input 56 x 140: x scale 0.7, y scale 0.56, so a
    # (h, w) / (w, h) mix-up puts the boxes elsewhere.
    target = Target([[50, 25, 150, 75]], ["cat"], image_size=(100, 200), input_size=(56, 140))
    pred = (np.array([[10.0, 80.0, 40.0, 98.0]]), ["dog"])
    image = np.zeros((56, 140, 3), np.uint8)
    (out,) = render.render_examples([image], [target], [pred], ["r 1.0"])
    body = out[out.shape[0] - 280 :]
    assert body.shape == (280, 700, 3)  # k = 5
    # gt: [35, 14, 105, 42] input px -> x 175..525, y 70..210 at k = 5
    _check_box(body, 175, 70, 525, 210, GREEN)
    # pred: [7, 44.8, 28, 54.88] input px -> x 35..140, y 224..274.4 (last row 273)
    assert _is(body[250, 35], RED) and _is(body[250, 139], RED)
    assert _is(body[224, 80], RED) and _is(body[273, 80], RED)
    assert not _is(body[250, 40:134], RED).any()

    with pytest.raises(ValueError, match="input_size"):
        render.render_examples([image.transpose(1, 0, 2)], [target], [pred], None)
    with pytest.raises(ValueError, match="one of each"):
        render.render_examples([image], [target], [], None)


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = tmp_path / "boxes" / "step_10.png"
    render.save_png(path, image)
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), image)
