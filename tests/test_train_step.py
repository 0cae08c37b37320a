"""The GRPO train step (issue #10, step.py): state, optimizer, frozen tower, reference model.

References are independent of `make_train_step`: the loss is rebuilt from `grpo.loss` and
`completion_logprobs` with its own `jax.grad`, and AdamW (clip by global norm, bias-corrected
moments, decoupled decay on matrices, HF's linear schedule) is written out in float64 numpy.
Vision-tower runs are counted with a `jax.debug.callback` (as test_train_logprobs does).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from visionr1_jax import grpo, host, sections
from visionr1_jax.models import QwenVL, QwenVLConfig, from_pretrained, testing
from visionr1_jax.models.logprobs import completion_logprobs
from visionr1_jax.sections.training import validate_training
from visionr1_jax.state import init_train_state, learning_rate_schedule
from visionr1_jax.step import UpdateBatch, make_train_step

G, L = 2, 8
STEPS = 3
LR, WD, TOTAL = 1e-3, 0.1, 10
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8
TEMPERATURE = 0.8
# optax's linear schedule in float32: 1 − s/n amplifies the rounding of s/n by s/(n − s) <=
# n − 1 (times u/2), plus about four more roundings (lr, product, sum, join).
LR_RTOL = (TOTAL + 4) * 2.0**-24


class _CountingQwenVL(QwenVL):
    """QwenVL that counts its vision-tower runs (one per policy or reference forward)."""

    calls: ClassVar[list] = []

    def encode_images(self, pixel_values, image_grid_thw):
        jax.debug.callback(lambda: _CountingQwenVL.calls.append(1))
        return super().encode_images(pixel_values, image_grid_thw)


def _config(*, beta: float, freeze: bool, **optim) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = TOTAL
    c.model = sections.model_config()
    c.model.dtype = "float32"
    c.model.freeze_vision_tower = freeze
    c.grpo = sections.grpo_config()
    c.grpo.num_generations = G
    c.grpo.beta = beta
    c.grpo.temperature = TEMPERATURE
    c.optim = sections.optim_config()
    c.optim.learning_rate = LR
    c.optim.weight_decay = WD
    c.optim.update(optim)
    return c


def _flat(tree) -> dict[str, np.ndarray]:
    """{path: float64 copy} of a pytree's leaves (copied to the host before any donation)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in leaves}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


@pytest.fixture(scope="module")
def logprob_atol(ckpt) -> float:
    # float32 log-prob parity of two evaluations of the same parameters (tiny logit scale
    # divided by the temperature, the checkpoint's vocabulary).
    vocab = QwenVLConfig.from_pretrained(ckpt).vocab_size
    return testing.logprob_atol(testing.TINY_LOGIT_SCALE / TEMPERATURE, vocab)


@pytest.fixture(scope="module")
def rollout(ckpt):
    """(batch, tokens i32[B*G, L], mask bool[B*G, L], advantages f32[B*G]): 3 image prompts;
    completion 0 of prompt 0 has advantage +1, completion 1 has -1, the others 0."""
    full = testing.prompt_batch(ckpt)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    batch = {k: np.asarray(full[k]) for k in keys}
    rows = batch["input_ids"].shape[0] * G
    cfg = QwenVLConfig.from_pretrained(ckpt)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = [int(cfg.hf_config[k]) for k in names]
    allowed = np.setdiff1d(np.arange(cfg.vocab_size), vision)  # completions are text
    rng = np.random.default_rng(0)
    tokens = rng.choice(allowed, (rows, L)).astype(np.int32)
    lengths = rng.integers(3, L + 1, rows)
    lengths[:2] = L
    mask = np.arange(L)[None] < lengths[:, None]
    adv = np.zeros(rows, np.float32)
    adv[:2] = (1.0, -1.0)
    return batch, tokens, mask, adv


