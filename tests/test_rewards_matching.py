"""Box kernels and matchers against numpy / scipy references, under jit and vmap."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from visionr1_jax.rewards import boxes, matching

SIZES = (0, 1, 2, 5, 17, 30, 40)
U = 2.0**-24  # float32 unit roundoff


def _overlaps(a, b):
    """``(iou, giou)`` of two xyxy boxes in float64, with ``boxes.py``'s conventions for
    degenerate boxes (areas clipped at 0; 0 IoU for an empty union, no penalty for an empty
    hull); the reference's formulas give NaN there."""
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    iou = inter / union if union > 0 else 0.0
    hull = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0) * max(max(a[3], b[3]) - min(a[1], b[1]), 0)
    return iou, iou - ((hull - union) / hull if hull > 0 else 0.0)


def _random_boxes(rng, n, degenerate=0.1):
    xy = rng.uniform(-20, 300, (n, 2))
    wh = rng.uniform(0, 120, (n, 2))
    wh[rng.random(n) < degenerate] = 0.0  # zero-area boxes
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_iou_giou_match_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 64), _random_boxes(rng, 48)
    iou, _ = jax.jit(lambda x, y: boxes.pairwise(boxes.iou, x, y))(a, b)
    giou, aux = jax.jit(lambda x, y: boxes.pairwise(boxes.giou, x, y))(a, b)
    want = np.array([[_overlaps(p.astype(float), q.astype(float)) for q in b] for p in a])
    # float32 IoU/GIoU: ~8 roundings of ≤ U relative each on ratios ≤ 1 (areas ≤ 1.4e4 are
    # exact to 2^-10) → |Δ| ≤ ~5e-7 on any CPU, FMA or not; 1e-6.
    np.testing.assert_allclose(np.asarray(iou), want[..., 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(giou), want[..., 1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["iou"]), want[..., 0], atol=1e-6)
    assert np.all(np.isfinite(np.asarray(giou)))
    assert np.all((np.asarray(giou) >= -1) & (np.asarray(giou) <= 1))


def test_box_prior_cost_matches_definition():
    rng = np.random.default_rng(1)
    p, g = _random_boxes(rng, 7), _random_boxes(rng, 5)
    pl, gl = rng.integers(0, 3, 7), rng.integers(1, 3, 5)
    cost, aux = jax.jit(matching.box_prior_cost)(p, pl, g, gl)
    for i, j in itertools.product(range(7), range(5)):
        _, giou = _overlaps(p[i].astype(float), g[j].astype(float))
        l1 = np.abs(p[i].astype(float) - g[j].astype(float)).sum()
        want = l1 - float(pl[i] == gl[j]) - giou
        # float32 L1 of 4 differences (≤ 4 roundings of ≤ U·L1) minus the class term and a
        # GIoU good to 1e-6 (above): |Δ| ≤ 4·U·L1 + ulp(|cost|) + 1e-6.
        tol = 4 * U * l1 + 2 * U * abs(want) + 1e-6
        assert abs(float(cost[i, j]) - want) <= tol, (i, j, float(cost[i, j]), want)
        assert float(aux["class_match"][i, j]) == float(pl[i] == gl[j])


def _problems(rng, count, m, n, kind):
    if kind == "normal":
        cost = rng.normal(size=(count, m, n)) * 50
    elif kind == "integer":  # many ties
        cost = rng.integers(0, 4, size=(count, m, n)).astype(float)
    else:  # L1 − GIoU costs of jittered boxes (duplicates, misses), the reward's case
        cost = np.zeros((count, m, n))
        for c in range(count):
            g = _random_boxes(rng, n, 0)
            src = rng.integers(0, max(n, 1), m)
            p = g[src] + rng.normal(0, 8, (m, 4)) if n else _random_boxes(rng, m, 0)
            for i, j in itertools.product(range(m), range(n)):
                cost[c, i, j] = np.abs(p[i] - g[j]).sum() - _overlaps(p[i], g[j])[1]
    m_valid = rng.integers(0, m + 1, count)
    n_valid = rng.integers(0, n + 1, count)
    m_valid[0], n_valid[0] = m, n  # always include the full problem
    row_valid = np.arange(m)[None] < m_valid[:, None]
    col_valid = np.arange(n)[None] < n_valid[:, None]
    return cost.astype(np.float32), row_valid, col_valid


def _check(cost, row_valid, col_valid, p2g, g2p, optimal=True):
    for b in range(cost.shape[0]):
        rows, cols = np.flatnonzero(row_valid[b]), np.flatnonzero(col_valid[b])
        sub = cost[b][np.ix_(rows, cols)].astype(np.float64)
        sel = p2g[b]
        matched = np.flatnonzero(sel >= 0)
        # One-to-one, only valid entries, exactly min(M, N) pairs, inverse consistent.
        assert set(matched) <= set(rows)
        assert set(sel[matched]) <= set(cols)
        assert len(set(sel[matched])) == len(matched) == min(len(rows), len(cols))
        assert all(g2p[b, sel[i]] == i for i in matched)
        assert (g2p[b] >= 0).sum() == len(matched)
        ours = float(sum(cost[b, i, sel[i]] for i in matched))
        if len(rows) and len(cols):
            r, c = linear_sum_assignment(sub)
            best = float(sub[r, c].sum())
        else:
            best = 0.0
        # Both sums read the same float32 entries in float64; the solver's float32 reduced
        # costs round at ulp(max|C|) per relaxation, ≤ 16 ulps per assigned row.
        tol = 16 * U * float(np.abs(sub).max(initial=0.0)) * max(len(matched), 1) + 1e-9
        if optimal:
            assert abs(ours - best) <= tol, (b, ours, best, tol)
        else:
            assert ours >= best - tol


@pytest.mark.parametrize("m,n", list(itertools.product(SIZES, SIZES)))
def test_hungarian_total_cost_equals_scipy_under_jit(m, n):
    rng = np.random.default_rng(m * 100 + n)
    parts = [_problems(rng, 12, m, n, kind) for kind in ("normal", "integer", "boxes")]
    cost, rv, cv = (np.concatenate(x) for x in zip(*parts, strict=True))
    p2g, g2p = jax.jit(lambda c, r, v: matching.hungarian(c, r, v, lanes=8))(cost, rv, cv)
    assert p2g.shape == (36, m) and g2p.shape == (36, n)
    _check(cost, rv, cv, np.asarray(p2g), np.asarray(g2p))


@pytest.mark.parametrize("m,n", [(5, 17), (30, 17), (40, 40), (0, 5), (17, 0)])
def test_hungarian_under_vmap(m, n):
    rng = np.random.default_rng(7)
    cost, rv, cv = _problems(rng, 3 * 8, m, n, "normal")
    fn = jax.jit(jax.vmap(lambda c, r, v: matching.hungarian(c, r, v, lanes=4)))
    p2g, g2p = fn(cost.reshape(3, 8, m, n), rv.reshape(3, 8, m), cv.reshape(3, 8, n))
    _check(cost, rv, cv, np.asarray(p2g).reshape(24, m), np.asarray(g2p).reshape(24, n))


@pytest.mark.parametrize("lanes,refill_at", [(1, 1), (3, 1), (3, 2), (64, 1), (64, 16), (64, 64)])
def test_hungarian_lane_count_does_not_change_the_optimum(lanes, refill_at):
    rng = np.random.default_rng(lanes * 100 + refill_at)
    cost, rv, cv = _problems(rng, 50, 17, 30, "boxes")
    solve = jax.jit(lambda c, r, v: matching.hungarian(c, r, v, lanes=lanes, refill_at=refill_at))
    p2g, g2p = solve(cost, rv, cv)
    _check(cost, rv, cv, np.asarray(p2g), np.asarray(g2p))


def test_hungarian_handles_non_finite_costs_and_scattered_masks():
    rng = np.random.default_rng(3)
    cost, _, _ = _problems(rng, 16, 9, 6, "normal")
    cost[cost > 60] = np.nan  # treated as 0
    cost[cost < -70] = -np.inf  # likewise
    rv, cv = rng.random((16, 9)) < 0.7, rng.random((16, 6)) < 0.7  # non-prefix masks
    p2g, g2p = jax.jit(matching.hungarian)(cost, rv, cv)
    finite = np.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)
    _check(finite, rv, cv, np.asarray(p2g), np.asarray(g2p))


def _greedy_reference(cost, rv, cv):
    m, _n = cost.shape
    p2g = -np.ones(m, int)
    free = np.where(rv[:, None] & cv[None, :], cost, np.inf)
    for _ in range(min(rv.sum(), cv.sum())):
        i, j = np.unravel_index(np.argmin(free), free.shape)
        p2g[i] = j
        free[i, :] = np.inf
        free[:, j] = np.inf
    return p2g


@pytest.mark.parametrize("m,n", [(0, 3), (5, 17), (17, 5), (30, 30)])
def test_greedy_matches_numpy_greedy(m, n):
    rng = np.random.default_rng(11)
    cost, rv, cv = _problems(rng, 10, m, n, "normal")
    p2g, g2p = jax.jit(matching.greedy)(cost, rv, cv)
    _check(cost, rv, cv, np.asarray(p2g), np.asarray(g2p), optimal=False)
    for b in range(10):
        np.testing.assert_array_equal(np.asarray(p2g[b]), _greedy_reference(cost[b], rv[b], cv[b]))


def test_matched_cost():
    cost = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4)
    p2g = jnp.array([[2, -1, 0]])
    assert float(matching.matched_cost(cost, p2g)[0]) == 2.0 + 8.0
