"""Teacher-forced completion log-probs (`models.logprobs.completion_logprobs`) and the
sampler's vision token suppression (issue #10, acceptance 3).

References are independent of the shared-prefix code: the model's plain full forward
(`QwenVL.token_logprobs`, itself compared with transformers in test_models_qwen_vl) over each
of the B*G rows with its own copy of the prompt and image (`sampler.repeat_prompts`, the
reference's unshared path, in the HF processor's packed layout); transformers'
`SuppressTokensLogitsProcessor` and warpers and its `generate(suppress_tokens=...)` for the
sampler. float32 log-probs are compared at `testing.logprob_atol` (derived there).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from visionr1_jax import processing, sampler
from visionr1_jax.models import QwenVL, from_pretrained, qwen_vl, save_pretrained, testing
from visionr1_jax.models.logprobs import completion_logprobs

G, L = 2, 12
TEMPERATURE = 0.7  # the log-prob passes below divide the logits by it


class _CountingQwenVL(QwenVL):
    """QwenVL that records, every time its vision tower runs, the patch array it runs on."""

    calls: ClassVar[list] = []

    def encode_images(self, pixel_values, image_grid_thw):
        shape = tuple(pixel_values.shape)
        jax.debug.callback(lambda: _CountingQwenVL.calls.append(shape))
        return super().encode_images(pixel_values, image_grid_thw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


@pytest.fixture(scope="module")
def model(ckpt):
    m = from_pretrained(ckpt)
    m.__class__ = _CountingQwenVL
    return m


def _vision_ids(model) -> list[int]:
    hf = model.cfg.hf_config
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(hf[k]) for k in keys]  # the tiny config.json names all four


def _completions(model, rng, rows):
    """Random text completions i32[rows, L] (no vision special token) and ragged prefix masks
    bool[rows, L] (lengths 1..L, one full row)."""
    allowed = np.setdiff1d(np.arange(model.cfg.vocab_size), _vision_ids(model))
    tokens = rng.choice(allowed, (rows, L)).astype(np.int32)
    lengths = rng.integers(1, L + 1, rows)
    lengths[0] = L
    return tokens, np.arange(L)[None] < lengths[:, None]


def _ours(m, batch, tokens, mask, weights):
    """(sum of weights * log-probs, log-probs) of the shared-prefix pass."""
    lp = completion_logprobs(m, batch, tokens, mask, num_generations=G, temperature=TEMPERATURE)
    return jnp.sum(weights * lp), lp


def _unshared(m, rep, inputs, tokens, mask, weights):
    """The same from the full forward of each row: its own prompt and image copy, then the
    completion `inputs` (completion mask as attention mask), with next-token targets
    `tokens` (`inputs` unless a test feeds other ids)."""
    t = rep["input_ids"].shape[1]
    ids = jnp.concatenate([rep["input_ids"], inputs], 1)
    am = jnp.concatenate([rep["attention_mask"], mask.astype(jnp.int32)], 1)
    targets = jnp.concatenate([ids[:, 1:t], tokens, jnp.zeros_like(ids[:, :1])], 1)
    lp = m.token_logprobs(
        ids, rep["pixel_values"], rep["image_grid_thw"], am, targets, temperature=TEMPERATURE
    )
    lp = jnp.where(mask, lp[:, t - 1 : t - 1 + L], 0.0)
    return jnp.sum(weights * lp), lp


_ours_grad = nnx.jit(nnx.value_and_grad(_ours, has_aux=True))
_unshared_grad = nnx.jit(nnx.value_and_grad(_unshared, has_aux=True))
_ours_fwd = nnx.jit(_ours)
_unshared_fwd = nnx.jit(_unshared)


def _logprob_atol(model) -> float:
    # float32 log-prob parity of two evaluations of the same network (logits of the tiny
    # scale, divided by the temperature).
    return testing.logprob_atol(testing.TINY_LOGIT_SCALE / TEMPERATURE, model.cfg.vocab_size)


@pytest.fixture(scope="module")
def packed(ckpt):
    """The processor batch (packed images): 3 left-padded image prompts, 4 images of 4 sizes
    (a two-image prompt), one text-only row."""
    return testing.prompt_batch(ckpt, text_only_row=True)


def test_equals_unshared_computation_values_and_gradients(model, packed):
    """Log-probs and parameter gradients of the shared pass (vision tower on the B prompts'
    images) equal the unshared full forward of B*G rows (vision tower on G copies)."""
    b = packed["input_ids"].shape[0]
    rng = np.random.default_rng(0)
    tokens, mask = _completions(model, rng, b * G)
    weights = rng.normal(size=tokens.shape).astype(np.float32)
    rep = sampler.repeat_prompts(packed, G, model.cfg.image_token_id)
    batch = dict(packed)

    _CountingQwenVL.calls = []
    (_, got), grads = _ours_grad(model, batch, tokens, mask, weights)
    jax.block_until_ready(grads)
    assert _CountingQwenVL.calls == [packed["pixel_values"].shape]  # once, on B prompts' P
    _CountingQwenVL.calls = []
    (_, want), want_grads = _unshared_grad(model, rep, tokens, tokens, mask, weights)
    jax.block_until_ready(want_grads)
    assert _CountingQwenVL.calls == [rep["pixel_values"].shape]
    assert rep["pixel_values"].shape[0] == G * packed["pixel_values"].shape[0]

    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(want).all() and (got[~mask] == 0).all()
    np.testing.assert_allclose(got[mask], want[mask], atol=_logprob_atol(model), rtol=0)

    # Gradients: the backward pass runs one rounded reduction per forward reduction (its
    # transpose) plus the forward's own, so each gradient carries about twice the logits'
    # relative rounding, 2 x LOGIT_RTOL of its scale; the scale of a leaf is its largest
    # entry, and its entries sum B*G*L weighted terms in another order (the prompt's G
    # completions summed inside the pass vs. over copies): sqrt(B*G*L) u relative more.
    n = tokens.size
    rtol = 2 * testing.LOGIT_RTOL + math.sqrt(n) * testing.F32_U
    flat_got = dict(nnx.to_flat_state(grads))
    flat_want = dict(nnx.to_flat_state(want_grads))
    assert flat_got.keys() == flat_want.keys()
    worst = 0.0
    for path, ref in flat_want.items():
        ref = np.asarray(ref[...])
        val = np.asarray(flat_got[path][...])
        scale = float(np.abs(ref).max())
        assert scale > 0, path  # every parameter (vision tower included) gets a gradient
        err = float(np.abs(val - ref).max())
        worst = max(worst, err / scale)
        assert err <= rtol * scale, (path, err, scale)
    print(f"gradient parity: worst relative error {worst:.3g} <= {rtol:.3g}")


@pytest.mark.parametrize(
    "options",
    [
        {"remat_policy": "dots_no_batch"},
        {"scan_layers": True},
        {"remat_policy": "dots_no_batch", "scan_layers": True},
    ],
    ids=["remat", "scan", "remat+scan"],
)
def test_remat_and_scan_keep_the_shared_pass_values_and_gradients(ckpt, model, packed, options):
    """The shared pass under a remat policy (each decoder layer checkpointed,
    `qwen_vl.remat_call`) and/or with the layers under one `lax.scan` over their stacked
    weights (`qwen_vl.run_layers`) gives the values and gradients of the plain unrolled one,
    within the float32 parity of two evaluations of the same network (the tolerances of the
    test above); so does the model's own forward (`QwenVL.__call__`)."""
    b = packed["input_ids"].shape[0]
    rng = np.random.default_rng(1)
    tokens, mask = _completions(model, rng, b * G)
    weights = rng.normal(size=tokens.shape).astype(np.float32)
    other = from_pretrained(ckpt, **options)
    assert other.cfg.scan_layers == options.get("scan_layers", False)
    (_, want), want_grads = _ours_grad(model, dict(packed), tokens, mask, weights)
    (_, got), grads = _ours_grad(other, dict(packed), tokens, mask, weights)
    want_logits = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *_forward_args(packed)))
    got_logits = np.asarray(nnx.jit(lambda m, *a: m(*a))(other, *_forward_args(packed)))
    scale = float(np.abs(want_logits).max())
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=testing.logit_atol(scale))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=_logprob_atol(model))
    rtol = 2 * testing.LOGIT_RTOL + math.sqrt(tokens.size) * testing.F32_U
    flat_got = dict(nnx.to_flat_state(grads))
    for path, ref in nnx.to_flat_state(want_grads):
        ref, val = np.asarray(ref[...]), np.asarray(flat_got[path][...])
        scale = float(np.abs(ref).max())
        assert scale > 0 and float(np.abs(val - ref).max()) <= rtol * scale, path


