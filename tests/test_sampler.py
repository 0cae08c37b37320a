"""The rollout sampler against transformers `generate` (greedy, stop ids), scipy (sampling
distribution), a teacher-forced forward (log-probs, greedy and sampled, float32 and bf16 KV
cache), the unshared path (prefix sharing), its bucket bound on compilations and 8 simulated
devices. float32 log-probs are compared at `testing.logprob_atol` (derived there)."""

import dataclasses
import json
import os
import shutil
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from visionr1_jax import host, processing, sampler, sharding
from visionr1_jax.models import QwenVL, from_pretrained, qwen_vl, testing
from visionr1_jax.models.testing import tiny_checkpoint
from visionr1_jax.models.tiny import INSTRUCT_EOS

CONFIGS = ["qwen2_5_vl_tiny", "qwen2_5_vl_gqa4", "qwen2_5_vl_mha", "qwen2_vl_tiny"]
F32 = dict(cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, batch, model) of qwen2_5_vl_tiny: 3 left-padded prompts, 4 images of 4 sizes."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    return path, testing.prompt_batch(path), from_pretrained(path)


def _hf_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _hf_vision_ids(config) -> list[int]:
    """The vision special tokens our rollout suppresses by default (`sampler.vision_token_ids`)."""
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [int(getattr(config, k)) for k in keys]


def _hf_generate(hf, batch, **kwargs):
    """transformers `generate` on a processor batch, with our default suppression of the vision
    special tokens (`suppress_tokens`); returns the new tokens i64[B, <= L]."""
    kwargs.setdefault("suppress_tokens", _hf_vision_ids(hf.config))
    ids = torch.tensor(batch["input_ids"]).long()
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.tensor(batch["attention_mask"]).long(),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]).long(),
            mm_token_type_ids=(ids == hf.config.image_token_id).long(),
            **kwargs,
        )
    return out[:, ids.shape[1] :].numpy()


def _hf_warpers(temperature, top_k, top_p, suppress=()):
    """transformers' logits processors for the sampling settings (the reference filters),
    after the suppression of the tokens `suppress` (as `generate` orders them)."""
    from transformers import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if suppress:
        procs.append(SuppressTokensLogitsProcessor(list(suppress)))
    if temperature > 0:  # greedy (0): the untempered model
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return lambda logits: procs(None, torch.tensor(logits)).numpy()


# ----------------------------------------------------------------------------- acceptance 1


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_transformers_generate(tmp_path_factory, name):
    """64 greedy tokens equal transformers `generate(do_sample=False)` token for token, with
    left padding and four image sizes; a stop token that one row emits mid-way checks the
    per-row EOS stop and the padding after it."""
    path = tiny_checkpoint(tmp_path_factory, name)
    batch = testing.prompt_batch(path)
    assert (batch["attention_mask"][:, 0] == 0).any()
    assert len(set(map(tuple, batch["image_grid_thw"]))) == 4
    model, hf = from_pretrained(path), _hf_model(path)
    pad = hf.generation_config.pad_token_id
    ours = sampler.generate(
        model, batch, rng=jax.random.key(0), max_new_tokens=64, temperature=0.0,
        eos_token_id=(), **F32,
    )  # fmt: skip
    ref = _hf_generate(hf, batch, do_sample=False, max_new_tokens=64, min_new_tokens=64)
    assert ref.shape == (3, 64)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert np.asarray(ours.mask).all() and int(ours.steps) == 64
    # A stop token: the 20th token of row 0 (chosen from the run above), absent from row 0's
    # first 19 tokens; the other rows stop at their own first occurrence, if any.
    eos = int(ref[0, 19])
    stop = sampler.generate(
        model, batch, rng=jax.random.key(0), max_new_tokens=64, temperature=0.0,
        eos_token_id=eos, **F32,
    )  # fmt: skip
    ref_stop = _hf_generate(hf, batch, do_sample=False, max_new_tokens=64, eos_token_id=eos)
    n = ref_stop.shape[1]
    toks, mask = np.asarray(stop.tokens), np.asarray(stop.mask)
    np.testing.assert_array_equal(toks[:, :n], ref_stop)
    assert (toks[:, n:] == pad).all() and not mask[:, n:].any()
    lengths = [int(np.argmax(r == eos)) + 1 if (r == eos).any() else 64 for r in ref]
    np.testing.assert_array_equal(np.asarray(stop.num_tokens), lengths)
    np.testing.assert_array_equal(mask.sum(1), lengths)
    assert lengths[0] <= 20 and int(stop.steps) == max(lengths)


