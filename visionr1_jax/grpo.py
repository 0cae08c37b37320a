"""GRPO core: group advantages, KL estimators, loss aggregations and the clipped loss.

Pure functions on fixed shapes, jittable, with the variants chosen by config strings from small
registries (``ESTIMATORS``, ``KL_ESTIMATORS``, ``AGGREGATIONS``). Shapes use the project's
letters: ``B`` prompts, ``G`` generations per prompt, ``L`` completion length; row ``b*G + g``
holds generation ``g`` of prompt ``b``.

The reference (Vision-R1's ``trainer/qwen_trainer.py``, built on TRL 0.14's ``GRPOTrainer``;
SPEC §5) uses ``grpo`` advantages with ``eps = 1e-4`` and the unbiased std, the ``k3`` KL with
``β = 0.04``, the ``seq-mean-token-mean`` aggregation and one update per rollout (μ = 1), so its
ratio is ``exp(logp − stop_gradient(logp)) ≡ 1`` and no clipping ever acts: that is
``loss(logps, None, ref_logps, advantages, mask, beta=0.04, epsilon=...)`` here, for any ε.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        allowed = ", ".join(repr(k) for k in registry)
        raise ValueError(f"unknown {what} {name!r}; allowed: {allowed}")
    return registry[name]


# --------------------------------------------------------------------------------------------
# Advantages


def _require_generations(g: int, minimum: int, name: str) -> None:
    if g < minimum:
        raise ValueError(
            f"advantage estimator {name!r} needs num_generations >= {minimum}, got {g}"
        )


def _centered(grouped: Array) -> Array:
    """``r − mean_G(r)`` for f32[B, G], exactly 0 in a group of equal rewards.

    The mean is taken of the rewards shifted by the group's first one (``r0 + mean(r − r0)``):
    equal rewards give ``r − r0 = 0`` exactly, so their advantages are exactly 0 rather than a
    rounding residue divided by ``eps``; shifting also removes the cancellation of a large
    common offset.
    """
    shifted = grouped - grouped[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def _grpo(grouped: Array, eps: float) -> Array:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2): ``(r − mean_G) / (std_G + eps)``.

    ``std_G`` is the unbiased sample std ``sqrt(Σ(r − mean)² / (G − 1))``: the reference calls
    ``torch.Tensor.std(dim=1)``, whose default is Bessel's correction (``correction=1``). With
    ``G == 1`` that std is ``0/0 = NaN`` in torch and the reference's loss would be NaN; TRL
    (≥ 0.17) rejects ``num_generations < 2`` for GRPO and so do we, with a ValueError.
    """
    g = grouped.shape[1]
    _require_generations(g, 2, "grpo")
    centered = _centered(grouped)
    std = jnp.sqrt(jnp.sum(centered * centered, axis=1, keepdims=True) / (g - 1))
    return centered / (std + eps)


def _drgrpo(grouped: Array, eps: float) -> Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", §3.1): ``r − mean_G``.

    No std division (it biases towards groups of near-equal rewards); ``eps`` is unused and any
    ``G >= 1`` is allowed (``G == 1`` gives 0).
    """
    del eps
    return _centered(grouped)


def _rloo(grouped: Array, eps: float) -> Array:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``r_i − mean of the other G − 1``.

    Computed as ``G/(G−1) · (r_i − mean_G)``, the same quantity; needs ``G >= 2`` (the
    leave-one-out baseline of a single sample is undefined). ``eps`` is unused.
    """
    del eps
    g = grouped.shape[1]
    _require_generations(g, 2, "rloo")
    return _centered(grouped) * (g / (g - 1))


ESTIMATORS: dict[str, Callable[[Array, float], Array]] = {
    "grpo": _grpo,
    "drgrpo": _drgrpo,
    "rloo": _rloo,
}