def _forward_args(packed):
    keys = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask")
    return [jnp.asarray(packed[k]) for k in keys]


def _per_row_batch(ckpt, rng):
    """A pipeline-like batch: per-row images (pixel_values f32[B, S, F] zero padded past each
    row's patches, image_grid_thw i32[B, 3], zeros for the text-only row), left-padded
    prompts of different lengths; and the same prompts in the processor's packed layout."""
    proc = processing.load_processor(ckpt)
    questions = [
        "Locate every cat and every dog in the picture, then answer with boxes.",
        "hi",
        "Find the red square please.",
        "No picture in this one.",
    ]
    ims = testing.random_images(rng, [(100, 150), (60, 60), (224, 168)])
    images = [[ims[0]], [ims[1]], [ims[2]], []]
    texts = [
        processing.render_prompt(proc, q, num_images=len(i))
        for q, i in zip(questions, images, strict=True)
    ]
    packed = processing.encode_batch(proc, texts, images, padding_side="left")
    grid = np.zeros((4, 3), np.int32)
    grid[:3] = packed["image_grid_thw"]
    sizes = np.prod(grid, 1)
    s = int(sizes.max()) + 32  # padding patches after every row's own
    pixels = np.zeros((4, s, packed["pixel_values"].shape[1]), np.float32)
    start = 0
    for i in range(3):
        pixels[i, : sizes[i]] = packed["pixel_values"][start : start + sizes[i]]
        start += sizes[i]
    per_row = {
        "input_ids": packed["input_ids"],
        "attention_mask": packed["attention_mask"],
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }
    return per_row, packed


