"""The rollout's weight copy (issue 13, `grpo.rollout_copy`): the loop samples from a copy of
the weight matrices in the compute dtype, made once per rollout, instead of reading the float32
master weights at every decoding step.

- the copy holds every rank >= 2 floating parameter in bfloat16 and the rest (norm scales,
  biases) unchanged, each with its sharding (8 simulated devices, FSDP x tensor);
- sampling from it gives the master weights' tokens and log-probs exactly: every layer casts
  its weights to the compute dtype anyway;
- `rollout_copy=True` where there is nothing to narrow is rejected; None copies only then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from visionr1_jax import config_lib, sampler, sharding, train
from visionr1_jax.models import from_pretrained, model_config, testing


def _config(dtype: str, copy: bool | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = 1
    c.model = model_config()
    c.model.dtype = dtype
    c.grpo = train.grpo_config()
    c.grpo.rollout_copy = copy
    return c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


def test_copy_is_bf16_matrices_with_their_shardings_and_samples_the_same(ckpt):
    config = _config("bfloat16")
    assert train.rollout_dtype(config) == jnp.bfloat16
    mesh = sharding.make_mesh((1, 4, 2))
    with jax.set_mesh(mesh):
        model = from_pretrained(ckpt, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=mesh)
        graphdef, frozen, params = nnx.split(model, nnx.Nothing, ...)
        copy_params, copy_frozen = train.make_rollout_copy(config)((params, frozen))
        for (path, x), y in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(copy_params), strict=True
        ):
            want = jnp.bfloat16 if x.ndim >= 2 else jnp.float32
            assert y.dtype == want, (jax.tree_util.keystr(path), y.dtype)
            assert y.sharding == x.sharding, jax.tree_util.keystr(path)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(want)))
        batch = testing.prompt_batch(ckpt)
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        batch = {k: np.asarray(batch[k]) for k in keys}
        runs = []
        for p, f in ((params, frozen), (copy_params, copy_frozen)):
            out = sampler.generate(
                nnx.merge(graphdef, p, f), batch, rng=jax.random.key(3), num_generations=2,
                max_new_tokens=12, temperature=1.0, top_k=20,
            )  # fmt: skip
            runs.append(jax.device_get((out.tokens, out.mask, out.logprobs)))
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1].sum() > 0


def test_rollout_copy_settings():
    assert train.rollout_dtype(_config("float32")) is None  # nothing to narrow: no copy
    assert train.rollout_dtype(_config("bfloat16", copy=False)) is None
    assert train.make_rollout_copy(_config("float32")) is None
    config_lib.validate(_config("bfloat16", copy=True))
    with pytest.raises(ValueError, match=r"grpo\.rollout_copy=True has no effect"):
        config_lib.validate(_config("float32", copy=True))
