"""Logit parity of our Flax NNX Qwen-VL with transformers (PyTorch fp32 CPU), export round trip,
bf16 loading and compute, and the chunked log-prob head.

Every float32 comparison uses the shared tolerances of `models.testing` (derived there from the
float32 rounding of the forward and the logits' scale); bf16 ones `testing.assert_bf16_close`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionr1_jax.models import from_pretrained, save_pretrained, testing
from visionr1_jax.models.testing import tiny_checkpoint

CONFIGS = ["qwen2_5_vl_tiny", "qwen2_5_vl_gqa4", "qwen2_5_vl_mha", "qwen2_vl_tiny"]
forward = testing.jit_forward()
# bf16 roundings in sequence on qwen2_5_vl_tiny's deepest path, weights and activations: patch
# embedding 2, 2 vision blocks x 17 (norm, qkv weight + output, rope, probs, attention output,
# proj weight + output, residual, norm, gate/up weight + output, act * up, down weight + output,
# residual), merger 6, token embedding 1, 2 text layers x 17, final norm 1, head 2.
BF16_ROUNDINGS = 2 + 2 * 17 + 6 + 1 + 2 * 17 + 3


def _ours(path, batch, **kwargs):
    model = from_pretrained(path, **kwargs)
    out = forward(
        model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
        batch["attention_mask"],
    )  # fmt: skip
    return model, np.asarray(out)


def _flat_params(model):
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path_factory, name):
    path = tiny_checkpoint(tmp_path_factory, name)
    batch = testing.prompt_batch(path)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    assert len(set(map(tuple, batch["image_grid_thw"]))) == 4  # four different image sizes
    _, ours = _ours(path, batch)
    ref = testing.hf_logits(path, batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    testing.assert_logits_close(ours, ref, batch["attention_mask"])  # float32 parity


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_text_only_row(tmp_path_factory, side):
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path, padding_side=side, seed=1, text_only_row=True)
    pad_col = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_col] == 0).any()
    _, ours = _ours(path, batch)
    ref = testing.hf_logits(path, batch)
    testing.assert_logits_close(ours, ref, batch["attention_mask"])  # float32 parity


def _hf_load(path, **kwargs):
    """transformers' model at `path` and its loading report (missing / unexpected keys...)."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        path, output_loading_info=True, **kwargs
    )
    return model.eval(), info


def _assert_same_hf_model(exported, original, batch):
    """transformers loads every weight of `exported` without a missing or unexpected key
    (it would initialise a missing one at random, silently) and it is the `original` model bit
    for bit: same parameters, same logits."""
    hf_new, info = _hf_load(exported)
    assert not any(info.values()), info
    hf_old, _ = _hf_load(original)
    assert hf_new.dtype == hf_old.dtype
    new, old = hf_new.state_dict(), hf_old.state_dict()
    assert new.keys() == old.keys()
    for key, value in old.items():
        assert new[key].dtype == value.dtype, key
        np.testing.assert_array_equal(new[key].float().numpy(), value.float().numpy(), key)
    # Same weights, same program: bit-identical logits (the same library on the same CPU).
    logits_new = testing.hf_logits(exported, batch, hf_model=hf_new)
    np.testing.assert_array_equal(logits_new, testing.hf_logits(original, batch, hf_model=hf_old))


@pytest.mark.parametrize("name", ["qwen2_5_vl_gqa4", "qwen2_5_vl_tiny", "qwen2_vl_tiny"])
def test_export_round_trip(tmp_path_factory, tmp_path, name):
    """Tied embeddings (gqa4), an untied `lm_head` (tiny) and the Qwen2-VL tower: transformers
    reads our export as the original checkpoint, and our loader reads it back bit for bit."""
    import json

    path = tiny_checkpoint(tmp_path_factory, name)
    batch = testing.prompt_batch(path)
    model = from_pretrained(path)
    assert model.cfg.tie_word_embeddings == (name == "qwen2_5_vl_gqa4")
    save_pretrained(model, str(tmp_path))
    _assert_same_hf_model(str(tmp_path), path, batch)
    with open(tmp_path / "generation_config.json", encoding="utf-8") as f:
        assert json.load(f) == model.cfg.hf_generation_config  # the stop ids travel along
    # And back: our loader reads what we wrote, bit for bit.
    again = _flat_params(from_pretrained(str(tmp_path)))
    params = _flat_params(model)
    assert again.keys() == params.keys() and len(params) > 50
    for key, value in params.items():
        np.testing.assert_array_equal(again[key], value)


