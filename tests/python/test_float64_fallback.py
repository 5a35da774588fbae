"""damp=0 on an ill-conditioned H: a float32 elimination that loses positive definiteness is
redone in float64 (same damping, never re-damped) and reported as precision="float64".

Structured pruning is not here: its eliminations run on a shared float64 inverse in every
precision, so there is nothing to fall back to (it raises HessianError when float64 fails)."""

from __future__ import annotations

import numpy as np
import pytest

import obc_native


def _problem(decades: float):
    """(W float32, the same W in float64, H): H has condition number 10**decades (eigenvalues
    1 .. 10**-decades in a random basis): its float64 inverse is fine, but float32 greedy
    eliminations of it lose definiteness."""
    rng = np.random.default_rng(0)
    cols = 256
    Q, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    H = (Q * np.logspace(0, -decades, cols)) @ Q.T
    H = 0.5 * (H + H.T)
    W = rng.standard_normal((16, cols))
    W32 = W.astype(np.float32)
    return W32, W32.astype(np.float64), H


@pytest.fixture(scope="module")
def ill_conditioned():
    return _problem(8)


def _check_prune_fallback(r32, r64):
    assert r32.precision == "float64"
    assert r64.precision == "float64"
    assert r32.weight.dtype == np.float32
    np.testing.assert_array_equal(r32.weight, r64.weight.astype(np.float32))
    np.testing.assert_array_equal(r32.mask, r64.mask)
    assert r32.damp == 0 and r32.damp_absolute == 0  # never re-damped
    assert np.all(r32.row_losses >= 0)
    np.testing.assert_allclose(r32.row_losses, r64.row_losses, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("spread", ["global", "uniform"])
def test_unstructured_redone_in_float64(ill_conditioned, spread):
    W32, W64, H = ill_conditioned
    # uniform stops every row at the same count: deep enough to lose definiteness in float32
    sparsity = 0.5 if spread == "global" else 0.99
    r32 = obc_native.prune_unstructured(W32, H, sparsity, damp=0, spread=spread)
    r64 = obc_native.prune_unstructured(W64, H, sparsity, damp=0, spread=spread)
    _check_prune_fallback(r32, r64)


def test_blocked_redone_in_float64(ill_conditioned):
    W32, W64, H = ill_conditioned
    r32 = obc_native.prune_blocked(W32, H, 0.5, 4, damp=0)
    r64 = obc_native.prune_blocked(W64, H, 0.5, 4, damp=0)
    _check_prune_fallback(r32, r64)


def test_nm_redone_in_float64():
    W32, W64, H = _problem(10)  # 7:8 eliminates deep enough to lose definiteness in float32
    r32 = obc_native.prune_nm(W32, H, 7, 8, damp=0)
    r64 = obc_native.prune_nm(W64, H, 7, 8, damp=0)
    _check_prune_fallback(r32, r64)


def test_fallback_does_not_depend_on_the_thread_count(ill_conditioned):
    W32, _, H = ill_conditioned
    one = obc_native.prune_unstructured(W32, H, 0.5, damp=0, num_threads=1)
    two = obc_native.prune_unstructured(W32, H, 0.5, damp=0, num_threads=2)
    assert one.precision == two.precision == "float64"
    np.testing.assert_array_equal(one.weight, two.weight)
    np.testing.assert_array_equal(one.row_losses, two.row_losses)


def test_trace_redone_in_float64(ill_conditioned):
    W32, W64, H = ill_conditioned
    t32 = obc_native.trace_unstructured(W32, H, damp=0, record=[0.5])
    t64 = obc_native.trace_unstructured(W64, H, damp=0, record=[0.5])
    assert t32.precision == "float64"
    np.testing.assert_array_equal(t32.order, t64.order)
    np.testing.assert_array_equal(t32.losses, t64.losses)
    w32 = t32.weights(0.5, spread="uniform")
    assert w32.weight.dtype == np.float32 and w32.precision == "float64"
    np.testing.assert_array_equal(w32.weight,
                                  t64.weights(0.5, spread="uniform").weight.astype(np.float32))


@pytest.mark.parametrize("joint", [False, True], ids=["quantize", "joint"])
def test_quantize_redone_in_float64_on_the_float32_grid(ill_conditioned, joint):
    W32, W64, H = ill_conditioned
    if joint:  # joint pruning + quantization: quantize a pruned layer
        W32 = obc_native.prune_magnitude(W32, 0.5)
        W64 = W32.astype(np.float64)
    r32 = obc_native.quantize(W32, H, 4, damp=0)
    assert r32.precision == "float64"
    assert r32.weight.dtype == np.float32 and r32.scale.dtype == np.float32
    # On the float32 grid, exactly.
    g = r32.group_index()
    on_grid = r32.scale[:, g] * (r32.codes.astype(np.float32) - r32.zero[:, g].astype(np.float32))
    np.testing.assert_array_equal(r32.weight, on_grid)
    assert np.all(r32.weight[W32 == 0] == 0)
    # The float64 greedy on that same grid, rounded: the float64 run with the float32 scales.
    r64 = obc_native.quantize(W64, H, 4, damp=0)
    assert np.all(r32.row_losses >= 0)
    if np.array_equal(r64.scale.astype(np.float32), r32.scale):
        np.testing.assert_array_equal(r32.codes, r64.codes)


def test_well_conditioned_float32_stays_float32(ill_conditioned):
    W32, _, _ = ill_conditioned
    cols = W32.shape[1]
    X = np.random.default_rng(1).standard_normal((cols, 4 * cols))
    H = 2 / X.shape[1] * X @ X.T
    for r in (obc_native.prune_unstructured(W32, H, 0.5), obc_native.prune_nm(W32, H, 2, 4),
              obc_native.prune_blocked(W32, H, 0.5, 4), obc_native.quantize(W32, H, 4),
              obc_native.prune_structured(W32, H, 0.25)):
        assert r.precision == "float32"
    assert obc_native.trace_unstructured(W32, H).precision == "float32"
    assert obc_native.prune_unstructured(W32.astype(np.float64), H, 0.5).precision == "float64"
