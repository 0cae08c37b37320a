"""visionr1_jax.grpo against a float64 numpy oracle (tests/grpo_reference.py) and the reference's
own torch formulas (Vision-R1 ``qwen_trainer.py``, TRL 0.14); GSPO (``importance_level=
"sequence"``) against an oracle written from the GSPO paper and TRL 1.16's own
``GRPOTrainer._compute_loss`` run in the test.

Tolerances. float32 unit roundoff u = 2^-24 ≈ 6.0e-8. Every comparison is relative to the
magnitude of the float32 computation (the same formula with every term replaced by the size of
its operands, from the oracle), not to the possibly cancelling result:
* loss: ≤ 4u per token (a rounded difference, exp, product, KL) and ≤ (L − 1) + (R − 1) = 11
  roundings in the row-then-batch sums of R = 8 rows × L = 5 tokens: 15u ≈ 9e-7 ≤ 1e-6;
* advantages: ≤ (G + 4)u of the group's spread over its std (shift, G-term sum, sqrt, divide),
  G ≤ 8: 12u ≈ 7e-7 ≤ 1e-6;
* gradients: no sums per token (the sum's transpose broadcasts): ≤ 6u of the token's magnitude.
Each is held at 1e-6, the issue's acceptance bound, which covers the derivation on any x86-64.
"""

from __future__ import annotations

import functools

import grpo_reference as ref_impl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionr1_jax import grpo

U = 2.0**-24  # float32 unit roundoff
RTOL = 1e-6  # derived in the module docstring (≤ 15u for the loss, ≤ 12u advantages)
B, G, L = 2, 4, 5
EMPTY_ROW = 2
KLS = tuple(grpo.KL_ESTIMATORS)
AGGS = tuple(grpo.AGGREGATIONS)


