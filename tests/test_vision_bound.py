"""The vision tower's per-image bound follows the run's data (issue: core fixes, point 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from visionr1_jax import config_lib
from visionr1_jax.models import QwenVL, testing
from visionr1_jax.models.qwen_vl import QwenVLConfig
from visionr1_jax.sections.model import data_max_patches, max_image_patches


def _resize_patches(height: int, width: int, max_pixels: int) -> int | None:
    """Patches transformers' Qwen2-VL resize gives one image (the independent reference), or
    None for a shape the input pipeline rejects (aspect ratio > 200, or so elongated that the
    resize exceeds max_pixels: `bad_aspect_ratio`, tested with the pipeline)."""
    try:
        h, w = smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=max_pixels)
    except ValueError:
        return None
    return (h // 14) * (w // 14) if h * w <= max_pixels else None


@pytest.mark.parametrize("max_pixels", [112 * 112, 401_408, 12_845_056])
def test_derived_bound_is_the_most_patches_the_resize_produces(max_pixels):
    data = ml_collections.ConfigDict({"max_pixels": max_pixels})
    bound = data_max_patches(data)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(28, 5000, (2000, 2))]
    # Shapes that fill each max_pixels exactly (112², 448·896, 3584²), near misses, extremes.
    sizes += [(112, 112), (448, 896), (3584, 3584), (449, 893), (4000, 4000), (28, 5000)]
    produced = [p for p in (_resize_patches(h, w, max_pixels) for h, w in sizes) if p]
    assert max(produced) == bound


def test_run_configs_bound_the_tower_by_their_data():
    tpu = config_lib.validate(config_lib.load_config("configs/tpu_v4_64.py"))
    assert max_image_patches(tpu) == 2048  # SPEC §5: 401,408 pixels / 14²
    demo = config_lib.validate(config_lib.load_config("configs/demo_cpu.py"))
    assert max_image_patches(demo) == 64  # 112² pixels
    tpu.model.max_image_patches = 4096  # settable above what the data needs
    assert max_image_patches(config_lib.validate(tpu)) == 4096


@pytest.mark.parametrize("value", [1024, 2047, True])
def test_a_bound_below_the_data_or_not_an_int_is_rejected(value):
    config = config_lib.load_config("configs/tpu_v4_64.py")
    config.model.max_image_patches = value
    with pytest.raises(ValueError, match=r"model\.max_image_patches"):
        config_lib.validate(config)


def test_the_bound_keeps_full_attention_blocks_local(tmp_path_factory):
    """Compiled temporaries of the vision forward over 16 packed images of 64 patches: with the
    data's bound (64) the full-attention blocks stay per image; with a checkpoint bound above
    the packed count (as 7B's 65,536 > 16 x 2,048) they go dense over all 1,024 patches."""
    path = testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    grid = jnp.asarray(np.tile([[1, 8, 8]], (16, 1)), jnp.int32)

    def temp_bytes(bound):
        cfg = QwenVLConfig.from_pretrained(path, max_image_patches=bound)
        model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        pixels = jax.ShapeDtypeStruct((16 * 64, cfg.patch_dim), jnp.float32)

        def f(state, pixels):
            return nnx.merge(graphdef, state).encode_images(pixels, grid)

        compiled = jax.jit(f).lower(state, pixels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(64) < temp_bytes(65_536) / 2
