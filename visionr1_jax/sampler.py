"""Rollout sampler: the training graph generates its own completions.

GRPO spends most of its time generating. We generate with the same `QwenVL` graph and the same
parameters that we train, so there is nothing to sync between a trainer and an inference engine
and no numerical mismatch between the sampling and the training policy.

One jitted program per bucket does the whole rollout of B prompts x G completions:

1. **Encode once.** The packed images of the B prompts go through the vision tower once
   (`model.encode_images`), the B prompts are embedded and prefilled once into a preallocated
   prompt KV cache `[B, T, KV, hd]` (dtype `cache_dtype`, bf16 by default).
2. **Share the prefix.** The prompt cache is shared, not copied, by the G completions of each
   group (row `b * G + g` is completion g of prompt b): each decode step attends to the prompt
   keys `[B, T]` once per group and to the row's own completion keys `[B*G, L]`, with one
   softmax over both (`decode_step`). The last prompt logits and the M-RoPE deltas are
   broadcast. Nothing of the prompt is recomputed per completion (the Vision-R1 / TRL
   reference re-encodes the image and prefills the prompt for every completion).
3. **Decode** in a `lax.while_loop`: sample a token per row (suppressed tokens removed first,
   then greedy, or temperature -> top-k -> top-p as transformers' logits warpers, then
   inverse-CDF sampling with one uniform per row),
   record its log-prob under the sampling distribution, stop rows at EOS, feed the token back
   at M-RoPE position `n_real_prompt_tokens + i + rope_delta` (Qwen2-VL paper, Sec. 2.1: text
   after the image advances all three axes together). The loop exits once every row has
   stopped or after `max_new_tokens` steps.

Randomness: row r at step i uses the key `fold_in(fold_in(rng, r), i)`, so a rollout does not
depend on the mesh nor on whether the prefix is shared (both are tested).

Suppressed tokens: by default the vision special tokens (`<|image_pad|>`, `<|video_pad|>`,
`<|vision_start|>`, `<|vision_end|>`, as the checkpoint config names them) are never sampled:
their logits are set to -inf before any warper and before greedy's argmax (transformers'
`generate(suppress_tokens=...)`), and the recorded log-probs are those of this masked
distribution. A completion token is text to the model anyway (`decode_step` embeds it as
text, and so does `models.logprobs.completion_logprobs`), but a sampled `<|image_pad|>` would
be read as an image placeholder by a naive full forward over prompt + completion, and no image
token in an answer is meaningful. `suppress_token_ids=()` turns this off.

Shapes are static: the prompt length T, the packed patch count P, the number of image slots I
and the completion length L are padded up to buckets on the host (numpy, before the program), so
a run compiles at most one program per combination of buckets (and batch size / sampling mode).
Programs are compiled ahead of time and cached here; `compile_count()` is the number compiled so
far (exposed to metrics), each compilation is logged with its bucket shapes.

    rollout = generate(model, batch, rng=jax.random.key(0), num_generations=4,
                       max_new_tokens=128, temperature=1.0)
    rollout.tokens      # i32[B*G, L]
    rollout.mask        # bool[B*G, L]
    rollout.logprobs    # f32[B*G, L]

Sharding: the program runs under the caller's mesh (`with jax.set_mesh(mesh)`), with the same
logical axis rules as training; the batch axis of the cache and of every per-row array is
constrained to the `batch` rule (mesh axes `data`, `fsdp`), KV heads to `act_kv_heads`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visionr1_jax import sharding
from visionr1_jax.models import qwen_vl, rope

log = logging.getLogger(__name__)

# Default buckets. A run whose prompts, images and budgets vary compiles at most one program
# per (prompt, patch, image, completion) bucket combination. Prompt lengths step by 64 up to
# 1024 (a power-of-two step wasted 1.5x prefill on typical ~170-token prompts), then double.
PROMPT_BUCKETS = (16, 32, *range(64, 1024, 64), *(2**i for i in range(10, 16)))
PATCH_BUCKETS = tuple(2**i for i in range(4, 20))  # 16 .. 524288 patches (multiples of 4)
IMAGE_BUCKETS = tuple(2**i for i in range(0, 10))  # 1 .. 512 image slots
COMPLETION_BUCKETS = tuple(2**i for i in range(4, 16))  # 16 .. 32768 new tokens


@dataclasses.dataclass(frozen=True)
class Rollout:
    """G completions per prompt, grouped by prompt: row `b * G + g` is completion g of prompt b.

    Attributes:
      tokens: i32[B*G, L] sampled tokens; `pad_token_id` after a row stopped (L is the
        completion bucket >= max_new_tokens).
      mask: bool[B*G, L] True for generated tokens, including the EOS token that stopped a row.
      logprobs: f32[B*G, L] log-prob of each sampled token under the sampling distribution
        (suppressed tokens removed, then tempered, top-k/top-p filtered logits; the untempered
        model for greedy); 0 where masked.
      entropy: f32[B*G, L] entropy (nats) of the sampling distribution each token was drawn
        from (the same filtered, tempered distribution; 0 for greedy); 0 where masked.
      num_tokens: i32[B*G] generated tokens per row (`mask.sum(1)`).
      steps: i32[] decode-loop iterations run (the longest row; < max_new_tokens on early exit).
      num_generations: G (static).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    num_tokens: jax.Array
    steps: jax.Array
    entropy: jax.Array
    num_generations: int = dataclasses.field(default=1, metadata=dict(static=True))