def make_case(seed: int = 1, rows: int = B * G, length: int = L):
    """Random f32 tensors: ragged prefix masks with a full row and an empty row, finite junk at
    the masked positions (the oracle never reads it), ratios spread enough to clip on both
    sides, and a group of zero advantages."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (rows, length))
    old = logps + rng.normal(0.0, 0.3, (rows, length))
    ref = logps + rng.normal(0.0, 0.4, (rows, length))
    lengths = rng.integers(1, length + 1, rows)
    lengths[0], lengths[EMPTY_ROW] = length, 0
    mask = np.arange(length)[None, :] < lengths[:, None]
    adv = rng.normal(0.0, 1.0, rows)
    adv[G : 2 * G] = 0.0  # a zero-variance group
    entropy = rng.uniform(0.0, 5.0, (rows, length))
    junk = rng.uniform(-40.0, 40.0, (rows, length))
    f32 = lambda x: np.where(mask, x, junk).astype(np.float32)
    return dict(
        logps=f32(logps),
        old=f32(old),
        ref=f32(ref),
        adv=adv.astype(np.float32),
        mask=mask,
        entropy=f32(entropy),
    )


@functools.partial(jax.jit, static_argnames=("use_kl", "use_old"))
def run_all(logps, old, ref, adv, mask, entropy, beta, eps, eps_high, *, use_kl, use_old):
    """{"kl|aggregation": (loss, aux, d loss / d logps)} for every pair, in one compiled program
    (one compile per (use_kl, use_old) keeps the file fast); β, ε, ε_high are traced (β = 0 is
    the static Python 0 when the KL term is off)."""
    out = {}
    for kl in KLS:
        for aggregation in AGGS:

            def f(lp, kl=kl, aggregation=aggregation):
                return grpo.loss(
                    lp,
                    old if use_old else None,
                    ref if use_kl else None,
                    adv,
                    mask,
                    beta=beta if use_kl else 0.0,
                    epsilon=eps,
                    epsilon_high=eps_high,
                    kl=kl,
                    aggregation=aggregation,
                    entropy=entropy,
                )

            (value, aux), grad = jax.value_and_grad(f, has_aux=True)(logps)
            out[f"{kl}|{aggregation}"] = (value, aux, grad)
    return out


def both(case, *, beta, eps, eps_high, kl, aggregation, use_old=True):
    ours = run_all(
        case["logps"],
        case["old"],
        case["ref"],
        case["adv"],
        case["mask"],
        case["entropy"],
        beta,
        eps,
        eps if eps_high is None else eps_high,
        use_kl=beta != 0,
        use_old=use_old,
    )[f"{kl}|{aggregation}"]
    oracle = ref_impl.loss(
        case["logps"],
        case["old"] if use_old else None,
        case["ref"],
        case["adv"],
        case["mask"],
        beta=beta,
        epsilon=eps,
        epsilon_high=eps_high,
        kl_kind=kl,
        aggregation=aggregation,
        entropy=case["entropy"],
    )
    return ours, oracle


def assert_close(ours, oracle, scale, what):
    err = np.abs(np.asarray(ours, np.float64) - oracle)
    tol = RTOL * np.asarray(scale)  # RTOL: derived in the module docstring
    assert np.all(err <= tol), f"{what}: max err {err.max():.3g}, tol {np.min(tol):.3g}"


# ------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("estimator", tuple(grpo.ESTIMATORS))
@pytest.mark.parametrize("g", [2, 3, 4, 8])
def test_advantages_match_oracle(estimator, g):
    rng = np.random.default_rng(g)
    groups = [
        np.full(g, 0.7),  # zero variance
        2.9 + 1e-3 * rng.normal(size=g),  # tight spread near a typical reward
        rng.uniform(0.0, 3.0, g),
        rng.uniform(-5.0, 5.0, g),
    ]
    rewards = np.concatenate(groups).astype(np.float32)
    fn = jax.jit(functools.partial(grpo.advantages, estimator=estimator), static_argnums=1)
    ours = fn(rewards, g)
    assert ours.shape == rewards.shape and ours.dtype == jnp.float32
    oracle = ref_impl.advantages(rewards, g, estimator, 1e-4)
    scale = ref_impl.advantage_scale(rewards, g, estimator, 1e-4)
    # RTOL: ≤ (G + 4)u of the group's spread / std (docstring); 0 for equal rewards
    assert_close(ours, oracle, scale, f"{estimator} G={g}")
    assert np.all(np.asarray(ours)[:g] == 0.0)  # zero-variance group: exactly 0
    assert np.all(np.isfinite(ours))


def test_advantages_single_generation():
    rewards = np.array([0.3, 1.2, 2.0], np.float32)
    np.testing.assert_array_equal(grpo.advantages(rewards, 1, estimator="drgrpo"), 0.0)
    for estimator in ("grpo", "rloo"):
        with pytest.raises(ValueError, match=r"num_generations >= 2"):
            grpo.advantages(rewards, 1, estimator=estimator)


def test_advantages_unbiased_std_like_reference_torch():
    """The reference's lines in torch (float64): ``rewards.view(-1, G).std(dim=1)`` with
    torch's default correction, ``(r − mean) / (std + 1e-4)``."""
    torch = pytest.importorskip("torch")
    rewards = np.random.default_rng(3).uniform(0.0, 3.0, 16).astype(np.float32)
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = r.view(-1, 4).mean(dim=1).repeat_interleave(4, dim=0)
    std = r.view(-1, 4).std(dim=1).repeat_interleave(4, dim=0)
    expected = ((r - mean) / (std + 1e-4)).numpy()
    scale = ref_impl.advantage_scale(rewards, 4, "grpo", 1e-4)
    # RTOL: ≤ 8u of the spread / std for G = 4 (docstring)
    assert_close(grpo.advantages(rewards, 4), expected, scale, "grpo vs torch")