def advantages(
    rewards: Array, num_generations: int, *, estimator: str = "grpo", eps: float = 1e-4
) -> Array:
    """Group-relative advantages ``f32[B*G]`` from the rewards ``f32[B*G]``.

    Row ``b*G + g`` is generation ``g`` of prompt ``b``; each group of ``G = num_generations``
    consecutive rows is normalised on its own:

    * ``grpo`` (default, reference): ``A = (r − mean_G) / (std_G + eps)``, unbiased std
      (``ddof=1``, torch's default), ``G >= 2``;
    * ``drgrpo``: ``A = r − mean_G``;
    * ``rloo``: ``A_i = r_i − Σ_{j≠i} r_j / (G − 1)``, ``G >= 2``.

    A group whose rewards are all equal gets exactly 0 advantages under every estimator.
    Computed in float32. ``num_generations`` is static; it must divide the number of rows.
    """
    fn = _lookup(ESTIMATORS, estimator, "advantage estimator")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int):
        raise ValueError(f"num_generations must be an int, got {num_generations!r}")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % num_generations:
        raise ValueError(
            f"rewards must be f32[B*G] with G={num_generations} dividing its length, "
            f"got shape {rewards.shape}"
        )
    grouped = rewards.reshape(-1, num_generations)
    return fn(grouped, eps).reshape(-1)


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020): unbiased or low-variance
# per-token estimates of KL(π_θ ‖ π_ref) from samples of π_θ, with x = ref − logp = log(π_ref/π_θ).


def _k1(logp: Array, ref: Array) -> Array:
    """``k1 = logp − ref = −x``: unbiased, high variance, can be negative."""
    return logp - ref


def _k2(logp: Array, ref: Array) -> Array:
    """``k2 = ½ (logp − ref)² = ½ x²``: biased, low variance, ≥ 0."""
    d = logp - ref
    return 0.5 * d * d


def _k3(logp: Array, ref: Array) -> Array:
    """``k3 = exp(x) − x − 1``: unbiased, ≥ 0, low variance (GRPO, TRL, the reference).

    Evaluated as ``expm1(x) − x``, the same value without the ``exp(x) − 1`` cancellation near
    ``x = 0`` (where the policy is close to the reference).
    """
    x = ref - logp
    return jnp.expm1(x) - x


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
}


# --------------------------------------------------------------------------------------------
# Aggregations: per-token losses f32[R, L] and a {0, 1} mask f32[R, L] -> f32[], R = B*G rows.
# Every one sums each row first, then over rows.


def _seq_mean_token_mean(per_token: Array, mask: Array) -> Array:
    """``mean_rows( Σ_t m·ℓ / max(Σ_t m, 1) )``: the reference and GRPO paper (TRL "grpo").

    Each completion weighs the same whatever its length. A row with an empty mask contributes 0
    and still counts as one of the R rows, as TRL's ``completion_mask.sum(-1).clamp(min=1)``
    (the reference itself never has an empty row: its mask always keeps the first token).
    """
    counts = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.mean(jnp.sum(per_token * mask, axis=-1) / counts)


def _token_mean(per_token: Array, mask: Array) -> Array:
    """``Σ m·ℓ / max(Σ m, 1)`` over the whole batch: DAPO (Yu et al. 2025, §3.3; TRL "bnpo").

    Each token weighs the same, so long completions weigh more.
    """
    total = jnp.sum(jnp.sum(per_token * mask, axis=-1))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _seq_mean_token_sum_norm(per_token: Array, mask: Array) -> Array:
    """``Σ m·ℓ / (R·L)``: Dr. GRPO (Liu et al. 2025, §3.1; TRL "dr_grpo").

    A constant normaliser (rows × the padded completion length L), free of length bias.
    """
    total = jnp.sum(jnp.sum(per_token * mask, axis=-1))
    return total / (per_token.shape[0] * per_token.shape[1])