def test_early_exit_once_every_row_stopped(tiny):
    """When every row has emitted a stop token the loop exits before the budget."""
    _, batch, model = tiny
    free = sampler.generate(
        model, batch, rng=jax.random.key(0), max_new_tokens=16, temperature=0.0,
        eos_token_id=(), **F32,
    )  # fmt: skip
    toks = np.asarray(free.tokens)
    eos = sorted({int(t) for t in toks[:, 3]})  # every row stops at step <= 4
    out = sampler.generate(
        model, batch, rng=jax.random.key(0), max_new_tokens=16, temperature=0.0,
        eos_token_id=eos, **F32,
    )  # fmt: skip
    lengths = [int(np.flatnonzero(np.isin(r, eos))[0]) + 1 for r in toks]
    assert max(lengths) <= 4
    np.testing.assert_array_equal(np.asarray(out.num_tokens), lengths)
    assert int(out.steps) == max(lengths) < 16
    m = np.asarray(out.mask)
    np.testing.assert_array_equal(np.asarray(out.tokens)[m], toks[m])
    assert (np.asarray(out.logprobs)[~m] == 0).all()


def test_default_stop_ids_come_from_the_generation_config(tmp_path_factory, tmp_path):
    """Qwen2.5-VL-Instruct's generation_config.json lists two stop ids where config.json has
    one: the defaults are the generation config's (those transformers' `generate` stops on),
    and config.json's without that file."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny", generation_eos=INSTRUCT_EOS)
    tok = processing.load_processor(path).tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids(list(INSTRUCT_EOS))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["text_config"]["eos_token_id"] == im_end
    gen = _hf_model(path).generation_config
    assert list(gen.eos_token_id) == [im_end, endoftext]
    model = from_pretrained(path)
    assert sampler.default_token_ids(model) == ((im_end, endoftext), gen.pad_token_id)
    bare = tmp_path / "no_generation_config"
    shutil.copytree(path, bare)
    os.remove(bare / "generation_config.json")
    assert sampler.default_token_ids(from_pretrained(str(bare))) == ((im_end,), endoftext)


def test_greedy_stops_on_every_generation_config_eos(tmp_path_factory):
    """A checkpoint whose generation_config.json adds to config.json's `<|im_end|>` a second
    stop id, one that row 0 emits mid-way: with the checkpoint's default stop ids the greedy
    rollout stops there, as transformers' `generate` does on the same checkpoint."""
    n = 24
    plain = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(plain)
    free = _hf_generate(_hf_model(plain), batch, do_sample=False, max_new_tokens=n,
                        min_new_tokens=n)  # fmt: skip
    k = next(i for i in range(8, n) if free[0, i] not in free[0, :i])  # row 0's stop step
    second = int(free[0, k])
    path = tiny_checkpoint(
        tmp_path_factory, "qwen2_5_vl_tiny", generation_eos=("<|im_end|>", second)
    )
    model, hf = from_pretrained(path), _hf_model(path)
    im_end = model.cfg.hf_config["text_config"]["eos_token_id"]  # config.json's only one
    out = sampler.generate(model, batch, rng=jax.random.key(0), max_new_tokens=n,
                           temperature=0.0, **F32)  # fmt: skip
    ref = _hf_generate(hf, batch, do_sample=False, max_new_tokens=n)  # its own default stop ids
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    np.testing.assert_array_equal(toks[:, : ref.shape[1]], ref)
    stops = np.isin(ref, [im_end, second])
    lengths = np.where(stops.any(1), np.argmax(stops, 1) + 1, n)
    assert ref[0, lengths[0] - 1] == second and lengths[0] < n  # row 0 stops on the second id
    np.testing.assert_array_equal(np.asarray(out.num_tokens), lengths)
    np.testing.assert_array_equal(mask.sum(1), lengths)
    assert (toks[~mask] == hf.generation_config.pad_token_id).all()
    assert sampler.default_token_ids(model)[0] == (im_end, second)


