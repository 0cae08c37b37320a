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


def image_placement(
    input_ids: jax.Array,
    image_grid_thw: jax.Array,
    attention_mask: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    per_row: bool = False,
) -> dict[str, jax.Array]:
    """Which image, and which of its merged tokens, every `<|image_pad|>` token stands for.

    A run of image tokens (consecutive *valid* tokens; padding between them does not split
    a run) is one image. Two layouts of the images:

    * packed (`per_row=False`, the HF processor's): `image_grid_thw` i32[I, 3] lists the images
      of the whole batch; runs take them in row-major order (row b's first run is image
      `runs in rows < b`). Inside an image, token j takes merged token j of *that* image, so a
      stray token in one row never shifts another row's embeddings.
    * per row (`per_row=True`, the input pipeline's): `image_grid_thw` i32[B, 3] is row b's
      image (zeros: no image); row b's run is image b, whatever the other rows hold.

    A row is consistent when each of its runs holds exactly its image's `t*h*w / m^2` tokens
    (and, per row, when it has at most one run and a non-empty image is used). In the packed
    layout an image that no run uses makes every row inconsistent (which row lost it cannot
    be known); a run of the wrong length only its own row. The callers turn an inconsistent
    row into NaN; transformers raises instead.

    Args:
      input_ids: i32[B, T]; image_grid_thw: i32[I, 3] (packed) or i32[B, 3] (per row);
      attention_mask: [B, T] (1 = real token) or None.
    Returns:
      dict with is_image bool[B, T] (valid image tokens), image i32[B, T] (image index, 0 for
      text), index i32[B, T] (merged token inside the image, 0 for text), run_start
      bool[B, T], run_first i32[B, T] (position of the latest run start at or before each
      token, 0 before the first), ok bool[B] (the row's image tokens match its images).
    """
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    is_img = (input_ids == image_token_id) & valid
    run_start = is_img & ~_previous_valid(is_img, valid)
    rank = jnp.cumsum(run_start, axis=1) - 1  # run number inside the row
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    n_img = grid.shape[0]
    if per_row:
        if n_img != b:
            raise ValueError(f"per-row images need image_grid_thw [B={b}, 3], got {grid.shape}")
        image = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    else:
        runs = run_start.sum(axis=1)
        image = (jnp.cumsum(runs) - runs)[:, None] + rank
    image = jnp.where(is_img, image, 0).astype(jnp.int32)
    # Index of each token inside its run, counting valid tokens only.
    ar = jnp.arange(t)[None, :]
    start = jnp.maximum(jax.lax.cummax(jnp.where(run_start, ar, -1), axis=1), 0)
    valid_rank = jnp.cumsum(valid, axis=1) - 1
    index = jnp.where(is_img, valid_rank - jnp.take_along_axis(valid_rank, start, axis=1), 0)
    tokens = grid[:, 0] * grid[:, 1] * grid[:, 2] // spatial_merge_size**2  # [I]
    known = image < n_img
    count = (
        jnp.zeros((max(n_img, 1),), jnp.int32)
        .at[jnp.where(is_img & known, image, n_img)]
        .add(1, mode="drop")[:n_img]
    )
    image_ok = count == tokens  # [I]: every token of the image placed exactly once
    image_ok_or_unknown = jnp.concatenate([image_ok, jnp.zeros((1,), bool)])  # [I + 1]
    token_ok = ~is_img | image_ok_or_unknown[jnp.where(known, image, n_img)]
    ok = jnp.all(token_ok, axis=1)
    if per_row:
        ok = ok & image_ok & (rank[:, -1] <= 0)
    elif n_img:
        ok = ok & ~jnp.any((count == 0) & (tokens > 0))
    return dict(
        is_image=is_img, image=image, index=index, run_start=run_start, run_first=start, ok=ok
    )


def get_rope_index(
    input_ids: jax.Array,
    image_grid_thw: jax.Array,
    attention_mask: jax.Array | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    per_row: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE position ids, equal to transformers' `get_rope_index` for images.

    Images are placed by `image_placement` (packed: runs take `image_grid_thw` rows in
    row-major order, the HF processor's convention, rows beyond the last image ignored; per
    row: row b's run is image b).

    Args:
      input_ids: i32[B, T].
      image_grid_thw: i32[I, 3] (packed) or i32[B, 3] (`per_row`) patch grid (t, h, w) per
        image, before merging.
      attention_mask: i32/bool[B, T] (1 = real token) or None (all real).
      image_token_id: id of `<|image_pad|>`.
      spatial_merge_size: the vision merger's m (grid h, w are divided by m).

    Returns:
      position_ids i32[3, B, T] and rope_deltas i32[B, 1] where rope_deltas is
      `max position + 1 - number of real tokens`; during decoding the n-th real token (0-based)
      of a row sits at position `n + rope_deltas`.
    """
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    place = image_placement(
        input_ids,
        image_grid_thw,
        attention_mask,
        image_token_id=image_token_id,
        spatial_merge_size=spatial_merge_size,
        per_row=per_row,
    )
    is_img, run_start, j = place["is_image"], place["run_start"], place["index"]
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    n_img = grid.shape[0]
    if n_img == 0:
        grid = jnp.zeros((1, 3), jnp.int32)
    g = grid[jnp.clip(place["image"], 0, max(n_img - 1, 0))]  # [B, T, 3]
    gh = g[..., 1] // spatial_merge_size
    gw = g[..., 2] // spatial_merge_size
    # Advance of the running position contributed by each token.
    advance = jnp.where(
        is_img, jnp.where(run_start, jnp.maximum(gh, gw), 0), valid.astype(jnp.int32)
    )
    before = jnp.cumsum(advance, axis=1) - advance  # exclusive cumsum
    run_base = jnp.take_along_axis(before, place["run_first"], axis=1)
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


def check_image_tokens(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    per_row: bool = False,
) -> None:
    """Host-side (numpy, nothing compiled) form of `image_placement`'s `ok`: raises ValueError
    naming each row whose `<|image_pad|>` runs do not match its images (the model would return
    NaN for it)."""
    ids = np.asarray(input_ids)
    valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    tokens = grid.prod(axis=1) // spatial_merge_size**2
    runs = []  # per row: lengths of the runs of image tokens among its valid tokens
    for row, keep in zip(ids, valid, strict=True):
        is_img = np.concatenate([[False], row[keep] == image_token_id, [False]])
        edges = np.flatnonzero(np.diff(is_img.astype(np.int8)))
        runs.append((edges[1::2] - edges[::2]).tolist())
    if per_row:
        bad = [b for b, r in enumerate(runs) if r != ([int(tokens[b])] if tokens[b] else [])]
    else:
        bad, used, k = [], set(), 0
        for b, r in enumerate(runs):
            mine = range(k, k + len(r))
            k += len(r)
            used.update(mine)
            if any(i >= len(tokens) or n != tokens[i] for i, n in zip(mine, r, strict=True)):
                bad.append(b)
        if any(t > 0 and i not in used for i, t in enumerate(tokens)):
            bad = list(range(len(runs)))  # an image no run uses: no row can be trusted
    if bad:
        layout = "per-row" if per_row else "packed"
        raise ValueError(
            f"image tokens do not match the images ({layout} layout) in rows {bad}: runs of "
            f"<|image_pad|> per row {[runs[b] for b in bad]}, merged tokens per image "
            f"{tokens.tolist()}"
        )