# ------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("eps, eps_high", [(0.2, None), (0.1, 0.2)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("kl", KLS)
def test_loss_matches_oracle(kl, aggregation, beta, eps, eps_high):
    case = make_case()
    (value, aux, grad), (o_value, o_aux, o_grad, o_scale, o_gscale) = both(
        case, beta=beta, eps=eps, eps_high=eps_high, kl=kl, aggregation=aggregation
    )
    assert o_aux["clip_frac_low"] > 0 and o_aux["clip_frac_high"] > 0  # clipping is exercised
    assert 0 < o_aux["clip_frac"] < 0.5
    assert value.shape == () and value.dtype == jnp.float32
    # RTOL: ≤ 15u of the loss's magnitude (docstring)
    assert_close(value, o_value, o_scale, "loss")
    # RTOL: ≤ 6u of each token's gradient magnitude; masked tokens exactly 0
    assert_close(grad, o_grad, o_gscale, "grad")
    assert np.all(np.asarray(grad)[~case["mask"]] == 0.0)

    expected_keys = set(o_aux)
    assert set(aux) == expected_keys
    # counts of ≤ 40 tokens are exact; the fraction is one rounded division: u relative
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac"):
        np.testing.assert_allclose(aux[key], o_aux[key], rtol=2 * U, err_msg=key)
    # positive terms: exp of a rounded difference ≤ (|d| + 2)u ≤ 4u, sums of ≤ 40: well in 1e-6
    for key in ("ratio_mean", "ratio_min", "ratio_max", "entropy"):
        np.testing.assert_allclose(aux[key], o_aux[key], rtol=RTOL, err_msg=key)
    if beta:
        mask = case["mask"]
        kl_scale = np.mean(
            [
                ref_impl.kl_scale(kl, float(a), float(b))
                for a, b in zip(case["logps"][mask], case["ref"][mask], strict=True)
            ]
        )
        # RTOL: ≤ 4u per token, ≤ 11 roundings in the row-then-batch sums, 1 division
        assert abs(aux["kl"] - o_aux["kl"]) <= RTOL * kl_scale, "kl"


def _check_oracle_gradient(oracle, case, grad_index):
    """`oracle`'s analytic float64 gradient (its output `grad_index`) against central
    differences of its loss (output 0), for every aggregation."""
    kwargs = dict(beta=0.04, epsilon=0.1, epsilon_high=0.2, kl_kind="k3")
    args = (case["old"], case["ref"], case["adv"], case["mask"])
    lp = case["logps"].astype(np.float64)
    for aggregation in AGGS:
        grad = oracle(lp, *args, aggregation=aggregation, **kwargs)[grad_index]
        h = 1e-6
        fd = np.zeros_like(lp)
        for i, t in zip(*np.nonzero(case["mask"]), strict=True):
            up, down = lp.copy(), lp.copy()
            up[i, t] += h
            down[i, t] -= h
            plus = oracle(up, *args, aggregation=aggregation, **kwargs)[0]
            minus = oracle(down, *args, aggregation=aggregation, **kwargs)[0]
            fd[i, t] = (plus - minus) / (2 * h)
        # float64: truncation O(h²) ≈ 1e-12, cancellation ≈ 1e-16 / h = 1e-10
        np.testing.assert_allclose(fd, grad, atol=1e-8)


def test_oracle_gradient_is_the_derivative_of_the_oracle_loss():
    """The analytic float64 gradient of the oracle against central differences of its loss."""
    _check_oracle_gradient(ref_impl.loss, make_case(1), 2)


