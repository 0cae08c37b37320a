"""The `model` and `mesh` sections: the checkpoint, dtypes, memory levers, LoRA, the mesh.

Jax-free (a config file loads it without jax). `lora_options` and `max_image_patches` derive
the values the model loader takes from a run config.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from visionr1_jax.sections.common import fail, is_int, is_number

DTYPES = ("float32", "bfloat16", "float16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
REMAT = ("none", "full", "dots", "dots_no_batch")
TOKENIZERS = ("small", "demo", "qwen")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config() -> ml_collections.ConfigDict:
    """The `model` section.

    Fields: `checkpoint` (local or gs:// directory; empty = write the tiny config `tiny` to the
    workdir), `tiny` (a key of `tiny.TINY_CONFIGS`), `tokenizer` ("small", "demo" or "qwen",
    for tiny),
    `param_dtype` / `dtype` (master weights / compute), `remat_policy` (none, full, dots,
    dots_no_batch), `scan_layers` (the decoder's layers and the vision tower's blocks under
    `lax.scan` in training and the reference pass: one layer compiled instead of all; same
    values), `logprob_chunk` (sequence chunk of the log-prob head; None = the largest chunk
    whose f32 `[B, chunk, V]` logits block fits `qwen_vl.LOGITS_BLOCK_BYTES`, B the global rows,
    which suits one host; pod configs set it), `max_image_patches` (the vision tower's static
    per-image bound; None derives it from `data.max_pixels`, see `max_image_patches`;
    validation rejects a value below what the data produces), `freeze_vision_tower` (the tower
    gets no gradient and no optimizer state; policy and reference share it), `init_from`
    (another run's workdir, local or gs://: its trainable parameters at `init_step`, None = its
    newest checkpoint, replace the start checkpoint's and become the reference; the architecture
    and the frozen parameters still come from `checkpoint`; empty = off), `lora` (low-rank
    adapters on the decoder's projections: `rank` (0 = off), `alpha`, `targets` (of
    `LORA_TARGETS`), `seed` of the A matrices; with rank > 0 only the adapters train and have
    optimizer state, the base weights stay as loaded, and the reference is the base model: the
    adapters off, no second copy of the weights).
    """
    c = ml_collections.ConfigDict()
    c.checkpoint = ""
    c.tiny = "qwen2_5_vl_tiny"
    c.tokenizer = "small"
    c.param_dtype = "float32"
    c.dtype = "bfloat16"
    c.remat_policy = "none"
    c.scan_layers = False
    c.logprob_chunk = ml_collections.config_dict.placeholder(int)
    c.max_image_patches = ml_collections.config_dict.placeholder(int)
    c.freeze_vision_tower = False
    c.init_from = ""
    c.init_step = ml_collections.config_dict.placeholder(int)
    c.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 16.0, "targets": LORA_TARGETS, "seed": 0}
    )
    return c


def mesh_config(ici=(-1, 1, 1), dcn=(1, 1, 1)) -> ml_collections.ConfigDict:
    """The `mesh` section: ICI and DCN parallelism over `('data', 'fsdp', 'tensor')`; one
    entry may be -1 (all remaining devices)."""
    return ml_collections.ConfigDict({"ici_parallelism": tuple(ici), "dcn_parallelism": tuple(dcn)})


def lora_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`model.lora` as `hf_weights.from_pretrained` keywords (empty when off or absent)."""
    lora = (config.get("model") or {}).get("lora")
    if not lora or not lora.get("rank"):
        return {}
    return dict(
        lora_rank=int(lora.rank),
        lora_alpha=float(lora.alpha),
        lora_targets=tuple(lora.targets),
        lora_seed=int(lora.get("seed", 0)),
    )


def narrower(model: ml_collections.ConfigDict) -> bool:
    """`model.dtype` (compute) has fewer bytes than `model.param_dtype` (master weights)."""
    return ITEMSIZE[model.dtype] < ITEMSIZE[model.param_dtype]