def _run(ckpt, rollout, config, steps):
    """Runs `steps` train steps; returns start params, per-step params, metrics, tower runs
    per step, backend compilations during the steps, the final state and graphdef."""
    batch, tokens, mask, adv = rollout
    model = from_pretrained(ckpt)
    model.__class__ = _CountingQwenVL
    start_model = _flat(nnx.state(model))
    graphdef, state = init_train_state(model, config, jax.random.key(0))
    start = _flat(state.params)
    step_fn = make_train_step(graphdef, config)
    compiles, params, metrics, calls = [], [], [], []

    def listener(event, duration, **kwargs):
        if event in host.COMPILE_EVENTS:  # compiled, or loaded from the persistent cache
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(steps):
            _CountingQwenVL.calls = []
            state, m = step_fn(state, UpdateBatch(batch, tokens, mask, adv, None, None))
            jax.block_until_ready((state, m))
            jax.effects_barrier()
            calls.append(len(_CountingQwenVL.calls))
            params.append(_flat(state.params))
            metrics.append({k: float(v) for k, v in m.items()})
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return dict(
        start=start, start_model=start_model, params=params, metrics=metrics, calls=calls,
        compiles=len(compiles), cache_size=step_fn._cache_size(), state=state,
        graphdef=graphdef,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plain(ckpt, rollout):
    """β = 0, whole model trained, STEPS steps."""
    return _run(ckpt, rollout, _config(beta=0.0, freeze=False), STEPS)


@pytest.fixture(scope="module")
def frozen(ckpt, rollout):
    """β = 0.04 (reference log-probs computed inside the step), vision tower frozen, 2 steps."""
    return _run(ckpt, rollout, _config(beta=0.04, freeze=True), 2)


@pytest.fixture(scope="module")
def reference_grad(plain, rollout):
    """The loss and its gradient rebuilt outside the train step: params -> ((loss, logps),
    grads), with `grpo.loss` (β = 0, μ = 1) over `completion_logprobs` at the temperature."""
    graphdef, empty = plain["graphdef"], plain["state"].frozen
    batch, tokens, mask, adv = rollout

    @jax.jit
    def fn(params):
        def loss(p):
            model = nnx.merge(graphdef, p, empty)
            lp = completion_logprobs(
                model, batch, tokens, mask, num_generations=G, temperature=TEMPERATURE
            )
            value, _ = grpo.loss(lp, None, None, adv, mask, beta=0.0, epsilon=0.2)
            return value, lp

        return jax.value_and_grad(loss, has_aux=True)(params)

    template = plain["state"].params

    def at(flat: dict[str, np.ndarray]):
        leaves = [jnp.asarray(flat[k], jnp.float32) for k in _flat(template)]
        params = jax.tree.unflatten(jax.tree.structure(template), leaves)
        (_, lp), grads = fn(params)
        return np.asarray(lp, np.float64), _flat(grads)

    return at


# ----------------------------------------------------------------------------- reference model


def test_beta_zero_holds_no_reference_and_runs_no_reference_forward(plain, frozen):
    """β = 0: no reference tree, one vision-tower run per step (the policy's); β > 0 without
    given reference log-probs and a frozen tower: still one (the policy and reference passes
    share the frozen tower's features)."""
    assert plain["state"].ref_params is None
    assert plain["calls"] == [1] * STEPS
    assert frozen["state"].ref_params is not None
    assert frozen["calls"] == [1, 1]


def test_reference_stays_at_start_params(frozen, logprob_atol):
    """β > 0: the reference equals the start parameters after the steps (exactly: frozen),
    while the policy has moved; the KL is rounding-level at step 1 (policy = reference) and
    clearly positive at step 2."""
    ref = _flat(frozen["state"].ref_params)
    assert ref.keys() == frozen["start"].keys()
    for k, v in frozen["start"].items():
        np.testing.assert_array_equal(ref[k], v, err_msg=k)
    assert any(not np.array_equal(frozen["params"][-1][k], v) for k, v in ref.items())
    # k3 ≈ x²/2 for a log-prob difference x; two evaluations of the same parameters differ by
    # at most the float32 log-prob parity `atol`, so step 1's KL is at most atol²/2.
    atol = logprob_atol
    kl = [m["kl"] for m in frozen["metrics"]]
    assert 0 <= kl[0] <= atol**2 / 2, kl
    assert kl[1] > 10 * atol**2, kl


# ----------------------------------------------------------------------------- frozen tower


def test_frozen_vision_tower_gets_no_update_and_no_optimizer_state(frozen, plain):
    """freeze_vision_tower: the tower is neither in the trained params nor in the optimizer
    state, the merged policy's tower equals the start checkpoint's, other matrices moved."""
    state = frozen["state"]
    trained = _flat(state.params)
    assert trained and not any("visual" in k for k in trained)
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    ]
    assert not any("visual" in k for k in opt_paths)
    plain_opt = jax.tree_util.tree_leaves_with_path(plain["state"].opt_state)
    assert any("visual" in jax.tree_util.keystr(p) for p, _ in plain_opt)  # the test can fail

    policy = _flat(nnx.state(nnx.merge(frozen["graphdef"], state.params, state.frozen)))
    tower = [k for k in policy if "visual" in k]
    assert tower and set(tower) == {k for k in frozen["start_model"] if "visual" in k}
    for k in tower:
        np.testing.assert_array_equal(policy[k], frozen["start_model"][k], err_msg=k)
    moved = [k for k, v in frozen["start"].items() if v.ndim >= 2]
    assert moved and all(not np.array_equal(trained[k], frozen["start"][k]) for k in moved)
    assert frozen["metrics"][0]["grad_norm"] > 0