jax.tree_util.register_dataclass(
    Rollout,
    data_fields=["tokens", "mask", "logprobs", "num_tokens", "steps", "entropy"],
    meta_fields=["num_generations"],
)


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Top-k then top-p (nucleus) filtering, as transformers' `TopKLogitsWarper` and
    `TopPLogitsWarper`: removed entries become -inf.

    Top-k keeps logits >= the k-th largest (ties kept); top-p keeps the smallest prefix of the
    descending order whose probability mass reaches `top_p` (a token is kept if the mass strictly
    before it is < top_p; the most likely token is always kept).

    Args:
      logits: f32[R, V] (already divided by the temperature).
      top_k: static, 0 = off.
      top_p: f32[] or None (off).
    Returns:
      f32[R, V].
    """
    v = logits.shape[-1]
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    k = v if top_k <= 0 else min(top_k, v)
    if top_k <= 0 and top_p is None:
        return logits
    # Sorted candidates: the top-k (or the whole vocabulary when only top-p is on).
    vals, _ = jax.lax.top_k(logits, k)  # [R, k] descending
    # XLA:CPU otherwise fuses the slice of the k-th value into the top-k and lowers it as a
    # full sort of the vocabulary (913 ms vs 7.8 ms for 8 x 151,936 logits; BENCHMARKS.md).
    vals = jax.lax.optimization_barrier(vals)
    if top_k > 0:
        logits = jnp.where(logits < vals[:, -1:], neg, logits)
    if top_p is not None:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < top_p
        keep = keep.at[:, 0].set(True)
        n_keep = keep.sum(-1)
        threshold = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    *,
    greedy: bool,
    temperature: jax.Array,
    top_k: int,
    top_p: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """One token per row, its log-prob under the sampling distribution and that
    distribution's entropy.

    Args:
      logits: f32[R, V] model logits; keys: [R] one PRNG key per row.
      greedy: static; argmax, with log-probs of the untempered softmax.
      temperature: f32[]; top_k: static (0 = off); top_p: f32[] or None (off).
    Returns:
      tokens i32[R], logprobs f32[R], entropy f32[R] (`-Σ p log p` over the tokens the
      filters keep; 0 for greedy, whose distribution is the argmax).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = jax.nn.log_softmax(logits, axis=-1)
        entropy = jnp.zeros(tok.shape, jnp.float32)
    else:
        scaled = filter_logits(logits / temperature, top_k, top_p)
        lp = jax.nn.log_softmax(scaled, axis=-1)
        probs = jnp.exp(lp)
        tok = _inverse_cdf(probs, jax.vmap(jax.random.uniform)(keys))
        entropy = -jnp.sum(jnp.where(probs > 0, probs * lp, 0.0), axis=-1)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], entropy


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """i32[R]: token j with cdf[j-1] <= u * cdf[-1] < cdf[j] for probs f32[R, V], u f32[R] in
    [0, 1). One uniform per row instead of V Gumbel draws (the sampling step's main cost on
    CPU); a zero-probability token is never returned."""
    cdf = jnp.cumsum(probs, axis=-1)
    tok = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    v = probs.shape[-1]
    last = v - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)  # last token with mass
    return jnp.minimum(tok, last).astype(jnp.int32)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that selects a program besides the argument shapes."""

    num_generations: int
    completion_len: int
    greedy: bool
    top_k: int
    use_top_p: bool
    pad_id: int
    cache_dtype: str
    suppress_ids: tuple[int, ...] = ()  # never sampled (logits -> -inf before any warper)


def _rollout(graphdef, state, ids, mask, pixels, grid, rng, max_new, temperature, top_p, eos, st):
    """The rollout of B prompts x G completions (traced once per bucket; see module doc).

    Stages: 1. encode the images and prefill the prompts (`prefill`); 2. share the prefix
    with the G completions of each group; 3. decode (`_decode`); 4. mask each row after its
    first EOS (`_finish`).

    Args:
      ids, mask: i32[B, T] prompt tokens / validity (any padding side); pixels f32[P, F]
      with grid i32[I, 3] (packed), or f32[B, S, F] with i32[B, 3] (per row); rng: PRNG key;
      max_new: i32[] token budget (<= L); temperature, top_p: f32[]; eos: i32[E] stop tokens
      (-1: none); st: `_Static`.
    Returns:
      `Rollout` with [B*G, L] arrays.
    """
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    rules = cfg.logical_axis_rules
    g = st.num_generations
    r = ids.shape[0] * g
    cache_dtype = jnp.dtype(st.cache_dtype)
    ids = sharding.constrain(ids, ("batch", "length"), rules)
    mask = sharding.constrain(mask, ("batch", "length"), rules)

    # 1. Encode the images and prefill the prompts, once per prompt.
    logits, prompt_kv, delta = prefill(model, ids, mask, pixels, grid, cache_dtype)

    # 2. Share the prefix with the G completions of each group (row b * G + g): the prompt
    # KV cache stays [B, T] and is read once per group; completions get their own [B*G, L].
    logits = sharding.constrain(jnp.repeat(logits, g, axis=0), ("batch", "act_vocab"), rules)
    gen_kv = _constrain_cache(qwen_vl.init_cache(cfg, r, st.completion_len, cache_dtype), rules)
    next_pos = jnp.repeat(mask.sum(1).astype(jnp.int32) + delta[:, 0], g)  # position of token 0
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(r))
    prompt = (prompt_kv, mask.astype(bool))

    # 3. Decode until every row stopped or the budget is spent.
    sampling = (max_new, temperature, top_p if st.use_top_p else None, eos)
    steps, tokens, logps, ents = _decode(
        model, st, logits, gen_kv, prompt, next_pos, row_keys, sampling
    )

    # 4. A row's tokens are valid up to and including its first EOS, within the steps run.
    return _finish(tokens, logps, ents, steps, eos, st, rules)


def _decode(model, st, logits, gen_kv, prompt, next_pos, row_keys, sampling):
    """Stage 3 of `_rollout`: the decode loop of B*G rows (a `lax.while_loop`).

    Each step samples a token per row from `logits` f32[B*G, V] (suppressed tokens removed
    first, `sample_tokens`), records it with its log-prob and entropy, stops rows at EOS and
    feeds the token back at M-RoPE position `next_pos + i` (`decode_step`). The loop exits once
    every row has stopped or after `max_new` steps.

    Args:
      model, st: the policy and the `_Static` options; gen_kv: the completion caches
      [B*G, L]; prompt: (prompt KV cache [B, T], prompt validity bool[B, T]); next_pos:
      i32[B*G] position of token 0; row_keys: one PRNG key per row; sampling: (max_new i32[],
      temperature f32[], top_p f32[] or None, eos i32[E]).
    Returns:
      steps i32[] run, tokens i32[B*G, L] (`st.pad_id` after a row stopped), log-probs and
      entropies f32[B*G, L] (0 after a row stopped).
    """
    rules = model.cfg.logical_axis_rules
    prompt_kv, prompt_valid = prompt
    max_new, temperature, top_p, eos = sampling
    r, big_l = next_pos.shape[0], st.completion_len
    suppressed = None
    if st.suppress_ids:  # a constant of the program: the ids are static (stable over a run)
        suppressed = np.zeros((model.cfg.vocab_size,), bool)
        suppressed[list(st.suppress_ids)] = True

    def cond(c):
        i, _, _, _, _, _, done = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, logits, gen_kv, tokens, logps, ents, done = c
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
        if suppressed is not None:
            logits = jnp.where(suppressed, -jnp.inf, logits.astype(jnp.float32))
        tok, lp, ent = sample_tokens(
            logits, keys, greedy=st.greedy, temperature=temperature, top_k=st.top_k,
            top_p=top_p,
        )  # fmt: skip
        tok = jnp.where(done, st.pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, lp[:, None], (0, i))
        ents = jax.lax.dynamic_update_slice(ents, jnp.where(done, 0.0, ent)[:, None], (0, i))
        done = done | jnp.isin(tok, eos)
        p = jnp.broadcast_to((next_pos + i)[None, :, None], (3, r, 1))
        h, gen_kv = decode_step(model, tok, p, prompt_kv, prompt_valid, gen_kv, i)
        logits = sharding.constrain(model.logits(h), ("batch", "act_vocab"), rules)
        return i + 1, logits, _constrain_cache(gen_kv, rules), tokens, logps, ents, done

    tokens = jnp.full((r, big_l), st.pad_id, jnp.int32)
    logps = jnp.zeros((r, big_l), jnp.float32)
    done = jnp.zeros((r,), bool)
    carry = (jnp.int32(0), logits, gen_kv, tokens, logps, logps, done)
    steps, _, _, tokens, logps, ents, _ = jax.lax.while_loop(cond, body, carry)
    return steps, tokens, logps, ents


def _finish(tokens, logps, ents, steps, eos, st, rules) -> Rollout:
    """Stage 4 of `_rollout`: the `Rollout`, a row's tokens valid up to and including its
    first EOS, within the `steps` run; log-probs and entropies zeroed elsewhere."""
    big_l = st.completion_len
    ar = jnp.arange(big_l)[None]
    is_eos = jnp.isin(tokens, eos) & (ar < steps)
    first_eos = jnp.min(jnp.where(is_eos, ar, big_l), axis=1)
    num = jnp.minimum(first_eos + 1, steps).astype(jnp.int32)
    out_mask = ar < num[:, None]
    names = ("batch", None)
    return Rollout(
        tokens=sharding.constrain(tokens, names, rules),
        mask=sharding.constrain(out_mask, names, rules),
        logprobs=sharding.constrain(jnp.where(out_mask, logps, 0.0), names, rules),
        num_tokens=num,
        steps=steps,
        entropy=sharding.constrain(jnp.where(out_mask, ents, 0.0), names, rules),
        num_generations=st.num_generations,
    )


def prefill(
    model: qwen_vl.QwenVL,
    ids: jax.Array,
    mask: jax.Array,
    pixels: jax.Array,
    grid: jax.Array,
    cache_dtype: Any = jnp.bfloat16,
) -> tuple[jax.Array, qwen_vl.Cache, jax.Array]:
    """Encodes the images and runs the B prompts through the decoder once (the rollout's
    first phase; `tools.aot` compiles it alone to cost it).

    Args: as `_rollout` (ids, mask i32[B, T]; pixels and grid packed or per row, or empty).
    Returns:
      logits f32[B, V] at each prompt's last valid token, the prompt KV cache (per layer
      {"k", "v": [B, T, KV, hd]} in `cache_dtype`) and the M-RoPE position delta i32[B, 1].
    """
    cfg = model.cfg
    b, t = ids.shape
    per_row = pixels.ndim == 3
    pos, delta = model.rope_index(ids, grid, mask, per_row)
    emb = model.encode_images(pixels, grid) if pixels.size else None
    x = model.embed(ids, emb, grid, mask)
    cache = qwen_vl.init_cache(cfg, b, t, jnp.dtype(cache_dtype))
    prompt_kv = _constrain_cache(cache, cfg.logical_axis_rules)
    h, prompt_kv = model.decode(x, pos, mask, prompt_kv, jnp.int32(0))
    last = jnp.max(jnp.where(mask.astype(bool), jnp.arange(t)[None], 0), axis=1)  # [B]
    logits = model.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])  # [B, V]
    return logits, prompt_kv, delta


def decode_step(
    model: qwen_vl.QwenVL,
    tokens: jax.Array,
    position_ids: jax.Array,
    prompt_kv: qwen_vl.Cache,
    prompt_valid: jax.Array,
    gen_kv: qwen_vl.Cache,
    index: jax.Array,
) -> tuple[jax.Array, qwen_vl.Cache]:
    """One decoding step of B*G rows against a shared prompt cache and per-row completion caches.

    The same computation as `QwenVL.decode` with a cache (its layers, norms, rotary and the
    float32-score attention), except that attention is split over two key sets: the prompt
    keys `[B, T]`, shared by the G rows of a group (read once per group, never copied G times),
    and the completion keys `[B*G, L]` of each row. One softmax runs over their concatenated
    scores, so the result equals attention over `concat(prompt, completion)`.

    The rows' activations carry no sharding constraint here (the caches keep theirs): the
    partitioner then keeps each device's FSDP shard of the weights where it is and moves the
    [B*G, D] activations instead, where rows sharded like the batch make every device
    all-gather every weight at every step. Qwen2.5-VL-7B on v4-64 (`tools/aot.py`): 3.24 GiB
    read per device and step instead of 16.06 (2.8 ms instead of 14 ms at HBM bandwidth).

    Args:
      tokens: i32[B*G] the tokens just sampled; position_ids: i32[3, B*G, 1] their M-RoPE ids.
      prompt_kv: per layer {"k", "v": [B, T, KV, hd]}; prompt_valid: bool[B, T].
      gen_kv: per layer {"k", "v": [B*G, L, KV, hd]}; index: i32[] slot of `tokens` in gen_kv.
    Returns:
      final-norm hidden states f32[B*G, D] and the updated completion caches.
    """
    cfg = model.cfg
    b, t = prompt_valid.shape
    r = tokens.shape[0]
    g, big_l = r // b, gen_kv[0]["k"].shape[1]
    h_n, kv_n, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hg = h_n // kv_n
    x = model.embed(tokens[:, None])  # [R, 1, D]
    cos, sin = rope.mrope_cos_sin(position_ids, hd, cfg.rope_theta, cfg.mrope_section)
    neg = jnp.finfo(jnp.float32).min
    gen_valid = jnp.arange(big_l) <= index  # [L]
    new_kv = []
    for layer, pkv, gkv in zip(model.model.layers, prompt_kv, gen_kv, strict=True):
        attn = layer.self_attn
        y = layer.input_layernorm(x)
        q = attn.q_proj(y).reshape(r, 1, h_n, hd)
        k = attn.k_proj(y).reshape(r, 1, kv_n, hd)
        v = attn.v_proj(y).reshape(r, 1, kv_n, hd)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        gk = jax.lax.dynamic_update_slice(gkv["k"], k.astype(gkv["k"].dtype), (0, index, 0, 0))
        gv = jax.lax.dynamic_update_slice(gkv["v"], v.astype(gkv["v"].dtype), (0, index, 0, 0))
        new_kv.append({"k": gk, "v": gv})
        # Query head h = kv * hg + j attends with KV head kv (grouped-query attention).
        qx = q.reshape(b, g, kv_n, hg, hd)
        dt = q.dtype
        s_p = jnp.einsum(
            "bgkjd,btkd->bgkjt", qx, pkv["k"].astype(dt), preferred_element_type=jnp.float32
        )
        s_g = jnp.einsum(
            "bgkjd,bglkd->bgkjl", qx, gk.astype(dt).reshape(b, g, big_l, kv_n, hd),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        s_p = jnp.where(prompt_valid[:, None, None, None, :], s_p * hd**-0.5, neg)
        s_g = jnp.where(gen_valid, s_g * hd**-0.5, neg)
        pr = jax.nn.softmax(jnp.concatenate([s_p, s_g], axis=-1), axis=-1).astype(dt)
        o = jnp.einsum(
            "bgkjt,btkd->bgkjd", pr[..., :t], pkv["v"].astype(dt),
            preferred_element_type=jnp.float32,
        ) + jnp.einsum(
            "bgkjl,bglkd->bgkjd", pr[..., t:], gv.astype(dt).reshape(b, g, big_l, kv_n, hd),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        x = x + attn.o_proj(o.astype(x.dtype).reshape(r, 1, h_n * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)[:, 0], new_kv


def _constrain_cache(cache: qwen_vl.Cache, rules) -> qwen_vl.Cache:
    names = ("batch", "length", "act_kv_heads", None)
    return [{k: sharding.constrain(v, names, rules) for k, v in layer.items()} for layer in cache]


# ----------------------------------------------------------------------------- compilation


_PROGRAMS: dict[Any, Any] = {}
_LOCK = threading.Lock()
_JITTED = jax.jit(_rollout, static_argnums=(0, 11))


def compile_count() -> int:
    """Number of rollout programs compiled in this process (one per bucket combination)."""
    return len(_PROGRAMS)


def clear_cache() -> None:
    """Forgets the compiled programs (and resets `compile_count`)."""
    with _LOCK:
        _PROGRAMS.clear()


def _signature(tree) -> tuple:
    def sig(x):
        sh = getattr(x, "sharding", None)
        dtype = str(np.asarray(x).dtype if sh is None else x.dtype)
        if isinstance(sh, jax.sharding.SingleDeviceSharding):
            sh = None  # host arrays and single-device arrays run the same program
        return (tuple(np.shape(x)), dtype, sh)

    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(sig(x) for x in leaves)


def _program(graphdef, args, st: _Static):
    """The compiled program for these argument shapes/shardings and static options."""
    mesh = jax.sharding.get_abstract_mesh()
    key = (graphdef, _signature(args), st, None if mesh is None or mesh.empty else mesh)
    with _LOCK:
        prog = _PROGRAMS.get(key)
        if prog is None:
            ids, _, pixels, grid = args[1:5]
            log.info(
                "sampler: compiling program %d (B=%d, T=%d, P=%d, I=%d, G=%d, L=%d, %s, "
                "suppress=%s)",
                len(_PROGRAMS) + 1, ids.shape[0], ids.shape[1], pixels.shape[0], grid.shape[0],
                st.num_generations, st.completion_len,
                "greedy" if st.greedy else f"top_k={st.top_k} top_p={st.use_top_p}",
                list(st.suppress_ids),
            )  # fmt: skip
            prog = _JITTED.lower(graphdef, *args, st).compile()
            _PROGRAMS[key] = prog
    return prog


# ----------------------------------------------------------------------------- host side


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets ascending); raises if none fits."""
    i = bisect.bisect_left(list(buckets), n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def completion_width(
    max_new_tokens: int, completion_buckets: Sequence[int] | None = COMPLETION_BUCKETS
) -> int:
    """L of a rollout's `[B*G, L]` arrays: the completion bucket of `max_new_tokens` (itself
    when `completion_buckets` is None)."""
    return bucket(max_new_tokens, completion_buckets) if completion_buckets else max_new_tokens


def pad_batch(
    batch: Mapping[str, Any],
    *,
    pad_token_id: int,
    prompt_buckets: Sequence[int] | None = PROMPT_BUCKETS,
    patch_buckets: Sequence[int] | None = PATCH_BUCKETS,
    image_buckets: Sequence[int] | None = IMAGE_BUCKETS,
) -> dict[str, Any]:
    """Pads a processor batch up to the buckets, on the host (None: keep that size).

    Prompts are padded on the left (masked), packed patches and image-grid rows with zeros
    (ignored by the model). Per-row images (the input pipeline's `pixel_values f32[B, S, F]`,
    `image_grid_thw i32[B, 3]`) are already bucketed by the pipeline and pass unchanged. Arrays
    already at a bucket size are passed through untouched (device arrays from the input
    pipeline stay on the device).

    Returns:
      input_ids i32[B, T'], attention_mask i32[B, T'], and pixel_values f32[P', F] with
      image_grid_thw i32[I', 3] (packed) or the per-row pair as given.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch.get("pixel_values")
    grid = batch.get("image_grid_thw")
    if pixels is None:
        pixels = np.zeros((0, 0), np.float32)
        grid = np.zeros((0, 3), np.int32)
    t = ids.shape[1]
    t2 = bucket(t, prompt_buckets) if prompt_buckets else t
    if t2 != t and isinstance(ids, jax.Array):  # on the devices, where the batch is
        ids = _pad_left(ids, t2 - t, int(pad_token_id))
        mask = _pad_left(jnp.asarray(mask), t2 - t, 0)
    elif t2 != t:
        ids = np.pad(np.asarray(ids), ((0, 0), (t2 - t, 0)), constant_values=pad_token_id)
        mask = np.pad(np.asarray(mask), ((0, 0), (t2 - t, 0)))
    if pixels.ndim == 2:
        p = pixels.shape[0]
        p2 = bucket(p, patch_buckets) if patch_buckets and p else p
        if p2 != p:
            pixels = np.pad(np.asarray(pixels), ((0, p2 - p), (0, 0)))
        n = grid.shape[0]
        n2 = bucket(n, image_buckets) if image_buckets and n else n
        if n2 != n:
            grid = np.pad(np.asarray(grid), ((0, n2 - n), (0, 0)))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_left(x: jax.Array, width: int, value: int) -> jax.Array:
    """`x` [B, T] padded on the left to [B, T + width] with `value`, on x's devices (a
    device batch never comes to the host to be padded)."""
    return jnp.pad(x, ((0, 0), (width, 0)), constant_values=value)


def repeat_prompts(batch: Mapping[str, np.ndarray], n: int, image_token_id: int) -> dict:
    """The batch with every prompt repeated `n` times (row b * n + j), images included.

    This is the reference's unshared path (each completion re-encodes its image and prefills
    its prompt); used to test that prefix sharing changes nothing.
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    grid = np.asarray(batch["image_grid_thw"])
    pixels = np.asarray(batch["pixel_values"])
    is_img = (ids == image_token_id) & mask.astype(bool)
    starts = is_img & ~np.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    per_row = starts.sum(1)
    sizes = np.prod(grid, axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    img_rows, pix_rows, k = [], [], 0
    for b in range(ids.shape[0]):
        imgs = list(range(k, k + per_row[b]))
        k += per_row[b]
        for _ in range(n):
            img_rows += imgs
            pix_rows += [np.arange(offsets[i], offsets[i + 1]) for i in imgs]
    pix_idx = np.concatenate(pix_rows) if pix_rows else np.zeros((0,), int)
    return {
        "input_ids": np.repeat(ids, n, axis=0),
        "attention_mask": np.repeat(mask, n, axis=0),
        "pixel_values": pixels[pix_idx],
        "image_grid_thw": grid[np.asarray(img_rows, int)].reshape(-1, 3),
    }


def default_token_ids(model: qwen_vl.QwenVL) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of the checkpoint, as transformers' `generate` takes them.

    Each id is read from `generation_config.json` first (`cfg.hf_generation_config`; the
    Qwen2.5-VL-Instruct releases stop on `[151645, 151643]` there), then from `config.json`
    (`text_config` first, then the top level, which lists only 151645). The pad id defaults to
    the first EOS id.
    """
    gen = model.cfg.hf_generation_config or {}
    hf = model.cfg.hf_config or {}
    text = hf.get("text_config") or {}

    def first(key):
        for source in (gen, text, hf):
            if source.get(key) is not None:
                return source[key]
        return None

    eos = first("eos_token_id")
    pad = first("pad_token_id")
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return tuple(int(e) for e in eos_ids), int(pad)


VISION_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def vision_token_ids(model: qwen_vl.QwenVL) -> tuple[int, ...]:
    """The checkpoint's vision special token ids (`<|image_pad|>`, `<|video_pad|>`,
    `<|vision_start|>`, `<|vision_end|>`), those of `VISION_TOKEN_KEYS` that `config.json`
    gives (top level, then `text_config`), sorted; `cfg.image_token_id` without a config."""
    hf = model.cfg.hf_config
    if hf is None:
        return (int(model.cfg.image_token_id),)
    text = hf.get("text_config") or {}
    ids = set()
    for key in VISION_TOKEN_KEYS:
        value = hf.get(key, text.get(key))
        if value is not None:
            ids.add(int(value))
    return tuple(sorted(ids))


def generate(
    model: qwen_vl.QwenVL,
    batch: Mapping[str, Any],
    *,
    rng: jax.Array,
    num_generations: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cache_dtype: Any = jnp.bfloat16,
    prompt_buckets: Sequence[int] | None = PROMPT_BUCKETS,
    patch_buckets: Sequence[int] | None = PATCH_BUCKETS,
    image_buckets: Sequence[int] | None = IMAGE_BUCKETS,
    completion_buckets: Sequence[int] | None = COMPLETION_BUCKETS,
    suppress_token_ids: Sequence[int] | None = None,
) -> Rollout:
    """Samples `num_generations` completions for each of the B prompts of a processor batch.

    Args:
      model: the policy (`QwenVL`), as trained; its parameters may be sharded.
      batch: B prompts: input_ids i32[B, T], attention_mask i32[B, T] and their images,
        packed (`processing.encode_batch`: pixel_values f32[P, F], image_grid_thw i32[I, 3])
        or per row (the input pipeline's batch as it comes, host or device arrays:
        pixel_values f32[B, S, F], image_grid_thw i32[B, 3]; other keys are ignored).
        Host (numpy) batches are checked first (`check_image_tokens`).
      rng: PRNG key; row r at step i draws with `fold_in(fold_in(rng, r), i)`, so results do
        not depend on sharding or on prefix sharing.
      num_generations: G completions per prompt; row `b * G + g` is completion g of prompt b.
      max_new_tokens: token budget per completion.
      temperature: 0 = greedy; else logits / temperature.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus mass (1.0 = off).
      eos_token_id: stop token(s); default from the checkpoint config; () = never stop.
      pad_token_id: fills tokens after a row stopped; default from the checkpoint config.
      cache_dtype: KV cache dtype (bf16 by default; float32 for bit-parity tests).
      prompt_buckets, patch_buckets, image_buckets, completion_buckets: static size buckets
        (None: the batch's own size / `max_new_tokens`).
      suppress_token_ids: tokens never sampled: their logits become -inf before temperature,
        top-k, top-p and greedy's argmax, and the recorded log-probs are under that masked
        distribution. None (default): the checkpoint's vision special tokens
        (`vision_token_ids`); () = suppress nothing. Static (part of the program key): keep
        it fixed over a run.

    Returns:
      `Rollout` with tokens i32[B*G, L], mask bool[B*G, L], logprobs f32[B*G, L] where L is
      the completion bucket of `max_new_tokens`.
    """
    graphdef, args, st = _prepare(
        model, batch, rng=rng, num_generations=num_generations, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, cache_dtype=cache_dtype, prompt_buckets=prompt_buckets,
        patch_buckets=patch_buckets, image_buckets=image_buckets,
        completion_buckets=completion_buckets, suppress_token_ids=suppress_token_ids,
    )  # fmt: skip
    args = (*args[:6], *jax.device_put(args[6:]))  # the sampling settings: explicitly sent
    return _program(graphdef, args, st)(*args)


def lower(model: qwen_vl.QwenVL, batch: Mapping[str, Any], **kwargs: Any) -> Any:
    """The rollout program `generate(model, batch, **kwargs)` would run, lowered and not
    compiled (`jax.stages.Lowered`); `model` and `batch` may hold `jax.ShapeDtypeStruct`s at
    bucket sizes (`tools.aot` compiles it for a TPU topology without devices)."""
    graphdef, args, st = _prepare(model, batch, **kwargs)
    return _JITTED.lower(graphdef, *args, st)


def _prepare(
    model: qwen_vl.QwenVL,
    batch: Mapping[str, Any],
    *,
    rng: jax.Array,
    num_generations: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    cache_dtype: Any = jnp.bfloat16,
    prompt_buckets: Sequence[int] | None = PROMPT_BUCKETS,
    patch_buckets: Sequence[int] | None = PATCH_BUCKETS,
    image_buckets: Sequence[int] | None = IMAGE_BUCKETS,
    completion_buckets: Sequence[int] | None = COMPLETION_BUCKETS,
    suppress_token_ids: Sequence[int] | None = None,
) -> tuple[nnx.GraphDef, tuple[Any, ...], _Static]:
    """`generate`'s checks and padding: the program's graph definition, arguments and static
    options."""
    eos_ids, pad = _stop_and_pad_ids(model, eos_token_id, pad_token_id)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    big_l = completion_width(max_new_tokens, completion_buckets)
    _check_host_batch(model, batch)
    padded = pad_batch(
        batch,
        pad_token_id=pad,
        prompt_buckets=prompt_buckets,
        patch_buckets=patch_buckets,
        image_buckets=image_buckets,
    )
    suppress = _suppressed_ids(model, suppress_token_ids)
    greedy = temperature == 0.0
    st = _Static(
        num_generations=int(num_generations),
        completion_len=int(big_l),
        greedy=greedy,
        top_k=0 if greedy else int(top_k),
        use_top_p=(not greedy) and top_p < 1.0,
        pad_id=pad,
        cache_dtype=jnp.dtype(cache_dtype).name,
        suppress_ids=suppress,
    )
    graphdef, state = nnx.split(model)
    args = (
        state,
        _as_int32(padded["input_ids"]),
        _as_int32(padded["attention_mask"]),
        padded["pixel_values"],
        _as_int32(padded["image_grid_thw"]),
        rng,
        np.int32(max_new_tokens),
        np.float32(1.0 if greedy else temperature),
        np.float32(top_p),
        np.asarray(eos_ids or (-1,), np.int32),
    )
    return graphdef, args, st


def _stop_and_pad_ids(
    model: qwen_vl.QwenVL, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of `generate`'s arguments, the checkpoint's (`default_token_ids`)
    where they are None."""
    eos_default, pad_default = default_token_ids(model)
    if eos_token_id is None:
        eos_ids = eos_default
    elif isinstance(eos_token_id, int):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    pad = pad_default if pad_token_id is None else int(pad_token_id)
    return eos_ids, pad


def _check_host_batch(model: qwen_vl.QwenVL, batch: Mapping[str, Any]) -> None:
    """A host (numpy) batch with images: its image tokens against its grids
    (`rope.check_image_tokens`); device arrays are not fetched to be checked."""
    if isinstance(batch["input_ids"], np.ndarray) and batch.get("pixel_values") is not None:
        rope.check_image_tokens(
            batch["input_ids"],
            batch["image_grid_thw"],
            batch.get("attention_mask"),
            image_token_id=model.cfg.image_token_id,
            spatial_merge_size=model.cfg.spatial_merge_size,
            per_row=np.ndim(batch["pixel_values"]) == 3,
        )


def _suppressed_ids(
    model: qwen_vl.QwenVL, suppress_token_ids: Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted ids never sampled: the checkpoint's vision special tokens for None
    (`vision_token_ids`); each must lie in the vocabulary."""
    if suppress_token_ids is None:
        suppress = vision_token_ids(model)
    else:
        suppress = tuple(sorted({int(i) for i in suppress_token_ids}))
    if any(not 0 <= i < model.cfg.vocab_size for i in suppress):
        v = model.cfg.vocab_size
        raise ValueError(f"suppress_token_ids {list(suppress)} outside the vocabulary [0, {v})")
    return suppress


def _as_int32(x):
    if isinstance(x, np.ndarray) and x.dtype != np.int32:
        return x.astype(np.int32)
    return x
