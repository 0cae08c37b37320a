"""One-to-one matching of predicted and ground-truth boxes (pure JAX, jit/vmap-safe).

* ``box_prior_cost``: the Vision-R1 matching cost (SPEC §3)
  ``C[i, j] = L1(pred_i, gt_j) − 1[class_i = class_j] − GIoU(pred_i, gt_j)``.
* ``hungarian``: an exactly optimal assignment on padded matrices with validity masks
  (``M = 0`` or ``N = 0`` allowed), giving ``min(M, N)`` pairs.
* ``greedy``: repeatedly takes the cheapest remaining pair; a registered alternative.

Why the Hungarian solver looks the way it does. A textbook O(n³) Hungarian lifted with
``vmap`` runs every problem of the batch for as many sweeps as the hardest one needs and is
several times slower than a host loop over ``scipy.optimize.linear_sum_assignment``. Here:

1. The smaller side always plays the rows: each problem is padded to a square and transposed
   when it has more valid rows than columns, so the number of augmentations is ``min(M, N)``.
   The oriented, masked cost is written once, so every later row read is contiguous.
2. Warm start: row reduction (``u_i = min_j C_ij``, ``v = 0``) and every column goes to the
   lowest row whose cheapest column it is. Those pairs are tight and the duals feasible, so
   the start satisfies complementary slackness. Box-prior costs are dominated by the pixel L1
   term, so most rows are settled here and many problems are done.
3. The remaining rows are augmented with Dijkstra-style shortest augmenting paths (Jonker &
   Volgenant, 1987; the rectangular variant of Crouse, 2016, which SciPy also implements),
   written as a *single flat state machine*: one loop iteration performs one Dijkstra step or
   one back-tracking step of an augmentation.
4. Lanes, not the batch, are vectorised: ``lanes`` problems are solved side by side and a
   lane that finishes takes the next queued problem (hardest first), so the loop runs about
   ``Σ_b steps_b / lanes`` times instead of ``max_b steps_b`` sweeps over the whole batch.

XLA:CPU specifics that shaped the code (each measured; numbers in BENCHMARKS.md): ``argmin``
(a variadic reduce) lowers to a slow scalar loop, so arg-minima are a native ``min`` and then
a ``min`` over the indices that attain it, with an ``optimization_barrier`` so the first
reduce is not re-fused (recomputed per element) into the second; in the loop, row distances
are recorded when a row is reached rather than gathered when the duals move; padding is coded
in the assignment vectors (``-2``) rather than carried as extra mask arrays; finished lanes
are written back and refilled in batches, not every iteration.

Conventions: rows are predictions (``M``), columns are ground truth (``N``). Outputs are
``pred_to_gt i32[M]`` and ``gt_to_pred i32[N]`` with ``-1`` for unmatched entries.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from visionr1_jax.rewards import boxes as boxes_lib

Array = jax.Array

_SEARCH, _AUGMENT, _DONE = 0, 1, 2
_FREE, _PAD = -1, -2  # assignment-vector codes: unassigned, padding (never assigned)


def box_prior_cost(
    pred_boxes: Array, pred_labels: Array, gt_boxes: Array, gt_labels: Array
) -> tuple[Array, dict[str, Array]]:
    """The box-prior matching cost of SPEC §3 for one completion.

    Args:
      pred_boxes: ``f32[M, 4]`` xyxy in original-image pixels.
      pred_labels: ``i32[M]`` class ids (0 = background / unknown label).
      gt_boxes: ``f32[N, 4]`` xyxy in original-image pixels.
      gt_labels: ``i32[N]`` class ids.

    Returns:
      ``(cost f32[M, N], aux)`` with aux ``{"giou", "iou", "l1", "class_match"}``, each
      ``[M, N]``, so the caller can read any overlap of the matched pairs without recomputing.
    """
    g, aux = boxes_lib.pairwise(boxes_lib.giou, pred_boxes, gt_boxes)
    l1, _ = boxes_lib.pairwise(boxes_lib.l1, pred_boxes, gt_boxes)
    same = (pred_labels[:, None] == gt_labels[None, :]).astype(jnp.float32)
    cost = l1 - same - g
    return cost, {"giou": g, "iou": aux["iou"], "l1": l1, "class_match": same}


def _min_argmin(x: Array, axis: int) -> tuple[Array, Array]:
    """``(min, lowest index attaining it)`` of ``x`` over ``axis``, as two native reduces.

    XLA:CPU lowers ``argmin`` (a variadic reduce) to a slow scalar loop; two plain ``min``
    reduces vectorise. The barrier keeps the first reduce from being re-fused (and recomputed
    per element) into the second.
    """
    low = jax.lax.optimization_barrier(jnp.min(x, axis))
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    hit = x == jnp.expand_dims(low, axis)
    arg = jnp.min(jnp.where(hit, iota, x.shape[axis]), axis)
    return low, jnp.minimum(arg, x.shape[axis] - 1)


def _first(mask: Array) -> Array:
    """``bool[..., S] -> i32[...]``: the first true index, ``S`` when there is none."""
    size = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def _prepare(cost: Array, row_valid: Array, col_valid: Array) -> dict[str, Array]:
    """Orientation and warm start for a whole batch (batched ops, no vmap).

    Orientation: each problem is square-padded and transposed when it has more valid rows
    than columns, so the smaller side plays the rows and ``min(M, N)`` rows get augmented.
    Warm start: row reduction ``u_i = min_j C_ij`` with ``v = 0``; each column goes to the
    lowest row whose cheapest column it is. Those pairs are tight and the duals feasible, so
    complementary slackness holds from the start.

    Args:
      cost: ``f32[B, M, N]``; row_valid ``bool[B, M]``; col_valid ``bool[B, N]``.

    Returns:
      dict with ``cost f32[B, S, S]`` (oriented; non-finite valid entries read as 0, padded
      entries ``+inf``), ``transposed bool[B]``, ``u f32[B, S]``, ``col4row`` and ``row4col``
      ``i32[B, S]`` (``-1`` free, ``-2`` padding) and ``open_rows i32[B]``; ``S = max(M, N)``.
    """
    _, m, n = cost.shape
    size = max(m, n)
    if m != n:
        cost = jnp.pad(cost, ((0, 0), (0, size - m), (0, size - n)))
    rv = jnp.pad(row_valid, ((0, 0), (0, size - m)))
    cv = jnp.pad(col_valid, ((0, 0), (0, size - n)))
    transposed = jnp.sum(rv, axis=1) > jnp.sum(cv, axis=1)
    t2, t3 = transposed[:, None], transposed[:, None, None]
    rv, cv = jnp.where(t2, cv, rv), jnp.where(t2, rv, cv)
    # One elementwise pass, so only the oriented array is ever written.
    flipped = jnp.where(t3, jnp.swapaxes(cost, 1, 2), cost)
    finite = jnp.where(jnp.isfinite(flipped), flipped, 0.0)
    oriented = jax.lax.optimization_barrier(
        jnp.where(rv[:, :, None] & cv[:, None, :], finite, jnp.inf)
    )
    u, best = _min_argmin(oriented, 2)
    # After orientation every valid row has a valid column, so ``u`` is finite on valid rows.
    idx = jnp.arange(size, dtype=jnp.int32)
    wants = rv[:, :, None] & (best[:, :, None] == idx[None, None, :])  # [B, row, col]
    claim = jnp.min(jnp.where(wants, idx[None, :, None], size), axis=1)  # lowest row per col
    row4col = jnp.where(claim < size, claim, _FREE)
    won = jnp.take_along_axis(row4col, best, axis=1) == idx[None, :]
    col4row = jnp.where(rv, jnp.where(won, best, _FREE), _PAD)
    return {
        "cost": oriented,
        "transposed": transposed,
        "u": jnp.where(rv, u, 0.0),
        "col4row": col4row,
        "row4col": jnp.where(cv, row4col, _PAD),
        "open_rows": jnp.sum(col4row == _FREE, axis=1),
    }


def _lane_step(s: dict[str, Array], row: Array) -> dict[str, Array]:
    """One step of one lane: a Dijkstra step (``SEARCH``) or one back-tracking step of the
    augmentation (``AUGMENT``) that, once it reaches the start row, opens the next search.

    Follows the rectangular shortest-augmenting-path method (Crouse, 2016; SciPy's
    ``linear_sum_assignment``): reduced costs ``C_ij − u_i − v_j ≥ 0`` with tight matched
    pairs, duals updated once a free column (the sink) is reached. ``row_dist[r]`` records the
    path length at which row ``r`` was reached (``0`` for the start row, ``inf`` if not
    reached); it replaces SciPy's ``shortest[col4row[r]]`` gather in the row-dual update.

    Args:
      s: lane state, vectors ``[S]`` and scalars (see ``_fresh_lane``).
      row: ``f32[S]``, the oriented cost row of the lane's current row ``s["i"]``.
    """
    size = row.shape[0]
    idx = jnp.arange(size, dtype=jnp.int32)
    searching = s["mode"] == _SEARCH
    i = s["i"]

    # -- search: relax the columns reachable from row i, settle the closest open column j.
    row_dist = jnp.where(idx == i, s["min_val"], s["row_dist"])
    reduced = s["min_val"] + row - s["u"][i] - s["v"]
    better = ~s["scanned"] & (reduced < s["shortest"])
    shortest = jnp.where(better, reduced, s["shortest"])
    path = jnp.where(better, i, s["path"])
    cand = jnp.where(s["scanned"], jnp.inf, shortest)
    lowest = jax.lax.optimization_barrier(jnp.min(cand))
    # Among ties prefer a free column (ends the search sooner), then the lowest index.
    key = jnp.where(cand == lowest, jnp.where(s["row4col"] == _FREE, idx, idx + size), 2 * size)
    k = jnp.min(key)
    sink = k < size
    j_s = jnp.where(sink, k, k - size)
    scanned = s["scanned"] | (idx == j_s)
    # Dual update once the sink is reached (before augmenting, as in JV).
    u_s = s["u"] + jnp.where(row_dist < jnp.inf, lowest - row_dist, 0.0)
    v_s = s["v"] - jnp.where(scanned & (shortest < jnp.inf), lowest - shortest, 0.0)

    # -- augment: flip one (row, column) pair of the path, walking back from the sink.
    flip = s["mode"] == _AUGMENT
    j = s["j"]
    i_a = s["path"][j]
    row4col = jnp.where(flip & (idx == j), i_a, s["row4col"])
    col4row = jnp.where(flip & (idx == i_a), j, s["col4row"])
    finished = flip & (i_a == s["cur"])
    next_row = _first(col4row == _FREE)

    step_sink = searching & sink
    return {
        "u": jnp.where(step_sink, u_s, s["u"]),
        "v": jnp.where(step_sink, v_s, s["v"]),
        "col4row": col4row,
        "row4col": row4col,
        "shortest": jnp.where(searching, shortest, jnp.where(finished, jnp.inf, s["shortest"])),
        "path": jnp.where(searching, path, s["path"]),
        "scanned": jnp.where(
            searching, scanned, jnp.where(finished, row4col == _PAD, s["scanned"])
        ),
        "row_dist": jnp.where(searching, row_dist, jnp.where(finished, jnp.inf, s["row_dist"])),
        "min_val": jnp.where(searching, lowest, jnp.where(finished, 0.0, s["min_val"])),
        "i": jnp.where(
            searching,
            jnp.where(sink, i, s["row4col"][j_s]),
            jnp.where(finished, jnp.minimum(next_row, size - 1), i),
        ),
        "cur": jnp.where(finished, jnp.minimum(next_row, size - 1), s["cur"]),
        "j": jnp.where(searching, j_s, s["col4row"][i_a]),
        "mode": jnp.where(
            searching,
            jnp.where(sink, _AUGMENT, _SEARCH),
            jnp.where(finished, jnp.where(next_row < size, _SEARCH, _DONE), s["mode"]),
        ).astype(jnp.int32),
    }


def _fresh_lane(warm: dict[str, Array], q: Array) -> dict[str, Array]:
    """Lane state for problem ``q`` (scalar index): its warm start and a search from its first
    open row. Padded columns start (and stay) scanned, so no search ever reaches them."""
    size = warm["u"].shape[1]
    col4row, row4col = warm["col4row"][q], warm["row4col"][q]
    first = jnp.minimum(_first(col4row == _FREE), size - 1)
    return {
        "u": warm["u"][q],
        "v": jnp.zeros((size,), jnp.float32),
        "col4row": col4row,
        "row4col": row4col,
        "shortest": jnp.full((size,), jnp.inf, jnp.float32),
        "path": jnp.full((size,), -1, jnp.int32),
        "scanned": row4col == _PAD,
        "row_dist": jnp.full((size,), jnp.inf, jnp.float32),
        "min_val": jnp.float32(0.0),
        "i": first,
        "cur": first,
        "j": jnp.int32(0),
        "mode": jnp.int32(_SEARCH),
    }


def hungarian(
    cost: Array,
    row_valid: Array,
    col_valid: Array,
    *,
    lanes: int = 128,
    refill_at: int = 16,
) -> tuple[Array, Array]:
    """Exactly optimal one-to-one assignment for a batch of padded cost matrices.

    Minimises ``Σ C[i, σ(i)]`` over ``min(M_b, N_b)`` pairs of valid rows and columns of each
    problem ``b``; padded entries are never matched.

    Stages: (1) orientation and warm start for the whole batch (``_prepare``); (2) the
    problems the warm start left open are queued, hardest first; (3) ``lanes`` problems are
    solved side by side, one ``_lane_step`` per loop iteration; once ``refill_at`` lanes have
    finished (or all have), their results are written back and they take the next queued
    problems, so the loop runs about ``Σ_b steps_b / lanes`` times (``_solve_lanes``); (4) the
    assignments are read back in the problems' own orientation.

    Args:
      cost: ``f32[B, M, N]`` (non-finite entries of valid pairs are treated as 0).
      row_valid: ``bool[B, M]``; col_valid: ``bool[B, N]``.
      lanes: problems augmented side by side.
      refill_at: finished lanes that trigger a refill (fewer refills, a little idling).

    Returns:
      ``(pred_to_gt i32[B, M], gt_to_pred i32[B, N])``, ``-1`` where unmatched.
    """
    batch, m, n = cost.shape
    if batch == 0 or m == 0 or n == 0:
        return jnp.full((batch, m), -1, jnp.int32), jnp.full((batch, n), -1, jnp.int32)
    # 1. orientation and warm start.
    warm = _prepare(cost, row_valid, col_valid)
    lanes = min(lanes, batch)
    refill_at = max(1, min(refill_at, lanes))
    # 2. the open problems, hardest first.
    order = jnp.argsort(-warm["open_rows"], stable=True).astype(jnp.int32)
    num_open = jnp.sum(warm["open_rows"] > 0)
    # 3. lanes.
    solved = _solve_lanes(warm, order, num_open, lanes, refill_at)
    # 4. back to the problems' orientation.
    col4row, row4col = (jnp.maximum(x, -1) for x in solved)
    flip = warm["transposed"][:, None]
    pred_to_gt = jnp.where(flip, row4col, col4row)[:, :m]
    gt_to_pred = jnp.where(flip, col4row, row4col)[:, :n]
    return pred_to_gt, gt_to_pred


def _select(take: Array, a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
    """Lane states ``a`` where ``take bool[lanes]``, else ``b``."""
    return jax.tree.map(
        lambda x, y: jnp.where(take.reshape(take.shape + (1,) * (x.ndim - 1)), x, y), a, b
    )


def _write_back(
    lane_q: Array, state: dict[str, Array], out: tuple[Array, Array]
) -> tuple[Array, Array]:
    """``out`` (``col4row``, ``row4col`` i32[B, S]) with the finished lanes' assignments
    written into their problems' rows (``lane_q i32[lanes]``: -1 for an idle lane)."""
    batch = out[0].shape[0]
    target = jnp.where((lane_q >= 0) & (state["mode"] == _DONE), lane_q, batch)
    return (
        out[0].at[target].set(state["col4row"], mode="drop"),
        out[1].at[target].set(state["row4col"], mode="drop"),
    )