def test_bf16_checkpoint_loads(tmp_path_factory):
    import torch

    path = tiny_checkpoint(tmp_path_factory, "qwen2_vl_tiny", dtype="bfloat16")
    batch = testing.prompt_batch(path)
    _, ours = _ours(path, batch)  # bf16 on disk, fp32 parameters
    ref = testing.hf_logits(path, batch, hf_model=_hf_load(path, dtype=torch.float32)[0])
    testing.assert_logits_close(ours, ref, batch["attention_mask"])  # float32 parity
    model_bf16 = from_pretrained(path, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in _flat_params(model_bf16).values()}
    assert dtypes == {np.dtype(jnp.bfloat16)}
    # bf16 export: transformers reads it back as the original bf16 checkpoint, bit for bit.
    out = tmp_path_factory.mktemp("bf16_export")
    save_pretrained(model_bf16, str(out))
    hf_bf16, _ = _hf_load(str(out))
    assert hf_bf16.dtype == torch.bfloat16
    _assert_same_hf_model(str(out), path, batch)


@pytest.mark.parametrize("chunk_size,block_bytes", [(16, None), (None, None), (None, 4096)])
def test_token_logprobs_equal_log_softmax(tmp_path_factory, monkeypatch, chunk_size, block_bytes):
    """Chunked log-probs equal a numpy log-softmax of the full logits, for an explicit chunk,
    the automatic one (one block here) and an automatic one cut to many small blocks."""
    from flax import nnx

    from visionr1_jax.models import qwen_vl

    if block_bytes is not None:
        monkeypatch.setattr(qwen_vl, "LOGITS_BLOCK_BYTES", block_bytes)
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path)
    model, logits = _ours(path, batch)
    targets = np.roll(batch["input_ids"], -1, axis=1)
    fn = nnx.jit(
        lambda m, ids, pv, g, am, y: m.token_logprobs(ids, pv, g, am, y, chunk_size=chunk_size),
    )
    got = np.asarray(
        fn(model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
           batch["attention_mask"], targets)
    )  # fmt: skip
    mx = logits.max(-1, keepdims=True)
    ls = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    want = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    m = batch["attention_mask"].astype(bool)
    # Log-prob parity of two float32 evaluations of logits of scale max|z| over V tokens.
    atol = testing.logprob_atol(float(np.abs(logits[m]).max()), logits.shape[-1])
    np.testing.assert_allclose(got[m], want[m], atol=atol, rtol=0)


def test_kv_cache_decoding_matches_full_forward(tmp_path_factory):
    """Prefill into a KV cache, then decode token by token at positions n + rope_delta: the
    logits equal a full forward over prompt + new tokens."""
    from flax import nnx

    from visionr1_jax.models import qwen_vl

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path, text_only_row=True)
    model = from_pretrained(path)
    b, t = batch["input_ids"].shape
    k = 3
    new = np.random.default_rng(0).integers(0, 300, (b, k)).astype(np.int32)
    ids_full = np.concatenate([batch["input_ids"], new], 1)
    mask_full = np.concatenate([batch["attention_mask"], np.ones((b, k), np.int32)], 1)
    full = forward(model, ids_full, batch["pixel_values"], batch["image_grid_thw"], mask_full)

    @nnx.jit
    def prefill(m, ids, pv, g, am, key_valid):
        pos, delta = m.rope_index(ids, g, am)
        x = m.embed(ids, m.encode_images(pv, g), g, am)
        cache = qwen_vl.init_cache(m.cfg, ids.shape[0], key_valid.shape[1])
        h, cache = m.decode(x, pos, key_valid, cache, jnp.int32(0))
        return m.logits(h), cache, delta

    @nnx.jit
    def step(m, tok, pos, key_valid, cache, index):
        h, cache = m.decode(m.embed(tok), pos, key_valid, cache, index)
        return m.logits(h), cache

    args = (batch["pixel_values"], batch["image_grid_thw"], batch["attention_mask"])
    logits, cache, delta = prefill(model, batch["input_ids"], *args, mask_full)
    full = np.asarray(full)
    testing.assert_logits_close(logits, full[:, :t], batch["attention_mask"])  # float32 parity
    n_real = batch["attention_mask"].sum(1)
    for i in range(k):
        pos = np.broadcast_to((n_real + i)[:, None] + np.asarray(delta), (3, b, 1))
        logits, cache = step(model, new[:, i : i + 1], pos, mask_full, cache, jnp.int32(t + i))
        testing.assert_logits_close(np.asarray(logits)[:, 0], full[:, t + i])  # float32 parity


