"""Processor built locally: chat template, left padding to buckets, padded patches and grids."""

import numpy as np
import pytest

from visionr1_jax import processing
from visionr1_jax.models.testing import random_images, tiny_checkpoint


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return processing.load_processor(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny"))


def test_render_prompt_has_one_placeholder_per_image(proc):
    text = processing.render_prompt(proc, "Locate every cat.", num_images=2)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_encode_batch_matches_processor_and_pads_to_buckets(proc):
    rng = np.random.default_rng(0)
    ims = random_images(rng, [(100, 150), (224, 168), (60, 60)])
    texts = [
        processing.render_prompt(proc, "Locate every cat.", num_images=2),
        processing.render_prompt(proc, "hi", num_images=1),
    ]
    batch = processing.encode_batch(
        proc,
        texts,
        [ims[:2], ims[2:]],
        length_buckets=(16, 256),
        patch_buckets=(64, 1024),
        max_images=4,
    )
    ref = proc(text=texts, images=ims, padding=True, return_tensors="np")
    b = ref["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, 256) and batch["pixel_values"].shape == (1024, 1176)
    # Left padding: the processor's (longest-padded) rows sit at the right end.
    ref_mask = ref["attention_mask"]
    for i in range(b):
        n = ref_mask[i].sum()
        np.testing.assert_array_equal(
            batch["input_ids"][i, -n:], ref["input_ids"][i][ref_mask[i] == 1]
        )
        assert batch["attention_mask"][i].sum() == n
        assert batch["attention_mask"][i, -n:].all()
    p = ref["pixel_values"].shape[0]
    np.testing.assert_array_equal(batch["pixel_values"][:p], ref["pixel_values"])
    assert not batch["pixel_values"][p:].any()
    np.testing.assert_array_equal(batch["image_grid_thw"][:3], ref["image_grid_thw"])
    assert not batch["image_grid_thw"][3:].any()
    n_tokens = (batch["input_ids"] == proc.image_token_id).sum()
    assert n_tokens == ref["image_grid_thw"].prod(-1).sum() // 4


def test_bucket():
    assert processing.bucket(5, (4, 8, 16)) == 8
    assert processing.bucket(8, (4, 8, 16)) == 8
    with pytest.raises(ValueError):
        processing.bucket(17, (4, 8, 16))
