"""Float64 numpy oracle for visionr1_jax.grpo, written from the formulas (SPEC §5, issue #10) and
TRL's ``GRPOTrainer._compute_loss``, token by token in plain loops, not from the jax code.

Conventions taken from TRL: a row's token count is clamped at 1 (an empty row adds 0 to the
sum over rows and still counts as a row); clip fractions are ``(ρ < 1 − ε_low) & (A < 0)`` and
``(ρ > 1 + ε_high) & (A > 0)`` averaged over the batch's completion tokens. Dr. GRPO divides by
rows × the padded length L.
"""

from __future__ import annotations

import math

import numpy as np


def advantages(rewards, g: int, estimator: str, eps: float) -> np.ndarray:
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    for start in range(0, len(r), g):
        group = r[start : start + g]
        mean = sum(group) / g
        for i, ri in enumerate(group):
            if estimator == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))  # ddof=1
                a = (ri - mean) / (std + eps)
            elif estimator == "drgrpo":
                a = ri - mean
            elif estimator == "rloo":
                a = ri - (sum(group) - ri) / (g - 1)
            else:
                raise KeyError(estimator)
            out[start + i] = a
    return out


def advantage_scale(rewards, g: int, estimator: str, eps: float) -> np.ndarray:
    """Per-row magnitude of the float32 computation: max |r − r_first| of the group, divided
    like the advantage (by std + eps for grpo, times G/(G−1) for rloo)."""
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    for start in range(0, len(r), g):
        group = r[start : start + g]
        spread = np.max(np.abs(group - group[0]))
        if estimator == "grpo":
            spread /= np.std(group, ddof=1) + eps
        elif estimator == "rloo":
            spread *= g / (g - 1)
        out[start : start + g] = spread
    return out


def kl(kind: str, lp: float, ref: float) -> float:
    x = ref - lp
    if kind == "k1":
        return lp - ref
    if kind == "k2":
        return 0.5 * (lp - ref) ** 2
    if kind == "k3":
        return math.exp(x) - x - 1.0
    raise KeyError(kind)


def kl_grad(kind: str, lp: float, ref: float) -> float:
    """d KL / d logp."""
    if kind == "k1":
        return 1.0
    if kind == "k2":
        return lp - ref
    if kind == "k3":
        return 1.0 - math.exp(ref - lp)
    raise KeyError(kind)


def kl_scale(kind: str, lp: float, ref: float) -> float:
    """Magnitude of the operands of the float32 KL evaluation (for its rounding error)."""
    x = ref - lp
    if kind in ("k1", "k2"):
        return abs(kl(kind, lp, ref))
    return abs(math.expm1(x)) + abs(x)


def kl_grad_scale(kind: str, lp: float, ref: float) -> float:
    if kind == "k1":
        return 1.0
    if kind == "k2":
        return abs(lp - ref)
    return math.exp(ref - lp) + 1.0


def weights(mask: np.ndarray, aggregation: str) -> np.ndarray:
    """w[i, t] such that the aggregated loss is Σ w·ℓ (w = 0 off the mask)."""
    rows, length = mask.shape
    w = np.zeros(mask.shape)
    total = max(int(mask.sum()), 1)
    for i in range(rows):
        count = max(int(mask[i].sum()), 1)
        for t in range(length):
            if not mask[i, t]:
                continue
            if aggregation == "seq-mean-token-mean":
                w[i, t] = 1.0 / (count * rows)
            elif aggregation == "token-mean":
                w[i, t] = 1.0 / total
            elif aggregation == "seq-mean-token-sum-norm":
                w[i, t] = 1.0 / (rows * length)
            else:
                raise KeyError(aggregation)
    return w


