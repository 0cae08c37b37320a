"""The on-device M-RoPE index equals transformers' `get_rope_index` on random layouts."""

import jax
import numpy as np
import pytest
import torch

from visionr1_jax.models import rope
from visionr1_jax.models.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()


def _random_layout(rng, batch, image_token, vocab):
    """Rows of text with 0-3 images (random merged grids) and random left/right padding."""
    rows, grids = [], []
    for _ in range(batch):
        row = list(rng.integers(0, 50, rng.integers(1, 6)))
        for _ in range(rng.integers(0, 4)):
            h, w = 2 * rng.integers(1, 6), 2 * rng.integers(1, 6)
            grids.append((1, h, w))
            row += [vocab - 1] + [image_token] * (h * w // 4) + [vocab - 2]
            row += list(rng.integers(0, 50, rng.integers(0, 4)))
        rows.append(row)
    t = max(len(r) for r in rows) + int(rng.integers(0, 3))
    ids = np.zeros((batch, t), np.int64)
    mask = np.zeros((batch, t), np.int64)
    for i, r in enumerate(rows):
        if rng.random() < 0.5:
            ids[i, t - len(r) :], mask[i, t - len(r) :] = r, 1
        else:
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask, np.array(grids, np.int64).reshape(-1, 3)


@pytest.mark.parametrize("seed", range(6))
def test_rope_index_matches_transformers(hf_model, seed):
    rng = np.random.default_rng(seed)
    image_token = hf_model.config.image_token_id
    ids, mask, grids = _random_layout(rng, 5, image_token, 300)
    assert len(grids) > 0  # HF builds 3-D positions only for a batch with an image
    want_pos, want_delta = hf_model.model.get_rope_index(
        torch.tensor(ids),
        mm_token_type_ids=torch.tensor((ids == image_token).astype(np.int64)),
        image_grid_thw=torch.tensor(grids),
        attention_mask=torch.tensor(mask),
    )
    padded = np.concatenate([grids, np.zeros((2, 3), np.int64)])  # unused rows are ignored
    fn = jax.jit(rope.get_rope_index, static_argnames=("image_token_id", "spatial_merge_size"))
    pos, delta = fn(ids, padded, mask, image_token_id=image_token, spatial_merge_size=2)
    np.testing.assert_array_equal(np.asarray(pos), want_pos.numpy())
    np.testing.assert_array_equal(np.asarray(delta), want_delta.numpy())


def test_text_only_rows_are_cumulative_counts():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = np.ones_like(mask)
    pos, delta = rope.get_rope_index(ids, np.zeros((0, 3), np.int32), mask, image_token_id=7)
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(rope.text_positions(mask)))
    np.testing.assert_array_equal(np.asarray(delta), [[0], [0]])
