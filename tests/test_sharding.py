"""Mesh construction, the logical-axis rules table, and the 8 simulated devices the test
session always has (conftest)."""

import os
import subprocess
import sys

import conftest
import jax
import pytest
from jax.sharding import PartitionSpec as P

from visionr1_jax import sharding


def test_device_count_flag_is_added_to_existing_xla_flags():
    flag = "--xla_force_host_platform_device_count"
    assert conftest.with_device_count("") == f"{flag}=8"
    assert conftest.with_device_count("--xla_cpu_enable_fast_math=false") == (
        f"--xla_cpu_enable_fast_math=false {flag}=8"
    )
    assert conftest.with_device_count(f"--a=1 {flag}=2 --b=2") == f"--a=1 {flag}=8 --b=2"
    assert conftest.with_device_count(f"{flag}=16") == f"{flag}=8"


@pytest.mark.parametrize(
    "preset", ["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=2"]
)
def test_session_has_8_devices_whatever_xla_flags_was(preset):
    """A fresh interpreter with XLA_FLAGS already set sees 8 devices after the conftest."""
    probe = "import conftest, jax; print(jax.device_count())"
    env = dict(os.environ, XLA_FLAGS=preset, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=os.path.dirname(__file__), env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split()[-1] == "8", out.stderr[-2000:]


def test_this_session_has_8_devices():
    assert jax.device_count() == conftest.NUM_DEVICES


def test_make_mesh_fills_minus_one():
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
    mesh = sharding.make_mesh((2, 2, 2))
    sh = sharding.named_sharding(mesh, ("vocab", "embed"), shape=(385, 64))
    assert sh.spec == P(None, "fsdp")


def test_constrain_is_noop_without_mesh():
    x = jax.numpy.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x
