"""Teacher-forced completion log-probs with the prompt run once per group: the GRPO loss's
`logps`, `old_logps` and `ref_logps` (the policy differentiated, the reference frozen).

`completion_logprobs` recomputes, for each of the B*G rollout rows (row `b*G + g` is completion
g of prompt b, as `sampler.generate` lays them out), log p(token_i | prompt_b, tokens_<i):

1. **Encode once.** The B prompts' images go through the vision tower once (not B*G times)
   and the B prompts are embedded once (`QwenVL.embed`, image tokens replaced by their image's
   embeddings) with their M-RoPE positions (`QwenVL.rope_index`).
2. **Share the prefix.** Each decoder layer runs the B prompts once (causal self-attention,
   as `QwenVL.decode`); the G completions of prompt b attend to its keys and values and to
   their own earlier tokens with one softmax over both (`_shared_layer`). Gradients of the G
   completions flow into the one prompt pass, as they would into G copies.
3. **Completions are text.** Completion tokens are embedded with the token table only
   (`embed_tokens`), so a sampled `<|image_pad|>` is never read as an image placeholder, and
   token i sits at M-RoPE position `n_valid_prompt_tokens + i + rope_delta` on all three
   axes, as the sampler fed it (Qwen2-VL paper, Sec. 2.1).
4. **Head.** The hidden state before token i (the last valid prompt position for i = 0) goes
   through `qwen_vl.chunked_logprobs` (the vocabulary head in chunks under `jax.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from visionr1_jax import sharding
from visionr1_jax.models import qwen_vl, rope


def completion_logprobs(
    model: qwen_vl.QwenVL,
    batch: Mapping[str, Any],
    tokens: jax.Array,
    mask: jax.Array,
    *,
    num_generations: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    image_embeds: jax.Array | None = None,
) -> jax.Array:
    """Teacher-forced log-probs of the rollout's completion tokens (see the module docstring).

    `log softmax(logits / temperature)[token]` of completion token i of row r given prompt
    `r // G` and the row's tokens before i; differentiable w.r.t. the model's parameters and
    jittable (`nnx.jit`, or `nnx.merge` inside `jax.jit`).

    Args:
      model: the policy or the reference (`QwenVL`).
      batch: the B prompts as `sampler.generate` took them: input_ids i32[B, T],
        attention_mask i32[B, T] (any padding side; None or absent = all valid), and the
        images per row (pixel_values f32[B, S, F], image_grid_thw i32[B, 3], zeros = none) or
        packed (f32[P, F], i32[I, 3]); no pixel_values (or an empty array) = text only.
      tokens: i32[B*G, L] completion tokens (row `b*G + g` is completion g of prompt b).
      mask: bool[B*G, L] tokens to score. It only zeroes outputs: every completion token is
        context for the tokens after it, as in the rollout (with the sampler's prefix masks
        this is the same as dropping the masked tail).
      num_generations: G (static).
      temperature: the sampling temperature (static; logits are divided by it).
      chunk_size: positions per vocabulary-head chunk (`qwen_vl.chunked_logprobs`).
      image_embeds: the B prompts' image features (`model.encode_images` of the batch's
        images); given, the vision tower does not run (policy and reference share a frozen
        tower's features this way).
    Returns:
      f32[B*G, L], 0 where `mask` is False.
    """
    rules = model.cfg.logical_axis_rules
    ids, prompt_mask, pixels, grid = _prompt_arrays(batch)
    b, t = ids.shape
    r, big_l = tokens.shape
    g = int(num_generations)
    if r != b * g:
        raise ValueError(f"tokens has {r} rows, expected B * G = {b} * {g}")
    has_images = pixels is not None
    per_row = has_images and pixels.ndim == 3

    # 1. The B prompts: images encoded once, embedded once, their positions and rope deltas.
    if not has_images:
        emb = None
    elif image_embeds is not None:
        emb = image_embeds
    else:
        emb = model.encode_images(pixels, grid)
    x_p = model.embed(ids, emb, grid if has_images else None, prompt_mask)  # [B, T, D]
    pos_p, delta = model.rope_index(ids, grid, prompt_mask, per_row)  # [3, B, T], [B, 1]

    # 3. Completion tokens as text, at n_valid_prompt_tokens + i + rope_delta.
    tokens = jnp.asarray(tokens, jnp.int32)
    x_c = model.model.embed_tokens(tokens)  # [R, L, D]
    first = jnp.repeat(prompt_mask.sum(1) + delta[:, 0], g)  # [R] position of token 0
    pos_c = jnp.broadcast_to((first[:, None] + jnp.arange(big_l))[None], (3, r, big_l))

    # 2. The decoder, prompt once per group.
    h_p, h_c = _decode_shared(model, x_p, pos_p, prompt_mask.astype(bool), x_c, pos_c)

    # 4. Token i is predicted by the hidden state before it.
    last = jnp.max(jnp.where(prompt_mask.astype(bool), jnp.arange(t)[None], 0), axis=1)  # [B]
    h_last = jnp.take_along_axis(h_p, last[:, None, None], axis=1)  # [B, 1, D]
    hidden = jnp.concatenate([jnp.repeat(h_last, g, axis=0), h_c[:, :-1]], axis=1)
    hidden = sharding.constrain(hidden, ("batch", "length", "act_embed"), rules)
    lp = qwen_vl.chunked_logprobs(
        model, hidden, tokens, chunk_size=chunk_size, temperature=temperature
    )
    return jnp.where(mask, lp, 0.0)


def _prompt_arrays(batch: Mapping[str, Any]):
    """The prompts' `(input_ids i32[B, T], attention_mask i32[B, T], pixel_values or None
    (no images), image_grid_thw i32[I, 3])` of a batch (absent mask: all valid)."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    prompt_mask = batch.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = jnp.ones(ids.shape, jnp.int32)
    pixels = batch.get("pixel_values")
    if pixels is None or pixels.size == 0:
        return ids, jnp.asarray(prompt_mask, jnp.int32), None, jnp.zeros((0, 3), jnp.int32)
    grid = jnp.asarray(batch["image_grid_thw"], jnp.int32)
    return ids, jnp.asarray(prompt_mask, jnp.int32), pixels, grid


def _decode_shared(
    model: qwen_vl.QwenVL,
    x_p: jax.Array,
    pos_p: jax.Array,
    valid_p: jax.Array,
    x_c: jax.Array,
    pos_c: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`QwenVL.decode` of prompt + completion with the prompt run once per group.

    Args:
      x_p: f32[B, T, D] prompt embeddings; pos_p: i32[3, B, T]; valid_p: bool[B, T].
      x_c: f32[B*G, L, D] completion embeddings; pos_c: i32[3, B*G, L].
    Returns:
      final-norm hidden states f32[B, T, D] (prompts) and f32[B*G, L, D] (completions).
    """
    cfg = model.cfg
    cos_p, sin_p = rope.mrope_cos_sin(pos_p, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    cos_c, sin_c = rope.mrope_cos_sin(pos_c, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    x_p, x_c = qwen_vl.run_layers(
        model.model.layers,
        _shared_layer,
        (x_p, x_c),
        cos_p,
        sin_p,
        cos_c,
        sin_c,
        valid_p,
        remat_policy=cfg.remat_policy,
        scan=cfg.scan_layers,
        dtype=cfg.dtype,
    )
    return model.model.norm(x_p), model.model.norm(x_c)


def _shared_layer(layer, carry, cos_p, sin_p, cos_c, sin_c, valid_p):
    """One `DecoderLayer` over B prompts [B, T, D] and their B*G completions [B*G, L, D].

    The prompts attend causally to themselves (`qwen_vl.causal_attention`, as `decode`);
    completion query i of row r attends to prompt `r // G`'s valid keys and to the row's own
    keys 0..i, with one float32 softmax over both (`qwen_vl.masked_attention`; the prompt keys
    and values are repeated G times, the prompt's queries, MLP and projections are not), so
    the result equals attention over `concat(prompt, completion)`. `carry` is `(x_p, x_c)`,
    returned updated.
    """
    x_p, x_c = carry
    attn = layer.self_attn
    cfg = attn.cfg
    rules = cfg.logical_axis_rules
    b, t, _ = x_p.shape
    r, big_l, _ = x_c.shape
    g = r // b
    hd = cfg.head_dim
    scale = hd**-0.5

    def qkv(x, cos, sin):
        n, s, _ = x.shape
        q = attn.q_proj(x).reshape(n, s, cfg.num_heads, hd)
        k = attn.k_proj(x).reshape(n, s, cfg.num_kv_heads, hd)
        v = attn.v_proj(x).reshape(n, s, cfg.num_kv_heads, hd)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None), rules)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        return q, k.astype(q.dtype), v.astype(q.dtype)

    q_p, k_p, v_p = qkv(layer.input_layernorm(x_p), cos_p, sin_p)
    q_c, k_c, v_c = qkv(layer.input_layernorm(x_c), cos_c, sin_c)
    o_p = qwen_vl.causal_attention(q_p, k_p, v_p, valid_p, scale)  # [B, T, H, hd]

    # Completion queries in blocks [lo, hi) that see the prompt and completion keys [0, hi).
    k_all = jnp.concatenate([jnp.repeat(k_p, g, axis=0), k_c], axis=1)  # [R, T + L, KV, hd]
    v_all = jnp.concatenate([jnp.repeat(v_p, g, axis=0), v_c], axis=1)
    prompt_keys = jnp.repeat(valid_p, g, axis=0)[:, None, None, :]  # [R, 1, 1, T]
    chunk = max(qwen_vl.CAUSAL_CHUNK, -(-big_l // qwen_vl.CAUSAL_MAX_CHUNKS))
    outs = []
    for lo in range(0, big_l, chunk):
        hi = min(lo + chunk, big_l)
        causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]  # [hi - lo, hi]
        m = jnp.concatenate(
            [
                jnp.broadcast_to(prompt_keys, (r, 1, hi - lo, t)),
                jnp.broadcast_to(causal[None, None], (r, 1, hi - lo, hi)),
            ],
            axis=-1,
        )
        outs.append(
            qwen_vl.masked_attention(
                q_c[:, lo:hi], k_all[:, : t + hi], v_all[:, : t + hi], m, scale
            )
        )
    o_c = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # [R, L, H, hd]

    names = ("batch", "length", "act_embed")
    out = []
    for x, o in ((x_p, o_p), (x_c, o_c)):
        n, s, _ = x.shape
        x = x + attn.o_proj(o.astype(x.dtype).reshape(n, s, cfg.num_heads * hd))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        out.append(sharding.constrain(x, names, rules))
    return tuple(out)