@pytest.mark.parametrize("eps, eps_high", [(0.0, None), (0.2, None), (0.2, 0.28)])
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("kl", ["k2", "k3"])
def test_old_none_is_the_policy_gradient(kl, aggregation, eps, eps_high):
    """μ = 1 (SPEC §5): ρ ≡ 1, never clipped (even with ε = 0), and the gradient is
    ``w·(−A + β ∂KL/∂logp)`` with w the aggregation's token weight."""
    case = make_case(2)
    beta = 0.04
    (value, aux, grad), (o_value, _, _, o_scale, o_gscale) = both(
        case, beta=beta, eps=eps, eps_high=eps_high, kl=kl, aggregation=aggregation, use_old=False
    )
    mask = case["mask"]
    w = ref_impl.weights(mask, aggregation)
    expected = np.zeros(mask.shape)
    for i, t in zip(*np.nonzero(mask), strict=True):
        kl_grad = ref_impl.kl_grad(kl, float(case["logps"][i, t]), float(case["ref"][i, t]))
        expected[i, t] = w[i, t] * (-float(case["adv"][i]) + beta * kl_grad)
    # RTOL: ≤ 6u of each token's gradient magnitude (docstring)
    assert_close(grad, expected, o_gscale, "policy gradient")
    assert_close(value, o_value, o_scale, "loss")  # RTOL: ≤ 15u of the magnitude
    assert aux["ratio_min"] == aux["ratio_max"] == 1.0
    assert aux["clip_frac"] == 0.0


def test_reference_torch_loss_and_gradient():
    """The reference's μ = 1 loss in torch float64 with autograd: ``exp(lp − lp.detach())·A``,
    ``−(that − β·k3)``, per-row mask mean, then mean; our default config equals it."""
    torch = pytest.importorskip("torch")
    case = make_case(4)
    case["mask"][EMPTY_ROW, 0] = True  # the reference's mask always keeps the first token
    rewards = np.random.default_rng(4).uniform(0.0, 3.0, B * G).astype(np.float32)
    adv_np = np.asarray(grpo.advantages(rewards, G))
    lp = torch.tensor(case["logps"], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(case["ref"], dtype=torch.float64)
    mask = torch.tensor(case["mask"], dtype=torch.float64)
    adv = torch.tensor(adv_np, dtype=torch.float64)
    per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token_loss = torch.exp(lp - lp.detach()) * adv.unsqueeze(1)
    per_token_loss = -(per_token_loss - 0.04 * per_token_kl)
    expected = ((per_token_loss * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    expected.backward()

    fn = functools.partial(grpo.loss, old_logps=None, beta=0.04, epsilon=0.2)
    (value, _), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
        case["logps"], ref_logps=case["ref"], advantages=adv_np, mask=case["mask"]
    )
    o = ref_impl.loss(case["logps"], None, case["ref"], adv_np, case["mask"], beta=0.04,
                      epsilon=0.2)  # fmt: skip
    # RTOL: ≤ 15u of the loss magnitude, ≤ 6u of each gradient's (docstring)
    assert_close(value, expected.item(), o[3], "loss vs torch")
    assert_close(grad, lp.grad.numpy(), o[4], "grad vs torch")


# ------------------------------------------------------------------------ edges and contract


def test_masked_positions_are_ignored_even_if_nonfinite():
    case = make_case(5)
    bad = dict(case)
    pad = ~case["mask"]
    for key, fill in (("logps", -np.inf), ("old", np.nan), ("ref", np.inf), ("entropy", np.nan)):
        bad[key] = np.where(pad, fill, case[key]).astype(np.float32)
    for kl in KLS:
        kwargs = dict(beta=0.04, eps=0.1, eps_high=0.2, kl=kl, aggregation=AGGS[0])
        clean, _ = both(case, **kwargs)
        dirty, _ = both(bad, **kwargs)
        assert np.isfinite(dirty[0]) and np.all(np.isfinite(dirty[2]))
        jax.tree.map(np.testing.assert_array_equal, dirty, clean)


@pytest.mark.parametrize("aggregation", AGGS)
def test_empty_mask_gives_zero_not_nan(aggregation):
    case = make_case(6)
    case["mask"][:] = False
    value, aux, grad = both(case, beta=0.04, eps=0.2, eps_high=None, kl="k3",
                            aggregation=aggregation)[0]  # fmt: skip
    assert value == 0.0
    assert all(v == 0.0 for v in aux.values()), aux
    assert np.all(np.asarray(grad) == 0.0)


def test_empty_row_counts_as_a_row_in_the_sequence_mean():
    """TRL's clamp(min=1): an empty row adds 0 but is one of the R rows."""
    case = make_case(7)
    adv = np.ones(B * G, np.float32)
    mask = np.zeros((B * G, L), bool)
    mask[0, :2] = True
    fn = jax.jit(functools.partial(grpo.loss, beta=0.0, epsilon=0.2))
    value, _ = fn(case["logps"], None, None, adv, mask)
    assert value == pytest.approx(-1.0 / (B * G), rel=2 * U)  # one row of mean −1 over 8 rows


def test_beta_zero_ignores_the_reference_and_jits():
    case = make_case(8)
    fn = jax.jit(functools.partial(grpo.loss, beta=0.0, epsilon=0.2))
    value, aux = fn(case["logps"], case["old"], None, case["adv"], case["mask"])
    with_ref = fn(case["logps"], case["old"], np.full_like(case["ref"], np.nan), case["adv"],
                  case["mask"])  # fmt: skip
    assert np.isfinite(value) and with_ref[0] == value
    assert "kl" not in aux and set(aux) == set(with_ref[1])
    assert all(v.shape == () and v.dtype == jnp.float32 for v in aux.values())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: grpo.advantages(c["adv"], 4, estimator="ppo"), "'grpo', 'drgrpo', 'rloo'"),
        (lambda c: grpo.advantages(c["adv"], 3), "dividing"),
        (lambda c: grpo.advantages(c["adv"], 0), ">= 1"),
        (lambda c: grpo.loss(*_args(c), beta=0.1, epsilon=0.2, kl="k4"), "'k1', 'k2', 'k3'"),
        (
            lambda c: grpo.loss(*_args(c), beta=0.1, epsilon=0.2, aggregation="sum"),
            "'seq-mean-token-mean', 'token-mean', 'seq-mean-token-sum-norm'",
        ),
        (
            lambda c: grpo.loss(c["logps"], None, None, c["adv"], c["mask"], beta=0.1, epsilon=0.2),
            "ref_logps is None",
        ),
        (
            lambda c: grpo.loss(*_args(c)[:3], c["adv"][:3], c["mask"], beta=0.1, epsilon=0.2),
            "advantages must be",
        ),
        (
            lambda c: grpo.loss(*_args(c)[:4], c["mask"][:, :2], beta=0.1, epsilon=0.2),
            "mask must have",
        ),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_case())


