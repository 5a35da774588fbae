"""Float64 brute-force reference for ExactOBS pruning and OBQ quantization (test-only).

Slow but obviously right: after every greedy step the constrained least-squares problem is
re-solved from scratch with ``np.linalg.solve`` on the free block. No inverse-Hessian downdates,
no OBS score formulas, no lazy tricks: the score of a candidate is the *exact* loss increase of
additionally fixing it, obtained from two fresh solves.

Notation (one weight row ``w`` of length ``cols``; ``H = 2/n X X^T``):

* dead inputs: ``diag(H) == 0``. Their weights are fixed to 0 from the start (pruned).
* damped Hessian: ``Hd = H + lam * I`` on the live inputs only, with
  ``lam = damp * mean(diag H over live inputs)``; dead rows/columns of ``Hd`` stay zero.
* a *constraint set* is a boolean mask ``fixed`` plus target values ``target`` on it (0 for
  pruning, a grid value for quantization). ``F = ~fixed`` are the free coordinates.
* the optimum under a constraint set minimises ``1/2 (w' - w)^T Hd (w' - w)`` subject to
  ``w'_P = t_P``. With ``d = w' - w`` and ``d_P = t_P - w_P`` fixed, the gradient with respect to
  ``d_F`` is ``Hd_FF d_F + Hd_FP d_P``; setting it to zero gives

      d_F = -inv(Hd_FF) Hd_FP (t_P - w_P),     i.e.  w'_F = w_F - inv(Hd_FF) Hd_FP (t_P - w_P).

  (Hd_FF is positive definite because Hd is on the live inputs and F never contains dead ones.)
* ``loss(P) = 1/2 (w_opt(P) - w)^T Hd (w_opt(P) - w)`` (damped; that is what the greedy scores);
  reported losses of final results use the *undamped* H.
* the greedy score of a candidate ``c`` (a coordinate, or a set of coordinates) is
  ``loss(P + c) - loss(P)``. It is evaluated as ``1/2 ||w_opt(P + c) - w_opt(P)||^2_Hd``, which is
  the same number (Pythagoras: ``w_opt(P)`` is the Hd-orthogonal projection of ``w`` onto the
  affine set of ``P``, and ``w_opt(P + c)`` lies in that set) but free of the cancellation of
  subtracting two large losses. ``score_check=True`` additionally asserts that it agrees with
  the literal difference of the two losses.
* ties go to the lowest index (``np.argmin`` over candidates listed in increasing order).

Everything here works on float64 copies and loops over rows in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "OUTLIER_TOL",
    "MSE_NORM",
    "damped_hessian",
    "constrained_optimum",
    "constrained_loss",
    "row_loss",
    "layer_losses",
    "count_for_sparsity",
    "RowTrace",
    "trace_row",
    "trace_layer",
    "steps_per_row",
    "prune_from_trace",
    "prune_unstructured",
    "prune_blocked",
    "prune_nm",
    "prune_structured",
    "grid_1d",
    "make_grid",
    "quantize_value",
    "quantize_codes",
    "quantize_row",
    "quantize",
    "quantize_rtn",
    "quantize_fixed_order",
    "refine_objective",
    "best_single_code_changes",
]

OUTLIER_TOL = 1e-3  # OBQ outlier rule: err > (1 + OUTLIER_TOL) * scale^2 / 4
MSE_NORM = 2.4  # exponent of the MSE grid search
MSE_STEPS = 80  # p = 1 - i/100 for i in range(80)


# ----------------------------------------------------------------------------------------------
# Hessian and the constrained least-squares solve
# ----------------------------------------------------------------------------------------------


def damped_hessian(H, damp):
    """Returns (Hd, dead, lam): H + lam*I on live inputs (dead rows/cols stay 0), dead flags, lam."""
    H = np.array(H, dtype=np.float64)
    diag = np.diag(H).copy()
    dead = diag == 0
    live = ~dead
    lam = damp * float(np.mean(diag[live])) if live.any() else 0.0
    Hd = H.copy()
    idx = np.nonzero(live)[0]
    Hd[idx, idx] += lam
    return Hd, dead, lam


def constrained_optimum(w, Hd, fixed, target):
    """Optimal rows w' for a batch of constraint sets, each solved from scratch.

    w: (cols,) original weights. Hd: (cols, cols) damped Hessian.
    fixed: (B, cols) bool, True where w'_i is fixed to target[b, i]; target: (B, cols).
    Returns (B, cols): w'_P = t_P exactly, w'_F = w_F - inv(Hd_FF) Hd_FP (t_P - w_P).
    """
    w = np.asarray(w, dtype=np.float64)
    fixed = np.atleast_2d(np.asarray(fixed, dtype=bool))
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), fixed.shape)
    batch, cols = fixed.shape
    out = np.empty((batch, cols))
    # Displacement on the fixed coordinates, zero on the free ones.
    disp = np.where(fixed, target - w, 0.0)
    free_counts = (~fixed).sum(axis=1)
    for k in np.unique(free_counts):
        sel = np.nonzero(free_counts == k)[0]
        d = disp[sel].copy()
        if k > 0:
            # Row-major nonzero() keeps each batch member's free indices together and sorted.
            free_idx = np.nonzero(~fixed[sel])[1].reshape(len(sel), k)
            A = Hd[free_idx[:, :, None], free_idx[:, None, :]]  # Hd_FF, (b, k, k)
            # Hd_F,: @ d equals Hd_FP d_P because d is zero on F.
            rhs = -np.einsum("bkc,bc->bk", Hd[free_idx], d)
            d_free = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
            np.put_along_axis(d, free_idx, d_free, axis=1)
        out[sel] = w + d
    # Fixed coordinates hold their targets exactly (w + (t - w) may differ from t by rounding).
    out[fixed] = target[fixed]
    return out


def _quad(d, Hd):
    """1/2 d^T Hd d for every row of d (B, cols)."""
    d = np.atleast_2d(d)
    return 0.5 * np.einsum("bi,ij,bj->b", d, Hd, d)


def constrained_loss(w, Hd, fixed, target):
    """loss(P) = 1/2 (w_opt(P) - w)^T Hd (w_opt(P) - w) for a batch of constraint sets."""
    opt = constrained_optimum(w, Hd, fixed, target)
    return _quad(opt - w, Hd)


def row_loss(w, w_hat, H):
    """1/2 (w - w_hat) H (w - w_hat)^T with the given (undamped) H."""
    return float(_quad(np.asarray(w, np.float64) - np.asarray(w_hat, np.float64), np.asarray(H, np.float64))[0])


def layer_losses(W, W_hat, H):
    """Per-row losses 1/2 dw H dw^T (rows,)."""
    d = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return 0.5 * np.einsum("ri,ij,rj->r", d, np.asarray(H, np.float64), d)


def _increase_scores(w, Hd, w_cur, fixed, target, cand_masks, cand_targets, score_check):
    """Exact loss increase of additionally fixing each candidate (a set of coordinates).

    fixed/target: the current constraint set (cols,); w_cur its optimum.
    cand_masks: (C, cols) bool, the coordinates each candidate adds; cand_targets (C, cols).
    Returns (C,) increases and (C, cols) the new optima.
    """
    new_fixed = fixed[None, :] | cand_masks
    new_target = np.where(cand_masks, cand_targets, target[None, :])
    w_new = constrained_optimum(w, Hd, new_fixed, new_target)
    inc = _quad(w_new - w_cur[None, :], Hd)
    if score_check:
        # The literal definition: loss(P + c) - loss(P), both from scratch.
        loss_old = _quad(w_cur - w, Hd)[0]
        loss_new = _quad(w_new - w[None, :], Hd)
        diff = loss_new - loss_old
        scale = max(loss_old, float(np.max(loss_new)), 1e-300)
        np.testing.assert_allclose(diff, inc, rtol=1e-7, atol=1e-9 * scale)
    return inc, w_new


def count_for_sparsity(sparsity, total):
    """ceil(sparsity * total) with a little slack for floating point noise (0.3*10 -> 3)."""
    return int(math.ceil(sparsity * total - 1e-9))


# ----------------------------------------------------------------------------------------------
# Unstructured / blocked traces
# ----------------------------------------------------------------------------------------------


@dataclass
class RowTrace:
    order: np.ndarray  # (steps,) coordinate or block index removed at each step
    losses: np.ndarray  # (steps,) loss increase (damped) of each step; 0 for pre-pruned items
    initial_fixed: np.ndarray  # (cols,) bool: existing zeros and dead inputs
    num_prepruned: int = 0
    weights: list = field(default_factory=list)  # optimum after each step (if keep_weights)


def _block_masks(cols, block):
    nb = cols // block
    masks = np.zeros((nb, cols), dtype=bool)
    for b in range(nb):
        masks[b, b * block : (b + 1) * block] = True
    return masks


def trace_row(w, H, damp=0.01, block=1, *, score_check=False, keep_weights=False, Hd=None, dead=None):
    """Full greedy elimination of one row: every step removes the coordinate (block) whose removal
    increases the damped loss least, with a fresh re-solve after every step.

    Items already pruned (all coordinates zero or dead) come first in index order with loss 0.
    A partially pruned block's candidate is its still-free coordinates.
    """
    w = np.asarray(w, dtype=np.float64)
    cols = w.shape[0]
    assert cols % block == 0
    if Hd is None:
        Hd, dead, _ = damped_hessian(H, damp)
    fixed = (w == 0) | dead
    initial_fixed = fixed.copy()
    target = np.zeros(cols)
    masks = _block_masks(cols, block)
    nb = masks.shape[0]
    removed = np.zeros(nb, dtype=bool)
    order, losses = [], []
    for b in range(nb):
        if np.all(fixed[masks[b]]):
            removed[b] = True
            order.append(b)
            losses.append(0.0)
    num_pre = len(order)
    w_cur = constrained_optimum(w, Hd, fixed, target)[0]
    weights = [w_cur.copy()] if keep_weights else []
    while not removed.all():
        cand = np.nonzero(~removed)[0]  # increasing: argmin -> lowest index on ties
        cand_masks = masks[cand] & ~fixed[None, :]
        inc, w_new = _increase_scores(w, Hd, w_cur, fixed, target, cand_masks, np.zeros_like(cand_masks, dtype=float), score_check)
        j = int(np.argmin(inc))
        b = int(cand[j])
        order.append(b)
        losses.append(float(inc[j]))
        removed[b] = True
        fixed = fixed | masks[b]
        w_cur = w_new[j]
        if keep_weights:
            weights.append(w_cur.copy())
    return RowTrace(np.array(order, dtype=np.int64), np.array(losses), initial_fixed, num_pre, weights)


def trace_layer(W, H, damp=0.01, block=1, *, score_check=False):
    """Traces of all rows: (order (rows, steps), losses (rows, steps), list of RowTrace)."""
    W = np.asarray(W, dtype=np.float64)
    Hd, dead, _ = damped_hessian(H, damp)
    traces = [trace_row(w, None, block=block, score_check=score_check, Hd=Hd, dead=dead) for w in W]
    order = np.stack([t.order for t in traces])
    losses = np.stack([t.losses for t in traces])
    return order, losses, traces


def steps_per_row(losses, sparsity, spread="global"):
    """How many leading steps of each row's trace a layer sparsity selects.

    global: the ceil(s * rows * steps) smallest step losses of the whole layer, ordered by
    (loss, row, step); each row gets the number of its steps among them.
    uniform: ceil(s * steps) for every row.
    """
    losses = np.asarray(losses)
    rows, steps = losses.shape
    if spread == "uniform":
        return np.full(rows, count_for_sparsity(sparsity, steps), dtype=np.int64)
    assert spread == "global"
    total = count_for_sparsity(sparsity, rows * steps)
    entries = sorted((float(losses[r, s]), r, s) for r in range(rows) for s in range(steps))
    counts = np.zeros(rows, dtype=np.int64)
    for _, r, _ in entries[:total]:
        counts[r] += 1
    return counts


def prune_from_trace(W, H, order, counts, damp=0.01, block=1, initial_fixed=None):
    """Pruned mask from order prefixes (plus existing zeros / dead inputs), then a fresh solve.

    Returns (weight, kept_mask, row_losses (undamped H)).
    """
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    Hd, dead, _ = damped_hessian(H, damp)
    masks = _block_masks(cols, block)
    pruned = (W == 0) | dead[None, :]
    for r in range(rows):
        for b in order[r, : counts[r]]:
            pruned[r] |= masks[b]
    weight = np.empty_like(W)
    for r in range(rows):
        weight[r] = constrained_optimum(W[r], Hd, pruned[r], 0.0)[0]
    return weight, ~pruned, layer_losses(W, weight, H)


def prune_unstructured(W, H, sparsity, damp=0.01, spread="global"):
    order, losses, _ = trace_layer(W, H, damp)
    counts = steps_per_row(losses, sparsity, spread)
    return prune_from_trace(W, H, order, counts, damp)


def prune_blocked(W, H, sparsity, block, damp=0.01, spread="global"):
    order, losses, _ = trace_layer(W, H, damp, block=block)
    counts = steps_per_row(losses, sparsity, spread)
    return prune_from_trace(W, H, order, counts, damp, block=block)


# ----------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------


def prune_nm_row(w, Hd, dead, n, m, *, score_check=False):
    """Greedy N:M pruning of one row; returns (weight, pruned mask, order).

    A group of m consecutive inputs is closed as soon as it holds n fixed (zero) coordinates;
    existing zeros and dead inputs count. Candidates: free coordinates of open groups.
    """
    w = np.asarray(w, dtype=np.float64)
    cols = w.shape[0]
    fixed = (w == 0) | dead
    target = np.zeros(cols)
    group_of = np.arange(cols) // m
    w_cur = constrained_optimum(w, Hd, fixed, target)[0]
    order = []
    while True:
        zeros_per_group = np.bincount(group_of, weights=fixed.astype(float), minlength=cols // m)
        open_group = zeros_per_group < n
        cand = np.nonzero(~fixed & open_group[group_of])[0]
        if cand.size == 0:
            break
        cand_masks = np.zeros((cand.size, cols), dtype=bool)
        cand_masks[np.arange(cand.size), cand] = True
        inc, w_new = _increase_scores(w, Hd, w_cur, fixed, target, cand_masks, np.zeros((cand.size, cols)), score_check)
        j = int(np.argmin(inc))
        order.append(int(cand[j]))
        fixed = fixed.copy()
        fixed[cand[j]] = True
        w_cur = w_new[j]
    return w_cur, fixed, order


def prune_nm(W, H, n, m, damp=0.01, *, score_check=False):
    """Returns (weight, kept_mask, row_losses)."""
    W = np.asarray(W, dtype=np.float64)
    Hd, dead, _ = damped_hessian(H, damp)
    weight = np.empty_like(W)
    pruned = np.zeros(W.shape, dtype=bool)
    for r in range(W.shape[0]):
        weight[r], pruned[r], _ = prune_nm_row(W[r], Hd, dead, n, m, score_check=score_check)
    return weight, ~pruned, layer_losses(W, weight, H)


# ----------------------------------------------------------------------------------------------
# Structured: groups of input columns removed from every row
# ----------------------------------------------------------------------------------------------


def prune_structured(W, H, sparsity, group=1, damp=0.01, *, score_check=False, return_order=False):
    """Greedy removal of whole column groups from all rows (shared H).

    A group whose coordinates are all already fixed (zero or dead) in every row counts as removed
    from the start. Each step removes the group with the smallest summed (over rows) exact loss
    increase; every row keeps its own constraint set (its own existing zeros stay fixed).
    Stops when ceil(sparsity * cols/group) groups are removed. Returns (weight, kept, row_losses).
    """
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    Hd, dead, _ = damped_hessian(H, damp)
    masks = _block_masks(cols, group)
    ng = masks.shape[0]
    fixed = (W == 0) | dead[None, :]
    target = np.zeros(cols)
    removed = np.array([np.all(fixed[:, masks[g]]) for g in range(ng)])
    goal = count_for_sparsity(sparsity, ng)
    w_cur = np.stack([constrained_optimum(W[r], Hd, fixed[r], target)[0] for r in range(rows)])
    order = [int(g) for g in np.nonzero(removed)[0]]
    while removed.sum() < goal:
        cand = np.nonzero(~removed)[0]
        total = np.zeros(cand.size)
        new_rows = []
        for r in range(rows):
            cand_masks = masks[cand] & ~fixed[r][None, :]
            inc, w_new = _increase_scores(W[r], Hd, w_cur[r], fixed[r], target, cand_masks, np.zeros((cand.size, cols)), score_check)
            total += inc
            new_rows.append(w_new)
        j = int(np.argmin(total))
        g = int(cand[j])
        order.append(g)
        removed[g] = True
        fixed = fixed | masks[g][None, :]
        w_cur = np.stack([new_rows[r][j] for r in range(rows)])
    out = (w_cur, ~fixed, layer_losses(W, w_cur, H))
    return out + (order,) if return_order else out


# ----------------------------------------------------------------------------------------------
# Quantization grids
# ----------------------------------------------------------------------------------------------


def quantize_codes(x, scale, zero, bits):
    """code = clip(round_half_even(x / scale) + zero, 0, 2^bits - 1) (float64 array of integers)."""
    maxq = 2**bits - 1
    return np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero, 0, maxq)


def quantize_value(x, scale, zero, bits):
    """Grid value scale * (code - zero)."""
    return scale * (quantize_codes(x, scale, zero, bits) - zero)


def _grid_params(x, bits, sym, p):
    """(scale, zero) of the range shrunk by p; an all-zero range gets scale 1."""
    maxq = 2**bits - 1
    if sym:
        amax = float(np.max(np.abs(x))) * p if x.size else 0.0
        zero = float(2 ** (bits - 1))
        scale = amax / (2 ** (bits - 1) - 1) if amax > 0 else 1.0
        return scale, zero
    xmin = min(float(np.min(x)), 0.0) * p
    xmax = max(float(np.max(x)), 0.0) * p
    if xmax == xmin:
        return 1.0, float(np.rint(-xmin / 1.0))
    scale = (xmax - xmin) / maxq
    return scale, float(np.rint(-xmin / scale))


def grid_1d(x, bits, sym=True, grid="mse"):
    """Grid (scale, zero) of one row or group x.

    minmax: the range [min(x,0), max(x,0)] (sym: [-max|x|, max|x|]).
    mse: for i in range(80), p = 1 - i/100, shrink the range by p; keep the p with the smallest
    sum |q(x) - x|^2.4 (strictly smaller: the first minimum wins).
    """
    x = np.asarray(x, dtype=np.float64)
    if grid == "minmax":
        return _grid_params(x, bits, sym, 1.0)
    assert grid == "mse"
    best, best_params = math.inf, None
    for i in range(MSE_STEPS):
        p = 1 - i / 100
        scale, zero = _grid_params(x, bits, sym, p)
        err = float(np.sum(np.abs(quantize_value(x, scale, zero, bits) - x) ** MSE_NORM))
        if err < best:
            best, best_params = err, (scale, zero)
    return best_params


def make_grid(W, bits, sym=True, group_size=None, grid="mse"):
    """scale, zero (rows, groups) computed from W itself."""
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    ng = cols // gs
    scale = np.empty((rows, ng))
    zero = np.empty((rows, ng))
    for r in range(rows):
        for g in range(ng):
            scale[r, g], zero[r, g] = grid_1d(W[r, g * gs : (g + 1) * gs], bits, sym, grid)
    return scale, zero


# ----------------------------------------------------------------------------------------------
# OBQ
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantRef:
    weight: np.ndarray  # (rows, cols) dequantized
    codes: np.ndarray  # (rows, cols) integer codes (int64)
    scale: np.ndarray  # (rows, groups)
    zero: np.ndarray  # (rows, groups)
    kept: np.ndarray  # (rows, cols) bool: was non-zero on input and live
    row_losses: np.ndarray  # (rows,) undamped
    orders: list  # per row: the coordinate fixed at each greedy step
    outlier_steps: list  # per row: how many steps the outlier rule chose


def quantize_row(w, Hd, dead, scale_col, zero_col, bits, *, outlier_tol=OUTLIER_TOL, score_check=False):
    """OBQ on one row with per-coordinate grid parameters (scale_col, zero_col of its group).

    Existing zeros and dead inputs are fixed to 0 from the start. Each step: grid values of the
    current optimum; if some free weight's rounding error exceeds (1 + tol) * scale^2 / 4, fix the
    one with the largest such error; else fix the one with the smallest exact loss increase.
    Returns (weight, codes, fixed_initial, order, n_outlier_steps).
    """
    w = np.asarray(w, dtype=np.float64)
    cols = w.shape[0]
    fixed = (w == 0) | dead
    initial = fixed.copy()
    target = np.zeros(cols)
    codes = np.where(fixed, zero_col, 0.0)
    w_cur = constrained_optimum(w, Hd, fixed, target)[0]
    order, n_outliers = [], 0
    threshold = (1.0 + outlier_tol) * scale_col**2 / 4.0
    while not fixed.all():
        q_codes = quantize_codes(w_cur, scale_col, zero_col, bits)
        q_vals = scale_col * (q_codes - zero_col)
        err = (w_cur - q_vals) ** 2
        outlier = ~fixed & (err > threshold)
        if outlier.any():
            j = int(np.argmax(np.where(outlier, err, -np.inf)))
            n_outliers += 1
            new_fixed = fixed.copy()
            new_fixed[j] = True
            new_target = target.copy()
            new_target[j] = q_vals[j]
            w_next = constrained_optimum(w, Hd, new_fixed, new_target)[0]
        else:
            cand = np.nonzero(~fixed)[0]
            cand_masks = np.zeros((cand.size, cols), dtype=bool)
            cand_masks[np.arange(cand.size), cand] = True
            cand_targets = np.where(cand_masks, q_vals[None, :], 0.0)
            inc, w_new = _increase_scores(w, Hd, w_cur, fixed, target, cand_masks, cand_targets, score_check)
            jj = int(np.argmin(inc))
            j = int(cand[jj])
            w_next = w_new[jj]
        fixed = fixed.copy()
        fixed[j] = True
        target = target.copy()
        target[j] = q_vals[j]
        codes[j] = q_codes[j]
        order.append(j)
        w_cur = w_next
    weight = scale_col * (codes - zero_col)
    return weight, codes.astype(np.int64), initial, order, n_outliers


def _per_column(a, cols):
    gs = cols // a.shape[1]
    return np.repeat(a, gs, axis=1)


def quantize(W, H, bits, sym=True, group_size=None, grid="mse", damp=0.01, *, outlier_tol=OUTLIER_TOL, score_check=False):
    """OBQ of a layer. The grid comes from W (the weights passed in)."""
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    Hd, dead, _ = damped_hessian(H, damp)
    scale, zero = make_grid(W, bits, sym, group_size, grid)
    scale_c, zero_c = _per_column(scale, cols), _per_column(zero, cols)
    weight = np.empty_like(W)
    codes = np.empty(W.shape, dtype=np.int64)
    kept = np.empty(W.shape, dtype=bool)
    orders, outs = [], []
    for r in range(rows):
        weight[r], codes[r], init, order, nout = quantize_row(
            W[r], Hd, dead, scale_c[r], zero_c[r], bits, outlier_tol=outlier_tol, score_check=score_check
        )
        kept[r] = ~init
        orders.append(order)
        outs.append(nout)
    return QuantRef(weight, codes, scale, zero, kept, layer_losses(W, weight, H), orders, outs)


def quantize_rtn(W, H, bits, sym=True, group_size=None, grid="mse"):
    """Round-to-nearest on the same grid (no error feedback); zeros stay zero (0 is on the grid)."""
    W = np.asarray(W, dtype=np.float64)
    cols = W.shape[1]
    scale, zero = make_grid(W, bits, sym, group_size, grid)
    scale_c, zero_c = _per_column(scale, cols), _per_column(zero, cols)
    codes = quantize_codes(W, scale_c, zero_c, bits)
    weight = scale_c * (codes - zero_c)
    return weight, codes.astype(np.int64), scale, zero, layer_losses(W, weight, H)


# ----------------------------------------------------------------------------------------------
# Fixed-order quantization (GPTQ) and coordinate-descent refinement
# ----------------------------------------------------------------------------------------------


def quantize_fixed_order(W, H, bits, sym=True, group_size=None, grid="mse", damp=0.01, *, act_order=True,
                         downdate=False):
    """GPTQ replayed step by step, without lazy blocks or Cholesky factors.

    The grid comes from W (original column order). Columns are visited in a fixed order:
    descending diag(H) (stable: ties by lower index) or 0, 1, ... Dead inputs are 0 and never
    visited. At each step, for F = the live columns not yet visited (including the current
    column j), G = inv(Hd_FF) is computed afresh and every row is updated with the exact OBS
    step w_F -= G[:, j] (w_j - t_j) / G_jj, where t_j is the grid value of the current w_j, or 0
    where W was zero on input (the pruned weight is set to 0 and its error propagated).
    downdate=True: G from the previous step's by the rank-1 downdate G_FF - G_Fj G_jF / G_jj
    (inv of a principal block = Schur complement of the inverse) instead of afresh: O(cols^3) in
    all instead of O(cols^4), for wide layers.
    Returns (weight, codes (int64), row_losses with the undamped H).
    """
    W = np.asarray(W, dtype=np.float64)
    rows, cols = W.shape
    Hd, dead, _ = damped_hessian(H, damp)
    scale, zero = make_grid(W, bits, sym, group_size, grid)
    scale_c, zero_c = _per_column(scale, cols), _per_column(zero, cols)
    pruned = W == 0
    diag = np.diag(np.asarray(H, np.float64))
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(cols)
    order = [int(j) for j in order if not dead[j]]
    w = W.copy()
    w[:, dead] = 0.0
    out = np.zeros_like(W)
    G = np.linalg.inv(Hd[np.ix_(order, order)]) if downdate and order else None
    for k, j in enumerate(order):
        free = np.array(order[k:])
        if downdate:
            if k > 0:
                G = G[1:, 1:] - np.outer(G[1:, 0], G[0, 1:]) / G[0, 0]
        else:
            G = np.linalg.inv(Hd[np.ix_(free, free)])
        col = G[:, 0]  # j is free[0]
        target = np.where(pruned[:, j], 0.0, quantize_value(w[:, j], scale_c[:, j], zero_c[:, j], bits))
        err = w[:, j] - target
        w[:, free] -= np.outer(err / col[0], col)
        w[:, j] = target
        out[:, j] = target
    codes = np.where(dead[None, :] | pruned, zero_c, quantize_codes(out, scale_c, zero_c, bits))
    return out, codes.astype(np.int64), layer_losses(W, out, H)


def refine_objective(W, W_hat, H, damp):
    """Per-row 1/2 e Hd e^T, e = W_hat - W on the live inputs (the refinement's objective)."""
    Hd, dead, _ = damped_hessian(H, damp)
    e = np.asarray(W_hat, np.float64) - np.asarray(W, np.float64)
    e[:, dead] = 0.0
    return 0.5 * np.einsum("ri,ij,rj->r", e, Hd, e)


def best_single_code_changes(W, W_hat, H, bits, scale, zero, damp):
    """For every row, the lowest change of refine_objective reachable by changing one code of a
    weight that was non-zero in W (on a live input) to any other code, found by trying them all.
    Returns (rows,) float64 (0 when no change helps)."""
    W = np.asarray(W, np.float64)
    W_hat = np.asarray(W_hat, np.float64)
    rows, cols = W.shape
    Hd, dead, _ = damped_hessian(H, damp)
    scale_c, zero_c = _per_column(scale, cols), _per_column(zero, cols)
    e = W_hat - W
    e[:, dead] = 0.0
    g = e @ Hd
    free = (W != 0) & ~dead[None, :]
    best = np.zeros(rows)
    for code in range(2**bits):
        delta = scale_c * (code - zero_c) - W_hat
        change = delta * g + 0.5 * delta**2 * np.diag(Hd)[None, :]
        change = np.where(free, change, 0.0)
        best = np.minimum(best, change.min(axis=1))
    return best


def refit_scales(W, codes, zero, group_index, H, pruned):
    """Per row, the scales (one per group) minimizing 1/2 (w - A s)^T H (w - A s) with
    A[c, g] = codes[c] - zero[g] for input c in group g, over the free inputs (pruned == False),
    solved in float64 by numpy. Groups whose codes all sit at the zero point get NaN (no scale in
    the objective). Returns (rows, groups) float64."""
    W = np.asarray(W, np.float64)
    H = 0.5 * (np.asarray(H, np.float64) + np.asarray(H, np.float64).T)
    rows, cols = W.shape
    groups = zero.shape[1]
    out = np.full((rows, groups), np.nan)
    for r in range(rows):
        free = ~pruned[r]
        a = np.where(free, codes[r].astype(np.float64) - zero[r, group_index], 0.0)
        A = np.zeros((cols, groups))
        A[np.arange(cols), group_index] = a
        live = np.any(A != 0, axis=0)
        if not live.any():
            continue
        A = A[:, live]
        w = np.where(free, W[r], 0.0)
        out[r, live] = np.linalg.solve(A.T @ H @ A, A.T @ H @ w)
    return out
