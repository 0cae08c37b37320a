"""Hugging Face checkpoints <-> `QwenVL` parameters.

Loading never materialises a full tensor on one device: the abstract model (`nnx.eval_shape`)
gives every parameter's shape and logical axes, the rules table gives its `NamedSharding`, and
`jax.make_array_from_callback` asks each addressable device for its slice, which is read from a
memory-mapped safetensors file (so a host touches only the bytes of its own shards); a remote
checkpoint (`gs://...`, read through `visionr1_jax.fs`) is read tensor by tensor with ranged
reads, never copied whole to the local disk. bf16, fp16
and fp32 files, single files and sharded `model.safetensors.index.json` checkpoints are read;
both the hub key layout (`model.layers.N`, `visual.blocks.N`) and the transformers-5 layout
(`model.language_model.layers.N`, `model.visual.blocks.N`) are accepted.

Export writes `config.json` and `model.safetensors` in the hub layout, which
`transformers.AutoModelForImageTextToText.from_pretrained` (or the model classes) load, and the
checkpoint's `generation_config.json` (stop and pad ids) when it had one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from visionr1_jax import fs, sharding
from visionr1_jax.models.qwen_vl import Dense, LoRAParam, QwenVL, QwenVLConfig

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsDir:
    """Read access to every tensor of a checkpoint directory: memory-mapped for a local one,
    ranged reads of each tensor's bytes for a remote one."""

    def __init__(self, path: str):
        index = fs.join(path, "model.safetensors.index.json")
        if fs.exists(index):
            files = sorted(set(fs.read_json(index)["weight_map"].values()))
        else:
            files = [n for n in fs.listdir(path) if n.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            fname = fs.join(path, name)
            with fs.open(fname, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self.entries[key] = (fname, info, 8 + n)
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def array(self, key: str) -> np.ndarray:
        """Tensor `key` as numpy: a lazily read memory-mapped view of a local file, or the
        tensor's bytes read with one ranged read of a remote one."""
        fname, info, offset = self.entries[key]
        start, end = info["data_offsets"]
        if fs.is_remote(fname):
            with fs.open(fname, "rb") as f:
                f.seek(offset + start)
                raw = np.frombuffer(f.read(end - start), np.uint8)
            return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        if fname not in self._maps:
            self._maps[fname] = np.memmap(fname, dtype=np.uint8, mode="r")
        raw = self._maps[fname][offset + start : offset + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


# ----------------------------------------------------------------------------- key mapping


def hf_key(path: tuple) -> str:
    """Hub-layout key of our parameter path, e.g. ('model', 'layers', 0, 'mlp', 'up_proj',
    'kernel') -> 'model.layers.0.mlp.up_proj.weight'."""
    parts = []
    for p in path:
        p = str(p)
        if p in ("kernel", "weight"):
            p = "weight"
        elif p.startswith("mlp_") and p[4:].isdigit():  # merger's nn.Sequential indices
            p = "mlp." + p[4:]
        parts.append(p)
    if parts[:2] == ["visual", "patch_embed"]:
        return "visual.patch_embed.proj.weight"
    return ".".join(parts)


def _alternatives(key: str) -> list[str]:
    alts = [key]
    if key.startswith("model."):
        alts.append("model.language_model." + key[len("model.") :])
    if key.startswith("visual."):
        alts.append("model." + key)
    return alts


def _to_ours(path: tuple, cfg: QwenVLConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Layout transform of an HF tensor into our parameter layout."""
    if path[:2] == ("visual", "patch_embed"):
        return lambda w: w.reshape(w.shape[0], -1).T  # Conv3d [E, C, t, p, p] -> [F, E]
    if path[-1] == "kernel":
        return lambda w: w.T  # Linear [out, in] -> [in, out]
    return lambda w: w


def _to_hf(path: tuple, cfg: QwenVLConfig) -> Callable[[np.ndarray], np.ndarray]:
    if path[:2] == ("visual", "patch_embed"):
        shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        return lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], *shape)
    if path[-1] == "kernel":
        return lambda w: np.ascontiguousarray(w.T)
    return lambda w: w


# ----------------------------------------------------------------------------- load


def abstract_model(cfg: QwenVLConfig) -> QwenVL:
    """The model with `ShapeDtypeStruct` leaves (no memory)."""
    return nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))


def from_pretrained(
    path: str,
    *,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    compute_dtype=None,
    remat_policy: str = "none",
    scan_layers: bool = False,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_AXIS_RULES,
    max_image_patches: int | str | None = "auto",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: tuple[str, ...] = (),
    lora_seed: int = 0,
) -> QwenVL:
    """Loads a HF checkpoint directory (local or remote) into a `QwenVL`.

    Args:
      path: directory (local or `gs://`) with `config.json` and `*.safetensors` (and, optionally,
        `generation_config.json`, kept as `cfg.hf_generation_config`: the release's stop ids).
      dtype: parameter dtype (fp32 master weights by default; bf16 files are upcast).
      mesh: if given, every parameter is created directly with the sharding the rules table
        gives its logical axes on `mesh`; otherwise on the default device.
      compute_dtype: activation/matmul dtype (default: `dtype`).
      remat_policy: one of `qwen_vl.REMAT_POLICIES`.
      scan_layers: the decoder's layers and the vision tower's blocks under `lax.scan` in the
        passes without a cache (`QwenVLConfig.scan_layers`).
      rules: logical axis rules.
      max_image_patches: static bound on patches per image for block-local vision attention;
        "auto" reads the processor's `max_pixels` from `preprocessor_config.json`, None means
        dense attention over all packed patches.
      lora_rank, lora_alpha, lora_targets: low-rank adapters (`QwenVLConfig`); they are not
        in the checkpoint and start as `Dense` initialises them (A from `lora_seed`, B zero).
    """
    if max_image_patches == "auto":
        max_image_patches = _max_patches_from_processor(path)
    cfg = QwenVLConfig.from_pretrained(
        path,
        param_dtype=dtype,
        dtype=compute_dtype or dtype,
        remat_policy=remat_policy,
        scan_layers=bool(scan_layers),
        logical_axis_rules=rules,
        max_image_patches=max_image_patches,
        hf_generation_config=read_generation_config(path),
        lora_rank=int(lora_rank),
        lora_alpha=float(lora_alpha),
        lora_targets=tuple(lora_targets),
    )
    files = SafetensorsDir(path)
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    values = {}
    for pth, var in flat:
        shape = tuple(var.get_value().shape)
        if isinstance(var, LoRAParam):
            names = var.get_metadata().get("logical_axes")
            sh = None if mesh is None else sharding.named_sharding(mesh, names, rules, shape)
            values[pth] = jax.device_put(_initial_adapter(pth, shape, dtype, lora_seed), sh)
            continue
        key = hf_key(pth)
        found = next((k for k in _alternatives(key) if k in files), None)
        if found is None:
            raise KeyError(f"{key} (for {pth}) missing from {path}")
        tensor = files.array(found)
        transform = _to_ours(pth, cfg)
        np_dtype = np.dtype(dtype)
        if mesh is None:
            arr = jnp.asarray(np.asarray(transform(tensor)).astype(np_dtype))
            if arr.shape != shape:
                raise ValueError(f"{found}: shape {arr.shape} != expected {shape}")
        else:
            sh = sharding.named_sharding(mesh, var.get_metadata().get("logical_axes"), rules, shape)
            arr = _sharded_array(tensor, transform, pth[-1] == "kernel", shape, np_dtype, sh)
        values[pth] = arr
    for pth, var in flat:
        var.set_value(values[pth])
    return nnx.merge(graphdef, state)


def read_generation_config(path: str) -> dict | None:
    """The checkpoint's `generation_config.json` as a dict, or None when it has none.

    Qwen2.5-VL-Instruct lists `eos_token_id: [151645, 151643]` there (`<|im_end|>`,
    `<|endoftext|>`), while `config.json` has only 151645; transformers' `generate` stops on
    the generation config's ids.
    """
    fname = fs.join(path, "generation_config.json")
    return fs.read_json(fname) if fs.exists(fname) else None


def _max_patches_from_processor(path: str) -> int | None:
    """max_pixels / patch_size**2 of the checkpoint's image processor, if it was saved."""
    fname = fs.join(path, "preprocessor_config.json")
    if not fs.exists(fname):
        return None
    pre = fs.read_json(fname)
    max_pixels = pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge")
    if not max_pixels:
        return None
    return int(max_pixels) // int(pre.get("patch_size", 14)) ** 2


def _sharded_array(tensor, transform, is_linear, shape, np_dtype, sh) -> jax.Array:
    """Global array whose shards are read lazily from the memory-mapped `tensor`."""
    transposed = is_linear and tensor.ndim == 2 and tuple(tensor.shape[::-1]) == tuple(shape)

    def read(index):
        if transposed:
            block = tensor[index[1], index[0]].T  # read only the shard's rows of the HF tensor
        else:
            block = np.asarray(transform(tensor))[index]
        return np.ascontiguousarray(block).astype(np_dtype)

    return jax.make_array_from_callback(shape, sh, read)


def _initial_adapter(path: tuple, shape: tuple[int, ...], dtype, seed: int) -> jax.Array:
    """A fresh adapter as `Dense` initialises one: `lora_b` zeros; `lora_a` [in, r] uniform
    within ±1/sqrt(in), drawn from `seed` and the parameter's path (made on the host: small
    next to the base weights)."""
    if path[-1] == "lora_b":
        return jnp.zeros(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(map(str, path)).encode()))
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


# ----------------------------------------------------------------------------- save


def save_pretrained(model: QwenVL, path: str, *, dtype=None) -> None:
    """Writes `config.json` + `model.safetensors` (hub key layout) that transformers loads,
    and `generation_config.json` when the model was loaded with one.

    Args:
      model: a `QwenVL` (possibly sharded; parameters are gathered to the host).
      path: output directory (local or remote).
      dtype: on-disk dtype (default: the parameters' dtype).
    """
    cfg = model.cfg
    fs.makedirs(path)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    merged = merged_lora_kernels(model)
    tensors = {}
    for pth, var in flat:
        if isinstance(var, LoRAParam):
            continue  # merged into its kernel below
        arr = merged.get(pth, var[...])
        if jax.process_count() > 1:
            arr = multihost_utils.process_allgather(arr, tiled=True)
        w = np.asarray(jax.device_get(arr))
        if dtype is not None:
            w = w.astype(np.dtype(dtype))
        tensors[hf_key(pth)] = _to_hf(pth, cfg)(w)
    hf = dict(cfg.hf_config or {})
    if not hf:
        raise ValueError("model has no hf_config to export")
    out_dtype = np.dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    hf["dtype"] = "bfloat16" if out_dtype == _DTYPES["BF16"] else str(out_dtype)
    hf.pop("torch_dtype", None)
    if jax.process_index() == 0:
        # The weights first, config.json last: a folder with config.json is complete.
        write_safetensors(fs.join(path, "model.safetensors"), tensors)
        if cfg.hf_generation_config is not None:
            fs.write_json(
                fs.join(path, "generation_config.json"), cfg.hf_generation_config, indent=2
            )
        fs.write_json(fs.join(path, "config.json"), hf, indent=2)


def merged_lora_kernels(model: QwenVL) -> dict[tuple, jax.Array]:
    """Each adapted `Dense` kernel with its adapter merged in, `W + (alpha / r) A B` (float32,
    cast back to the kernel's dtype), by the kernel's state path; empty without adapters."""
    out = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora_a is not None:
            w = module.kernel[...]
            delta = jnp.matmul(
                module.lora_a[...].astype(jnp.float32), module.lora_b[...].astype(jnp.float32)
            )
            out[(*path, "kernel")] = (w.astype(jnp.float32) + module.lora_scale * delta).astype(
                w.dtype
            )
    return out


def write_safetensors(fname: str, tensors: dict[str, np.ndarray]) -> None:
    """Minimal safetensors writer (bf16 included, which `safetensors.numpy` lacks)."""
    header, offset = {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        n = t.nbytes
        header[key] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with fs.open(fname, "wb") as f:  # a remote object appears whole when the upload ends
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[key]).tobytes())