# ----------------------------------------------------------------------------- optimizer


def _rtol_grad() -> float:
    # Two float32 evaluations of the same gradient (other programs, other fusion): about twice
    # the logits' relative rounding (forward and its transpose), plus sqrt(R·L) u for the
    # R·L weighted terms summed in another order (as test_train_logprobs derives).
    return 2 * testing.LOGIT_RTOL + math.sqrt(6 * L) * testing.F32_U


def _clip(g: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
    c = min(1.0, 1.0 / norm)  # clip by global norm 1.0
    return {k: c * v for k, v in g.items()}, c


def _float32_rtol(t: int) -> float:
    """Relative float32 error of AdamW's step-t update besides the gradients': the bias
    corrections 1 − β^t (β^t carries (t + 1) u/2, amplified by β^t / (1 − β^t): 500x for β2 at
    t = 1; √v̂ halves v̂'s), and the learning rate (LR_RTOL)."""
    u = testing.F32_U
    m_hat = (t + 1) * u / 2 * B1**t / (1 - B1**t)
    v_hat = (t + 1) * u / 2 * B2**t / (1 - B2**t)
    return m_hat + v_hat / 2 + LR_RTOL


def test_updates_equal_adamw_by_hand(plain, reference_grad):
    """Steps 1 and 2 equal AdamW written out in numpy from the independently computed
    gradients: clip by global norm 1, m, v with bias correction, decoupled decay lr·wd·p on
    matrices only, lr of HF's linear schedule (lr, 0.9 lr); the reported gradient norm equals
    the reference's."""
    rtol = _rtol_grad()
    _, g1 = reference_grad(plain["start"])
    c1g1, c1 = _clip(g1)
    p1 = plain["params"][0]
    _, g2 = reference_grad(p1)  # step 2's gradient at our step-1 parameters
    c2g2, _ = _clip(g2)
    # Absolute error of a gradient entry: rtol of the scale of the terms it sums, bounded by
    # the model's largest entry (a leaf such as the k bias is a cancelling sum of k-gradient
    # terms, so its own scale would not bound it); doubled for the clip factor's own error.
    d1 = 2 * rtol * max(float(np.abs(v).max()) for v in c1g1.values())
    d2 = 2 * rtol * max(float(np.abs(v).max()) for v in c2g2.values())

    norm1 = math.sqrt(sum(float(np.sum(v * v)) for v in g1.values()))
    n = sum(v.size for v in g1.values())
    dnorm = math.sqrt(n) * d1 / c1  # |Δnorm| <= ||Δg||, unclipped scale
    assert abs(plain["metrics"][0]["grad_norm"] - norm1) <= dnorm + 4 * testing.F32_U * norm1
    np.testing.assert_allclose(
        [m["learning_rate"] for m in plain["metrics"]],
        [LR * (TOTAL - s) / TOTAL for s in range(STEPS)],
        rtol=LR_RTOL,
    )

    worst = 0.0
    for k, p0 in plain["start"].items():
        decay = WD if p0.ndim >= 2 else 0.0
        a1, a2 = c1g1[k], c2g2[k]

        # Step 1: m̂ = g, v̂ = g², update g / (|g| + ε); d/dg = ε / (|g| + ε)², |update| < 1.
        want1 = p0 - LR * (a1 / (np.abs(a1) + ADAM_EPS) + decay * p0)
        sens1 = np.minimum(
            2.0, 2 * d1 * ADAM_EPS / (np.maximum(np.abs(a1) - d1, 0) + ADAM_EPS) ** 2
        )
        # + the update's float32 error (|update| <= 1 + wd|p|) and the sum's rounding.
        rounding1 = LR * (1 + decay * np.abs(p0)) * (_float32_rtol(1) + 8 * testing.F32_U)
        tol1 = LR * sens1 + rounding1 + 2 * testing.F32_U * np.abs(p0)
        err1 = np.abs(p1[k] - want1)
        assert (err1 <= tol1).all(), (k, float((err1 - tol1).max()))

        # Step 2 from our p1 with the moments of the reference's step 1.
        lr2 = LR * (TOTAL - 1) / TOTAL
        m = (B1 * (1 - B1) * a1 + (1 - B1) * a2) / (1 - B1**2)
        v = (B2 * (1 - B2) * a1**2 + (1 - B2) * a2**2) / (1 - B2**2)
        s = np.sqrt(v)
        want2 = p1[k] - lr2 * (m / (s + ADAM_EPS) + decay * p1[k])
        # First-order sensitivity of m̂ / (√v̂ + ε) to the gradients' errors, doubled for the
        # second-order remainder; |m̂| <= 1.0014 √v̂ (Cauchy-Schwarz over the two steps'
        # weights), so the update is within ±1.0014 and two of them differ by < 2.01.
        dm = (B1 * (1 - B1) * d1 + (1 - B1) * d2) / (1 - B1**2)
        dv = 2 * (B2 * (1 - B2) * np.abs(a1) * d1 + (1 - B2) * np.abs(a2) * d2) / (1 - B2**2)
        sens2 = 2 * (dm / (s + ADAM_EPS) + 0.51 * dv / (s + ADAM_EPS) ** 2)
        rounding2 = lr2 * (1.01 + decay * np.abs(p1[k])) * (_float32_rtol(2) + 8 * testing.F32_U)
        tol2 = lr2 * np.minimum(2.01, sens2) + rounding2 + 2 * testing.F32_U * np.abs(p1[k])
        err2 = np.abs(plain["params"][1][k] - want2)
        assert (err2 <= tol2).all(), (k, float((err2 - tol2).max()))
        worst = max(worst, float((err1 / tol1).max()), float((err2 / tol2).max()))
    assert worst <= 1


def test_positive_advantage_raises_its_logprob(plain, reference_grad, rollout, logprob_atol):
    """After 3 steps the completion with advantage +1 is more likely, the one with -1 less,
    by more than the float32 evaluation error of their summed log-probs."""
    _, _, mask, _ = rollout
    before, _ = reference_grad(plain["start"])
    after, _ = reference_grad(plain["params"][-1])
    bound = 2 * L * logprob_atol  # two evaluations of L log-probs each
    up = float(after[0].sum() - before[0].sum())
    down = float(after[1].sum() - before[1].sum())
    assert up > bound and down < -bound, (up, down, bound)
    assert mask[0].all() and mask[1].all()


def test_step_compiles_once(plain):
    """Three steps on the same shapes: one XLA compilation (the donated state comes back with
    the same structure, shardings and dtypes), one entry in the jit cache."""
    assert plain["compiles"] == 1
    assert plain["cache_size"] == 1


# ----------------------------------------------------------------------------- config


def test_learning_rate_schedule_with_warmup_matches_hf_formula():
    """HF `get_linear_schedule_with_warmup`: s / W for s < W, then (T − s) / (T − W), 0 after T."""
    config = _config(beta=0.0, freeze=False, warmup_steps=3)
    schedule = learning_rate_schedule(config)
    want = [LR * (s / 3 if s < 3 else max(0.0, (TOTAL - s) / (TOTAL - 3))) for s in range(12)]
    got = [float(schedule(s)) for s in range(12)]
    np.testing.assert_allclose(got, want, rtol=LR_RTOL, atol=0)


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("grpo", "epsilon_high", 0.28, "no effect"),
        ("grpo", "importance_level", "sequence", r"importance_level.*no effect"),
        ("grpo", "importance_level", "seq", "must be one of"),
        ("grpo", "temperature", 0.0, "temperature"),
        ("grpo", "num_generations", 1, "num_generations"),
        ("grpo", "kl", "k4", "grpo.kl"),
        ("grpo", "top_p", 0.0, "top_p"),
        ("optim", "warmup_steps", TOTAL + 1, "warmup_steps"),
        ("optim", "grad_clip", 0.0, "grad_clip"),
    ],
)
def test_validation_rejects(section, key, value, match):
    config = _config(beta=0.0, freeze=False)
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
        validate_training(config)