def test_per_row_images_under_remat_keep_values_and_gradients(tmp_path_factory):
    """The input pipeline's per-row images (`pixel_values [B, S, F]`, the tower vmapped over
    rows) under a remat policy: the same embeddings and gradients as without remat (the
    layers' `nnx.remat` runs inside the vmap; it once failed with a trace-level error)."""
    from flax import nnx

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    rng = np.random.default_rng(0)
    base = from_pretrained(path, max_image_patches=64)
    pixels = jnp.asarray(rng.normal(size=(2, 64, base.cfg.patch_dim)), jnp.float32)
    grid = jnp.asarray([[1, 8, 8], [1, 4, 8]], jnp.int32)  # row 1: 32 patches + padding

    def loss(m):
        emb = m.encode_images(pixels, grid)  # [2, 16, D]
        return jnp.sum(emb[0] ** 2) + jnp.sum(emb[1, :8] ** 2), emb

    grad = nnx.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))
    (_, e0), g0 = grad(base)
    (v1, e1), g1 = grad(from_pretrained(path, max_image_patches=64, remat_policy="full"))
    scale = float(np.abs(np.asarray(e0)).max())
    # Two evaluations of the same network: the logits' relative rounding bound (testing.py).
    np.testing.assert_allclose(np.asarray(e1), np.asarray(e0), atol=testing.LOGIT_RTOL * scale)
    g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0))
    assert g_scale > 0 and np.isfinite(float(v1))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        # The backward pass doubles the forward's depth of rounded reductions.
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), atol=2 * testing.LOGIT_RTOL * g_scale
        )


def test_remat_policies_keep_values_and_gradients(tmp_path_factory):
    from flax import nnx

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path)
    targets = np.roll(batch["input_ids"], -1, axis=1)
    mask = batch["attention_mask"]

    def loss(m):
        lp = m.token_logprobs(
            batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], mask, targets,
            chunk_size=32,
        )  # fmt: skip
        return -(lp * mask).sum() / mask.sum()

    grad = nnx.jit(lambda m: nnx.value_and_grad(loss)(m))
    base = from_pretrained(path)
    v0, g0 = grad(base)
    assert len(jax.tree.leaves(g0)) > 50
    g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0))
    for policy in ("full", "dots_no_batch"):
        v1, g1 = grad(from_pretrained(path, remat_policy=policy))
        # The loss is a mean of log-probs: at most the log-prob rounding difference.
        atol = testing.logprob_atol(testing.TINY_LOGIT_SCALE, base.cfg.vocab_size)
        np.testing.assert_allclose(v0, v1, atol=atol, rtol=0)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
            # The backward pass doubles the forward's depth of rounded reductions.
            atol = 2 * testing.LOGIT_RTOL * g_scale
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


def test_dense_and_block_local_vision_attention_agree(tmp_path_factory):
    """Block-local vision attention (bound from the processor's max_pixels) equals dense masked
    attention over the packed patches, and an image above the bound is reported as NaN."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_mha")  # two full-attention blocks
    batch = testing.prompt_batch(path)
    block_model, block = _ours(path, batch)
    assert block_model.cfg.max_image_patches == 224 * 224 // 14**2
    assert batch["pixel_values"].shape[0] > block_model.cfg.max_image_patches
    _, dense = _ours(path, batch, max_image_patches=None)
    m = batch["attention_mask"].astype(bool)
    testing.assert_logits_close(block, dense, m)  # float32 parity
    _, poisoned = _ours(path, batch, max_image_patches=16)
    assert np.isnan(poisoned[m]).any()


def test_real_vocabulary_and_tokenizer(tmp_path_factory):
    """The real Qwen tokenizer (151,643 + specials at the official ids) and the 151,936-token
    vocabulary of the releases."""
    from visionr1_jax import processing

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="qwen")
    proc = processing.load_processor(path)
    assert proc.image_token_id == 151655
    assert proc.tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    batch = testing.prompt_batch(path)
    model, ours = _ours(path, batch)
    assert model.cfg.vocab_size == 151936 and ours.shape[-1] == 151936
    ref = testing.hf_logits(path, batch)
    testing.assert_logits_close(ours, ref, batch["attention_mask"])  # float32 parity


def test_sharded_index_checkpoint_loads(tmp_path_factory, tmp_path):
    """A multi-file checkpoint (`model.safetensors.index.json`) in the transformers-5 key
    layout loads to the same parameters as the single-file hub layout."""
    import os

    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoint(tmp_path_factory, "qwen2_vl_tiny")
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    a, b = _flat_params(from_pretrained(path)), _flat_params(from_pretrained(str(tmp_path)))
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value)


@pytest.mark.parametrize(
    "param_dtype, compute_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)]
)
def test_bf16_forward_tracks_float32(tmp_path_factory, param_dtype, compute_dtype):
    """bf16 activations/matmuls, over fp32 master weights or over bf16 parameters, track the
    float32 logits (themselves at float32 parity with transformers) within the bf16 rounding
    of the forward."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path)
    _, ref = _ours(path, batch)
    model, low = _ours(path, batch, dtype=param_dtype, compute_dtype=compute_dtype)
    assert {v.dtype for v in _flat_params(model).values()} == {np.dtype(param_dtype)}
    assert low.dtype == np.float32
    # <= BF16_ROUNDINGS roundings of relative error <= 2^-9 each (measured: 1.3% rms).
    testing.assert_bf16_close(low, ref, batch["attention_mask"], roundings=BF16_ROUNDINGS)