def data_max_patches(data: ml_collections.ConfigDict, patch_size: int = 14, merge: int = 2) -> int:
    """The most patches the data's smart resize gives one image: (max_pixels // (p·m)²)·m²
    (2,048 for SPEC §5's 401,408 pixels; p = 14, m = 2 for every Qwen2/2.5-VL)."""
    return (int(data.max_pixels) // (patch_size * merge) ** 2) * merge**2


def max_image_patches(config: ml_collections.ConfigDict) -> int | None:
    """The vision tower's static per-image bound of a run (`QwenVLConfig.max_image_patches`):
    `model.max_image_patches` when set, else what `data.max_pixels` produces. One derived
    value, so the bound follows the run's data rather than the checkpoint's processor (whose
    `max_pixels` is 12,845,056 for Qwen2.5-VL-7B-Instruct: 65,536 patches, which would make the
    full-attention blocks of a packed 16 x 2,048-patch batch dense). None: no data section."""
    bound = config.model.get("max_image_patches") if "model" in config else None
    if bound is not None:
        return int(bound)
    return data_max_patches(config.data) if "data" in config else None


def _validate_lora(c: ml_collections.ConfigDict) -> None:
    lora = c.get("lora")
    if lora is None:
        return
    rank = lora.get("rank", 0)
    if not is_int(rank) or rank < 0:
        fail("model.lora.rank", rank, "must be an integer >= 0 (0 = off)")
    targets = tuple(lora.get("targets") or ())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"model.lora.targets {unknown} not in {LORA_TARGETS}")
    alpha = lora.get("alpha")
    if not is_number(alpha) or alpha <= 0:
        fail("model.lora.alpha", alpha, "must be a number > 0")
    if rank and not targets:
        fail("model.lora.rank", rank, "has no effect with no lora.targets")
    if rank and c.get("freeze_vision_tower"):
        raise ValueError(
            "model.freeze_vision_tower has no effect with model.lora.rank > 0 (only the "
            "adapters train)"
        )


def validate_model(config: ml_collections.ConfigDict) -> None:
    """Checks the `model` section (and its bound against the data's images)."""
    c = config.model
    for key in ("param_dtype", "dtype"):
        if c.get(key) not in DTYPES:
            fail(f"model.{key}", c.get(key), f"must be one of {list(DTYPES)}")
    if c.get("remat_policy") not in REMAT:
        fail("model.remat_policy", c.get("remat_policy"), f"must be one of {REMAT}")
    if not isinstance(c.get("scan_layers", False), bool):
        fail("model.scan_layers", c.get("scan_layers"), "must be True or False")
    chunk = c.get("logprob_chunk")
    if chunk is not None and (not is_int(chunk) or chunk <= 0):
        fail("model.logprob_chunk", chunk, "must be a positive integer or None")
    step = c.get("init_step")
    if step is not None and (not is_int(step) or step < 0):
        fail("model.init_step", step, "must be an integer >= 0 or None")
    if step is not None and not c.get("init_from"):
        raise ValueError(f"model.init_step={step} has no effect without model.init_from")
    if c.get("tokenizer") not in TOKENIZERS:
        fail("model.tokenizer", c.get("tokenizer"), f"must be one of {TOKENIZERS}")
    _validate_lora(c)
    bound = c.get("max_image_patches")
    if bound is not None and not is_int(bound):
        fail("model.max_image_patches", bound, "must be a positive int or None")
    if bound is not None and "data" in config:
        needed = data_max_patches(config.data)
        if bound < needed:
            raise ValueError(
                f"model.max_image_patches={bound} is below the {needed} patches that "
                f"data.max_pixels={config.data.max_pixels} produces: such images would come "
                "out NaN; raise it or leave it None (derived from data.max_pixels)"
            )


def _check_parallelism(values, key: str) -> None:
    values = tuple(values)
    if len(values) != 3 or not all(is_int(v) and (v >= 1 or v == -1) for v in values):
        raise ValueError(f"{key}={values!r} must be 3 ints >= 1 over (data, fsdp, tensor); -1 once")
    if sum(v == -1 for v in values) > 1:
        raise ValueError(f"{key}={values!r} may hold -1 at most once")


def validate_mesh(config: ml_collections.ConfigDict) -> None:
    """Checks the `mesh` section."""
    _check_parallelism(config.mesh.ici_parallelism, "mesh.ici_parallelism")
    _check_parallelism(config.mesh.dcn_parallelism, "mesh.dcn_parallelism")
