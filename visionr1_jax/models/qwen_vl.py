"""Qwen2-VL and Qwen2.5-VL in Flax NNX, numerically faithful to `transformers`.

One class, `QwenVL`, covers both families; `QwenVLConfig.family` (read from the checkpoint's
`config.json`) selects the vision tower variant:

* Qwen2-VL vision blocks: LayerNorm, fc1 -> quick-GELU -> fc2 MLP, full attention per image.
* Qwen2.5-VL vision blocks: RMSNorm, SwiGLU MLP with biases, windowed attention except in
  `fullatt_block_indexes` (windows of `window_size` pixels over the merged grid).

Both share the 3-D patch embedding (a matmul over flattened `C x 2 x 14 x 14` patches), the
axial 2-D rotary, the patch merger (norm, then a 2-layer GELU MLP over 2 x 2 merged patches) and
the Qwen2 decoder (RMSNorm, grouped-query attention with q/k/v biases, M-RoPE, SwiGLU MLP, tied
or untied embeddings).

Images come *per row* (the input pipeline's layout: `pixel_values f32[B, S, F]`, each row's
patches zero padded to S, `image_grid_thw i32[B, 3]`, zeros for no image; the tower is vmapped
over rows) or *packed* (the HF processor's: `pixel_values f32[P, F]` holds the patches of all
images of the batch back to back, zero padded to a bucket, `image_grid_thw i32[I, 3]` their grids,
zero rows for unused slots). Image tokens are placed per run (`rope.image_placement`). Within a
sequence of patches, everything that depends on the grids is computed on device with static
shapes; no Python loop runs over images:

* the patch embeddings are permuted into transformers' window order (windows row-major inside
  each image), and windowed blocks attend inside blocks of at most (window / 14)^2 patches with
  `segment_attention` (each query block sees its own and the two neighbouring key blocks);
* full-attention blocks use `aligned_attention`: images are moved to slot ranges aligned to 32,
  and each 32-query block attends to a key window of `max_image_patches` slots (the processor's
  `max_pixels / 14^2`, read from the checkpoint) — or, without that bound, to all P patches;
* the merger output is permuted back, so the image embeddings are in processor order.

The decoder's causal self-attention (no KV cache) runs in query blocks of `CAUSAL_CHUNK` rows
that skip the key blocks above the diagonal (`causal_attention`); `token_logprobs` computes
log-probs one cache-sized `[B, chunk, V]` logits block at a time (`LOGITS_BLOCK_BYTES`).

Calls, separable so that the sampler can encode images once and reuse a KV cache:

    emb = model.encode_images(pixel_values, image_grid_thw)      # f32[P / 4, D]
    x = model.embed(input_ids, emb)                              # f32[B, T, D]
    pos, deltas = model.rope_index(input_ids, image_grid_thw, attention_mask)
    h, cache = model.decode(x, pos, attention_mask)              # f32[B, T, D]
    logits = model.logits(h)                                     # f32[B, T, V]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from visionr1_jax import fs, sharding
from visionr1_jax.models import rope
from visionr1_jax.sections import model as model_section

Cache = list[dict[str, jax.Array]]

LOGITS_BLOCK_BYTES = 16 << 20  # f32 [B, chunk, V] logits block of `chunked_logprobs`
ALIGN = 32  # image alignment (query block) of the vision tower's full-attention blocks

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Architecture (from `config.json`) plus runtime options (dtypes, remat, sharding rules)."""

    family: str = "qwen2_5_vl"  # or "qwen2_vl"
    # Language model.
    vocab_size: int = 151936
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    # Vision tower.
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_num_heads: int = 16
    vision_hidden_act: str = "silu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    vision_rope_theta: float = 10000.0
    # Runtime options.
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute dtype
    remat_policy: str = "none"
    # The decoder's layers under one `lax.scan` (their weights stacked per call, in the compute
    # dtype) instead of unrolled, in the passes without a KV cache (training, reference), and
    # the vision tower's blocks in groups of one attention pattern: one layer and one group to
    # compile instead of all. Same values; see `run_layers`.
    scan_layers: bool = False
    # Static bound on patches per image frame (the processor's max_pixels / patch_size**2); the
    # vision tower then attends in blocks of this size instead of over all packed patches.
    # None: dense attention over the packed sequence. An image above the bound yields NaN.
    max_image_patches: int | None = None
    logical_axis_rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_AXIS_RULES
    # Low-rank adapters (LoRA) on the decoder's projections named in `lora_targets` (of
    # `LORA_TARGETS`): y = x W + (alpha / rank) (x A) B, A [in, rank], B [rank, out] (zeros at
    # the start: the adapted model starts as the base model). rank 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    # The checkpoint's generation_config.json (stop and pad ids), when it has one.
    hf_generation_config: dict | None = dataclasses.field(default=None, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf_dict(cls, cfg: dict, **overrides) -> QwenVLConfig:
        """Reads both the hub layout (text fields at top level, `rope_scaling`) and the
        transformers-5 layout (`text_config`, `rope_parameters`)."""
        family = cfg["model_type"]
        if family not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"unsupported model_type {family!r}")
        text = dict(cfg)
        text.update(cfg.get("text_config") or {})
        vis = cfg["vision_config"]
        rp = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = rp.get("rope_theta", text.get("rope_theta", 1000000.0))
        vrp = vis.get("rope_parameters") or {}
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        kw = dict(
            family=family,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            mrope_section=tuple(rp.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(tie),
            image_token_id=cfg.get("image_token_id", 151655),
            vision_depth=vis["depth"],
            vision_num_heads=vis["num_heads"],
            vision_hidden_act=vis.get("hidden_act", "silu"),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            in_channels=vis.get("in_channels", 3),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            vision_rope_theta=float(vrp.get("rope_theta", 10000.0)),
            hf_config=cfg,
        )
        if family == "qwen2_5_vl":
            kw.update(
                vision_hidden_size=vis["hidden_size"],
                vision_intermediate_size=vis["intermediate_size"],
                window_size=vis.get("window_size", 112),
                fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())),
            )
        else:
            kw.update(
                vision_hidden_size=vis["embed_dim"],
                vision_intermediate_size=int(vis["embed_dim"] * vis.get("mlp_ratio", 4)),
                vision_hidden_act=vis.get("hidden_act", "quick_gelu"),
                fullatt_block_indexes=tuple(range(vis["depth"])),
            )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> QwenVLConfig:
        return cls.from_hf_dict(fs.read_json(fs.join(path, "config.json")), **overrides)


