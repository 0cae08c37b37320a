"""Helpers shared by the model tests: tiny checkpoints written once per test session."""

from __future__ import annotations

import os

from visionr1_jax.models import tiny

_CACHE: dict[tuple, str] = {}


def tiny_checkpoint(tmp_path_factory, name: str, **kwargs) -> str:
    """Path of a tiny checkpoint `name`, written on first use in this pytest session.

    `tmp_path_factory` is pytest's session-scoped factory; keyword arguments go to
    `tiny.write_tiny_checkpoint` and are part of the cache key.
    """
    key = (str(tmp_path_factory.getbasetemp()), name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        tag = "-".join([name] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
        path = os.path.join(str(tmp_path_factory.getbasetemp()), "ckpt", tag)
        _CACHE[key] = tiny.write_tiny_checkpoint(path, name, **kwargs)
    return _CACHE[key]


def random_images(rng, sizes):
    """PIL images of the given (height, width) sizes with uniform random pixels."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