@pytest.mark.parametrize("chunk", [64, 16, 7])
def test_causal_block_attention_equals_dense_masked_attention(monkeypatch, chunk):
    """Skipping the key blocks above the diagonal changes no row: left padding, GQA 2."""
    from visionr1_jax.models import qwen_vl

    monkeypatch.setattr(qwen_vl, "CAUSAL_CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    b, t, h, kv, d = 3, 150, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, kv, d)).astype(np.float32) for _ in range(2))
    key_valid = np.arange(t)[None] >= np.array([[0], [37], [149]])  # left padding
    mask = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None, None] & key_valid[:, None, None]
    want = qwen_vl.masked_attention(q, k, v, mask, d**-0.5)
    got = jax.jit(qwen_vl.causal_attention, static_argnums=4)(q, k, v, key_valid, d**-0.5)
    rows = key_valid  # padded query rows are never read
    # First-order worst case of a float32 attention row: the d-term scores and the T-term
    # softmax sum and weighted sum of v (probabilities >= 0) each err <= n u relative to
    # max|v|; a key wrongly in or out of the mask moves a row by ~max|v| / T = 3e-2.
    atol = (2 * d + 2 * t) * testing.F32_U * float(np.abs(v).max())
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=atol, rtol=0)


def _tower_loss(graphdef, state, visual, batch, weights):
    """sum(embeddings * weights) of the model (graphdef, state) with the tower `visual`."""
    from flax import nnx

    state = nnx.State({**dict(state), "visual": visual})
    emb = nnx.merge(graphdef, state).encode_images(batch["pixel_values"], batch["image_grid_thw"])
    return jnp.sum(emb * weights), emb


@pytest.mark.parametrize(
    "name, fullatt, remat",
    [
        ("qwen2_5_vl_tiny", (1, 3), "none"),
        ("qwen2_5_vl_tiny", (1, 3), "dots_no_batch"),
        ("qwen2_vl_tiny", (), "full"),
    ],
)
def test_scanned_vision_tower_keeps_values_and_gradients(tmp_path_factory, name, fullatt, remat):
    """`scan_layers` runs the vision tower as a scan over groups of blocks with one attention
    pattern (here 4 blocks, windowed/full alternating: 2 groups of 2; Qwen2-VL's all-full
    blocks: 4 groups of 1). Its embeddings and their gradients w.r.t. every tower weight equal
    the unrolled tower's, at the float32 tolerance of two evaluations of one network."""
    import dataclasses

    from flax import nnx

    from visionr1_jax.models import QwenVL, QwenVLConfig

    path = tiny_checkpoint(tmp_path_factory, name)
    batch = testing.prompt_batch(path)
    cfg = dataclasses.replace(
        QwenVLConfig.from_pretrained(path, max_image_patches=None),
        vision_depth=4,
        fullatt_block_indexes=fullatt,
        remat_policy=remat,
    )
    graphdef, state = nnx.split(QwenVL(cfg, rngs=nnx.Rngs(0)))
    scanned = nnx.graphdef(QwenVL(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(1, cfg.hidden_size)), jnp.float32)

    def grads(gd):
        fn = lambda v: _tower_loss(gd, state, v, batch, weights)
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(state["visual"])

    (_, want), want_g = grads(graphdef)
    (_, got), got_g = grads(scanned)
    scale = float(np.abs(np.asarray(want)).max())
    assert scale > 0
    # The tower is 4 x 6 + 3 of the FORWARD_DEPTH reductions LOGIT_RTOL is derived for; the
    # backward pass doubles the depth.
    np.testing.assert_allclose(got, want, atol=testing.LOGIT_RTOL * scale, rtol=0)
    g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(want_g))
    assert len(jax.tree.leaves(want_g)) >= 4 * 8
    for a, b in zip(jax.tree.leaves(want_g), jax.tree.leaves(got_g), strict=True):
        np.testing.assert_allclose(b, a, atol=2 * testing.LOGIT_RTOL * g_scale, rtol=0)
