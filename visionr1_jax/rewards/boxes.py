"""Box overlap kernels (pure JAX): IoU, GIoU and L1 for one pair, lifted with ``vmap``.

Boxes are ``xyxy`` in one common frame (original-image pixels for rewards). Every kernel is
written for a single pair and returns the unreduced value plus an aux dict; ``pairwise``
lifts a pair kernel to ``[M, N]`` and ``jax.vmap`` lifts that to a batch (STYLE §8).

Degenerate boxes (zero or negative extent) are well defined: their area is clipped at 0 and
every division is guarded, so the kernels never produce NaN or Inf for finite inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
_EPS = 1e-9


def _area(box: Array) -> Array:
    """``f32[4] -> f32[]``: area with negative extents clipped to 0."""
    return jnp.maximum(box[2] - box[0], 0.0) * jnp.maximum(box[3] - box[1], 0.0)


def iou(a: Array, b: Array) -> tuple[Array, dict[str, Array]]:
    """Intersection over union of two boxes.

    Args:
      a, b: ``f32[4]`` xyxy boxes.

    Returns:
      ``(iou f32[], aux)`` with aux ``{"inter", "union"}``; ``iou = inter / union`` and 0 when
      the union is empty.
    """
    iw = jnp.maximum(jnp.minimum(a[2], b[2]) - jnp.maximum(a[0], b[0]), 0.0)
    ih = jnp.maximum(jnp.minimum(a[3], b[3]) - jnp.maximum(a[1], b[1]), 0.0)
    inter = iw * ih
    union = _area(a) + _area(b) - inter
    value = jnp.where(union > _EPS, inter / jnp.maximum(union, _EPS), 0.0)
    return value, {"inter": inter, "union": union}


def giou(a: Array, b: Array) -> tuple[Array, dict[str, Array]]:
    """Generalised IoU (Rezatofighi et al., 2019): ``IoU − (|E| − |A∪B|) / |E|``.

    ``E`` is the smallest box enclosing both. Range ``[-1, 1]``; 0 penalty when ``|E| = 0``.

    Args:
      a, b: ``f32[4]`` xyxy boxes.

    Returns:
      ``(giou f32[], aux)`` with aux ``{"iou", "inter", "union", "enclosing"}``.
    """
    value_iou, aux = iou(a, b)
    ew = jnp.maximum(a[2], b[2]) - jnp.minimum(a[0], b[0])
    eh = jnp.maximum(a[3], b[3]) - jnp.minimum(a[1], b[1])
    enclosing = jnp.maximum(ew, 0.0) * jnp.maximum(eh, 0.0)
    penalty = jnp.where(
        enclosing > _EPS, (enclosing - aux["union"]) / jnp.maximum(enclosing, _EPS), 0.0
    )
    return value_iou - penalty, {**aux, "iou": value_iou, "enclosing": enclosing}


def l1(a: Array, b: Array) -> tuple[Array, dict[str, Array]]:
    """``f32[4], f32[4] -> f32[]``: sum of absolute coordinate differences (``cdist`` p=1)."""
    return jnp.sum(jnp.abs(a - b)), {}


PairKernel = Callable[[Array, Array], tuple[Array, dict[str, Array]]]
OVERLAPS: dict[str, PairKernel] = {"iou": iou, "giou": giou}


def pairwise(kernel: PairKernel, a: Array, b: Array) -> tuple[Array, dict[str, Array]]:
    """Lift a pair kernel to all pairs: ``f32[M, 4], f32[N, 4] -> f32[M, N]`` (+ aux ``[M, N]``)."""
    return jax.vmap(jax.vmap(kernel, in_axes=(None, 0)), in_axes=(0, None))(a, b)