# ----------------------------------------------------------------------------- acceptance 2


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (1.3, 12, 1.0), (1.3, 0, 0.7), (0.8, 40, 0.9)]
)
def test_next_token_distribution_chi_square(tiny, temperature, top_k, top_p):
    """8,192 draws of the first completion token (G = 4,096 completions of 2 prompts) follow
    the model's softmax after transformers' temperature / top-k / top-p warpers."""
    path, _, model = tiny
    g = 4096
    proc = processing.load_processor(path)
    sub = processing.encode_batch(
        proc,
        [processing.render_prompt(proc, q, num_images=1) for q in ("Find the red box.", "hi")],
        [testing.random_images(np.random.default_rng(3), [(60, 60)])] * 2,
    )
    out = sampler.generate(
        model, sub, rng=jax.random.key(7), num_generations=g, max_new_tokens=1,
        temperature=temperature, top_k=top_k, top_p=top_p, **F32,
    )  # fmt: skip
    first = np.asarray(out.tokens)[:, 0].reshape(2, g)
    logits = testing.hf_logits(path, sub)[:, -1]  # the reference model's next-token logits
    warpers = _hf_warpers(temperature, top_k, top_p, sampler.vision_token_ids(model))
    probs = torch.softmax(torch.tensor(warpers(logits)), -1)
    probs = probs.numpy().astype(np.float64)
    for b in range(2):
        counts = np.bincount(first[b], minlength=probs.shape[1])
        assert counts[probs[b] == 0].sum() == 0  # nothing outside the filtered support
        expected = probs[b] * g
        big = expected >= 5  # pool the rare tokens into one bin
        f_obs = np.append(counts[big], counts[~big].sum())
        f_exp = np.append(expected[big], expected[~big].sum())
        keep = f_exp > 0
        assert keep.sum() >= 3, "too peaked a distribution to test"
        p = stats.chisquare(f_obs[keep], f_exp[keep] * f_obs.sum() / f_exp[keep].sum()).pvalue
        assert p > 1e-3, (b, p)
    # The returned log-probs are those of the sampling distribution.
    lp = np.asarray(out.logprobs)[:, 0].reshape(2, g)
    want = np.log(np.take_along_axis(probs, first, axis=1))
    # float32 log-prob parity with transformers, logits of scale max|z| / temperature.
    atol = testing.logprob_atol(float(np.abs(logits).max()) / temperature, logits.shape[-1])
    np.testing.assert_allclose(lp, want, atol=atol, rtol=0)


@nnx.jit(static_argnums=5)
def _cached_forward(m, ids, pixels, grid, mask, cache_dtype):
    """Logits f32[B, T, V] of one prefill of `ids` into a KV cache of `cache_dtype`: every
    query attends to the cache's rounded keys and values, as the sampler's decoding does."""
    pos, _ = m.rope_index(ids, grid, mask)
    x = m.embed(ids, m.encode_images(pixels, grid), grid, mask)
    cache = qwen_vl.init_cache(m.cfg, ids.shape[0], ids.shape[1], cache_dtype)
    h, _ = m.decode(x, pos, mask, cache, jnp.int32(0))
    return m.logits(h)


