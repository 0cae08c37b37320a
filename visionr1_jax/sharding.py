"""Device mesh from config and the one table mapping logical axis names to mesh axes.

Model code names only *logical* axes (`'embed'`, `'mlp'`, `'heads'`, `'batch'`, ...). This
module owns the table that turns them into mesh axes of the 3-D mesh `('data', 'fsdp',
'tensor')`: parameters are sharded FSDP-style over `fsdp` (their `embed` axis) and
Megatron-style over `tensor` (heads / MLP / vocabulary); activations are sharded over the batch
axes `('data', 'fsdp')`.

    mesh = make_mesh(ici_parallelism=(2, 2, 2))
    with jax.set_mesh(mesh):
        y = constrain(x, ("batch", "length", "act_embed"))
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # The packed patches of one image sequence (block-local attention reads across them); a
    # per-row batch's tower runs on each device's own rows (`QwenVL.encode_images`).
    ("vision_tokens", None),
    # Parameters of the language model.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    # LoRA adapters A [in, r] and B [r, out]: the rank dimension over fsdp wherever the
    # projection's own dimension does not take it (a mesh axis serves once per tensor), so
    # neither adapter is replicated across the FSDP axis.
    ("lora_rank", "fsdp"),
    # Parameters of the vision tower.
    ("patch", None),
    ("vision_embed", "fsdp"),
    ("vision_qkv", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("merger_in", "fsdp"),
    ("merger_hidden", "tensor"),
)


def make_mesh(
    ici_parallelism: Sequence[int] = (-1, 1, 1),
    dcn_parallelism: Sequence[int] = (1, 1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types.

    Args:
      ici_parallelism: sizes within a slice; one entry may be -1 (the rest of the devices).
      dcn_parallelism: sizes across slices (multi-slice TPU); all 1 on a single slice.
      devices: defaults to `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(int(d) for d in dcn_parallelism)
    n_slices = int(np.prod(dcn))
    per_slice = len(devices) // n_slices
    ici = [int(d) for d in ici_parallelism]
    if ici.count(-1) > 1:
        raise ValueError(f"at most one -1 in ici_parallelism, got {ici}")
    if -1 in ici:
        known = int(np.prod([d for d in ici if d != -1]))
        ici[ici.index(-1)] = per_slice // known
    shape = tuple(i * d for i, d in zip(ici, dcn, strict=True))
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {shape} does not use the {len(devices)} devices")
    types = (AxisType.Auto,) * len(MESH_AXES)
    if n_slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    return Mesh(arr, MESH_AXES, axis_types=types)


def logical_to_spec(
    names: Sequence[str | None] | None, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """PartitionSpec for logical axis `names`; a mesh axis is used at most once (first wins)."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh,
    names: Sequence[str | None] | None,
    rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding of logical `names` on `mesh`.

    With `shape`, a dimension that the mesh axes do not divide is left replicated, so odd-sized
    tensors (tiny vocabularies, 3 * hidden fused projections) still load.
    """
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = _divisible(spec, shape, mesh.shape)
    return NamedSharding(mesh, spec)


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh_shape) -> PartitionSpec:
    """`spec` with every dimension that its mesh axes do not divide evenly replicated."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            fixed.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else axes
        size = int(np.prod([mesh_shape[a] for a in axes_t]))
        fixed.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fixed)


def batch_axes(
    size: int, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES
) -> tuple[str, ...] | None:
    """The mesh axes of the logical `batch` axis under the current mesh, when they divide
    `size` rows: `jax.vmap(..., spmd_axis_name=batch_axes(B))` keeps a per-row computation's
    rows sharded (the constraints inside it name no batch axis, which vmap would otherwise
    replicate). None without a mesh or when the axes do not divide `size`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    axes = _divisible(logical_to_spec(("batch",), rules), (size,), mesh.shape)[0]
    if axes is None:
        return None
    return (axes,) if isinstance(axes, str) else tuple(axes)


def constrain(
    x: jax.Array, names: Sequence[str | None], rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES
) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one
    (single-device code paths stay free of mesh plumbing)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = _divisible(logical_to_spec(names, rules), x.shape, mesh.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def rows_sharding(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Rows sharded over ``batch_axes`` present in ``mesh`` (the ``batch`` logical axis),
    other dims replicated: the layout of every per-row array of a batch and of a rollout."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))
