"""The GRPO train step on a (2, 2, 2) mesh of 8 CPU devices equals the one-device step
(issue #10, acceptance 4: the train step on fixed rollouts).

Fixed rollouts, built once with numpy from a seed: 4 image prompts in the input pipeline's
per-row layout (pixel_values f32[B, S, F], image_grid_thw i32[B, 3]), left-padded to different
lengths; G = 2 random text completions of L = 16 tokens per prompt with ragged masks; GRPO
advantages of seeded rewards. They go through 3 steps of `step.make_train_step` twice, at
β = 0.04 (reference forward inside the step) and at β = 0: on one device, and with the model
loaded sharded on the mesh (`from_pretrained(mesh=...)` under `jax.set_mesh`) and every rollout
array split over the batch axes ('data', 'fsdp'). The one-device run is the reference: the
sharded program computes the same function with its sums split over devices and reordered
(psum), so the runs may differ only by float32 rounding (u = 2^-24), bounded at each assertion.

How that rounding reaches the parameters. A clipped gradient entry of the two runs differs
by at most Δ = 2 GRAD_RTOL of the largest entry's scale (test_train_step's derivation, doubled
for the clip factor). AdamW's update u = m̂ / (√v̂ + ε) is normalised: with each step's
gradient entry off by <= Δ, |Δm̂| <= Δ and |Δ√v̂| <= Δ (a weighted mean and a weighted norm of
the steps' gradients), so |Δu| <= (1 + C) Δ / (√v̂ − Δ + ε) where |m̂| <= C √v̂ (`_adam_c`),
and never more than 2C (both updates lie in ±C). That per-entry bound, computed from the
one-device run's own moments, holds every entry; it reaches its cap 2C·lr per step (a sign
flip) for entries whose gradient is tiny next to Δ. Its one gap: from step 2 on, the runs take
gradients at parameters that already differ, and that drift's effect (Hessian × Δp) is not in
Δ; the measured margin covers it (largest |Δp| / bound about 0.01). An entry whose gradient
error is GRAD_RTOL of its own size moves by only ~(1 + C)·GRAD_RTOL·lr per step, a float32
bound that 99.9% of the entries are held to.
"""

from __future__ import annotations

import contextlib
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from visionr1_jax import host, processing, sections, sharding
from visionr1_jax.models import QwenVLConfig, from_pretrained, testing
from visionr1_jax.state import init_train_state
from visionr1_jax.step import UpdateBatch, make_train_step

B, G, L = 4, 2, 16  # prompts, completions per prompt, completion length
ROWS = B * G
STEPS = 3
LR, TOTAL = 1e-3, 10  # large enough that every trained entry moves by ~lr per step
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8  # state.make_optimizer's AdamW
U = testing.F32_U
# A gradient entry of the sharded run vs the one-device run: twice the logits' relative
# rounding (forward and its transpose) plus sqrt(R·L) u for the R·L per-token terms summed in
# another order (the psum over the batch shards), of the scale of the largest entry.
GRAD_RTOL = 2 * testing.LOGIT_RTOL + math.sqrt(ROWS * L) * U
BULK_FRACTION = 0.999  # entries held to the float32 bound (the rest: Adam's worst case)
BATCH_AXES = ("data", "fsdp")


def _config(beta: float) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = TOTAL
    c.model = sections.model_config()
    c.model.dtype = "float32"
    c.grpo = sections.grpo_config()
    c.grpo.num_generations = G
    c.grpo.beta = beta
    c.optim = sections.optim_config()
    c.optim.learning_rate = LR
    return c


