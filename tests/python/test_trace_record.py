"""Traces that record the greedy's own weights at chosen uniform sparsities (`record=`).

The recorded weights must be the optimum for the trace's mask (the float64 least-squares
reference, and what Trace.weights re-solves without a record), come with solve_masked's mask
and exact losses, leave the trace itself unchanged, and not depend on the thread count."""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc
import reference as ref
from problems import make_problem

SPARSITIES = (0.0, 0.3, 0.5, 1.0)


def _trace(W, H, block, **kw):
    if block == 1:
        return obc.trace_unstructured(W, H, **kw)
    return obc.trace_blocked(W, H, block, **kw)


@pytest.mark.parametrize("kind,zeros,dead", [("random", 0.0, 0), ("illcond", 0.1, 1)])
@pytest.mark.parametrize("block", [1, 3])
def test_recorded_weights_are_the_optimum_for_the_mask(kind, zeros, dead, block):
    W, H, _ = make_problem(7, 42, seed=21, kind=kind, zeros=zeros, dead=dead)
    plain = _trace(W, H, block, num_threads=2)
    recorded = _trace(W, H, block, num_threads=2, record=SPARSITIES)
    np.testing.assert_array_equal(recorded.order, plain.order)
    np.testing.assert_array_equal(recorded.losses, plain.losses)
    Hd, dead_inputs, _ = ref.damped_hessian(H, 0.01)
    for s in SPARSITIES:
        got = recorded.weights(s, spread="uniform")
        solved = plain.weights(s, spread="uniform")
        np.testing.assert_array_equal(got.mask, solved.mask, err_msg=f"s={s}")
        assert np.all(got.weight[~got.mask] == 0)
        scale = np.abs(W).max()
        np.testing.assert_allclose(got.weight, solved.weight, rtol=0, atol=1e-7 * scale,
                                   err_msg=f"s={s}")
        for r in range(W.shape[0]):
            want = ref.constrained_optimum(W[r], Hd, ~got.mask[r] | dead_inputs, 0.0)[0]
            np.testing.assert_allclose(got.weight[r], want, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(got.row_losses, ref.layer_losses(W, got.weight, H),
                                   rtol=1e-9, atol=1e-12)
        assert got.damp == solved.damp and got.damp_absolute == solved.damp_absolute


def test_float32_recorded_weights_follow_the_resolve():
    W, H, _ = make_problem(6, 150, seed=22)
    W32 = W.astype(np.float32)
    trace = obc.trace_unstructured(W32, H, record=(0.5,))
    got = trace.weights(0.5, spread="uniform")
    solved = obc.solve_masked(W32, H, got.mask)
    assert got.weight.dtype == np.float32
    np.testing.assert_allclose(got.weight, solved.weight, rtol=0, atol=1e-4 * np.abs(W).max())
    np.testing.assert_allclose(got.loss, solved.loss, rtol=1e-4)


def test_unrecorded_levels_are_re_solved():
    W, H, _ = make_problem(5, 30, seed=23)
    plain = obc.trace_unstructured(W, H)
    recorded = obc.trace_unstructured(W, H, record=[0.5])
    for s, spread in [(0.4, "uniform"), (0.5, "global"), (0.7, "uniform")]:
        a, b = recorded.weights(s, spread=spread), plain.weights(s, spread=spread)
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.row_losses, b.row_losses)


def test_recorded_weights_do_not_depend_on_threads():
    W, H, _ = make_problem(9, 64, seed=24, zeros=0.05)
    one = obc.trace_unstructured(W.astype(np.float32), H, num_threads=1, record=(0.25, 0.5))
    two = obc.trace_unstructured(W.astype(np.float32), H, num_threads=2, record=(0.5, 0.25))
    for s in (0.25, 0.5):
        np.testing.assert_array_equal(one.weights(s, "uniform").weight,
                                      two.weights(s, "uniform").weight)


@pytest.mark.parametrize("record,error", [
    ("0.5", TypeError), (0.5, TypeError), ((1.5,), ValueError), ((np.nan,), ValueError),
    ((-0.1,), ValueError)])
def test_bad_record_is_rejected(record, error):
    W, H, _ = make_problem(3, 12, seed=25)
    with pytest.raises(error, match="record"):
        obc.trace_unstructured(W, H, record=record)
