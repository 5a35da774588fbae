"""obc_native against the float64 brute-force reference (reference.py), every mode.

Small float64 problems (rows <= 16, cols <= 64), random and ill-conditioned Hessians, with and
without existing zeros and dead inputs. Orders, masks and codes must be identical; weights,
losses and grids must agree to 1e-6 relative.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import obc_native
import reference as ref
from problems import ILL_DAMP, assert_close, make_problem

RTOL = 1e-6

# name: (kind, damp, fraction of existing zeros, dead inputs)
CASES = {
    "random": ("random", 0.01, 0.0, 0),
    "random-nodamp-zeros-dead": ("random", 0.0, 0.2, 2),
    "illcond": ("illcond", ILL_DAMP, 0.0, 0),
    "illcond-zeros-dead": ("illcond", ILL_DAMP, 0.2, 2),
}
SMALL = (8, 32)  # default size
LARGE = (16, 64)  # slow tests


@functools.lru_cache(maxsize=None)
def problem(case, rows, cols, seed=0, zero_cols=0):
    kind, damp, zeros, dead = CASES[case]
    W, H, X = make_problem(rows, cols, seed=seed + 17 * rows + cols, kind=kind, zeros=zeros, dead=dead)
    if zero_cols:
        # Whole input columns that are zero in every row (e.g. an earlier structured pruning).
        W[:, cols - zero_cols :] = 0.0
    if kind == "illcond":
        Hd, _, _ = ref.damped_hessian(H, damp)
        live = np.diag(Hd) > 0
        cond = np.linalg.cond(Hd[np.ix_(live, live)])
        assert 1e6 <= cond <= 1e9, cond  # genuinely ill-conditioned, still safely PD
    return W, H, damp


@functools.lru_cache(maxsize=None)
def ref_trace(case, rows, cols, block=1, zero_cols=0):
    W, H, damp = problem(case, rows, cols, zero_cols=zero_cols)
    order, losses, _ = ref.trace_layer(W, H, damp, block=block)
    return order, losses


def check_prune(res, expected, W, what):
    weight, kept, row_losses = expected
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
    assert res.mask.dtype == np.bool_
    mism = np.argwhere(res.mask != kept)
    assert mism.size == 0, f"{what}: mask differs at {mism[:8].tolist()} (of {len(mism)})"
    assert np.all(res.weight[~kept] == 0), f"{what}: pruned weights not exactly zero"
    assert_close(res.weight, weight, RTOL, f"{what}: weight")
    assert_close(res.row_losses, row_losses, RTOL, f"{what}: row_losses")
    assert res.loss == pytest.approx(float(np.sum(row_losses)), rel=RTOL)
    assert res.sparsity == pytest.approx(1 - kept.mean())


def check_order(got, expected, what):
    got = np.asarray(got)
    bad = np.nonzero(np.any(got != expected, axis=1))[0]
    if bad.size:
        r = int(bad[0])
        step = int(np.nonzero(got[r] != expected[r])[0][0])
        raise AssertionError(
            f"{what}: elimination order differs in rows {bad.tolist()}; row {r} first at step "
            f"{step}: got {got[r, step:step + 6].tolist()}, expected {expected[r, step:step + 6].tolist()}"
        )


# ----------------------------------------------------------------------------------------------
# Unstructured
# ----------------------------------------------------------------------------------------------


def _check_trace_unstructured(case, rows, cols):
    W, H, damp = problem(case, rows, cols)
    order, losses = ref_trace(case, rows, cols)
    tr = obc_native.trace_unstructured(W, H, damp=damp)
    assert tr.order.dtype == np.int32 and tr.order.shape == (rows, cols)
    assert tr.losses.dtype == np.float64 and tr.losses.shape == (rows, cols)
    assert tr.block == 1
    _, _, lam = ref.damped_hessian(H, damp)
    assert tr.damp == damp
    assert tr.damp_absolute == pytest.approx(lam, rel=1e-12, abs=0)
    check_order(tr.order, order, f"trace_unstructured[{case}]")
    assert_close(tr.losses, losses, RTOL, f"trace_unstructured[{case}]: losses")
    for spread in ("global", "uniform"):
        for s in (0.3, 0.5, 0.9):
            counts = ref.steps_per_row(losses, s, spread)
            assert tr.steps_per_row(s, spread).tolist() == counts.tolist()
            expected = ref.prune_from_trace(W, H, order, counts, damp)
            check_prune(tr.weights(s, spread), expected, W, f"Trace.weights({s}, {spread})[{case}]")


@pytest.mark.parametrize("case", CASES)
def test_trace_unstructured(case):
    _check_trace_unstructured(case, *SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_trace_unstructured_large(case):
    _check_trace_unstructured(case, *LARGE)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spread", ["global", "uniform"])
@pytest.mark.parametrize("sparsity", [0.25, 0.6])
def test_prune_unstructured(case, spread, sparsity):
    W, H, damp = problem(case, *SMALL)
    order, losses = ref_trace(case, *SMALL)
    counts = ref.steps_per_row(losses, sparsity, spread)
    expected = ref.prune_from_trace(W, H, order, counts, damp)
    res = obc_native.prune_unstructured(W, H, sparsity, damp=damp, spread=spread)
    check_prune(res, expected, W, f"prune_unstructured({sparsity}, {spread})[{case}]")
    _, _, lam = ref.damped_hessian(H, damp)
    assert res.damp == damp and res.damp_absolute == pytest.approx(lam, rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spread", ["global", "uniform"])
def test_prune_unstructured_large(case, spread):
    W, H, damp = problem(case, *LARGE)
    order, losses = ref_trace(case, *LARGE)
    counts = ref.steps_per_row(losses, 0.5, spread)
    expected = ref.prune_from_trace(W, H, order, counts, damp)
    res = obc_native.prune_unstructured(W, H, 0.5, damp=damp, spread=spread)
    check_prune(res, expected, W, f"prune_unstructured(0.5, {spread})[{case}] large")


# ----------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------


def _check_nm(case, rows, cols, n, m):
    W, H, damp = problem(case, rows, cols)
    expected = ref.prune_nm(W, H, n, m, damp)
    res = obc_native.prune_nm(W, H, n, m, damp=damp)
    check_prune(res, expected, W, f"prune_nm({n}:{m})[{case}]")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_prune_nm(case, n, m):
    _check_nm(case, *SMALL, n, m)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8)])
def test_prune_nm_large(case, n, m):
    _check_nm(case, *LARGE, n, m)


# ----------------------------------------------------------------------------------------------
# Blocked
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [2, 4, 8])  # the unrolled spans; 3 in test_kernels.py
@pytest.mark.parametrize("zero_cols", [0, 4])
def test_blocked(case, block, zero_cols):
    rows, cols = SMALL
    W, H, damp = problem(case, rows, cols, zero_cols=zero_cols)
    order, losses = ref_trace(case, rows, cols, block, zero_cols)
    tr = obc_native.trace_blocked(W, H, block, damp=damp)
    assert tr.block == block and tr.order.shape == (rows, cols // block)
    check_order(tr.order, order, f"trace_blocked({block})[{case}]")
    assert_close(tr.losses, losses, RTOL, f"trace_blocked({block})[{case}]: losses")
    for spread in ("global", "uniform"):
        for s in (0.25, 0.5):
            counts = ref.steps_per_row(losses, s, spread)
            expected = ref.prune_from_trace(W, H, order, counts, damp, block=block)
            res = obc_native.prune_blocked(W, H, s, block, damp=damp, spread=spread)
            check_prune(res, expected, W, f"prune_blocked({s}, {block}, {spread})[{case}]")
            assert tr.steps_per_row(s, spread).tolist() == counts.tolist()
            check_prune(tr.weights(s, spread), expected, W, f"Trace.weights({s}, {spread}) blocked[{case}]")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [2, 4])
def test_blocked_large(case, block):
    rows, cols = LARGE
    W, H, damp = problem(case, rows, cols)
    order, losses = ref_trace(case, rows, cols, block)
    for spread in ("global", "uniform"):
        counts = ref.steps_per_row(losses, 0.5, spread)
        expected = ref.prune_from_trace(W, H, order, counts, damp, block=block)
        res = obc_native.prune_blocked(W, H, 0.5, block, damp=damp, spread=spread)
        check_prune(res, expected, W, f"prune_blocked(0.5, {block}, {spread})[{case}] large")


# ----------------------------------------------------------------------------------------------
# Structured
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_prune_structured(case, group, sparsity):
    W, H, damp = problem(case, *SMALL)
    expected = ref.prune_structured(W, H, sparsity, group, damp)
    res = obc_native.prune_structured(W, H, sparsity, group=group, damp=damp)
    check_prune(res, expected, W, f"prune_structured({sparsity}, group={group})[{case}]")


@pytest.mark.parametrize("group", [1, 2, 4])
def test_prune_structured_zero_columns(group):
    """Columns that are zero in every row count as removed groups from the start."""
    W, H, damp = problem("random", *SMALL, zero_cols=4)
    for s in (0.0, 0.125, 0.5):
        expected = ref.prune_structured(W, H, s, group, damp)
        res = obc_native.prune_structured(W, H, s, group=group, damp=damp)
        check_prune(res, expected, W, f"prune_structured({s}, group={group})[zero columns]")


def test_prune_structured_scattered_zero_tiny():
    """2 x 4 layer, one row has a zero of its own, remove one column. True damped losses of
    removing column 0..3 (row zeros kept at zero): 0.0881, 0.571, 1.80, 0.0773 -> column 3."""
    W, H, _ = make_problem(2, 4, seed=16)
    W = np.round(W, 2)
    W[0, 1] = 0.0
    Hd, _, _ = ref.damped_hessian(H, 0.01)
    totals = []
    for c in range(4):
        fixed = W == 0
        fixed[:, c] = True
        totals.append(sum(ref.constrained_loss(W[r], Hd, fixed[r], 0.0)[0] for r in range(2)))
    assert int(np.argmin(totals)) == 3
    expected = ref.prune_structured(W, H, 0.25, 1, 0.01)
    assert np.array_equal(~expected[1], (W == 0) | (np.arange(4) == 3)[None, :])
    res = obc_native.prune_structured(W, H, 0.25, group=1)
    check_prune(res, expected, W, "prune_structured(0.25)[2x4 scattered zero]")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("group", [1, 4])
def test_prune_structured_large(case, group):
    W, H, damp = problem(case, *LARGE)
    expected = ref.prune_structured(W, H, 0.5, group, damp)
    res = obc_native.prune_structured(W, H, 0.5, group=group, damp=damp)
    check_prune(res, expected, W, f"prune_structured(0.5, group={group})[{case}] large")


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def check_quant(res, expected, W, bits, sym, group_size, what):
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    assert res.bits == bits and res.sym == sym and res.group_size == gs
    assert res.codes.dtype == np.uint8 and res.codes.shape == W.shape
    assert res.zero.dtype == np.uint8 and res.zero.shape == (rows, cols // gs)
    assert res.scale.dtype == W.dtype and res.scale.shape == (rows, cols // gs)
    assert res.weight.dtype == W.dtype
    assert np.array_equal(res.mask, expected.kept), f"{what}: mask"
    bad = np.argwhere(res.zero.astype(np.int64) != expected.zero)
    assert bad.size == 0, (
        f"{what}: zero points differ at {bad[:5].tolist()}: got "
        f"{[int(res.zero[tuple(i)]) for i in bad[:5]]}, expected {[expected.zero[tuple(i)] for i in bad[:5]]}"
    )
    assert_close(res.scale, expected.scale, RTOL, f"{what}: scale")
    bad = np.argwhere(res.codes.astype(np.int64) != expected.codes)
    assert bad.size == 0, (
        f"{what}: codes differ at {len(bad)} entries, first {bad[:5].tolist()}: got "
        f"{[int(res.codes[tuple(i)]) for i in bad[:5]]}, expected {[int(expected.codes[tuple(i)]) for i in bad[:5]]}"
    )
    assert_close(res.weight, expected.weight, RTOL, f"{what}: weight")
    assert_close(res.row_losses, expected.row_losses, RTOL, f"{what}: row_losses")


def _check_quantize(case, rows, cols, bits, sym, group_size, grid, W=None):
    W0, H, damp = problem(case, rows, cols)
    W = W0 if W is None else W
    expected = ref.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, damp=damp)
    res = obc_native.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, damp=damp,
                              method="obq", refine=False)  # the greedy OBQ of the reference
    check_quant(res, expected, W, bits, sym, group_size, f"quantize({bits}b, sym={sym}, gs={group_size}, {grid})[{case}]")
    return res


@pytest.mark.parametrize("case", ["random", "illcond-zeros-dead"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("grid", ["mse", "minmax"])
def test_quantize(case, bits, sym, group_size, grid):
    _check_quantize(case, *SMALL, bits, sym, group_size, grid)


@pytest.mark.parametrize("case", ["random-nodamp-zeros-dead", "illcond"])
@pytest.mark.parametrize("bits,sym,group_size,grid", [(2, False, 8, "mse"), (3, True, None, "minmax"), (4, False, None, "mse"), (8, True, 16, "mse")])
def test_quantize_more_cases(case, bits, sym, group_size, grid):
    _check_quantize(case, *SMALL, bits, sym, group_size, grid)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits,sym,group_size", [(2, True, None), (3, False, 16), (4, True, 32), (4, False, None)])
def test_quantize_large(case, bits, sym, group_size):
    _check_quantize(case, *LARGE, bits, sym, group_size, "mse")


def test_quantize_rtn():
    W, H, damp = problem("random-nodamp-zeros-dead", *SMALL)
    for bits, sym, gs, grid in [(2, True, None, "mse"), (3, False, 8, "minmax"), (4, True, 16, "minmax"), (8, False, None, "mse")]:
        weight, codes, scale, zero, losses = ref.quantize_rtn(W, H, bits, sym=sym, group_size=gs, grid=grid)
        res = obc_native.quantize_rtn(W, H, bits, sym=sym, group_size=gs, grid=grid)
        what = f"quantize_rtn({bits}, {sym}, {gs}, {grid})"
        assert np.array_equal(res.zero.astype(np.int64), zero.astype(np.int64)), what
        assert_close(res.scale, scale, RTOL, f"{what}: scale")
        # Dead inputs: RTN leaves their weights to rounding (they do not change the loss).
        live = np.diag(H) > 0
        assert np.array_equal(res.codes[:, live].astype(np.int64), codes[:, live]), what
        assert_close(res.weight[:, live], weight[:, live], RTOL, f"{what}: weight")
        assert_close(res.row_losses, losses, RTOL, f"{what}: row_losses")


# ----------------------------------------------------------------------------------------------
# Joint: prune, then quantize the pruned layer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prune", ["unstructured", "nm"])
@pytest.mark.parametrize("bits,sym,group_size", [(4, True, None), (3, False, 8)])
def test_joint_prune_then_quantize(case, prune, bits, sym, group_size):
    W, H, damp = problem(case, *SMALL)
    if prune == "nm":
        pruned = obc_native.prune_nm(W, H, 2, 4, damp=damp)
    else:
        pruned = obc_native.prune_unstructured(W, H, 0.5, damp=damp)
    Wp = pruned.weight
    res = _check_quantize(case, *SMALL, bits, sym, group_size, "mse", W=Wp)
    assert np.all(res.weight[~pruned.mask] == 0)
    assert np.array_equal(res.mask, pruned.mask & (np.diag(H) > 0)[None, :])
