"""Rotary position embeddings of Qwen-VL: the M-RoPE position index (jittable), text M-RoPE and
the vision tower's 2-D rotary.

M-RoPE (Qwen2-VL paper, Sec. 2.1) gives every token three position ids (temporal, height,
width). Text tokens use the same id on all three axes and advance by one; an image with a merged
grid (t, h', w') placed at running position s gets ids (s + t_i, s + h_i, s + w_i) and advances
the running position by max(h', w'). Padding tokens (attention mask 0) are skipped and get id 0.
`get_rope_index` computes this on device without a Python loop over images, so prompts with
several images of different sizes, left/right padding and text-only rows compile once per shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def get_rope_index(
    input_ids: jax.Array,
    image_grid_thw: jax.Array,
    attention_mask: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE position ids, equal to transformers' `get_rope_index` for images.

    Images are numbered in row-major order of their placeholder runs over the whole batch and
    take `image_grid_thw` rows in that order (the same convention as the HF processor). Rows of
    `image_grid_thw` beyond the last image (zero padding) are ignored.

    Args:
      input_ids: i32[B, T].
      image_grid_thw: i32[I, 3] patch grid (t, h, w) per image, before merging.
      attention_mask: i32/bool[B, T] (1 = real token) or None (all real).
      image_token_id: id of `<|image_pad|>`.
      spatial_merge_size: the vision merger's m (grid h, w are divided by m).

    Returns:
      position_ids i32[3, B, T] and rope_deltas i32[B, 1] where rope_deltas is
      `max position + 1 - number of real tokens`; during decoding the n-th real token (0-based)
      of a row sits at position `n + rope_deltas`.
    """
    b, t = input_ids.shape
    if attention_mask is None:
        valid = jnp.ones((b, t), bool)
    else:
        valid = attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & valid
    # Padding is skipped: a run continues across masked tokens only if HF's compaction would
    # merge it, i.e. the previous *valid* token is also an image token.
    prev_valid_is_img = _previous_valid(is_img, valid)
    run_start = is_img & ~prev_valid_is_img
    # Global image number of each image token (row-major over the batch).
    img_idx = jnp.cumsum(run_start.reshape(-1)).reshape(b, t) - 1
    n_img = image_grid_thw.shape[0]
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    if n_img == 0:
        grid = jnp.zeros((1, 3), jnp.int32)
    g = grid[jnp.clip(img_idx, 0, max(n_img - 1, 0))]  # [B, T, 3]
    gh = g[..., 1] // spatial_merge_size
    gw = g[..., 2] // spatial_merge_size
    # Advance of the running position contributed by each token.
    advance = jnp.where(
        is_img, jnp.where(run_start, jnp.maximum(gh, gw), 0), valid.astype(jnp.int32)
    )
    before = jnp.cumsum(advance, axis=1) - advance  # exclusive cumsum
    ar = jnp.arange(t)[None, :]
    start_pos = jax.lax.cummax(jnp.where(run_start, ar, -1), axis=1)
    start_pos = jnp.maximum(start_pos, 0)
    run_base = jnp.take_along_axis(before, start_pos, axis=1)
    # Index of the token inside its image run, counting valid tokens only.
    valid_rank = jnp.cumsum(valid, axis=1) - 1
    j = valid_rank - jnp.take_along_axis(valid_rank, start_pos, axis=1)
    hw = jnp.maximum(gh * gw, 1)
    wsafe = jnp.maximum(gw, 1)
    hsafe = jnp.maximum(gh, 1)
    pos_t = run_base + j // hw
    pos_h = run_base + (j // wsafe) % hsafe
    pos_w = run_base + j % wsafe
    pos = jnp.stack(
        [
            jnp.where(is_img, pos_t, before),
            jnp.where(is_img, pos_h, before),
            jnp.where(is_img, pos_w, before),
        ]
    )
    pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
    n_valid = valid.sum(axis=1)
    deltas = pos.max(axis=(0, 2)) + 1 - n_valid
    return pos, deltas[:, None].astype(jnp.int32)


def _previous_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
    """bool[B, T]: the value of `x` at the previous valid position (False if none)."""
    t = x.shape[1]
    ar = jnp.arange(t)[None, :]
    last_valid = jax.lax.cummax(jnp.where(valid, ar, -1), axis=1)
    prev = jnp.concatenate([jnp.full((x.shape[0], 1), -1), last_valid[:, :-1]], axis=1)
    return jnp.where(prev >= 0, jnp.take_along_axis(x, jnp.maximum(prev, 0), axis=1), False)


def text_positions(attention_mask: jax.Array) -> jax.Array:
    """i32[3, B, T] positions of text-only rows (cumulative count of real tokens)."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    pos = jnp.where(attention_mask.astype(bool), pos, 0)
    return jnp.broadcast_to(pos[None], (3, *pos.shape))


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
    """f32[dim // 2] rotary inverse frequencies `theta ** (-2i / dim)`."""
    return (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32[B, T, head_dim] of multimodal RoPE.

    Frequency i of the `head_dim // 2` frequencies takes its angle from the position axis
    (temporal, height, width) whose `mrope_section` chunk contains i; the halves are repeated
    as in `rotate_half` style RoPE.

    Args:
      position_ids: i32[3, B, T].
    """
    inv = inv_frequencies(head_dim, theta)
    axis = np.concatenate([np.full(s, k % 3) for k, s in enumerate(mrope_section)])
    if axis.shape[0] != head_dim // 2:
        raise ValueError(f"sum(mrope_section)={axis.shape[0]} must be head_dim/2={head_dim // 2}")
    pos = position_ids.astype(jnp.float32)[axis]  # [F, B, T]
    angles = jnp.moveaxis(pos, 0, -1) * inv  # [B, T, F]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def vision_cos_sin(hpos: jax.Array, wpos: jax.Array, head_dim: int, theta: float):
    """cos, sin f32[P, head_dim] of the vision tower's axial 2-D rotary.

    A quarter of the head dimension rotates with the row, a quarter with the column, and the
    half is repeated. Args: hpos, wpos i32[P] patch row / column inside its image.
    """
    inv = inv_frequencies(head_dim // 2, theta)
    ang = jnp.concatenate(
        [hpos.astype(jnp.float32)[:, None] * inv, wpos.astype(jnp.float32)[:, None] * inv], -1
    )
    ang = jnp.concatenate([ang, ang], -1)
    return jnp.cos(ang), jnp.sin(ang)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin in float32; cos/sin broadcast over the head axis.

    Args: x [..., T, H, D]; cos, sin [..., T, D].
    """
    xf = x.astype(jnp.float32)
    out = xf * cos[..., None, :] + rotate_half(xf) * sin[..., None, :]
    return out.astype(x.dtype)