AGGREGATIONS: dict[str, Callable[[Array, Array], Array]] = {
    "seq-mean-token-mean": _seq_mean_token_mean,
    "token-mean": _token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


# --------------------------------------------------------------------------------------------
# The loss


IMPORTANCE_LEVELS = ("token", "sequence")


def _masked_mean(x: Array, mask: Array) -> Array:
    """Token mean over the mask (0 when it is empty); rows summed first, as the losses."""
    return jnp.sum(jnp.sum(x * mask, axis=-1)) / jnp.maximum(jnp.sum(mask), 1.0)


def loss(
    logps: Array,
    old_logps: Array | None,
    ref_logps: Array | None,
    advantages: Array,
    mask: Array,
    *,
    beta: float | Array,
    epsilon: float | Array,
    epsilon_high: float | Array | None = None,
    kl: str = "k3",
    aggregation: str = "seq-mean-token-mean",
    entropy: Array | None = None,
    importance_level: str = "token",
) -> tuple[Array, dict[str, Array]]:
    """The GRPO loss ``f32[]`` and its metrics.

    Args:
      logps: f32[B*G, L] log π_θ of the completion tokens (differentiated).
      old_logps: f32[B*G, L] log π_old of the sampling policy, or ``None`` for μ = 1 (the
        reference's setting): ``old = stop_gradient(logps)``, so ``ρ ≡ 1`` and the gradient is
        the policy gradient ``−A ∇logp`` (aggregated) plus ``β ∇KL``.
      ref_logps: f32[B*G, L] log π_ref of the frozen reference; unused (may be ``None``) when
        ``beta`` is the Python number 0.
      advantages: f32[B*G], one per completion (see ``advantages``).
      mask: bool or {0, 1} f32[B*G, L], True on completion tokens. Values at masked-out
        positions of every input are ignored, even inf or NaN (in the loss and its gradient).
      beta: KL coefficient β (SPEC §5: 0.04 as released, 0.2 in the paper).
      epsilon: lower clip range ε_low; ``epsilon_high``: upper ε_high (``None``: ε_low).
        DAPO's "clip-higher" (Yu et al. 2025, §3.1) uses ε_high > ε_low.
      kl: name in ``KL_ESTIMATORS``; aggregation: name in ``AGGREGATIONS``.
      entropy: optional f32[B*G, L] per-token policy entropy, only reported in ``aux``.
      importance_level: ``token`` (GRPO, PPO's per-token ratio) or ``sequence`` (GSPO, Zheng
        et al. 2025, eq. 7: one ratio per completion, the length-normalised
        ``s = exp(mean_t(logp − old))``, clipped per completion; every token of the
        completion carries ``−min(sA, clip(s)A)``, whose gradient is GSPO's
        ``−sA·(1/|y|)Σ_t ∇logp_t`` off the clip: TRL's ``importance_sampling_level=
        "sequence"``).

    Stages:
      1. ratio ``ρ = exp(logp − old)`` per token (``sequence``: ``s`` per row, broadcast);
      2. clipped surrogate (PPO, Schulman et al. 2017; GRPO eq. 3)
         ``ℓ_pg = −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high) A)``;
      3. ``ℓ = ℓ_pg + β·KL`` with the chosen estimator;
      4. aggregation of ``ℓ`` over the mask;
      5. metrics.

    Stage 2 is evaluated in the equal piecewise form ``ℓ_pg = −b·A`` on the clipped tokens
    (``A > 0, ρ > 1 + ε_high``: ``b = 1 + ε_high``; ``A < 0, ρ < 1 − ε_low``: ``b = 1 − ε_low``)
    and ``−ρA`` elsewhere. Its gradient is then ``−ρA ∇logp`` off the clipped tokens including
    the clip boundaries, as torch's ``clamp``/``min`` give; a literal ``jnp.minimum``/``jnp.clip``
    splits gradients at ties and, e.g. with ε = 0 and ρ = 1, yields 5/8 of the policy gradient.

    Returns:
      ``(loss, aux)``, aux scalars (all 0 when the mask is empty), token means over the mask:
      ``kl`` (only when the KL term is used), ``clip_frac_low`` (ρ < 1 − ε_low and A < 0),
      ``clip_frac_high`` (ρ > 1 + ε_high and A > 0), ``clip_frac`` (either; TRL's
      ``clip_ratio/{low,high,region}_mean``), ``ratio_mean``, ``ratio_min``, ``ratio_max``,
      and ``entropy`` when given. With ``importance_level="sequence"`` the clip fractions and
      the ratio statistics are over the completions with at least one token (the level the
      ratio lives at).
    """
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"unknown importance_level {importance_level!r}; allowed: {IMPORTANCE_LEVELS}"
        )
    agg = _lookup(AGGREGATIONS, aggregation, "loss aggregation")
    kl_fn = _lookup(KL_ESTIMATORS, kl, "KL estimator")
    use_kl = not (isinstance(beta, int | float) and beta == 0)
    _check_loss_inputs(logps, old_logps, ref_logps, advantages, mask, entropy, use_kl=use_kl)
    keep = jnp.asarray(mask) > 0
    m = keep.astype(jnp.float32)
    logp = _clean(logps, keep)
    old = jax.lax.stop_gradient(logp) if old_logps is None else _clean(old_logps, keep)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    eps_high = epsilon if epsilon_high is None else epsilon_high

    # 1. ratio
    sequence = importance_level == "sequence"
    if sequence:  # GSPO: the length-normalised log-ratio of each completion
        n_tokens = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
        ratio = jnp.exp(jnp.sum((logp - old) * m, axis=-1, keepdims=True) / n_tokens)
    else:
        ratio = jnp.exp(logp - old)
    # 2. clipped surrogate, piecewise (see docstring)
    per_token, low_clipped, high_clipped = _clipped_surrogate(ratio, adv, epsilon, eps_high)
    if sequence:  # every token of a completion carries its sequence's term
        per_token = jnp.broadcast_to(per_token, logp.shape)
    # 3. KL
    aux: dict[str, Array] = {}
    if use_kl:
        per_token, aux["kl"] = _add_kl(per_token, kl_fn(logp, _clean(ref_logps, keep)), beta, m)
    # 4. aggregation
    value = agg(per_token, m)
    # 5. metrics
    if sequence:  # the statistics over the completions that have tokens
        rows = jnp.any(keep, axis=-1, keepdims=True)
        aux |= _loss_metrics(ratio, low_clipped, high_clipped, rows, rows.astype(jnp.float32))
    else:
        aux |= _loss_metrics(ratio, low_clipped, high_clipped, keep, m)
    if entropy is not None:
        aux["entropy"] = _masked_mean(jax.lax.stop_gradient(_clean(entropy, keep)), m)
    return value, aux


