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
2. Warm start: row reduction (``u_i = min_j C_ij``, ``v = 0``) and every row whose cheapest
   column is not wanted by an earlier row is assigned at once. Those pairs are tight and the
   duals are feasible, so the start satisfies complementary slackness. Box-prior costs are
   dominated by the pixel L1 term, so most rows are settled here and many problems are done.
3. The remaining rows are augmented with Dijkstra-style shortest augmenting paths (Jonker &
   Volgenant, 1987; the rectangular variant of Crouse, 2016, which SciPy also implements),
   written as a *single flat state machine*: each loop iteration performs one Dijkstra step or
   one back-tracking step of an augmentation. A batch then loops ``max_b(total steps of b)``
   times instead of ``Σ_rows max_b(path length)``.
4. Problems are sorted by the number of rows the warm start left open and solved in chunks
   (``lax.map`` with ``batch_size``), so chunks of settled problems exit immediately and a hard
   problem only holds back its own chunk.

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


def _argmin_last(x: Array) -> tuple[Array, Array]:
    """``(min, argmin)`` over the last axis as a halving tree of elementwise selects.

    XLA:CPU lowers ``argmin`` (a variadic reduce) to a slow scalar loop, and a reduce whose
    input compares against another reduce over the same axis gets recomputed per element;
    log2(S) elementwise steps are several times faster at these sizes. Ties may resolve to
    any minimal index, which every caller here accepts.
    """
    idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half : 2 * half]
        take = b < a
        x_next = jnp.where(take, b, a)
        i_next = jnp.where(take, idx[..., half : 2 * half], idx[..., :half])
        if x.shape[-1] % 2:
            x_next = jnp.concatenate([x_next, x[..., -1:]], axis=-1)
            i_next = jnp.concatenate([i_next, idx[..., -1:]], axis=-1)
        x, idx = x_next, i_next
    return x[..., 0], idx[..., 0]


def _prepare(cost: Array, row_valid: Array, col_valid: Array) -> dict[str, Array]:
    """Orientation and warm start for a whole batch (batched ops, no vmap).

    Orientation: each problem is square-padded and transposed when it has more valid rows
    than columns, so the smaller side plays the rows and ``min(M, N)`` rows get augmented.
    Warm start: row reduction ``u_i = min_j C_ij`` with ``v = 0``; each column goes to the
    first row whose cheapest column it is. Those pairs are tight and the duals feasible, so
    complementary slackness holds from the start.

    Args:
      cost: ``f32[B, M, N]``; row_valid ``bool[B, M]``; col_valid ``bool[B, N]``.

    Returns:
      dict with ``cost f32[B, S, S]`` (oriented, finite), ``row_valid``/``col_valid``
      ``bool[B, S]`` (oriented), ``transposed bool[B]``, ``u f32[B, S]``, ``col4row`` and
      ``row4col`` ``i32[B, S]`` and ``open_rows i32[B]``; ``S = max(M, N)``.
    """
    _, m, n = cost.shape
    size = max(m, n)
    sq = jnp.pad(jnp.where(jnp.isfinite(cost), cost, 0.0), ((0, 0), (0, size - m), (0, size - n)))
    rv = jnp.pad(row_valid, ((0, 0), (0, size - m)))
    cv = jnp.pad(col_valid, ((0, 0), (0, size - n)))
    transposed = jnp.sum(rv, axis=1) > jnp.sum(cv, axis=1)
    t2, t3 = transposed[:, None], transposed[:, None, None]
    sq = jnp.where(t3, jnp.swapaxes(sq, 1, 2), sq)
    rv, cv = jnp.where(t2, cv, rv), jnp.where(t2, rv, cv)

    masked = jnp.where(cv[:, None, :], sq, jnp.inf)
    # The barrier keeps XLA from re-fusing the tree into every consumer below.
    u, best = jax.lax.optimization_barrier(_argmin_last(masked))
    usable = rv & jnp.isfinite(u)
    idx = jnp.arange(size, dtype=jnp.int32)
    # Each column goes to the lowest-index row that wants it (scatter-min; others dropped).
    batch_idx = jnp.arange(sq.shape[0])[:, None]
    claim = jnp.full(rv.shape, size, jnp.int32)
    claim = claim.at[batch_idx, jnp.where(usable, best, size)].min(
        jnp.broadcast_to(idx, rv.shape), mode="drop"
    )
    row4col = jnp.where(claim < size, claim, -1)
    won = jnp.take_along_axis(row4col, best, axis=1) == idx[None, :]
    col4row = jnp.where(usable & won, best, -1)
    return {
        "cost": sq,
        "row_valid": rv,
        "col_valid": cv,
        "transposed": transposed,
        "u": jnp.where(usable, u, 0.0),
        "col4row": col4row,
        "row4col": row4col,
        "open_rows": jnp.sum(usable & (col4row < 0), axis=1),
    }


