"""Mesh construction and the logical-axis rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from visionr1_jax import sharding


def test_make_mesh_fills_minus_one():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = sharding.make_mesh((-1, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError):
        sharding.make_mesh((3, 1, 1))


def test_logical_to_spec_uses_each_mesh_axis_once():
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    # 'batch' already took fsdp, so 'embed' stays replicated.
    assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)


def test_named_sharding_replicates_odd_dims():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = sharding.make_mesh((2, 2, 2))
    sh = sharding.named_sharding(mesh, ("vocab", "embed"), shape=(385, 64))
    assert sh.spec == P(None, "fsdp")


def test_constrain_is_noop_without_mesh():
    x = jax.numpy.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x
