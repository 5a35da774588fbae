"""The lazy batched row kernels against the eager kernel (lazy batch B = 1, a flush after every
step) and against the float64 brute-force reference: every mode, several B (including B larger
than the number of steps), thread counts, sizes that are multiples of neither B nor the SIMD
width, random and ill-conditioned Hessians."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from obc_native import _core
from problems import assert_close, make_problem

BATCHES = [1, 3, 7, 64, 1000]
CASES = [("random", 0.0, 0), ("illcond", 0.1, 1)]


def _problem(kind, zeros, dead, cols, seed=5):
    return make_problem(6, cols, seed=seed, kind=kind, zeros=zeros, dead=dead)


@pytest.mark.parametrize("kind,zeros,dead", CASES)
@pytest.mark.parametrize("block", [1, 3])
def test_trace_kernels(kind, zeros, dead, block):
    W, H, _ = _problem(kind, zeros, dead, 39)
    order, losses, _ = ref.trace_layer(W, H, 0.01, block)
    for batch in BATCHES:
        for threads in (1, 2):
            got = _core.f64.trace(W, H, block, 0.01, threads, batch)
            np.testing.assert_array_equal(got["order"], order, err_msg=f"B={batch} t={threads}")
            assert_close(got["losses"], losses, 1e-6, f"losses B={batch}")


@pytest.mark.parametrize("kind,zeros,dead", CASES)
def test_nm_kernels(kind, zeros, dead):
    W, H, _ = _problem(kind, zeros, dead, 36)
    weight, _, _ = ref.prune_nm(W, H, 2, 4, 0.01)
    eager = _core.f64.prune_nm(W, H, 2, 4, 0.01, 1, 1)["weight"]
    for batch in BATCHES:
        for threads in (1, 2):
            got = _core.f64.prune_nm(W, H, 2, 4, 0.01, threads, batch)["weight"]
            assert_close(got, weight, 1e-6, f"2:4 B={batch}")
            assert_close(got, eager, 1e-9, f"2:4 vs eager B={batch}")


@pytest.mark.parametrize("kind,zeros,dead", CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_obq_kernels(kind, zeros, dead, sym):
    W, H, _ = _problem(kind, zeros, dead, 37)
    expected = ref.quantize(W, H, 3, sym=sym, grid="minmax")
    for batch in BATCHES:
        for threads in (1, 2):
            got = _core.f64.quantize(W, H, 3, sym, 0, "minmax", 0.01, threads, batch)
            np.testing.assert_array_equal(got["codes"], expected.codes, err_msg=f"B={batch}")
            assert_close(got["weight"], expected.weight, 1e-9, f"OBQ B={batch}")


def test_float32_kernels_follow_float64():
    """float32 arithmetic in the kernels: same greedy decisions as float64 on a well-conditioned
    problem (rows x cols large enough for several flushes), losses within 1e-4 relative."""
    W, H, _ = make_problem(8, 150, seed=9)
    exact = _core.f64.trace(W, H, 1, 0.01, 2, 1)
    for batch in (1, 16, 64):
        got = _core.f32.trace(W.astype(np.float32), H, 1, 0.01, 2, batch)
        agree = (got["order"] == exact["order"]).mean()
        assert agree > 0.95, f"B={batch}: only {agree:.2%} of steps agree"
        np.testing.assert_allclose(got["losses"].sum(), exact["losses"].sum(), rtol=1e-4)


@pytest.mark.parametrize("grid", ["minmax", "mse"])
def test_float32_obq_follows_float64(grid):
    """The float32 OBQ kernel (vectorized choice, outlier rule: the MSE grid clamps the largest
    weights, so the rule fires) makes the float64 kernel's choices on a well-conditioned problem,
    with 150 inputs (a multiple of neither 8 nor B) and several flushes."""
    W, H, _ = make_problem(8, 150, seed=11)
    exact = _core.f64.quantize(W, H, 4, True, 0, grid, 0.01, 2, 1)
    for batch in (1, 16, 64):
        for threads in (1, 2):
            got = _core.f32.quantize(W.astype(np.float32), H, 4, True, 0, grid, 0.01, threads,
                                     batch)
            agree = (got["codes"] == exact["codes"]).mean()
            assert agree > 0.95, f"B={batch} t={threads}: only {agree:.2%} of codes agree"
            np.testing.assert_allclose(got["row_losses"].sum(), exact["row_losses"].sum(),
                                       rtol=1e-3)


def test_float32_nm_follows_float64():
    W, H, _ = make_problem(8, 148, seed=12)
    exact = _core.f64.prune_nm(W, H, 2, 4, 0.01, 2, 1)
    for batch in (1, 16, 64):
        got = _core.f32.prune_nm(W.astype(np.float32), H, 2, 4, 0.01, 2, batch)
        agree = ((got["weight"] == 0) == (exact["weight"] == 0)).mean()
        assert agree > 0.97, f"B={batch}: only {agree:.2%} of the mask agrees"
        np.testing.assert_allclose(got["row_losses"].sum(), exact["row_losses"].sum(), rtol=1e-4)