def test_per_row_batch_image_reaches_each_row_only(model, ckpt, monkeypatch):
    """The pipeline's per-row layout with left-padded prompts of different lengths (and a
    text-only row): equal to the unshared packed forward; the vision tower runs once on the
    B rows; a different image in one row changes exactly that row's G completions. Our pass
    runs its attention in query blocks of 4 here (3 completion blocks: the block path)."""
    rng = np.random.default_rng(1)
    batch, packed = _per_row_batch(ckpt, rng)
    b = batch["input_ids"].shape[0]
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == b and (batch["attention_mask"][:, 0] == 0).sum() == b - 1
    tokens, mask = _completions(model, rng, b * G)
    weights = np.ones(tokens.shape, np.float32)

    _CountingQwenVL.calls = []
    with monkeypatch.context() as patch:
        patch.setattr(qwen_vl, "CAUSAL_CHUNK", 4)  # read when the pass is traced (here)
        _, got = _ours_fwd(model, batch, tokens, mask, weights)
    got = np.asarray(got)
    assert _CountingQwenVL.calls == [batch["pixel_values"].shape]  # B rows, not B*G
    rep = sampler.repeat_prompts(packed, G, model.cfg.image_token_id)
    _, want = _unshared_fwd(model, rep, tokens, tokens, mask, weights)
    np.testing.assert_allclose(got[mask], np.asarray(want)[mask], atol=_logprob_atol(model), rtol=0)

    # Another image (same size) in row 1: its G rows move, every other row is unchanged.
    other = dict(batch)
    other["pixel_values"] = batch["pixel_values"].copy()
    n1 = int(np.prod(batch["image_grid_thw"][1]))
    other["pixel_values"][1, :n1] = rng.normal(size=(n1, batch["pixel_values"].shape[2]))
    _, moved = _ours_fwd(model, other, tokens, mask, weights)
    moved = np.asarray(moved)
    rows = np.arange(b * G) // G == 1
    assert np.abs(moved[rows] - got[rows]).max() > 100 * _logprob_atol(model)
    np.testing.assert_array_equal(moved[~rows], got[~rows])  # rows are independent