# ----------------------------------------------------------------------------- layers


def _act(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_pytorch_exact"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported activation {name!r}")


def _param(rngs: nnx.Rngs, shape, names, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(names))


class LoRAParam(nnx.Param):
    """A low-rank adapter's weights: with `QwenVLConfig.lora_rank` > 0 the only trained
    parameters (`state.frozen_filter`); the base weights stay as loaded."""


# The decoder projections that can carry adapters (`QwenVLConfig.lora_targets`).
LORA_TARGETS = model_section.LORA_TARGETS  # the names a config may list (`model.lora.targets`)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] (transposed w.r.t. torch's `Linear.weight`).

    With `lora` (and `cfg.lora_rank` r > 0) it also holds adapters `lora_a` [in, r] (PEFT's
    initialisation: uniform within ±1/sqrt(in)) and `lora_b` [r, out] (zeros) and adds
    `(alpha / r) (x A) B`."""

    def __init__(self, din, dout, names, *, bias, cfg: QwenVLConfig, rngs: nnx.Rngs, lora=False):
        self.kernel = _param(rngs, (din, dout), names, cfg.param_dtype)
        self.bias = _param(rngs, (dout,), names[1:], cfg.param_dtype, "zeros") if bias else None
        self.dtype = cfg.dtype
        if lora and cfg.lora_rank > 0:
            r, bound = cfg.lora_rank, din**-0.5
            a = jax.random.uniform(rngs.params(), (din, r), jnp.float32, -bound, bound)
            a = a.astype(cfg.param_dtype)
            self.lora_a = LoRAParam(a, logical_axes=(names[0], "lora_rank"))
            zeros = jnp.zeros((r, dout), cfg.param_dtype)
            self.lora_b = LoRAParam(zeros, logical_axes=("lora_rank", names[1]))
            self.lora_scale = float(cfg.lora_alpha) / r
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            low = jnp.matmul(x, self.lora_a[...].astype(self.dtype))
            y = y + jnp.matmul(low, self.lora_b[...].astype(self.dtype)) * self.lora_scale
        return y


class RMSNorm(nnx.Module):
    """weight * x / sqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, dim, eps, names, *, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), names, cfg.param_dtype, "ones")
        self.eps = eps
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (weight and bias), statistics in float32."""

    def __init__(self, dim, eps, names, *, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), names, cfg.param_dtype, "ones")
        self.bias = _param(rngs, (dim,), names, cfg.param_dtype, "zeros")
        self.eps = eps
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(self.dtype)


def masked_attention(q, k, v, mask, scale):
    """Softmax attention with float32 scores. q [B, Tq, H, D], k/v [B, S, KV, D], mask
    bool[B, 1, Tq, S] (or broadcastable). The G = H / KV query heads of a group are folded into
    the query axis (one [G * Tq, S] matmul per KV head), which XLA:CPU runs ~2x faster than a
    5-D grouped einsum and which needs no repeated K/V."""
    b, tq, h, d = q.shape
    s_len, kv = k.shape[1], k.shape[2]
    g = h // kv
    qx = q.reshape(b, tq, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * tq, d)
    s = jnp.einsum("bkxd,bskd->bkxs", qx, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, :, None], s.reshape(b, kv, g, tq, s_len), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(b, kv, g * tq, s_len)
    o = jnp.einsum("bkxs,bskd->bkxd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, kv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d)


CAUSAL_CHUNK = 64  # query rows per causal block (at most CAUSAL_MAX_CHUNKS blocks)
CAUSAL_MAX_CHUNKS = 8


def causal_attention(q, k, v, key_valid, scale):
    """Causal self-attention that skips the key blocks above the diagonal.

    The T queries are cut into static blocks; block ``[lo, hi)`` attends to keys ``[0, hi)``
    only, so the score work is about ``(n + 1) / 2n`` of the dense ``T × T`` (n blocks) with
    every row's result unchanged (the skipped keys are masked out anyway).

    Args:
      q: [B, T, H, D]; k, v: [B, T, KV, D]; key_valid: bool[B, T].
    Returns:
      f32[B, T, H, D].
    """
    t = q.shape[1]
    chunk = max(CAUSAL_CHUNK, -(-t // CAUSAL_MAX_CHUNKS))
    outs = []
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]  # [hi - lo, hi]
        mask = causal[None, None] & key_valid[:, None, None, :hi]
        outs.append(masked_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask, scale))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- vision


class VisionMLP(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d, f = cfg.vision_hidden_size, cfg.vision_intermediate_size
        names = ("vision_embed", "vision_mlp")
        names_out = ("vision_mlp", "vision_embed")
        self.swiglu = cfg.family == "qwen2_5_vl"
        if self.swiglu:
            self.gate_proj = Dense(d, f, names, bias=True, cfg=cfg, rngs=rngs)
            self.up_proj = Dense(d, f, names, bias=True, cfg=cfg, rngs=rngs)
            self.down_proj = Dense(f, d, names_out, bias=True, cfg=cfg, rngs=rngs)
        else:
            self.fc1 = Dense(d, f, names, bias=True, cfg=cfg, rngs=rngs)
            self.fc2 = Dense(f, d, names_out, bias=True, cfg=cfg, rngs=rngs)
        self.act = cfg.vision_hidden_act

    def __call__(self, x):
        act = _act(self.act)
        if self.swiglu:
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(act(self.fc1(x)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d = cfg.vision_hidden_size
        self.qkv = Dense(d, 3 * d, ("vision_embed", "vision_qkv"), bias=True, cfg=cfg, rngs=rngs)
        self.proj = Dense(d, d, ("vision_heads", "vision_embed"), bias=True, cfg=cfg, rngs=rngs)
        self.num_heads = cfg.vision_num_heads

    def __call__(self, x, cos, sin, plan, block):
        p, d = x.shape
        hd = d // self.num_heads
        qkv = self.qkv(x).reshape(p, 3, self.num_heads, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        if "slot" in plan:
            o = aligned_attention(q, k, v, plan, block, hd**-0.5)
        else:
            o = segment_attention(q, k, v, plan["segments"], block, hd**-0.5)
        return self.proj(o.reshape(p, d).astype(x.dtype))


def aligned_plan(image: jax.Array, grid_thw: jax.Array, max_patches: int, align: int = 32):
    """Gather plan of `aligned_attention`: every image moved to a slot range starting at a
    multiple of `align`, so each block of `align` query slots belongs to one image and attends
    to one key window of `ceil(max_patches / align) * align` slots starting at its image.

    Work is P_aligned * max_patches (P_aligned <= P + I * (align - 1)) instead of P^2 (dense)
    or P * 3 * max_patches (`segment_attention`). Args: image i32[P] image id per patch
    (patches of an image contiguous; I = padding); grid_thw i32[I, 3] (t == 1).
    """
    n, n_img = image.shape[0], grid_thw.shape[0]
    p_al = -(-(n + n_img * (align - 1)) // align) * align
    width = min(-(-max_patches // align) * align, p_al)
    sizes = jnp.prod(grid_thw, axis=-1).astype(jnp.int32)
    start = jnp.cumsum(sizes) - sizes
    al_sizes = -(-sizes // align) * align
    al_start = jnp.cumsum(al_sizes) - al_sizes
    gi = jnp.clip(image, 0, n_img - 1)
    valid = image < n_img
    slot = jnp.where(valid, al_start[gi] + jnp.arange(n) - start[gi], p_al)
    slot_image = jnp.full((p_al,), -1, jnp.int32).at[slot].set(image, mode="drop")
    blk_img = slot_image.reshape(-1, align)[:, 0]
    kstart = al_start[jnp.clip(blk_img, 0, n_img - 1)]
    key_idx = jnp.clip(kstart[:, None] + jnp.arange(width), 0, p_al - 1)
    key_ok = (slot_image[key_idx] == blk_img[:, None]) & (blk_img[:, None] >= 0)
    return {"slot": slot, "key_idx": key_idx, "key_ok": key_ok}


def aligned_attention(q, k, v, plan, align: int, scale: float) -> jax.Array:
    """Per-image full attention through an `aligned_plan` built with the same `align`.

    q, k, v [P, H, D] -> f32[P, H, D].
    """
    slot, key_idx, key_ok = plan["slot"], plan["key_idx"], plan["key_ok"]
    nb = key_idx.shape[0]
    total = nb * align

    def scatter(x):
        return jnp.zeros((total, *x.shape[1:]), x.dtype).at[slot].set(x, mode="drop")

    qa = scatter(q).reshape(nb, align, *q.shape[1:])
    ka, va = scatter(k)[key_idx], scatter(v)[key_idx]  # [nb, width, H, D]
    o = masked_attention(qa, ka, va, key_ok[:, None, None, :], scale)
    return o.reshape(total, *q.shape[1:])[jnp.clip(slot, 0, total - 1)]


def segment_attention(q, k, v, segments, block: int, scale: float) -> jax.Array:
    """Attention restricted to equal segment ids, for *contiguous* segments of length <= block.

    The sequence is cut into blocks of `block` tokens; a segment then lies within two adjacent
    blocks, so each query block attends only to its own and its two neighbouring key blocks:
    cost P * 3 * block instead of P^2, exact for any packing.

    Args:
      q, k, v: [P, H, D]; segments: i32[P] non-decreasing ids; block: static segment bound.
    Returns:
      f32[P, H, D].
    """
    p = q.shape[0]
    if block >= p:
        mask = segments[:, None] == segments[None, :]
        return masked_attention(q[None], k[None], v[None], mask[None, None], scale)[0]
    nb = -(-p // block)
    pad = nb * block - p
    # Fresh ids for padding so that padded queries attend only to themselves.
    seg = jnp.concatenate([segments, -1 - jnp.arange(pad, dtype=segments.dtype)])
    none = jnp.full((block,), jnp.iinfo(jnp.int32).min, segments.dtype)
    seg_k = jnp.concatenate([none, seg, none]).reshape(nb + 2, block)

    def blocks(x):
        return jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, *x.shape[1:])

    def neighbours(x):
        xp = jnp.pad(x, ((1, 1), (0, 0), (0, 0), (0, 0)))
        return jnp.concatenate([xp[:-2], xp[1:-1], xp[2:]], axis=1)  # [nb, 3 * block, H, D]

    qb, kb, vb = blocks(q), neighbours(blocks(k)), neighbours(blocks(v))
    seg_kb = jnp.concatenate([seg_k[:-2], seg_k[1:-1], seg_k[2:]], axis=1)
    mask = seg.reshape(nb, block)[:, None, :, None] == seg_kb[:, None, None, :]
    o = masked_attention(qb, kb, vb, mask, scale)  # [nb, block, H, D]
    return o.reshape(nb * block, *q.shape[1:])[:p]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d = cfg.vision_hidden_size
        norm = RMSNorm if cfg.family == "qwen2_5_vl" else LayerNorm
        self.norm1 = norm(d, 1e-6, ("norm",), cfg=cfg, rngs=rngs)
        self.norm2 = norm(d, 1e-6, ("norm",), cfg=cfg, rngs=rngs)
        self.attn = VisionAttention(cfg, rngs)
        self.mlp = VisionMLP(cfg, rngs)

    def __call__(self, x, cos, sin, plan, block):
        x = x + self.attn(self.norm1(x), cos, sin, plan, block)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Conv3d with stride == kernel over (2, 14, 14) patches, written as a matmul."""

    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.proj = Dense(
            cfg.patch_dim, cfg.vision_hidden_size, ("patch", "vision_embed"), bias=False,
            cfg=cfg, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        return self.proj(x)


class PatchMerger(nnx.Module):
    """Norm, then concatenate each 2 x 2 block of patches and apply Linear-GELU-Linear."""

    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d = cfg.vision_hidden_size
        hid = d * cfg.spatial_merge_size**2
        norm = RMSNorm if cfg.family == "qwen2_5_vl" else LayerNorm
        self.ln_q = norm(d, 1e-6, ("norm",), cfg=cfg, rngs=rngs)
        self.mlp_0 = Dense(hid, hid, ("merger_in", "merger_hidden"), bias=True, cfg=cfg, rngs=rngs)
        self.mlp_2 = Dense(
            hid, cfg.hidden_size, ("merger_hidden", "embed"), bias=True, cfg=cfg, rngs=rngs
        )
        self.hid = hid

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.hid)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