def loss(
    logps,
    old_logps,
    ref_logps,
    adv,
    mask,
    *,
    beta,
    epsilon,
    epsilon_high=None,
    kl_kind="k3",
    aggregation="seq-mean-token-mean",
    entropy=None,
):
    """Returns (loss, aux, grad wrt logps, loss magnitude, grad magnitude), all float64."""
    lp = np.asarray(logps, np.float64)
    old = lp if old_logps is None else np.asarray(old_logps, np.float64)
    mask = np.asarray(mask, bool)
    adv = np.asarray(adv, np.float64)
    eh = epsilon if epsilon_high is None else epsilon_high
    w = weights(mask, aggregation)
    value = scale = 0.0
    grad = np.zeros(lp.shape)
    grad_scale = np.zeros(lp.shape)
    n = 0
    sums = dict(kl=0.0, low=0.0, high=0.0, region=0.0, ratio=0.0, entropy=0.0)
    rmin, rmax = math.inf, -math.inf
    for i in range(lp.shape[0]):
        a = adv[i]
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            rho = math.exp(lp[i, t] - old[i, t])
            clipped = min(max(rho, 1.0 - epsilon), 1.0 + eh)
            term = -min(rho * a, clipped * a)
            # d/dlogp: -rho*a unless the clipped branch is strictly the min (then constant)
            unclipped = rho * a <= clipped * a
            d = -rho * a if unclipped else 0.0
            mag, dmag = abs(term), abs(rho * a)
            if beta != 0:
                ref = float(ref_logps[i, t])
                k = kl(kl_kind, lp[i, t], ref)
                term += beta * k
                d += beta * kl_grad(kl_kind, lp[i, t], ref)
                mag += abs(beta) * kl_scale(kl_kind, lp[i, t], ref)
                dmag += abs(beta) * kl_grad_scale(kl_kind, lp[i, t], ref)
                sums["kl"] += k
            value += w[i, t] * term
            scale += w[i, t] * mag
            grad[i, t] = w[i, t] * d
            grad_scale[i, t] = w[i, t] * dmag
            n += 1
            low = rho < 1.0 - epsilon and a < 0
            high = rho > 1.0 + eh and a > 0
            sums["low"] += low
            sums["high"] += high
            sums["region"] += low or high
            sums["ratio"] += rho
            rmin, rmax = min(rmin, rho), max(rmax, rho)
            if entropy is not None:
                sums["entropy"] += float(entropy[i, t])
    denom = max(n, 1)
    aux = dict(
        clip_frac_low=sums["low"] / denom,
        clip_frac_high=sums["high"] / denom,
        clip_frac=sums["region"] / denom,
        ratio_mean=sums["ratio"] / denom,
        ratio_min=rmin if n else 0.0,
        ratio_max=rmax if n else 0.0,
    )
    if beta != 0:
        aux["kl"] = sums["kl"] / denom
    if entropy is not None:
        aux["entropy"] = sums["entropy"] / denom
    return value, aux, grad, scale, grad_scale


def gspo_loss(
    logps,
    old_logps,
    ref_logps,
    adv,
    mask,
    *,
    beta,
    epsilon,
    epsilon_high=None,
    kl_kind="k3",
    aggregation="seq-mean-token-mean",
):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7), in TRL's
    per-token layout: completion i has the importance ratio
    ``s_i = (π_θ(y_i) / π_old(y_i))^(1/|y_i|) = exp((1/|y_i|) Σ_t (logp_it − old_it))``, clipped
    to ``[1 − ε, 1 + ε_high]`` per completion; each of its tokens carries
    ``−min(s_i A_i, clip(s_i) A_i) + β KL_it``, aggregated with ``weights``. Returns
    (loss, aux, grad wrt logps), float64; aux over the completions with tokens."""
    lp = np.asarray(logps, np.float64)
    old = lp if old_logps is None else np.asarray(old_logps, np.float64)
    mask = np.asarray(mask, bool)
    adv = np.asarray(adv, np.float64)
    eh = epsilon if epsilon_high is None else epsilon_high
    w = weights(mask, aggregation)
    value = 0.0
    grad = np.zeros(lp.shape)
    stats = dict(low=0, high=0, region=0, ratio=0.0, rows=0, kl=0.0, tokens=0)
    rmin, rmax = math.inf, -math.inf
    for i in range(lp.shape[0]):
        ts = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not ts:
            continue
        a = adv[i]
        s = math.exp(sum(lp[i, t] - old[i, t] for t in ts) / len(ts))
        clipped = min(max(s, 1.0 - epsilon), 1.0 + eh)
        term = -min(s * a, clipped * a)
        # d term / d logp_it = -a * s / |y_i| unless the clipped branch is strictly the min
        d_term = -a * s / len(ts) if s * a <= clipped * a else 0.0
        row_weight = sum(w[i, t] for t in ts)
        for t in ts:
            value += w[i, t] * term
            grad[i, t] = row_weight * d_term
            if beta != 0:
                ref = float(ref_logps[i, t])
                value += w[i, t] * beta * kl(kl_kind, lp[i, t], ref)
                grad[i, t] += w[i, t] * beta * kl_grad(kl_kind, lp[i, t], ref)
                stats["kl"] += kl(kl_kind, lp[i, t], ref)
            stats["tokens"] += 1
        low, high = s < 1.0 - epsilon and a < 0, s > 1.0 + eh and a > 0
        stats["low"] += low
        stats["high"] += high
        stats["region"] += low or high
        stats["ratio"] += s
        stats["rows"] += 1
        rmin, rmax = min(rmin, s), max(rmax, s)
    rows = max(stats["rows"], 1)
    aux = dict(
        clip_frac_low=stats["low"] / rows,
        clip_frac_high=stats["high"] / rows,
        clip_frac=stats["region"] / rows,
        ratio_mean=stats["ratio"] / rows,
        ratio_min=rmin if stats["rows"] else 0.0,
        ratio_max=rmax if stats["rows"] else 0.0,
    )
    if beta != 0:
        aux["kl"] = stats["kl"] / max(stats["tokens"], 1)
    return value, aux, grad