def _flat(tree) -> dict[str, np.ndarray]:
    """{path: float64 copy} of a pytree's leaves (copied to the host before any donation)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in leaves}


def _adam_c(t: int) -> float:
    """C with |m̂_t| <= C √v̂_t for any gradients (Cauchy-Schwarz over the bias-corrected
    weights w of m̂ and w' of v̂: C² = Σ w_s² / w'_s)."""
    w = np.array([(1 - B1) * B1 ** (t - s) for s in range(1, t + 1)]) / (1 - B1**t)
    w2 = np.array([(1 - B2) * B2 ** (t - s) for s in range(1, t + 1)]) / (1 - B2**t)
    return float(np.sqrt(np.sum(w**2 / w2)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


@pytest.fixture(scope="module")
def rollout(ckpt):
    """(batch, tokens i32[R, L], mask bool[R, L], advantages f32[R]) for R = B·G rows."""
    rng = np.random.default_rng(0)
    proc = processing.load_processor(ckpt)
    questions = ["Locate every cat.", "hi", "Find it.", "Where?"]
    images = testing.random_images(rng, [(56, 84), (56, 56), (112, 84), (84, 56)])
    texts = [processing.render_prompt(proc, q, num_images=1) for q in questions]
    packed = processing.encode_batch(proc, texts, [[im] for im in images], padding_side="left")
    grid = np.asarray(packed["image_grid_thw"], np.int32)
    sizes = np.prod(grid, 1)
    pixels = np.zeros((B, int(sizes.max()) + 8, packed["pixel_values"].shape[1]), np.float32)
    ends = np.cumsum(sizes)
    for i in range(B):  # per-row layout: row i's patches, zero padding after them
        pixels[i, : sizes[i]] = packed["pixel_values"][ends[i] - sizes[i] : ends[i]]
    batch = {
        "input_ids": np.asarray(packed["input_ids"], np.int32),
        "attention_mask": np.asarray(packed["attention_mask"], np.int32),
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }
    assert len(set(batch["attention_mask"].sum(1).tolist())) == B  # different lengths
    assert (batch["attention_mask"][:, 0] == 0).sum() == B - 1  # left padding

    cfg = QwenVLConfig.from_pretrained(ckpt)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = [int(cfg.hf_config[k]) for k in names]
    allowed = np.setdiff1d(np.arange(cfg.vocab_size), vision)  # completions are text
    tokens = rng.choice(allowed, (ROWS, L)).astype(np.int32)
    lengths = rng.integers(4, L + 1, ROWS)
    lengths[0] = L
    mask = np.arange(L)[None] < lengths[:, None]
    rewards = rng.uniform(size=(B, G))
    adv = (rewards - rewards.mean(1, keepdims=True)) / (
        rewards.std(1, ddof=1, keepdims=True) + 1e-4
    )
    return batch, tokens, mask, adv.reshape(-1).astype(np.float32)


def _adam_moments(opt_state) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Adam's (mu, nu) as {param path: float64 array}."""
    return _flat(optax.tree_utils.tree_get(opt_state, "mu")), _flat(
        optax.tree_utils.tree_get(opt_state, "nu")
    )


