"""Sharded equals unsharded: a (2, 2, 2) ('data', 'fsdp', 'tensor') mesh of 8 CPU devices."""

import jax
import numpy as np
import pytest
from flax import nnx

from visionr1_jax import sharding
from visionr1_jax.models import from_pretrained, testing
from visionr1_jax.models.testing import tiny_checkpoint


def _expected_spec(names, shape, mesh):
    """Independent reading of the rules table: each logical name -> its mesh axes, an axis used
    once per tensor, replicated where the mesh does not divide the dimension."""
    table = dict(sharding.DEFAULT_LOGICAL_AXIS_RULES)
    used, out = set(), []
    for name, dim in zip(names, shape, strict=True):
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or dim % size:
            out.append(None)
        else:
            out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path, text_only_row=True)
    mesh = sharding.make_mesh((2, 2, 2))
    return path, batch, mesh


def _call(model, batch, targets):
    logits_fn = nnx.jit(lambda m, ids, pv, g, am: m(ids, pv, g, am))
    lp_fn = nnx.jit(lambda m, ids, pv, g, am, y: m.token_logprobs(ids, pv, g, am, y, chunk_size=16))
    args = (batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    logits = logits_fn(model, *args, batch["attention_mask"])
    lps = lp_fn(model, *args, batch["attention_mask"], targets)
    return logits, lps


def test_parameters_carry_rule_shardings(setup):
    path, _, mesh = setup
    model = from_pretrained(path, mesh=mesh)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    n_sharded = 0
    for pth, var in flat:
        arr = var.get_value()
        names = var.get_metadata()["logical_axes"]
        assert len(names) == arr.ndim, pth
        want = _expected_spec(names, arr.shape, mesh)
        got = tuple(arr.sharding.spec)
        while got and got[-1] is None:
            got = got[:-1]
        assert got == want, (pth, got, want)
        assert arr.sharding.mesh.shape == mesh.shape
        n_sharded += bool(want)
    assert n_sharded > 20  # embeddings, projections and MLPs are actually split


def test_sharded_equals_unsharded(setup):
    path, batch, mesh = setup
    targets = np.roll(batch["input_ids"], -1, axis=1)
    ref_logits, ref_lps = _call(from_pretrained(path), batch, targets)
    with jax.set_mesh(mesh):
        model = from_pretrained(path, mesh=mesh)
        batch_sh = dict(batch)
        for k in ("input_ids", "attention_mask"):
            batch_sh[k] = jax.device_put(
                batch[k], sharding.named_sharding(mesh, ("batch", "length"))
            )
        y = jax.device_put(targets, sharding.named_sharding(mesh, ("batch", "length")))
        logits, lps = _call(model, batch_sh, y)
    assert len(logits.sharding.device_set) == 8
    m = batch["attention_mask"].astype(bool)
    ref_logits = np.asarray(ref_logits)
    testing.assert_logits_close(logits, ref_logits, m)  # float32 parity
    # Log-prob parity of two float32 evaluations of logits of scale max|z| over V tokens.
    atol = testing.logprob_atol(float(np.abs(ref_logits[m]).max()), ref_logits.shape[-1])
    np.testing.assert_allclose(np.asarray(lps)[m], np.asarray(ref_lps)[m], atol=atol, rtol=0)