def test_vision_tokens_in_a_completion_are_read_as_text(model, packed):
    """A completion holding `<|image_pad|>` (and the other vision special tokens): its
    log-probs equal the full forward in which that token is a text token with the same
    embedding (a spare token id X given `<|image_pad|>`'s embedding row; the output head is
    untied, so only the input side changes). Read as an image placeholder instead, the full
    forward cannot place it: those rows come out NaN."""
    assert not model.cfg.tie_word_embeddings
    b = packed["input_ids"].shape[0]
    rng = np.random.default_rng(2)
    tokens, mask = _completions(model, rng, b * G)
    img = model.cfg.image_token_id
    vision = _vision_ids(model)
    tokens[0, [1, 2, 5]] = img
    tokens[3, 0] = img
    tokens[4, 4:8] = vision
    mask[[0, 3, 4]] = True
    used = set(np.unique(tokens).tolist()) | set(np.unique(packed["input_ids"]).tolist())
    spare = next(i for i in range(model.cfg.vocab_size) if i not in used)
    as_text = nnx.clone(model)
    emb = as_text.model.embed_tokens.weight
    emb[...] = emb[...].at[spare].set(emb[...][img])
    weights = np.ones(tokens.shape, np.float32)
    rep = sampler.repeat_prompts(packed, G, img)

    # The programs of the parity test (same shapes), gradients unused.
    (_, got), _ = _ours_grad(model, dict(packed), tokens, mask, weights)
    got = np.asarray(got)
    as_text_inputs = np.where(tokens == img, spare, tokens)
    (_, want), _ = _unshared_grad(as_text, rep, as_text_inputs, tokens, mask, weights)
    want = np.asarray(want)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got[mask], want[mask], atol=_logprob_atol(model), rtol=0)
    # `<|image_pad|>` in the completion read as an image placeholder:
    (_, naive), _ = _unshared_grad(model, rep, tokens, tokens, mask, weights)
    naive = np.asarray(naive)
    has_img = (tokens == img).any(1)
    assert np.isnan(naive[has_img[:, None] & mask]).all()  # (in the packed layout, later rows too)


# ----------------------------------------------------------------------------- the sampler


BIAS = 20.0  # head weight of the vision tokens on the constant hidden dimension
SAMPLING = dict(num_generations=2, max_new_tokens=12, temperature=1.3, top_k=8)


@pytest.fixture(scope="module")
def biased(ckpt, tmp_path_factory):
    """(model, transformers model, prompts) of the tiny checkpoint changed so that the vision
    special tokens dominate every next-token distribution, `<|image_pad|>` first.

    Hidden dimension 0 of every text token's residual stream is held at a constant C > 0 (its
    embedding entry set to C, every layer's writes into it zeroed), so the final norm gives
    h_0 = C / rms(x) > 0 there; the vision tokens' head columns read only h_0, with weight
    BIAS (+1 for `<|image_pad|>`): their logits BIAS * h_0 are positive and the same at every
    step, far above the other tokens' (|z| <~ 5). The prompts are text only (suppression acts
    on the next-token logits whatever the prompt; no vision tower keeps the programs small):
    three left-padded chat prompts.
    """
    m = from_pretrained(ckpt)
    ids = np.asarray(_vision_ids(m))
    emb = m.model.embed_tokens.weight
    emb[...] = emb[...].at[:, 0].set(4.0)
    for layer in m.model.layers:
        for dense in (layer.self_attn.o_proj, layer.mlp.down_proj):
            dense.kernel[...] = dense.kernel[...].at[:, 0].set(0.0)
    m.model.norm.weight[...] = m.model.norm.weight[...].at[0].set(1.0)
    head = m.lm_head.kernel
    column = np.zeros((m.cfg.hidden_size, len(ids)), np.float32)
    column[0] = BIAS
    column[0, ids == m.cfg.image_token_id] += 1.0
    head[...] = head[...].at[:, ids].set(column)
    path = str(tmp_path_factory.mktemp("biased"))
    save_pretrained(m, path)
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    proc = processing.load_processor(ckpt)
    questions = ("Where is the cat?", "hi", "Describe the picture in one long sentence.")
    texts = [processing.render_prompt(proc, q, num_images=0) for q in questions]
    batch = processing.encode_batch(proc, texts, [[]] * 3, padding_side="left")
    assert batch["pixel_values"].shape[0] == 0 and (batch["attention_mask"][:, 0] == 0).any()
    return m, hf, batch


@pytest.fixture(scope="module")
def sampled(biased):
    """The default (suppressing) sampled rollout of the biased model, top-k after suppression."""
    m, _, batch = biased
    kw = dict(eos_token_id=(), cache_dtype=jnp.float32, **SAMPLING)
    return sampler.generate(m, batch, rng=jax.random.key(3), **kw)