def _args(c):
    return c["logps"], c["old"], c["ref"], c["adv"], c["mask"]


# ------------------------------------------------------------------------------------- GSPO


@functools.partial(jax.jit, static_argnames=("kl", "aggregation", "use_old"))
def _gspo(logps, old, ref, adv, mask, beta, eps, eps_high, *, kl, aggregation, use_old):
    def f(lp):
        return grpo.loss(
            lp, old if use_old else None, ref, adv, mask, beta=beta, epsilon=eps,
            epsilon_high=eps_high, kl=kl, aggregation=aggregation, importance_level="sequence",
        )  # fmt: skip

    return jax.value_and_grad(f, has_aux=True)(logps)


def _gspo_case(seed):
    """`make_case` with the old log-probs spread per completion, so that sequence ratios fall
    on both sides of the clip range (a token-level spread averages out over a completion)."""
    case = make_case(seed)
    rng = np.random.default_rng(seed + 100)
    shift = rng.normal(0.0, 0.3, (B * G, 1)).astype(np.float32)
    case["old"] = np.where(case["mask"], case["old"] + shift, case["old"]).astype(np.float32)
    return case


@pytest.mark.parametrize("eps, eps_high", [(0.2, None), (0.1, 0.2)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_gspo_loss_matches_the_papers_oracle(kl, aggregation, beta, eps, eps_high):
    """`importance_level="sequence"` against `grpo_reference.gspo_loss` (float64, written from
    the GSPO paper's sequence ratio): loss, every token's gradient, the sequence-level metrics."""
    case = _gspo_case(12)
    (value, aux), grad = _gspo(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta, eps,
        eps if eps_high is None else eps_high, kl=kl, aggregation=aggregation, use_old=True,
    )  # fmt: skip
    o_value, o_aux, o_grad = ref_impl.gspo_loss(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta=beta,
        epsilon=eps, epsilon_high=eps_high, kl_kind=kl, aggregation=aggregation,
    )  # fmt: skip
    assert o_aux["clip_frac_low"] > 0 and o_aux["clip_frac_high"] > 0  # both sides clip
    assert 0 < o_aux["clip_frac"] < 1
    # the per-token magnitudes: |A|·max(s, 1 + ε) for the ratio term plus the KL's, summed
    # over the row's ≤ L tokens (a mean of L rounded terms, then a sum of R rows): the loss
    # carries ≤ (L + 4)u + (R − 1)u relative to Σ|w·term|, held at RTOL (1e-6 > 16u)
    _, _, _, o_scale, o_gscale = ref_impl.loss(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta=beta,
        epsilon=eps, epsilon_high=eps_high, kl_kind=kl, aggregation=aggregation,
    )  # fmt: skip
    s_max = max(o_aux["ratio_max"], 1.0 + max(eps, eps_high or eps))
    scale = o_scale + s_max * float(np.sum(np.abs(case["adv"])))
    assert abs(float(value) - o_value) <= RTOL * scale, (float(value), o_value)
    # gradient of a token: s·|A|·(row weight)/|y| plus its KL part, ≤ (L + 6)u of it (RTOL)
    row_w = ref_impl.weights(case["mask"], aggregation).sum(1, keepdims=True)
    gscale = o_gscale + s_max * np.abs(case["adv"])[:, None] * row_w
    err = np.abs(np.asarray(grad, np.float64) - o_grad)
    assert np.all(err <= RTOL * gscale), err.max()
    assert np.all(np.asarray(grad)[~case["mask"]] == 0.0)
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac"):  # counts of ≤ 8 rows: exact
        np.testing.assert_allclose(aux[key], o_aux[key], rtol=2 * U, err_msg=key)
    for key in ("ratio_mean", "ratio_min", "ratio_max"):  # exp of a mean of ≤ L terms
        np.testing.assert_allclose(aux[key], o_aux[key], rtol=RTOL, err_msg=key)


def test_gspo_oracle_gradient_is_the_derivative_of_its_loss():
    _check_oracle_gradient(ref_impl.gspo_loss, _gspo_case(4), 2)


@pytest.mark.parametrize("aggregation", AGGS)
def test_gspo_with_one_update_per_rollout_is_grpo(aggregation):
    """μ = 1 (no old log-probs): s ≡ 1 and, every aggregation weighting a row's tokens alike,
    GSPO's gradient A·s·(Σ_t w)/|y| per token is GRPO's A·w: the same loss and gradient."""
    case = make_case(5)
    args = (case["logps"], case["old"], case["ref"], case["adv"], case["mask"], 0.04, 0.2, 0.2)
    (v_seq, a_seq), g_seq = _gspo(*args, kl="k3", aggregation=aggregation, use_old=False)

    def token(lp):
        return grpo.loss(lp, None, case["ref"], case["adv"], case["mask"], beta=0.04,
                         epsilon=0.2, aggregation=aggregation)  # fmt: skip

    (v_tok, _), g_tok = jax.value_and_grad(token, has_aux=True)(case["logps"])
    # a row's sum of |y| equal rounded terms vs one term: ≤ (L + 2)u of the magnitude
    np.testing.assert_allclose(v_seq, v_tok, rtol=RTOL)
    np.testing.assert_allclose(g_seq, g_tok, rtol=RTOL)
    assert a_seq["ratio_min"] == a_seq["ratio_max"] == 1.0 and a_seq["clip_frac"] == 0.0


def test_unknown_importance_level_raises():
    case = make_case(1)
    with pytest.raises(ValueError, match="importance_level 'seq'"):
        grpo.loss(case["logps"], None, None, case["adv"], case["mask"], beta=0.0, epsilon=0.2,
                  importance_level="seq")  # fmt: skip


TRL_LOSS_TYPES = {  # our aggregation -> TRL's loss_type with the same normalisation
    "seq-mean-token-mean": "grpo",
    "token-mean": "bnpo",
    "seq-mean-token-sum-norm": "dr_grpo",
}


def _trl_loss(case, *, beta, eps, eps_high, loss_type):
    """TRL's own `GRPOTrainer._compute_loss` (importance_sampling_level="sequence"), run on a
    trainer object that holds only what the method reads; the model's log-probs are the case's
    (float64 torch, differentiated). Returns (loss, d loss / d logps)."""
    import collections
    import types

    import torch
    from trl import GRPOTrainer

    class Accelerator:  # one process: gathers and reductions are the identity
        num_processes, sync_gradients = 1, True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    mask = torch.tensor(case["mask"], dtype=torch.float64)
    f64 = lambda x: torch.tensor(np.where(case["mask"], x, 0.0), dtype=torch.float64)
    logps = f64(case["logps"]).requires_grad_(True)
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="sequence", beta=beta, loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=L,
        accelerator=Accelerator(), args=types.SimpleNamespace(use_bias_correction_kl=False,
                                                              delta=None),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )  # fmt: skip
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps),
                                                                   None)  # fmt: skip
    rows = mask.shape[0]
    inputs = {
        "prompt_ids": torch.zeros((rows, 1), dtype=torch.long),
        "prompt_mask": torch.ones((rows, 1), dtype=torch.long),
        "completion_ids": torch.zeros((rows, L), dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(case["adv"], dtype=torch.float64),
        "old_per_token_logps": f64(case["old"]),
        "ref_per_token_logps": f64(case["ref"]),
    }
    value = GRPOTrainer._compute_loss(trainer, None, inputs)
    value.backward()
    return float(value.detach()), logps.grad.numpy()


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_equals_trls(aggregation, beta):
    """Ours against TRL 1.16's `_compute_loss` with `importance_sampling_level="sequence"` (its
    KL is k3), same inputs: the loss and every token's gradient."""
    case = _gspo_case(12)
    eps, eps_high = 0.1, 0.2
    (value, _), grad = _gspo(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta, eps,
        eps_high, kl="k3", aggregation=aggregation, use_old=True,
    )  # fmt: skip
    t_value, t_grad = _trl_loss(
        case, beta=beta, eps=eps, eps_high=eps_high, loss_type=TRL_LOSS_TYPES[aggregation]
    )
    o_value, o_aux, o_grad = ref_impl.gspo_loss(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta=beta,
        epsilon=eps, epsilon_high=eps_high, kl_kind="k3", aggregation=aggregation,
    )  # fmt: skip
    assert o_aux["clip_frac"] > 0
    # TRL (float64) and the oracle (float64) agree to float64 rounding
    np.testing.assert_allclose(t_value, o_value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t_grad, o_grad, rtol=1e-10, atol=1e-15)
    # ours (float32) within the bounds of test_gspo_loss_matches_the_papers_oracle: RTOL
    # of the magnitude Σ|w·term| (here bounded by the largest ratio times Σ|A|, plus the KL's)
    _, _, _, o_scale, o_gscale = ref_impl.loss(
        case["logps"], case["old"], case["ref"], case["adv"], case["mask"], beta=beta,
        epsilon=eps, epsilon_high=eps_high, kl_kind="k3", aggregation=aggregation,
    )  # fmt: skip
    s_max = max(o_aux["ratio_max"], 1.0 + eps_high)
    assert abs(float(value) - t_value) <= RTOL * (o_scale + s_max * np.abs(case["adv"]).sum())
    row_w = ref_impl.weights(case["mask"], aggregation).sum(1, keepdims=True)
    gscale = o_gscale + s_max * np.abs(case["adv"])[:, None] * row_w
    assert np.all(np.abs(np.asarray(grad, np.float64) - t_grad) <= RTOL * gscale)
