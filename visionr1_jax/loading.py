"""Loading a run's model: the checkpoint to read, the model sharded over the run's mesh.

`checkpoint_path(config, workdir)` is `model.checkpoint`, or a tiny checkpoint written once
into the workdir (the laptop demo and the tests); `load_model(config, path, mesh)` reads it
with the run's dtypes, memory levers, image bound and LoRA; `make_run_mesh(config)` is the
mesh of `config.mesh`. Training, evaluation and export load alike through these.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from visionr1_jax import fs, sharding
from visionr1_jax.models import hf_weights, qwen_vl, tiny
from visionr1_jax.sections.model import lora_options, max_image_patches


def checkpoint_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`model.checkpoint`, or (empty) a tiny checkpoint `model.tiny` written once under
    `<workdir>/tiny_checkpoint` with `model.tokenizer` and the data's pixel bounds."""
    m = config.model
    if m.checkpoint:
        return str(m.checkpoint)
    path = fs.join(workdir, "tiny_checkpoint")
    if jax.process_index() == 0 and not fs.exists(fs.join(path, "config.json")):
        write = functools.partial(
            tiny.write_tiny_checkpoint,
            name=m.tiny,
            tokenizer=m.tokenizer,
            seed=int(config.seed),
            min_pixels=int(config.data.min_pixels),
            max_pixels=int(config.data.max_pixels),
        )
        if fs.is_remote(path):
            with tempfile.TemporaryDirectory(prefix="visionr1_tiny_") as local:
                write(local)
                fs.copy_tree(local, path, last="config.json")  # never read half-written
        else:
            write(path + ".tmp")
            os.replace(path + ".tmp", path)  # never a half-written checkpoint
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tiny_checkpoint")
    return path


def load_model(
    config: ml_collections.ConfigDict, path: str, mesh: jax.sharding.Mesh
) -> qwen_vl.QwenVL:
    """The Hugging Face checkpoint `path` as the run's model (`model.param_dtype`,
    `model.dtype`, `model.remat_policy`, the data's image-patch bound) sharded over `mesh`
    (call it under `jax.set_mesh(mesh)`)."""
    m = config.model
    return hf_weights.from_pretrained(
        path,
        dtype=jnp.dtype(m.param_dtype),
        compute_dtype=jnp.dtype(m.dtype),
        mesh=mesh,
        remat_policy=m.remat_policy,
        scan_layers=bool(m.get("scan_layers", False)),
        max_image_patches=max_image_patches(config),
        **lora_options(config),
    )


def make_run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of `config.mesh`. A fully specified mesh (no -1) smaller than the devices of a
    single process uses the first devices (a 1-device reference run on an 8-device host);
    multi-process runs must use every device."""
    ici, dcn = config.mesh.ici_parallelism, config.mesh.dcn_parallelism
    size = int(np.prod([*ici, *dcn]))
    devices = jax.devices()
    if -1 not in ici and jax.process_count() == 1 and size < len(devices):
        devices = devices[:size]
    return sharding.make_mesh(ici, dcn, devices=devices)
