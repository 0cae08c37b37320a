"""Prompt templates, answer frames (round trip through the rewards parser) and the data config."""

from __future__ import annotations

import numpy as np
import pytest

from visionr1_jax.data import config as config_lib
from visionr1_jax.data import data_config, templates
from visionr1_jax.rewards import parse


@pytest.mark.parametrize("frame", templates.FRAMES)
def test_answer_round_trips_through_the_rewards_parser(frame):
    rng = np.random.default_rng(0)
    image_size, input_size = (480, 640), (476, 644)  # (H, W) original, smart-resized
    xy = rng.uniform(0, 1, (7, 2, 2)) * np.array([640, 480])
    boxes = np.concatenate([xy.min(1), xy.max(1) + 5], axis=1).astype(np.float32)
    boxes = np.minimum(boxes, [640, 480, 640, 480]).astype(np.float32)
    labels = [f"thing {i}" for i in range(7)]
    text = templates.format_answer(boxes, labels, frame, image_size, input_size)
    assert text.startswith("```json\n[") and text.endswith("]\n```")
    parsed = parse.parse_answer(text, frame=frame, input_size=input_size)
    assert parsed.labels == labels
    back = parse.to_original_pixels(np.array(parsed.boxes), frame, image_size, input_size)
    # Rounding to the frame's unit (a resized pixel, 1/1000, 1e-3) moves a coordinate by <= half
    # a unit, in original pixels the larger of the x and y units; float32 at scale 640 (ulp
    # 6.1e-5, a few operations) adds < 1e-3.
    unit = {"qwen25_abs": max(640 / 644, 480 / 476), "rel1000": 0.64, "norm01": 0.64}[frame]
    np.testing.assert_allclose(back, boxes, atol=unit * 0.5 + 1e-3)


def test_boxes_to_frame_values():
    boxes = np.array([[64, 48, 320, 240]], np.float32)  # in a 640x480 image
    np.testing.assert_array_equal(
        templates.boxes_to_frame(boxes, "qwen25_abs", (480, 640), (240, 320)), [[32, 24, 160, 120]]
    )
    np.testing.assert_array_equal(
        templates.boxes_to_frame(boxes, "rel1000", (480, 640)), [[100, 100, 500, 500]]
    )
    np.testing.assert_array_equal(  # rounded to 3 decimals, then float32: exactly f32(0.1)
        templates.boxes_to_frame(boxes, "norm01", (480, 640)),
        np.float32([[0.1, 0.1, 0.5, 0.5]]),
    )
    with pytest.raises(ValueError, match="resized input size"):
        templates.boxes_to_frame(boxes, "qwen25_abs", (480, 640))


def test_render_prompt_rejects_bad_inputs():
    with pytest.raises(ValueError, match="unknown template"):
        templates.render_prompt("llava", "detection", ["cat"])
    with pytest.raises(ValueError, match="at least one category"):
        templates.render_prompt("qwen25", "detection", [])
    with pytest.raises(ValueError, match="one category"):
        templates.render_prompt("qwen25", "grounding", ["a", "b"])
    with pytest.raises(ValueError, match="referring expression"):
        templates.render_prompt("griffon", "rec")
    assert (
        templates.rewrite_griffon_prompt(
            "<image>\nLocate the exact position of red car in the picture, if you can.", "qwen25"
        )
        == "Locate every red car in the image and output the coordinates in JSON format."
    )


def test_data_config_defaults_validate():
    c = data_config()
    config_lib.validate_data_config(c)
    assert (c.min_pixels, c.max_pixels, c.min_instances, c.max_instances) == (3136, 401408, 1, 30)
    assert config_lib.frame_of(c) == "qwen25_abs"


@pytest.mark.parametrize(
    "key,value",
    [
        ("name", "imagenet"), ("split", ""), ("batch_size", 0), ("seed", -1), ("num_epochs", 0),
        ("min_pixels", 10), ("max_pixels", 1000), ("bad_data", "ignore"), ("min_instances", -1),
        ("max_instances", 0), ("template", "llava"), ("frame", "xyxy"), ("num_threads", -1),
        ("prefetch", -2), ("max_prompt_len", 0), ("length_buckets", (0,)),
        ("patch_buckets", (6,)), ("pixels", "float16"),
    ],
)  # fmt: skip
def test_data_config_errors_name_the_key(key, value):
    c = data_config()
    c[key] = value
    with pytest.raises(ValueError, match=rf"^data\.{key}: "):
        config_lib.validate_data_config(c)


def test_batch_size_must_split_over_processes():
    c = data_config()
    c.batch_size = 6
    with pytest.raises(ValueError, match=r"data\.batch_size: .*divisible.*4"):
        config_lib.validate_data_config(c, num_processes=4)


@pytest.mark.parametrize(
    "bounds,key",
    [((31, 30), "max_instances"), ((5, 3), "max_instances"), ((0, 0), "max_instances"),
     ((1, -2), "max_instances"), ((-1, 30), "min_instances"), ((-1, None), "min_instances"),
     ((True, 30), "min_instances")],
)  # fmt: skip
def test_instance_selection_without_effect_is_rejected(bounds, key):
    """min > max (no record with boxes selected), negatives, non-ints: rejected by name."""
    c = data_config()
    c.min_instances, c.max_instances = bounds
    with pytest.raises(ValueError, match=rf"^data\.{key}: "):
        config_lib.validate_data_config(c)


@pytest.mark.parametrize("bounds", [(0, None), (1, None), (0, 30), (1, 1), (10, 30)])
def test_instance_selection_bounds_accepted(bounds):
    c = data_config()
    c.min_instances, c.max_instances = bounds  # None: no upper bound
    config_lib.validate_data_config(c)


def test_eval_config_turns_the_selection_off():
    c = data_config()
    c.update(split="train[:90%]", eval_split="train[90%:]", min_instances=3, max_instances=10)
    e = config_lib.eval_config(c)
    config_lib.validate_data_config(e)
    assert (e.split, e.min_instances, e.max_instances) == ("train[90%:]", 0, None)
    assert (e.num_epochs, e.shuffle) == (1, False)
    assert (c.split, c.min_instances, c.max_instances) == ("train[:90%]", 3, 10)  # a copy
    c.eval_split = ""
    with pytest.raises(ValueError, match=r"^data\.eval_split: "):
        config_lib.eval_config(c)