def test_validation_accepts_defaults_and_clip_higher_with_iterations():
    config = _config(beta=0.0, freeze=False)
    validate_training(config)
    config.grpo.num_iterations = 2
    config.grpo.epsilon_high = 0.28
    validate_training(config)
    config.grpo.importance_level = "sequence"  # GSPO
    validate_training(config)


# ----------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_equals_the_full_batch(ckpt):
    """k = 2 micro-batches under `lax.scan` give the full batch's loss, KL and gradient (its
    norm) with the per-token aggregation (DAPO's token mean, whose micro-batch weights are
    their token shares; the per-sequence ones weigh 1/k) and completion lengths that differ
    between the micro-batches, so a wrong weighting shows. Text-only
    prompts of 4 rows (left-padded, different lengths): the split is a reshape of every row
    array, images included."""
    rng = np.random.default_rng(3)
    b, g, big_l, t = 4, 2, 8, 6
    ids = rng.integers(10, 300, (b, t)).astype(np.int32)
    attn = (np.arange(t)[None] >= np.array([0, 2, 1, 3])[:, None]).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": attn}
    tokens = rng.integers(10, 300, (b * g, big_l)).astype(np.int32)
    lengths = np.array([8, 8, 8, 7, 2, 1, 3, 2])  # micro-batch 1: 31 tokens, 2: 8
    mask = np.arange(big_l)[None] < lengths[:, None]
    adv = rng.normal(size=b * g).astype(np.float32)
    out = {}
    for k in (1, 2):
        c = _config(beta=0.04, freeze=False)
        c.grpo.aggregation = "token-mean"
        c.optim.accumulation_steps = k
        graphdef, state = init_train_state(from_pretrained(ckpt), c, jax.random.key(0))
        _, m = make_train_step(graphdef, c)(state, UpdateBatch(batch, tokens, mask, adv))
        out[k] = {key: float(v) for key, v in m.items()}
    # Rows are computed alike in both; only the final sums over ≤ 10^4 gradient terms (and
    # 2 micro-batch partial sums) are reordered: relative error ≲ √n·u ≈ 6e-6 per sum.
    rtol = 4 * math.sqrt(1e4) * testing.F32_U
    for key in ("loss", "kl", "grad_norm"):
        assert out[2][key] == pytest.approx(out[1][key], rel=rtol, abs=1e-9), key