def _lane_step(s: dict[str, Array], row: Array) -> dict[str, Array]:
    """One step of one lane: a Dijkstra step (``SEARCH``) or one back-tracking step of the
    augmentation (``AUGMENT``) that, once it reaches the start row, opens the next search.

    Follows the rectangular shortest-augmenting-path method (Crouse, 2016; SciPy's
    ``linear_sum_assignment``): reduced costs ``C_ij − u_i − v_j ≥ 0`` with tight matched
    pairs, duals updated once a free column (the sink) is reached.

    Args:
      s: lane state, vectors ``[S]`` and scalars (see ``_fresh_lane``).
      row: ``f32[S]``, the cost row of the lane's current row ``s["i"]``.
    """
    size = row.shape[0]
    idx = jnp.arange(size, dtype=jnp.int32)
    searching = s["mode"] == _SEARCH

    # -- search: relax the columns reachable from row i, settle the closest open column j.
    sr_s = s["sr"] | (idx == s["i"])
    reduced = s["min_val"] + row - s["u"][s["i"]] - s["v"]
    open_cols = ~s["sc"] & s["col_valid"]
    better = open_cols & (reduced < s["shortest"])
    shortest_s = jnp.where(better, reduced, s["shortest"])
    path = jnp.where(better & searching, s["i"], s["path"])
    cand = jnp.where(open_cols, shortest_s, jnp.inf)
    lowest = jnp.min(cand)
    free = s["row4col"] < 0
    # Among ties prefer a free column (ends the search sooner), as SciPy does.
    j_s = jnp.argmax((cand == lowest) * (1 + free)).astype(jnp.int32)
    sc_s = s["sc"] | (idx == j_s)
    sink = free[j_s]
    # Dual update once the sink is reached (before augmenting, as in JV).
    delta_rows = lowest - shortest_s[jnp.clip(s["col4row"], 0, size - 1)]
    u_s = s["u"] + jnp.where(idx == s["cur"], lowest, jnp.where(sr_s, delta_rows, 0.0))
    v_s = s["v"] - jnp.where(sc_s, lowest - shortest_s, 0.0)

    # -- augment: flip one (row, column) pair of the path, walking back from the sink.
    i_a = s["path"][s["j"]]
    flip = s["mode"] == _AUGMENT
    row4col = jnp.where(flip & (idx == s["j"]), i_a, s["row4col"])
    col4row = jnp.where(flip & (idx == i_a), s["j"], s["col4row"])
    finished = flip & (i_a == s["cur"])
    open_rows = s["row_valid"] & (col4row < 0)
    next_row = jnp.argmax(open_rows).astype(jnp.int32)

    return {
        **s,
        "u": jnp.where(searching & sink, u_s, s["u"]),
        "v": jnp.where(searching & sink, v_s, s["v"]),
        "col4row": col4row,
        "row4col": row4col,
        "shortest": jnp.where(searching, shortest_s, jnp.where(finished, jnp.inf, s["shortest"])),
        "path": path,
        "sc": jnp.where(searching, sc_s, s["sc"] & ~finished),
        "sr": jnp.where(searching, sr_s, s["sr"] & ~finished),
        "min_val": jnp.where(searching, lowest, jnp.where(finished, 0.0, s["min_val"])),
        "i": jnp.where(
            searching,
            jnp.where(sink, s["i"], s["row4col"][j_s]),
            jnp.where(finished, next_row, s["i"]),
        ),
        "cur": jnp.where(finished, next_row, s["cur"]),
        "j": jnp.where(searching, j_s, s["col4row"][i_a]),
        "mode": jnp.where(
            searching,
            jnp.where(sink, _AUGMENT, _SEARCH),
            jnp.where(finished, jnp.where(jnp.any(open_rows), _SEARCH, _DONE), s["mode"]),
        ).astype(jnp.int32),
    }