def _teacher_forced(model, batch, out, g, n, temperature, top_k, top_p, cache_dtype=None):
    """Log-probs f32[B*G, n] of the rollout's tokens recomputed by a teacher-forced forward
    over prompt + completion after transformers' warpers; with the bool[B*G, n] tokens to
    compare and the scale max|z| / T of the (tempered) logits. The forward is the float32
    full forward (the one the GRPO loss uses), or, with `cache_dtype`, a prefill through a KV
    cache of that dtype (`QwenVL.decode`)."""
    toks, mask = np.asarray(out.tokens)[:, :n], np.asarray(out.mask)[:, :n]
    rep = sampler.repeat_prompts(batch, g, model.cfg.image_token_id)
    # A generated <|image_pad|> would be read as an image placeholder by a full forward: the
    # comparison of such a row stops at that token (it is replaced by padding in the input).
    img = toks == model.cfg.image_token_id
    cut = np.where(img.any(1), np.argmax(img, 1) + 1, n)
    toks_in = np.where(img, 0, toks)
    ids = np.concatenate([rep["input_ids"], toks_in], 1)
    am = np.concatenate([rep["attention_mask"], mask.astype(np.int32)], 1)
    args = (model, ids, rep["pixel_values"], rep["image_grid_thw"], am)
    if cache_dtype is None:
        logits = np.asarray(testing.jit_forward()(*args))
    else:
        logits = np.asarray(_cached_forward(*args, jnp.dtype(cache_dtype).name))
    t = rep["input_ids"].shape[1]
    step_logits = logits[:, t - 1 : t - 1 + n].reshape(-1, logits.shape[-1])
    warpers = _hf_warpers(temperature, top_k, top_p, sampler.vision_token_ids(model))
    warped = torch.tensor(warpers(step_logits))
    want = torch.log_softmax(warped, -1).numpy().reshape(toks.shape[0], n, -1)
    want = np.take_along_axis(want, toks[..., None], -1)[..., 0]
    check = mask & (np.arange(n)[None] < cut[:, None])
    assert check.sum() >= 0.8 * mask.size  # a generated <|image_pad|> cuts few rows
    scale = float(np.abs(step_logits).max()) / (temperature or 1.0)
    return want, check, scale


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 30, 0.85)]
)
def test_logprobs_equal_teacher_forced_forward(tiny, temperature, top_k, top_p):
    """The sampler's per-token log-probs (greedy: of the untempered model) equal log-probs
    recomputed by a teacher-forced full forward over prompt + completion, after transformers'
    warpers."""
    _, batch, model = tiny
    g, n = 2, 24
    out = sampler.generate(
        model, batch, rng=jax.random.key(1), num_generations=g, max_new_tokens=n,
        temperature=temperature, top_k=top_k, top_p=top_p, **F32,
    )  # fmt: skip
    want, check, scale = _teacher_forced(model, batch, out, g, n, temperature, top_k, top_p)
    got = np.asarray(out.logprobs)[:, :n]
    # float32 log-prob parity: cached decoding vs a full forward over the same tokens.
    atol = testing.logprob_atol(scale, model.cfg.vocab_size)
    np.testing.assert_allclose(got[check], want[check], atol=atol, rtol=0)


# ----------------------------------------------------------------------------- acceptance 3


class _CountingQwenVL(QwenVL):
    """QwenVL that records, at trace time, the shapes its vision tower and decoder see and,
    at run time, how often the vision tower runs."""

    calls: ClassVar[list] = []

    def encode_images(self, pixel_values, image_grid_thw):
        _CountingQwenVL.calls.append(("vision", pixel_values.shape))
        jax.debug.callback(lambda: _CountingQwenVL.calls.append(("vision_run",)))
        return super().encode_images(pixel_values, image_grid_thw)

    def decode(self, inputs_embeds, *args, **kwargs):
        _CountingQwenVL.calls.append(("decode", inputs_embeds.shape))
        return super().decode(inputs_embeds, *args, **kwargs)