def _solve_lanes(
    warm: dict[str, Array], order: Array, num_open: Array, lanes: int, refill_at: int
) -> tuple[Array, Array]:
    """Stage 3 of ``hungarian``: the ``num_open`` problems of ``order`` solved ``lanes`` at a
    time in one ``while_loop``; returns every problem's ``(col4row, row4col) i32[B, S]``
    (the warm start's for the problems it left no row open)."""
    batch = warm["u"].shape[0]
    fresh = jax.vmap(lambda q: _fresh_lane(warm, q))

    def refill(carry):
        state, lane_q, ptr, out = carry
        out = _write_back(lane_q, state, out)
        done = state["mode"] == _DONE
        pos = ptr + jnp.cumsum(done) - 1
        take = done & (pos < num_open)
        new_q = jnp.where(take, order[jnp.clip(pos, 0, batch - 1)], -1)
        state = _select(take, fresh(jnp.maximum(new_q, 0)), state)
        lane_q = jnp.where(done, new_q, lane_q)
        return state, lane_q, ptr + jnp.sum(done), out

    def body(carry):
        num_done = jnp.sum(carry[0]["mode"] == _DONE)
        due = ((num_done >= refill_at) | (num_done == lanes)) & (carry[2] < num_open)
        state, lane_q, ptr, out = jax.lax.cond(due, refill, lambda c: c, carry)
        rows = warm["cost"][jnp.maximum(lane_q, 0), state["i"]]
        stepped = jax.vmap(_lane_step)(state, rows)
        stepped["mode"] = jnp.where(lane_q < 0, _DONE, stepped["mode"])  # idle lanes
        return stepped, lane_q, ptr, out

    def cond(carry):
        state, _, ptr, _ = carry
        return jnp.any(state["mode"] != _DONE) | (ptr < num_open)

    idle = fresh(jnp.zeros((lanes,), jnp.int32))
    idle["mode"] = jnp.full((lanes,), _DONE, jnp.int32)
    carry = (idle, jnp.full((lanes,), -1, jnp.int32), jnp.int32(0),
             (warm["col4row"], warm["row4col"]))  # fmt: skip
    state, lane_q, _, out = jax.lax.while_loop(cond, body, carry)
    return _write_back(lane_q, state, out)