def _run(ckpt, rollout, beta: float, mesh=None) -> dict:
    """STEPS train steps on one device (mesh None) or on `mesh`; per-step params, Adam
    moments and metrics (index 0 = start for params), the final state and the inputs."""
    config = _config(beta)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        model = from_pretrained(ckpt, mesh=mesh)
        graphdef, state = init_train_state(model, config, jax.random.key(0))
        inputs = rollout
        if mesh is not None:  # every array split over the batch axes on its leading dim
            inputs = jax.device_put(rollout, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        step_fn = make_train_step(graphdef, config)
        params, mus, nus, metrics, compiles = [_flat(state.params)], [], [], [], []

        def listener(event, duration, **kwargs):
            if event in host.COMPILE_EVENTS:  # compiled, or loaded from the persistent cache
                compiles.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            for _ in range(STEPS):
                state, m = step_fn(state, UpdateBatch(*inputs))
                params.append(_flat(state.params))
                mu, nu = _adam_moments(state.opt_state)
                mus.append(mu)
                nus.append(nu)
                metrics.append({k: float(v) for k, v in m.items()})
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        count = int(state.step)
    return dict(
        params=params, mu=mus, nu=nus, metrics=metrics, state=state, inputs=inputs,
        count=count, compiles=len(compiles),
    )  # fmt: skip


# β = 0.04 only: its step contains the β = 0 step (policy pass, loss, update) plus the
# reference forward; each β costs two train-step compilations (~30 s of CPU each), and the
# suite's budget is tight. The β = 0 branches below stay valid for a local `params=[0.0]` run.
@pytest.fixture(scope="module", params=[0.04], ids=["with_ref"])
def runs(request, ckpt, rollout):
    """(beta, one-device run, mesh run)."""
    beta = request.param
    one = _run(ckpt, rollout, beta)
    mesh = _run(ckpt, rollout, beta, sharding.make_mesh((2, 2, 2)))
    return beta, one, mesh


def _gradients(one: dict) -> list[dict[str, np.ndarray]]:
    """The clipped gradients of steps 1..STEPS of the one-device run, from its Adam first
    moments: g_t = (mu_t − β1 mu_{t−1}) / (1 − β1)."""
    out, prev = [], None
    for mu in one["mu"]:
        out.append(
            {k: (v - (0 if prev is None else B1 * prev[k])) / (1 - B1) for k, v in mu.items()}
        )
        prev = mu
    return out


def _grad_error(one: dict) -> list[float]:
    """Δ_t: the largest difference of a clipped gradient entry between the runs at any step
    <= t: GRAD_RTOL of the largest entry, doubled for the clip factor's own error."""
    scales = [max(float(np.abs(v).max()) for v in g.values()) for g in _gradients(one)]
    return [2 * GRAD_RTOL * max(scales[: t + 1]) for t in range(STEPS)]


def _logit_scale(params: dict[str, np.ndarray]) -> float:
    """A bound on |z| of the model with these parameters: the final RMSNorm's output has
    ‖h‖₂ <= √D max|γ|, so |z_v| <= ‖h‖₂ ‖W[:, v]‖₂ (Cauchy-Schwarz, untied lm_head)."""
    gamma = params["['model']['norm']['weight'].value"]
    head = params["['lm_head']['kernel'].value"]  # [D, V]
    return (
        math.sqrt(head.shape[0])
        * float(np.abs(gamma).max())
        * float(np.sqrt((head**2).sum(0)).max())
    )


# ----------------------------------------------------------------------------- the setup


def test_mesh_run_is_sharded_and_one_device_run_is_not(runs, rollout):
    """The mesh run's parameters are split over the 8 devices by the rules table (lm_head
    [embed, vocab] over ('fsdp', 'tensor')) and its rollout rows over ('data', 'fsdp'); the
    reference run lives on one device; each run compiled its step once."""
    _, one, mesh = runs
    leaves = jax.tree_util.tree_leaves_with_path(mesh["state"].params)
    split = [p for p, x in leaves if not x.sharding.is_fully_replicated]
    assert len(split) > 20, len(split)  # projections, MLPs, embeddings are actually split
    assert all(len(x.sharding.device_set) == 8 for _, x in leaves)
    head = mesh["state"].params["lm_head"]["kernel"][...]
    assert head.sharding.spec == PartitionSpec("fsdp", "tensor")
    adam_mu = jax.tree.leaves(optax.tree_utils.tree_get(mesh["state"].opt_state, "mu"))
    assert sum(not x.sharding.is_fully_replicated for x in adam_mu) == len(split)
    batch, tokens, mask, adv = mesh["inputs"]
    for x in (*batch.values(), tokens, mask, adv):
        assert x.sharding.spec == PartitionSpec(BATCH_AXES), x.sharding
        assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
    for _, x in jax.tree_util.tree_leaves_with_path(one["state"].params):
        assert len(x.sharding.device_set) == 1
    assert one["compiles"] == 1 and mesh["compiles"] == 1, (one["compiles"], mesh["compiles"])


# ----------------------------------------------------------------------------- metrics


def test_same_metrics_every_step(runs, rollout):
    """Per step: the same learning rate, clip fractions and ratios (μ = 1: ρ ≡ 1 exactly),
    loss, KL and gradient norm within their float32 bounds."""
    beta, one, mesh = runs
    _, _, mask, adv = rollout
    vocab = one["params"][0]["['lm_head']['kernel'].value"].shape[1]
    n = sum(v.size for v in one["params"][0].values())
    grads = _gradients(one)
    # The policy-gradient part of the loss, −mean_rows(A) (ρ ≡ 1, every row has a token).
    assert mask.any(1).all()
    pg = -float(np.mean(adv.astype(np.float64)))
    # The seq-mean-token-mean of R rows of L terms: (L + R + 2) u of the mean of |terms|.
    agg_u = (L + ROWS + 2) * U
    report = []
    for t, (a, b) in enumerate(zip(one["metrics"], mesh["metrics"], strict=True)):
        assert a.keys() == b.keys()
        for k in ("learning_rate", "clip_frac", "clip_frac_low", "clip_frac_high"):
            assert a[k] == b[k], (t, k)  # the same scalar formula of the same step / exact 0
        for k in ("ratio_mean", "ratio_min", "ratio_max"):
            assert a[k] == b[k] == 1.0, (t, k)  # exp(logp − stop_gradient(logp)) = exp(0)
        checks = {}
        if beta == 0:
            # No log-prob in the value (ρ ≡ 1): only the aggregation's rounding, in each run.
            rounding = agg_u * float(np.mean(np.abs(adv)))
            assert abs(a["loss"] - pg) <= rounding, (t, a["loss"], pg)  # vs float64 numpy
            checks["loss"] = 2 * rounding
            assert "kl" not in a
        else:
            # Each run's log-probs are within logprob_atol of the exact ones at a logit scale
            # bounded from either run's parameters (policy at step t, reference at the
            # start), so x = ref − logp is off by at most d = 2 atol.
            scale = max(_logit_scale(r["params"][s]) for r in (one, mesh) for s in (0, t))
            d = 2 * testing.logprob_atol(scale, vocab)
            kl_round = (ROWS * L + 2) * U * a["kl"]  # token mean of R·L terms >= 0, each run
            checks["kl"] = _k3_shift_bound(a["kl"], d) + 2 * kl_round
            agg_kl = max((a["loss"] - pg) / beta, 0.0)  # the loss's own mean of k3
            rounding = agg_u * (float(np.mean(np.abs(adv))) + beta * agg_kl)
            checks["loss"] = beta * _k3_shift_bound(agg_kl, d) + 2 * rounding
        # |Δ‖g‖| <= ‖Δg‖₂ <= √n max|Δg|, max|Δg| = GRAD_RTOL of the largest unclipped entry
        # (the clipped one times the clip divisor); + the reordered sum of n squares (√n u).
        g_scale = max(float(np.abs(v).max()) for v in grads[t].values())
        clip = max(a["grad_norm"], 1.0)
        checks["grad_norm"] = math.sqrt(n) * (GRAD_RTOL * g_scale * clip + U * a["grad_norm"])
        for k, tol in checks.items():
            err = abs(a[k] - b[k])
            report.append(f"step {t + 1} {k}: {a[k]:.6g}, |diff| {err:.3g} <= {tol:.3g}")
            assert err <= tol, report[-1]
    print("\n".join(report))


def _k3_shift_bound(k: float, d: float) -> float:
    """Largest change of a mean of k3(x) = expm1(x) − x when every x moves by <= d, given
    the mean k of k3: k3(x + d) − k3(x) = expm1(x) d + e^x (e^d − 1 − d), and |expm1 x| <=
    1 + k3 + √(2 k3) (x <= 0: <= 1; x > 0: k3 + x with x <= √(2 k3)), whose mean is <= E =
    1 + k + √(2k) (Jensen); so the mean moves by <= (E + (1 + E) d) d for d <= 1."""
    e = 1 + k + math.sqrt(2 * k)
    return (e + (1 + e) * d) * d


# ----------------------------------------------------------------------------- parameters


def test_same_parameters_and_optimizer_state_every_step(runs):
    """After each step the mesh run's parameters equal the one-device run's: every entry
    within the per-entry Adam bound (at most 2C·lr per step: a sign flip of a tiny
    gradient), 99.9% within the float32 bound of a well-conditioned entry; Adam's moments
    within their gradient-error bounds; the parameters really moved."""
    _, one, mesh = runs
    deltas = _grad_error(one)
    lrs = [m["learning_rate"] for m in one["metrics"]]
    grads = _gradients(one)
    start = one["params"][0]
    acc = {k: np.zeros_like(v) for k, v in start.items()}  # per-entry bound so far
    bulk = 0.0  # float32 bound of an entry whose gradient error is GRAD_RTOL of itself
    report = []
    for t in range(1, STEPS + 1):
        lr, delta, c = lrs[t - 1], deltas[t - 1], _adam_c(t)
        p1, p2 = one["params"][t], mesh["params"][t]
        mu1, mu2 = one["mu"][t - 1], mesh["mu"][t - 1]
        nu1, nu2 = one["nu"][t - 1], mesh["nu"][t - 1]
        # A common scale error (the clip factor's) cancels in m̂ / √v̂: GRAD_RTOL, not twice.
        bulk += lr * (1 + c) * GRAD_RTOL + 4 * U * lr
        worst = worst_mu = worst_nu = 0.0
        errs, bounds = [], []
        for k, p in p1.items():
            vhat = np.sqrt(nu1[k] / (1 - B2**t))
            # |Δu| <= (1 + C) Δ / (√v̂ − Δ + ε), capped at 2C; + the rounding of p − lr·u
            # (each run <= u/2 |p| + 2 u lr |u|) on top of the previous steps' bound.
            sens = np.minimum(2 * c, (1 + c) * delta / (np.maximum(vhat - delta, 0) + ADAM_EPS))
            acc[k] = acc[k] + lr * sens + 4 * U * lr + 2 * U * np.abs(p)
            err = np.abs(p1[k] - p2[k])
            worst = max(worst, float((err / acc[k]).max()))
            errs.append(err.ravel())
            bounds.append((bulk + 2 * U * t * np.abs(p)).ravel())
            # m_t, v_t: sums of the steps' gradients with weights summing to 1 − β^t, each
            # gradient off by <= Δ: |Δm| <= (1 − β1^t) Δ, |Δv| <= (1 − β2^t)(2 max|g| Δ + Δ²);
            # + their own rounding (4 u relative, both runs).
            gmax = np.max([np.abs(g[k]) for g in grads[:t]], axis=0)
            tol_mu = (1 - B1**t) * delta + 4 * U * np.abs(mu1[k])
            tol_nu = (1 - B2**t) * (2 * gmax * delta + delta**2) + 4 * U * nu1[k]
            worst_mu = max(worst_mu, float((np.abs(mu1[k] - mu2[k]) / tol_mu).max()))
            worst_nu = max(worst_nu, float((np.abs(nu1[k] - nu2[k]) / tol_nu).max()))
        err, bound = np.concatenate(errs), np.concatenate(bounds)
        frac = float(np.mean(err <= bound))
        report.append(
            f"step {t}: |Δp| max {err.max():.3g} (worst case 2C·Σlr {2 * c * sum(lrs[:t]):.3g}),"
            f" max |Δp|/bound {worst:.3g}; within the float32 bound {bulk:.3g}: {frac:.6f};"
            f" max |Δm|/bound {worst_mu:.3g}, |Δv|/bound {worst_nu:.3g}"
        )
        assert worst <= 1, report[-1]  # every entry within its Adam bound
        assert frac >= BULK_FRACTION, report[-1]  # the bulk: float32 rounding only
        assert worst_mu <= 1 and worst_nu <= 1, report[-1]  # Adam's moments
    print("\n".join(report))
    assert one["count"] == mesh["count"] == STEPS

    # The parameters really moved: every trained entry by ~lr per step, far above the bounds.
    moved = np.concatenate([np.abs(one["params"][-1][k] - v).ravel() for k, v in start.items()])
    print(f"moved: {np.mean(moved > LR):.3f} of entries by > lr, median {np.median(moved):.3g}")
    assert float(np.mean(moved > LR)) > 0.5 and moved.max() > 2 * LR
    assert float(np.median(moved)) > 1e3 * bulk  # the float32 bound is far below the steps