def test_prefix_is_shared_and_equals_the_unshared_path(tiny):
    """With G = 4 the vision tower encodes the P patches of the B prompts once and the prefill
    runs on B rows (not B * G); the result equals generating for each prompt repeated G times
    (images re-encoded per completion, as the reference does)."""
    path, batch, _ = tiny
    g = 4
    model = from_pretrained(path)
    model.__class__ = _CountingQwenVL  # a new graph type: traced afresh, with the probes
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, **F32)
    pb = sampler.pad_batch(batch, pad_token_id=0)
    b, t = pb["input_ids"].shape
    p = pb["pixel_values"].shape[0]

    _CountingQwenVL.calls = []
    shared = sampler.generate(model, batch, rng=jax.random.key(5), num_generations=g, **kw)
    jax.block_until_ready(shared)
    calls = _CountingQwenVL.calls
    assert [c for c in calls if c[0] == "vision"] == [("vision", pb["pixel_values"].shape)]
    assert calls.count(("vision_run",)) == 1
    decodes = [c[1] for c in calls if c[0] == "decode"]
    assert decodes[0][:2] == (b, t)  # the prefill: B prompts
    assert all(d[:2] == (b * g, 1) for d in decodes[1:])  # decode steps: B * G rows, 1 token

    _CountingQwenVL.calls = []
    rep = sampler.repeat_prompts(batch, g, model.cfg.image_token_id)
    unshared = sampler.generate(model, rep, rng=jax.random.key(5), num_generations=1, **kw)
    jax.block_until_ready(unshared)
    calls = _CountingQwenVL.calls
    (vision,) = [c for c in calls if c[0] == "vision"]
    assert vision[1][0] >= g * (batch["pixel_values"].shape[0]) > p  # G x the patches
    assert next(c[1][:2] for c in calls if c[0] == "decode") == (b * g, t)

    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(unshared.tokens))
    np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(unshared.mask))
    # float32 log-prob parity of two batch layouts (temperature 1: logits of the tiny scale).
    atol = testing.logprob_atol(testing.TINY_LOGIT_SCALE, model.cfg.vocab_size)
    np.testing.assert_allclose(
        np.asarray(shared.logprobs), np.asarray(unshared.logprobs), atol=atol, rtol=0
    )
    # Completions differ within a group (they are sampled, not copied).
    toks = np.asarray(shared.tokens).reshape(b, g, -1)
    assert all(len({r.tobytes() for r in toks[i]}) > 1 for i in range(b))


# ----------------------------------------------------------------------------- acceptance 4


def test_varied_prompts_compile_no_more_programs_than_buckets(tiny):
    """Prompts of varied lengths and image sizes, several budgets: the number of XLA
    compilations equals the number of distinct (prompt, patch, image, completion) buckets hit
    and stays below the number of bucket combinations."""
    path, _, model = tiny
    proc = processing.load_processor(path)
    rng = np.random.default_rng(0)
    buckets = dict(
        prompt_buckets=(64, 128, 256), patch_buckets=(256, 512, 1024), image_buckets=(2, 4)
    )
    completion_buckets = (8, 16)
    bound = 3 * 3 * 2 * 2
    runs, hit = [], set()
    for i in range(7):
        sizes = [tuple(int(s) for s in rng.integers(40, 230, 2)) for _ in range(1 + i % 2)]
        q = "Locate the cat. " * int(rng.integers(1, 12))
        texts = [processing.render_prompt(proc, q, num_images=len(sizes)), "hi"]
        texts[1] = processing.render_prompt(proc, texts[1], num_images=0)
        batch = processing.encode_batch(proc, texts, [testing.random_images(rng, sizes), []])
        max_new = int(rng.choice([5, 8, 12]))
        runs.append((batch, max_new))
        pb = sampler.pad_batch(batch, pad_token_id=0, **buckets)
        hit.add(
            (pb["input_ids"].shape, pb["pixel_values"].shape, pb["image_grid_thw"].shape,
             sampler.bucket(max_new, completion_buckets))
        )  # fmt: skip
    assert len({(b["input_ids"].shape, b["pixel_values"].shape) for b, _ in runs}) == 7

    compiles = []

    def listener(event, duration, **kwargs):
        if event in host.COMPILE_EVENTS:  # compiled, or loaded from the persistent cache
            compiles.append(event)

    before = sampler.compile_count()
    rngs = [jax.random.key(i) for i in range(len(runs))]  # created before counting
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for (batch, max_new), key in zip(runs, rngs, strict=True):
            out = sampler.generate(
                model, batch, rng=key, max_new_tokens=max_new, temperature=0.0,
                completion_buckets=completion_buckets, **buckets,
            )  # fmt: skip
            assert out.tokens.shape == (2, sampler.bucket(max_new, completion_buckets))
            assert int(out.steps) <= max_new
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sampler.compile_count() - before == len(hit) == len(compiles)
    assert 1 < len(hit) < bound


# ----------------------------------------------------------------------------- sharding, types


