"""The one evaluator maps answers back to the original image (issue 24).

Every other evaluation test uses 112×112 images at their own size, where the model's frame and
the original pixels coincide: a skipped rescale or swapped x/y went unseen. Here the images are
resized and not square (480×640 → 224×308, as the pipeline's smart resize makes them), the
answers are written in each frame from the original boxes by an independent oracle (the frame
definitions of SPEC §2 / `data.templates`), and the evaluator must return the original boxes,
score them perfectly, and fail when the answer is the rescale-free or transposed one.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from visionr1_jax import evaluate, rewards, sections
from visionr1_jax.data import data_config
from visionr1_jax.models import tiny

IMAGE = (480, 640)  # (height, width) of the original images
INPUT = (224, 308)  # the resized model input (multiples of 28)


# Each image's answer in the model's frame, as numbers the frame writes exactly: resized-input
# pixels (`qwen25_abs`, integers), thousandths of the image (`rel1000`, integers), fractions of
# it (`norm01`, three decimals).
ANSWERS = {
    "qwen25_abs": [[[22, 14, 154, 98]],
                   [[100, 40, 300, 220], [10, 120, 60, 200]],
                   [[5, 0, 308, 200]]],
    "rel1000": [[[71, 62, 500, 437]],
                [[325, 178, 974, 982], [32, 536, 195, 893]],
                [[16, 0, 1000, 893]]],
    "norm01": [[[0.071, 0.062, 0.5, 0.437]],
               [[0.325, 0.178, 0.974, 0.982], [0.032, 0.536, 0.195, 0.893]],
               [[0.016, 0.0, 1.0, 0.893]]],
}  # fmt: skip


def _to_pixels(coords: np.ndarray, frame: str) -> np.ndarray:
    """The oracle: the model's frame → original xyxy pixels, by the frames' definitions."""
    (h, w), (h_in, w_in) = IMAGE, INPUT
    scale = {"qwen25_abs": (w / w_in, h / h_in), "rel1000": (w / 1000, h / 1000), "norm01": (w, h)}
    sx, sy = scale[frame]
    return np.asarray(coords, np.float64) * np.array([sx, sy, sx, sy])


def _targets(frame: str) -> list[rewards.Target]:
    return [
        rewards.Target(_to_pixels(c, frame), ["cat"] * len(c), IMAGE, INPUT) for c in ANSWERS[frame]
    ]


def _answer_text(coords) -> str:
    items = [{"bbox_2d": list(box), "label": "cat"} for box in coords]
    return "```json\n" + json.dumps(items) + "\n```"


def _answers(frame: str, transform=lambda c: c) -> list[evaluate.Answer]:
    tok = tiny.small_tokenizer()
    rc = rewards.default_config("official")
    rc.frame = frame
    out = []
    for i, (coords, target) in enumerate(zip(ANSWERS[frame], _targets(frame), strict=True)):
        text = _answer_text(transform(np.asarray(coords)).tolist())
        ids = tok(text, add_special_tokens=False)["input_ids"]
        logps = np.zeros(len(ids), np.float32)
        out.append(evaluate.answer_of(tok, f"r{i}", ids, logps, target, False, rc, "constant"))
    return out


def _config(frame: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.eval = sections.eval_config()
    config.data = data_config()
    config.data.frame = frame
    config.reward = rewards.default_config()
    config.reward.frame = frame
    return config


@pytest.mark.parametrize("frame", ["qwen25_abs", "rel1000", "norm01"])
def test_answers_come_back_in_original_pixels(frame):
    answers = _answers(frame)
    for a, target in zip(answers, _targets(frame), strict=True):
        # float32 boxes of at most 640 px: a few ulps (1e-3 px is ~16 ulps at 640).
        np.testing.assert_allclose(a.boxes, target.boxes, atol=1e-3)
    m = evaluate.compute_metrics(answers, _config(frame))
    assert m["AP"] > 0.99 and m["AP50"] > 0.99  # pycocotools gives 1 - 2^-52 when perfect
    assert m["matched_iou"] > 0.999 and m["parse_rate"] == 1.0 and m["num_matched"] == 4


@pytest.mark.parametrize("frame", ["qwen25_abs", "rel1000", "norm01"])
def test_a_wrong_frame_mapping_is_seen(frame):
    """What a skipped rescale (the model's numbers read as original pixels) or swapped x/y
    would give is far from the original boxes, and the metrics see a swap: the test above
    can fail."""
    for coords, t in zip(ANSWERS[frame], _targets(frame), strict=True):
        assert np.abs(np.asarray(coords) - np.asarray(t.boxes)).max() > 10
    swapped = _answers(frame, transform=lambda c: c[:, [1, 0, 3, 2]])
    m = evaluate.compute_metrics(swapped, _config(frame))
    assert m["AP"] < 0.5 and m["matched_iou"] < 0.9
    for a, t in zip(swapped, _targets(frame), strict=True):
        assert np.abs(a.boxes - np.asarray(t.boxes)).max() > 10