def greedy(cost: Array, row_valid: Array, col_valid: Array) -> tuple[Array, Array]:
    """Greedy matching: repeatedly take the globally cheapest pair among unmatched ones.

    Same signature and outputs as ``hungarian``; not optimal in general (registered for
    ablations and as the cheap alternative).
    """
    batch, m, n = cost.shape
    if batch == 0 or m == 0 or n == 0:
        return jnp.full((batch, m), -1, jnp.int32), jnp.full((batch, n), -1, jnp.int32)

    def one(c, rv, cv):
        allowed = rv[:, None] & cv[None, :]
        c = jnp.where(allowed & jnp.isfinite(c), c, 0.0)

        def step(_, carry):
            p2g, g2p = carry
            free = allowed & (p2g[:, None] < 0) & (g2p[None, :] < 0)
            flat = jnp.argmin(jnp.where(free, c, jnp.inf).reshape(-1))
            i, j = flat // n, flat % n
            ok = jnp.any(free)
            p2g = jnp.where(ok & (jnp.arange(m) == i), j, p2g)
            g2p = jnp.where(ok & (jnp.arange(n) == j), i, g2p)
            return p2g.astype(jnp.int32), g2p.astype(jnp.int32)

        init = (jnp.full((m,), -1, jnp.int32), jnp.full((n,), -1, jnp.int32))
        return jax.lax.fori_loop(0, min(m, n), step, init)

    return jax.vmap(one)(cost, row_valid, col_valid)


Matcher = Callable[[Array, Array, Array], tuple[Array, Array]]
MATCHERS: dict[str, Matcher] = {"hungarian": hungarian, "greedy": greedy}


def matched_cost(cost: Array, pred_to_gt: Array) -> Array:
    """``f32[B, M, N], i32[B, M] -> f32[B]``: total cost of the matched pairs."""
    picked = jnp.take_along_axis(cost, jnp.clip(pred_to_gt, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(pred_to_gt >= 0, picked, 0.0), axis=-1)