def test_sharded_equals_unsharded(tiny):
    """On a (2, 2, 2) mesh of 8 simulated devices, with the training rules: same tokens, same
    log-probs, outputs spread over all 8 devices."""
    path, batch, model = tiny
    kw = dict(num_generations=4, max_new_tokens=10, temperature=1.0, top_p=0.9, **F32)
    ref = sampler.generate(model, batch, rng=jax.random.key(2), **kw)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        sharded_model = from_pretrained(path, mesh=mesh)
        out = sampler.generate(sharded_model, batch, rng=jax.random.key(2), **kw)
    assert len(out.tokens.sharding.device_set) == 8
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    # float32 log-prob parity, sharded vs not (temperature 1: logits of the tiny scale).
    atol = testing.logprob_atol(testing.TINY_LOGIT_SCALE, model.cfg.vocab_size)
    np.testing.assert_allclose(
        np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=atol, rtol=0
    )


def test_rollout_is_a_pytree_and_bf16_cache_tracks_float32(tiny):
    """`Rollout` crosses jit as a pytree (G static). The default bf16 KV cache: its log-probs
    equal a teacher-forced prefill through a bf16 cache (the same rounded keys and values) at
    float32 parity, and a float32 teacher-forced forward within the bf16 rounding of the
    cached keys and values."""
    _, batch, model = tiny
    g, n = 2, 16
    out = sampler.generate(model, batch, rng=jax.random.key(0), num_generations=g,
                           max_new_tokens=n)  # fmt: skip
    assert out.tokens.dtype == jnp.int32 and out.tokens.shape == (6, 16)
    assert out.mask.dtype == jnp.bool_ and out.logprobs.dtype == jnp.float32
    assert len(jax.tree.leaves(out)) == 6  # tokens, mask, logprobs, num_tokens, steps, entropy
    doubled = jax.jit(lambda r: dataclasses.replace(r, logprobs=2 * r.logprobs))(out)
    assert doubled.num_generations == 2
    np.testing.assert_array_equal(np.asarray(doubled.logprobs), 2 * np.asarray(out.logprobs))
    got = np.asarray(out.logprobs)[:, :n]
    want, check, scale = _teacher_forced(model, batch, out, g, n, 1.0, 0, 1.0, jnp.bfloat16)
    # float32 log-prob parity: both sides round the same float32 keys and values to bf16 (up
    # to float32 rounding, which moves a value across a bf16 rounding boundary only rarely).
    atol = testing.logprob_atol(scale, model.cfg.vocab_size)
    np.testing.assert_allclose(got[check], want[check], atol=atol, rtol=0)
    want, check, scale = _teacher_forced(model, batch, out, g, n, 1.0, 0, 1.0)
    # Against float32 K/V: each text layer rounds its cached K and V to bf16 (relative error
    # <= 2^-9 each): to first order the logits move by <= 2 x layers x 2^-9 of their scale, a
    # log-prob by twice that (0.068 here; measured 0.0017).
    atol = 2 * (2 * model.cfg.num_layers * testing.BF16_U * scale)
    np.testing.assert_allclose(got[check], want[check], atol=atol, rtol=0)


def test_text_only_batch_and_device_arrays_share_a_program(tiny):
    """A batch without images generates; the same batch as device arrays reuses the program
    compiled for the host arrays and gives the same rollout."""
    path, _, model = tiny
    proc = processing.load_processor(path)
    texts = [processing.render_prompt(proc, q, num_images=0) for q in ("hello there", "x")]
    batch = processing.encode_batch(proc, texts, [[], []])
    assert batch["pixel_values"].shape[0] == 0
    kw = dict(num_generations=3, max_new_tokens=5, temperature=1.0)
    before = sampler.compile_count()
    out = sampler.generate(model, batch, rng=jax.random.key(0), **kw)
    on_device = {k: jnp.asarray(v) for k, v in batch.items()}
    again = sampler.generate(model, on_device, rng=jax.random.key(0), **kw)
    assert sampler.compile_count() - before == 1
    assert out.tokens.shape == (6, 16) and (np.asarray(out.num_tokens) >= 1).all()
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