def vision_layout(grid_thw: jax.Array, num_patches: int, cfg: QwenVLConfig) -> dict[str, jax.Array]:
    """Per-patch image id, frame, row, column and window of the packed patch sequence.

    Patches of one image follow the processor's order: frame, then 2 x 2 merge blocks in
    row-major order, then row-major inside the block. Padding patches get image id I.

    Args:
      grid_thw: i32[I, 3]; num_patches: P (static).
    Returns:
      dict of i32[P]: image, frame, hpos, wpos, win_h, win_w.
    """
    m = cfg.spatial_merge_size
    grid = jnp.asarray(grid_thw, jnp.int32)
    sizes = grid[:, 0] * grid[:, 1] * grid[:, 2]
    ends = jnp.cumsum(sizes)
    p = jnp.arange(num_patches, dtype=jnp.int32)
    image = jnp.searchsorted(ends, p, side="right").astype(jnp.int32)
    gi = jnp.clip(image, 0, grid.shape[0] - 1)
    local = p - (ends - sizes)[gi]
    hm = jnp.maximum(grid[gi, 1] // m, 1)
    wm = jnp.maximum(grid[gi, 2] // m, 1)
    iw = local % m
    ih = (local // m) % m
    q = local // (m * m)
    bw = q % wm
    bh = (q // wm) % hm
    frame = q // (wm * hm)
    vms = max(cfg.window_size // m // cfg.patch_size, 1)
    return dict(
        image=image,
        frame=frame,
        hpos=bh * m + ih,
        wpos=bw * m + iw,
        win_h=bh // vms,
        win_w=bw // vms,
    )


def _period(kinds: Sequence[bool]) -> int:
    """The shortest p dividing len(kinds) with kinds[i] == kinds[i % p] for every i."""
    n = len(kinds)
    return next(
        p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n))
    )


class VisionTower(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(cfg.vision_depth)])
        self.merger = PatchMerger(cfg, rngs)
        self.cfg = cfg

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """f32[P, F] packed patches, i32[I, 3] grids -> f32[P / m^2, D] merged embeddings."""
        cfg = self.cfg
        n, n_blk = pixel_values.shape[0], len(self.blocks)
        lay = vision_layout(grid_thw, n, cfg)
        windowed = cfg.family == "qwen2_5_vl" and any(
            i not in cfg.fullatt_block_indexes for i in range(cfg.vision_depth)
        )
        # Window order (transformers' `window_index`): windows row-major inside each image,
        # patches in original order inside a window. Images stay contiguous, so the same
        # order serves the full-attention blocks; it is undone after the merger.
        if windowed:
            order = jnp.lexsort((lay["win_w"], lay["win_h"], lay["frame"], lay["image"]))
            lay = {k: v[order] for k, v in lay.items()}
        pad = jnp.arange(n) >= jnp.sum(jnp.prod(grid_thw, axis=-1))

        def segment_ids(*keys):
            change = (
                jnp.zeros(n, bool)
                .at[1:]
                .set(jnp.any(jnp.stack([k[1:] != k[:-1] for k in keys]), axis=0))
            )
            return jnp.where(pad, -1 - jnp.arange(n), jnp.cumsum(change)).astype(jnp.int32)

        win_plan = {"segments": segment_ids(lay["image"], lay["frame"], lay["win_h"], lay["win_w"])}
        vms = max(cfg.window_size // cfg.spatial_merge_size // cfg.patch_size, 1)
        win_block = min((vms * cfg.spatial_merge_size) ** 2, n)
        if cfg.max_image_patches is None or cfg.max_image_patches >= n:
            full_plan, full_block = {"segments": segment_ids(lay["image"], lay["frame"])}, n
        else:
            full_block = ALIGN
            full_plan = aligned_plan(lay["image"], grid_thw, cfg.max_image_patches, ALIGN)
        cos, sin = rope.vision_cos_sin(
            lay["hpos"], lay["wpos"], cfg.vision_head_dim, cfg.vision_rope_theta
        )
        x = self.patch_embed(jnp.asarray(pixel_values, cfg.dtype))
        if windowed:  # permute the embeddings, 36x narrower than the raw patches
            x = x[order]
        x = sharding.constrain(x, ("vision_tokens", "act_embed"), cfg.logical_axis_rules)
        full = [cfg.family == "qwen2_vl" or i in cfg.fullatt_block_indexes for i in range(n_blk)]
        # With `scan_layers`: a scan over groups of `period` blocks (7 windowed + 1 full for
        # Qwen2.5-VL), each block of a group under its own remat as in the unrolled loop.
        period = _period(full) if cfg.scan_layers else n_blk
        groups = [nnx.List(self.blocks[j : j + period]) for j in range(0, n_blk, period)]

        def group_fn(group, x, cos, sin, win_plan, full_plan):
            for k, blk in enumerate(group):
                plan, block = (full_plan, full_block) if full[k] else (win_plan, win_block)
                x = _maybe_remat(blk, cfg.remat_policy, block=block)(x, cos, sin, plan)
            return x

        x = run_layers(
            groups,
            group_fn,
            x,
            cos,
            sin,
            win_plan,
            full_plan,
            scan=len(groups) > 1,
            dtype=cfg.dtype,
        )
        if "slot" in full_plan:
            # An image above the static bound (or a multi-frame grid, whose frames are separate
            # segments) would be silently wrong: report it as NaN instead.
            bad = jnp.any(grid_thw[:, 1] * grid_thw[:, 2] > cfg.max_image_patches)
            x = jnp.where(bad | jnp.any(grid_thw[:, 0] > 1), jnp.nan, x)
        if windowed:
            x = x[jnp.argsort(order)]
        return self.merger(x)


# ----------------------------------------------------------------------------- text


class TextAttention(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        lora = lambda name: {"lora": name in cfg.lora_targets, "cfg": cfg, "rngs": rngs}
        self.q_proj = Dense(d, cfg.num_heads * hd, ("embed", "heads"), bias=True, **lora("q_proj"))
        kvn = ("embed", "kv_heads")
        self.k_proj = Dense(d, cfg.num_kv_heads * hd, kvn, bias=True, **lora("k_proj"))
        self.v_proj = Dense(d, cfg.num_kv_heads * hd, kvn, bias=True, **lora("v_proj"))
        self.o_proj = Dense(cfg.num_heads * hd, d, ("heads", "embed"), bias=False, **lora("o_proj"))
        self.cfg = cfg

    def __call__(self, x, cos, sin, key_valid, cache=None, cache_index=None):
        """x [B, T, D]; cos/sin f32[B, T, hd]; key_valid bool[B, S].

        Without a cache S == T and the mask is causal. With `cache` (dict k, v [B, S, KV, hd])
        the new keys/values are written at `cache_index` and queries attend causally to
        slots <= cache_index + t.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, hd)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, hd)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, hd)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None), cfg.logical_axis_rules)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        start = jnp.zeros((), jnp.int32) if cache_index is None else cache_index
        if cache is not None:
            k = jax.lax.dynamic_update_slice(
                cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0)
            )
            new_cache = {"k": k, "v": v}
        else:
            new_cache = None
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cache is None:
            o = causal_attention(q, k, v, key_valid.astype(bool), hd**-0.5)
        else:
            s = k.shape[1]
            causal = jnp.arange(s)[None, :] <= (start + jnp.arange(t))[:, None]  # [T, S]
            mask = causal[None, None] & key_valid[:, None, None, :].astype(bool)
            o = masked_attention(q, k, v, mask, hd**-0.5)
        o = o.astype(x.dtype).reshape(b, t, cfg.num_heads * hd)
        return self.o_proj(o), new_cache


class TextMLP(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lora = lambda name: {"lora": name in cfg.lora_targets, "cfg": cfg, "rngs": rngs}
        self.gate_proj = Dense(d, f, ("embed", "mlp"), bias=False, **lora("gate_proj"))
        self.up_proj = Dense(d, f, ("embed", "mlp"), bias=False, **lora("up_proj"))
        self.down_proj = Dense(f, d, ("mlp", "embed"), bias=False, **lora("down_proj"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, ("norm",), cfg=cfg, rngs=rngs)
        self.self_attn = TextAttention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, ("norm",), cfg=cfg, rngs=rngs)
        self.mlp = TextMLP(cfg, rngs)
        self.rules = cfg.logical_axis_rules

    def __call__(self, x, cos, sin, key_valid, cache=None, cache_index=None):
        a, new_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, key_valid, cache, cache_index
        )
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        x = sharding.constrain(x, ("batch", "length", "act_embed"), self.rules)
        return x, new_cache


class TextModel(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), cfg=cfg, rngs=rngs)


class Embedding(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        self.weight = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype
        )
        self.dtype = cfg.dtype

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, h):
        """h [..., D] -> [..., V] logits against the embedding (tied output head)."""
        w = self.weight[...].astype(self.dtype)
        return jnp.einsum(
            "...d,vd->...v", h.astype(self.dtype), w, preferred_element_type=jnp.float32
        )


def remat_call(fn: Callable, module: nnx.Module, *args, policy: Callable):
    """`fn(module, *args)` under `jax.checkpoint` with `policy`. The module is split into its
    graph and state outside and merged (a copy) inside, so its variables are only read across
    the trace levels: `nnx.remat` writes them back, which fails ("Cannot mutate Param from a
    different trace level") when the module mixes traced and untraced variables, as a LoRA
    layer under `jax.grad` does (adapters traced, the frozen base not)."""
    graphdef, state = nnx.split(module)

    def pure(state, *a):
        return fn(nnx.merge(graphdef, state, copy=True), *a)

    return jax.checkpoint(pure, policy=policy, prevent_cse=True)(state, *args)


def is_matrix(x: Any) -> bool:
    """A floating array (or abstract value) of rank >= 2: a weight matrix or an embedding,
    as opposed to a norm scale or a bias."""
    return x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)


def cast_matrices(tree: Any, dtype: Any) -> Any:
    """`tree` with its matrices (`is_matrix`) in `dtype` and the rest unchanged."""
    return jax.tree.map(lambda x: x.astype(dtype) if is_matrix(x) else x, tree)


def run_layers(
    layers: Sequence[nnx.Module],
    fn: Callable,
    carry: Any,
    *consts: Any,
    remat_policy: str = "none",
    scan: bool = False,
    dtype: Any = None,
) -> Any:
    """`carry = fn(layer, carry, *consts)` for each layer in order, under `remat_call` unless
    `remat_policy == "none"`.

    With `scan` the layers (same structure) run as one `lax.scan` over their states stacked on
    a new leading axis, so the compiler sees one layer instead of `len(layers)` (the
    difference between minutes and most of an hour for a 7B train step on TPU). The stack is
    a per-call copy of the layers' weights, their matrices cast to `dtype` first (the compute
    dtype: `Dense` casts its weights to it before use, so the values are those of the unrolled
    loop, and a bfloat16 copy is half the float32 masters). Each weight keeps its sharding
    (the new axis is unsharded), so FSDP gathers one layer at a time inside the loop.
    """
    policy = REMAT_POLICIES[remat_policy]
    if not scan:
        for layer in layers:
            if policy is None:
                carry = fn(layer, carry, *consts)
            else:
                carry = remat_call(fn, layer, carry, *consts, policy=policy)
        return carry
    graphdef = nnx.graphdef(layers[0])
    states = [nnx.state(layer) for layer in layers]
    if any(nnx.graphdef(layer) != graphdef for layer in layers[1:]):
        raise ValueError("scan over layers needs layers of one structure")

    # matrices only: norms may use their weights in float32 (`LayerNorm`)
    states = [cast_matrices(state, dtype) for state in states] if dtype is not None else states
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(carry, state):
        return fn(nnx.merge(graphdef, state, copy=True), carry, *consts), None

    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=True)
    carry, _ = jax.lax.scan(body, carry, stacked)
    return carry


def _maybe_remat(module, policy: str, **static):
    """`module(*args, **static)`, under `remat_call` unless `policy == "none"`; `static`
    kwargs (Python ints) stay out of the traced arguments."""
    if policy == "none":
        return lambda *args: module(*args, **static)
    checkpoint_policy = REMAT_POLICIES[policy]
    return lambda *args: remat_call(
        lambda m, *a: m(*a, **static), module, *args, policy=checkpoint_policy
    )


# ----------------------------------------------------------------------------- model


class QwenVL(nnx.Module):
    """Qwen2-VL / Qwen2.5-VL for conditional generation (vision tower + Qwen2 decoder + head)."""

    def __init__(self, cfg: QwenVLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = VisionTower(cfg, rngs)
        self.model = TextModel(cfg, rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(
                cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg, rngs=rngs
            )

    # -- separable pieces -------------------------------------------------------------

    def encode_images(self, pixel_values: jax.Array, image_grid_thw: jax.Array) -> jax.Array:
        """Image embeddings in either image layout (see `rope.image_placement`).

        Packed: f32[P, F] patches + i32[I, 3] grids -> f32[P / m^2, D].
        Per row (the input pipeline's): f32[B, S, F] + i32[B, 3] -> f32[B, S / m^2, D]; the
        tower runs on each row's own patches (vmapped over rows), so rows never mix.
        """
        if pixel_values.ndim == 3:
            grid = jnp.asarray(image_grid_thw, jnp.int32)[:, None, :]  # [B, 1, 3]
            # Rows sharded like the batch: each device runs the tower on its own rows only
            # (vmap would replicate the batch dimension of the constraints inside the tower).
            rules = self.cfg.logical_axis_rules
            axes = sharding.batch_axes(pixel_values.shape[0], rules)
            pixel_values = sharding.constrain(pixel_values, ("batch", None, None), rules)
            # The tower is rebuilt inside the vmapped function from its (closed-over) state, so
            # that its layers' `nnx.remat` runs at the vmap's trace level.
            graphdef, state = nnx.split(self.visual)
            tower = lambda px, g: nnx.merge(graphdef, state, copy=True)(px, g)
            return jax.vmap(tower, spmd_axis_name=axes)(pixel_values, grid)
        return self.visual(pixel_values, image_grid_thw)

    def embed(
        self,
        input_ids: jax.Array,
        image_embeds: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """i32[B, T] -> f32[B, T, D], image tokens replaced by their image's embeddings.

        `image_embeds` is `encode_images`' output (f32[N, D] packed or f32[B, N_b, D] per row)
        and `image_grid_thw` the grids it was computed from. Token j of an image's placeholder
        run takes that image's merged token j (`rope.image_placement`): a row's tokens only
        read its own images. A row whose image tokens do not match its images' token counts
        comes out NaN (transformers raises; under jit we cannot), so the mismatch is detected
        instead of absorbed.
        """
        x = self.model.embed_tokens(input_ids)
        if image_embeds is None:
            return x
        if image_grid_thw is None:
            raise ValueError("embed needs image_grid_thw to place image_embeds")
        per_row = image_embeds.ndim == 3
        place = rope.image_placement(
            input_ids,
            image_grid_thw,
            attention_mask,
            image_token_id=self.cfg.image_token_id,
            spatial_merge_size=self.cfg.spatial_merge_size,
            per_row=per_row,
        )
        emb = image_embeds.astype(x.dtype)
        if per_row:
            k = jnp.clip(place["index"], 0, emb.shape[1] - 1)
            picked = jnp.take_along_axis(emb, k[..., None], axis=1)
        else:
            grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
            sizes = jnp.prod(grid, axis=-1) // self.cfg.spatial_merge_size**2
            start = (jnp.cumsum(sizes) - sizes)[jnp.clip(place["image"], 0, grid.shape[0] - 1)]
            picked = emb[jnp.clip(start + place["index"], 0, emb.shape[0] - 1)]
        x = jnp.where(place["is_image"][..., None], picked, x)
        return jnp.where(place["ok"][:, None, None], x, jnp.nan)

    def rope_index(
        self,
        input_ids: jax.Array,
        image_grid_thw: jax.Array,
        attention_mask: jax.Array | None,
        per_row: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """(i32[3, B, T] positions, i32[B, 1] rope deltas); see `rope.get_rope_index`.

        `per_row`: the grids are i32[B, 3], one image per row (3-D `pixel_values`).
        """
        return rope.get_rope_index(
            input_ids,
            image_grid_thw,
            attention_mask,
            image_token_id=self.cfg.image_token_id,
            spatial_merge_size=self.cfg.spatial_merge_size,
            per_row=per_row,
        )

    def decode(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array,
        cache: Cache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """The Qwen2 decoder on embeddings.

        Args:
          inputs_embeds: f32[B, T, D].
          position_ids: i32[3, B, T] M-RoPE positions.
          attention_mask: [B, S] key validity (S == T without cache, else the cache length).
          cache: per layer {"k", "v": [B, S, KV, hd]} or None; cache_index: i32 write offset.
        Returns:
          final-norm hidden states f32[B, T, D] and the updated cache (None without one).
        """
        cfg = self.cfg
        x = sharding.constrain(
            inputs_embeds, ("batch", "length", "act_embed"), cfg.logical_axis_rules
        )
        cos, sin = rope.mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        if cache is None:
            x = run_layers(
                self.model.layers,
                lambda layer, x, *a: layer(x, *a)[0],
                x,
                cos,
                sin,
                attention_mask,
                remat_policy=cfg.remat_policy,
                scan=cfg.scan_layers,
                dtype=cfg.dtype,
            )
            return self.model.norm(x), None
        new_cache = []
        for layer, layer_cache in zip(self.model.layers, cache, strict=True):
            x, c = layer(x, cos, sin, attention_mask, layer_cache, cache_index)
            new_cache.append(c)
        return self.model.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """f32[..., D] -> f32[..., V]."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        w = self.lm_head.kernel[...].astype(self.cfg.dtype)
        return jnp.einsum(
            "...d,dv->...v", hidden.astype(self.cfg.dtype), w, preferred_element_type=jnp.float32
        )

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        attention_mask: jax.Array | None,
    ) -> jax.Array:
        """Final-norm hidden states f32[B, T, D] of a prompt batch (images encoded inside)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        emb = None
        if pixel_values is not None and pixel_values.size > 0:
            per_row = pixel_values.ndim == 3
            emb = self.encode_images(pixel_values, image_grid_thw)
            pos, _ = self.rope_index(input_ids, image_grid_thw, attention_mask, per_row)
        else:
            pos = rope.text_positions(attention_mask)
        x = self.embed(input_ids, emb, image_grid_thw, attention_mask)
        h, _ = self.decode(x, pos, attention_mask)
        return h

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits f32[B, T, V] of a prompt batch (the processor's or the input pipeline's).

        Args:
          input_ids: i32[B, T]; pixel_values: f32[B, S, F] with image_grid_thw i32[B, 3] (per
          row) or f32[P, F] with i32[I, 3] (packed); attention_mask: i32[B, T] (1 = real token).
        """
        h = self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask)
        return self.logits(h)

    def token_logprobs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        attention_mask: jax.Array | None,
        targets: jax.Array,
        *,
        chunk_size: int | None = None,
        temperature: float = 1.0,
    ) -> jax.Array:
        """log softmax(logits[b, t] / temperature)[targets[b, t]] as f32[B, T].

        For next-token log-probs pass `targets = input_ids` shifted left by one. Computed in
        sequence chunks of `chunk_size` positions under `jax.checkpoint`, so neither the
        forward nor the backward pass holds `f32[B, T, V]`; `None` picks the chunk whose
        `[B, chunk, V]` logits block fits `LOGITS_BLOCK_BYTES` (see `chunked_logprobs`).
        """
        h = self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask)
        return chunked_logprobs(self, h, targets, chunk_size=chunk_size, temperature=temperature)


def chunked_logprobs(
    model: QwenVL,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """f32[B, T] log-probs of `targets` i32[B, T] from hidden states f32[B, T, D], one
    `[B, chunk, V]` logits block at a time (rematerialised in the backward pass).

    `chunk_size=None` takes the largest chunk whose f32 block fits `LOGITS_BLOCK_BYTES`: with
    the real 151,936-token vocabulary a cache-sized block is ~2.4x faster on CPU than a
    128-position one (measured in BENCHMARKS.md), and it bounds memory on any backend.
    """
    b, t, d = hidden.shape
    if chunk_size is None:
        chunk_size = max(1, LOGITS_BLOCK_BYTES // (4 * b * model.cfg.vocab_size))
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets, ((0, 0), (0, pad)))
    h = h.reshape(b, n, c, d).swapaxes(0, 1)
    y = y.reshape(b, n, c).swapaxes(0, 1)
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def one(state, hc, yc):
        m = nnx.merge(graphdef, state)
        logits = m.logits(hc) / temperature
        logits = sharding.constrain(
            logits, ("batch", "length", "act_vocab"), m.cfg.logical_axis_rules
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
        return tgt - lse

    out = jax.lax.map(lambda xs: one(state, *xs), (h, y))
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def init_cache(cfg: QwenVLConfig, batch: int, length: int, dtype=None) -> Cache:
    """Zero KV cache: per layer {"k", "v": [B, S, KV, hd]}."""
    dtype = dtype or cfg.dtype
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def logical_axes(model_or_state: nnx.Module | nnx.State) -> Any:
    """Pytree of logical axis tuples, one per parameter (from `nnx.Param(logical_axes=...)`)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def param_shardings(
    model_or_state: nnx.Module | nnx.State,
    mesh: jax.sharding.Mesh,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_AXIS_RULES,
) -> Any:
    """Pytree of NamedSharding per parameter from the rules table (odd dims replicated)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(
        lambda v: sharding.named_sharding(
            mesh, v.get_metadata().get("logical_axes"), rules, shape=v.get_value().shape
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