def _hf_greedy(hf, batch, n, **kwargs):
    """transformers' greedy `generate` on a text-only batch: the n new tokens."""
    ids = torch.tensor(batch["input_ids"]).long()
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]).long(),
            do_sample=False, max_new_tokens=n, min_new_tokens=n, **kwargs,
        )  # fmt: skip
    return out[:, ids.shape[1] :].numpy()


def test_rollout_never_samples_vision_tokens_by_default(biased, sampled):
    """On a model whose most likely next tokens are the vision special tokens: the default
    rollout never emits one (greedy: token for token transformers' `generate` with
    `suppress_tokens`; sampled); with `suppress_token_ids=()` greedy emits `<|image_pad|>`
    at every step and sampling emits vision tokens almost always."""
    m, hf, batch = biased
    vision = _vision_ids(m)
    n = 16
    kw = dict(max_new_tokens=n, eos_token_id=(), cache_dtype=jnp.float32)
    assert sampler.vision_token_ids(m) == tuple(sorted(vision))

    greedy = sampler.generate(m, batch, rng=jax.random.key(0), temperature=0.0, **kw)
    toks = np.asarray(greedy.tokens)
    assert not np.isin(toks, vision).any()
    np.testing.assert_array_equal(toks, _hf_greedy(hf, batch, n, suppress_tokens=vision))
    free = sampler.generate(
        m, batch, rng=jax.random.key(0), temperature=0.0, suppress_token_ids=(), **kw
    )
    assert (np.asarray(free.tokens) == m.cfg.image_token_id).all()

    assert not np.isin(np.asarray(sampled.tokens), vision).any()
    free = sampler.generate(
        m, batch, rng=jax.random.key(3), eos_token_id=(), cache_dtype=jnp.float32,
        suppress_token_ids=(), **SAMPLING,
    )  # fmt: skip
    free_toks = np.asarray(free.tokens)[np.asarray(free.mask)]
    # Unsuppressed, top-k 8 keeps the 4 vision tokens, which hold nearly all the mass.
    assert np.isin(free_toks, vision).mean() > 0.9


def test_rollout_logprobs_are_under_the_masked_distribution(biased, sampled):
    """The default rollout's log-probs (temperature 1.3, top-k 8) equal a teacher-forced full
    forward over prompt + completion followed by transformers'
    `SuppressTokensLogitsProcessor`, temperature and top-k warpers (in that order, as
    `generate` applies them); top-k before the suppression would keep 4 tokens, not 8."""
    from transformers import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    m, _, batch = biased
    vision = _vision_ids(m)
    g, n = SAMPLING["num_generations"], SAMPLING["max_new_tokens"]
    temperature, top_k = SAMPLING["temperature"], SAMPLING["top_k"]
    toks, mask = np.asarray(sampled.tokens)[:, :n], np.asarray(sampled.mask)[:, :n]
    assert mask.all() and not np.isin(toks, vision).any()
    ids = np.concatenate([np.repeat(batch["input_ids"], g, 0), toks], 1)
    am = np.concatenate([np.repeat(batch["attention_mask"], g, 0), mask.astype(np.int32)], 1)
    logits = np.asarray(testing.jit_forward()(m, ids, None, None, am))
    t = batch["input_ids"].shape[1]
    step = logits[:, t - 1 : t - 1 + n].reshape(-1, logits.shape[-1])
    procs = LogitsProcessorList(
        [
            SuppressTokensLogitsProcessor(vision),
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k),
        ]
    )
    warped = procs(torch.zeros((step.shape[0], 1), dtype=torch.long), torch.tensor(step))
    want = torch.log_softmax(warped, -1).numpy().reshape(toks.shape[0], n, -1)
    want = np.take_along_axis(want, toks[..., None], -1)[..., 0]
    # float32 log-prob parity (cached decoding vs a full forward) at the scale of the biased
    # logits (the vision tokens' BIAS * h_0 included) over the temperature.
    scale = float(np.abs(step).max()) / temperature
    atol = testing.logprob_atol(scale, m.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(sampled.logprobs)[:, :n], want, atol=atol, rtol=0)
    # Unmasked, the vision tokens would hold nearly all the mass: the sampled tokens' masked
    # log-probs are far from their unmasked ones, so the check above is not vacuous.
    plain = torch.log_softmax(torch.tensor(step) / temperature, -1).numpy()
    plain = np.take_along_axis(plain.reshape(toks.shape[0], n, -1), toks[..., None], -1)[..., 0]
    assert (want - plain).min() > 1.0