def _check_loss_inputs(
    logps: Array,
    old_logps: Array | None,
    ref_logps: Array | None,
    advantages: Array,
    mask: Array,
    entropy: Array | None,
    *,
    use_kl: bool,
) -> None:
    """``loss``'s argument checks: the reference when the KL term is used, then every array's
    shape against ``logps`` f32[B*G, L] (``ref_logps`` only when used)."""
    if use_kl and ref_logps is None:
        raise ValueError("ref_logps is None but beta != 0: the KL term needs the reference")
    logps = jnp.asarray(logps)
    if logps.ndim != 2:
        raise ValueError(f"logps must be f32[B*G, L], got shape {logps.shape}")
    shape = logps.shape
    named = {"old_logps": old_logps, "ref_logps": ref_logps if use_kl else None}
    named |= {"mask": mask, "entropy": entropy}
    for name, x in named.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have the shape of logps {shape}, got {jnp.shape(x)}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages must be f32[{shape[0]}], got shape {jnp.shape(advantages)}")


def _clean(x: Array, keep: Array) -> Array:
    """``x`` as f32 with the padding (``~keep``) zeroed *before* any arithmetic, so inf/NaN
    there cannot reach the loss or, through a where's unselected branch, the gradient."""
    return jnp.where(keep, jnp.asarray(x, jnp.float32), 0.0)


def _clipped_surrogate(
    ratio: Array, adv: Array, eps_low: float | Array, eps_high: float | Array
) -> tuple[Array, Array, Array]:
    """Stage 2 of ``loss``, in its piecewise form (see there): ``ℓ_pg`` f32[B*G, L] and the
    clipped tokens ``bool[B*G, L]`` below (``A < 0``) and above (``A > 0``) the clip range,
    for the ratio ``ρ`` f32[B*G, L] and the advantages ``A`` f32[B*G, 1]."""
    low_clipped = (ratio < 1.0 - eps_low) & (adv < 0)
    high_clipped = (ratio > 1.0 + eps_high) & (adv > 0)
    bound = jnp.where(high_clipped, 1.0 + eps_high, 1.0 - eps_low)
    per_token = -jnp.where(low_clipped | high_clipped, bound, ratio) * adv
    return per_token, low_clipped, high_clipped


def _add_kl(
    per_token: Array, per_token_kl: Array, beta: float | Array, m: Array
) -> tuple[Array, Array]:
    """Stage 3 of ``loss``: ``ℓ + β·KL`` per token, and the KL's token mean over the mask
    (a metric: no gradient)."""
    return per_token + beta * per_token_kl, _masked_mean(jax.lax.stop_gradient(per_token_kl), m)


def _loss_metrics(
    ratio: Array, low_clipped: Array, high_clipped: Array, keep: Array, m: Array
) -> dict[str, Array]:
    """Stage 5 of ``loss``: the clip fractions and the ratio's mean, min and max, token
    statistics over the mask (all 0 when it is empty), without gradient."""
    ratio = jax.lax.stop_gradient(ratio)
    any_token = jnp.any(keep)
    return {
        "clip_frac_low": _masked_mean(low_clipped.astype(jnp.float32), m),
        "clip_frac_high": _masked_mean(high_clipped.astype(jnp.float32), m),
        "clip_frac": _masked_mean((low_clipped | high_clipped).astype(jnp.float32), m),
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_min": jnp.where(any_token, jnp.min(jnp.where(keep, ratio, jnp.inf)), 0.0),
        "ratio_max": jnp.where(any_token, jnp.max(jnp.where(keep, ratio, -jnp.inf)), 0.0),
    }