def _fresh_lane(warm: dict[str, Array], q: Array) -> dict[str, Array]:
    """Lane state for problem ``q`` (scalar index): its warm start and a search from its first
    open row."""
    size = warm["u"].shape[1]
    col4row, row_valid = warm["col4row"][q], warm["row_valid"][q]
    first = jnp.argmax(row_valid & (col4row < 0)).astype(jnp.int32)
    return {
        "u": warm["u"][q],
        "v": jnp.zeros((size,), jnp.float32),
        "col4row": col4row,
        "row4col": warm["row4col"][q],
        "row_valid": row_valid,
        "col_valid": warm["col_valid"][q],
        "shortest": jnp.full((size,), jnp.inf, jnp.float32),
        "path": jnp.full((size,), -1, jnp.int32),
        "sc": jnp.zeros((size,), bool),
        "sr": jnp.zeros((size,), bool),
        "min_val": jnp.float32(0.0),
        "i": first,
        "cur": first,
        "j": jnp.int32(0),
        "mode": jnp.int32(_SEARCH),
    }


def hungarian(
    cost: Array, row_valid: Array, col_valid: Array, *, lanes: int = 256
) -> tuple[Array, Array]:
    """Exactly optimal one-to-one assignment for a batch of padded cost matrices.

    Minimises ``Σ C[i, σ(i)]`` over ``min(M_b, N_b)`` pairs of valid rows and columns of each
    problem ``b``; padded entries are never matched.

    Stages: (1) orientation and warm start for the whole batch (``_prepare``); (2) the
    problems the warm start left open are queued, hardest first; (3) ``lanes`` problems are
    solved side by side, one ``_lane_step`` per loop iteration, and a lane that finishes takes
    the next queued problem at once, so the loop runs about ``Σ_b steps_b / lanes`` times.

    Args:
      cost: ``f32[B, M, N]`` (non-finite entries of valid pairs are treated as 0).
      row_valid: ``bool[B, M]``; col_valid: ``bool[B, N]``.
      lanes: problems augmented side by side.

    Returns:
      ``(pred_to_gt i32[B, M], gt_to_pred i32[B, N])``, ``-1`` where unmatched.
    """
    batch, m, n = cost.shape
    if batch == 0 or m == 0 or n == 0:
        return jnp.full((batch, m), -1, jnp.int32), jnp.full((batch, n), -1, jnp.int32)
    warm = _prepare(cost, row_valid, col_valid)
    lanes = min(lanes, batch)
    order = jnp.argsort(-warm["open_rows"], stable=True).astype(jnp.int32)
    num_open = jnp.sum(warm["open_rows"] > 0)
    fresh = jax.vmap(lambda q: _fresh_lane(warm, q))
    select = lambda c, a, b: jax.tree.map(
        lambda x, y: jnp.where(c.reshape(c.shape + (1,) * (x.ndim - 1)), x, y), a, b
    )

    def write_back(lane_q, state, out):
        target = jnp.where((lane_q >= 0) & (state["mode"] == _DONE), lane_q, batch)
        return (
            out[0].at[target].set(state["col4row"], mode="drop"),
            out[1].at[target].set(state["row4col"], mode="drop"),
        )

    def refill(carry):
        state, lane_q, ptr = carry
        done = state["mode"] == _DONE
        pos = ptr + jnp.cumsum(done) - 1
        take = done & (pos < num_open)
        new_q = jnp.where(take, order[jnp.clip(pos, 0, batch - 1)], -1)
        state = select(take, fresh(jnp.maximum(new_q, 0)), state)
        lane_q = jnp.where(done, new_q, lane_q)
        return state, lane_q, ptr + jnp.sum(done)

    def body(carry):
        state, lane_q, ptr, out = carry
        any_done = jnp.any(state["mode"] == _DONE) & (ptr < num_open)
        out = write_back(lane_q, state, out)
        state, lane_q, ptr = jax.lax.cond(any_done, refill, lambda c: c, (state, lane_q, ptr))
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
    col4row, row4col = write_back(lane_q, state, out)
    flip = warm["transposed"][:, None]
    pred_to_gt = jnp.where(flip, row4col, col4row)[:, :m]
    gt_to_pred = jnp.where(flip, col4row, row4col)[:, :n]
    return pred_to_gt, gt_to_pred


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
