"""Finite weights too large for the arithmetic: a ValueError or a finite result, never NaN or a crash.

Before: float32 weights near FLT_MAX made every greedy score NaN; the greedy's "nothing found"
index (-1) was then used as an input index (heap overflow, SIGSEGV) in the traces and in OBQ;
N:M and structured pruning returned NaN weights (structured reported loss 0), and float64
weights at DBL_MAX / 4 gave NaN/Inf everywhere. Now the core rejects a layer whose scale alone
rules the solve out (obc::Overflow, a ValueError) and checks every result for NaN/Inf.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc

FLT_MAX = float(np.finfo(np.float32).max)
DBL_MAX = float(np.finfo(np.float64).max)

MODES = {
    "unstructured": lambda W, H: obc.prune_unstructured(W, H, 0.5),
    "unstructured_uniform": lambda W, H: obc.prune_unstructured(W, H, 0.5, spread="uniform"),
    "blocked": lambda W, H: obc.prune_blocked(W, H, 0.5, 2),
    "nm": lambda W, H: obc.prune_nm(W, H, 2, 4),
    "structured": lambda W, H: obc.prune_structured(W, H, 0.5),
    "structured_group": lambda W, H: obc.prune_structured(W, H, 0.5, group=2),
    "quantize": lambda W, H: obc.quantize(W, H, 3, sym=False, group_size=4),
    "quantize_sym": lambda W, H: obc.quantize(W, H, 4),
    "quantize_rtn": lambda W, H: obc.quantize_rtn(W, H, 3, sym=False, group_size=4),
    "trace": lambda W, H: obc.trace_unstructured(W, H),
    "trace_blocked": lambda W, H: obc.trace_blocked(W, H, 2),
    "solve_masked": lambda W, H: obc.solve_masked(W, H, np.arange(W.size).reshape(W.shape) % 3 == 0),
    "layer_loss": lambda W, H: obc.layer_loss(W, np.zeros_like(W), H),
    "sparsegpt": lambda W, H: obc.prune_unstructured(W, H, 0.5, method="sparsegpt"),
    "sparsegpt_nm": lambda W, H: obc.prune_nm(W, H, 2, 4, method="sparsegpt"),
    "sparsegpt_blocked": lambda W, H: obc.prune_blocked(W, H, 0.5, 2, method="sparsegpt"),
    "sparsegpt_quantize": lambda W, H: obc.prune_quantize_sparsegpt(W, H, 3, sparsity=0.5),
}


def _parts(result):
    """(array, power) pairs of a result: weights scale with W (power 1), losses with W^2 (2)."""
    if isinstance(result, np.ndarray):
        return [(result, 2)]  # layer_loss
    if isinstance(result, obc.Trace):
        solved = result.weights(0.5)
        return [(result.losses, 2), (solved.weight, 1), (solved.row_losses, 2)]
    return [(result.weight, 1), (result.row_losses, 2)]


def _finite_or_overflow(fn):
    """fn()'s arrays are all finite, or fn raises a ValueError that says what overflowed."""
    try:
        result = fn()
    except ValueError as err:
        assert any(word in str(err) for word in ("too large", "out of float32 range", "NaN or Inf")), str(err)
        return None
    for values, _ in _parts(result):
        assert np.all(np.isfinite(values)), values
    return result


def _huge_layers(dtype):
    """(W, H) pairs of finite W at the top of dtype's range, with existing zeros for the joint mode."""
    top = FLT_MAX if dtype == np.float32 else DBL_MAX / 4
    rng = np.random.default_rng(3)
    X = rng.standard_normal((8, 40))
    H_random = 2 / 40 * X @ X.T
    signs = np.where(rng.random((3, 8)) < 0.5, -1.0, 1.0)
    W_top = (signs * top).astype(dtype)
    W_mixed = (rng.standard_normal((3, 8)) * top / 8).astype(dtype)
    W_zeros = W_mixed.copy()
    W_zeros[:, 1] = 0
    W_zeros[0, 5] = 0
    return [(W_top, np.eye(8)), (W_top, H_random), (W_mixed, H_random), (W_zeros, H_random)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_huge_weights_raise_or_stay_finite(mode, dtype):
    for W, H in _huge_layers(dtype):
        _finite_or_overflow(lambda: MODES[mode](W, H))


def test_reported_cases():
    # The reproductions: two crashed (SIGSEGV), one returned NaN.
    W = np.array([[3.4e38, 3.4e38]], np.float32)
    for fn in (obc.prune_unstructured, obc.prune_nm, obc.prune_structured):
        args = (W, np.eye(2), 0.5) if fn is not obc.prune_nm else (W, np.eye(2), 1, 2)
        with pytest.raises(ValueError, match="W: values too large for float32"):
            fn(*args)
    with pytest.raises(ValueError, match="W: values too large for float32"):
        obc.trace_unstructured(W, np.eye(2))
    row = np.array([[FLT_MAX, -FLT_MAX] * 4], np.float32)
    with pytest.raises(ValueError, match="W: values too large for float32"):
        obc.quantize(row, np.eye(8), 3, sym=False, group_size=4)
    with pytest.raises(ValueError, match="W: values too large for float64"):
        obc.prune_structured(np.full((1, 2), DBL_MAX / 4), np.eye(2), 0.5)
    with pytest.raises(ValueError, match="W: values too large: the loss .* overflows float64"):
        obc.layer_loss(np.full((1, 2), DBL_MAX / 4), np.zeros((1, 2)), np.eye(2))


def test_loss_overflow_names_the_argument():
    # Losses are summed in float64 for every dtype, so a finite layer whose loss overflows float64
    # is the caller's scale: the message names W (or W_hat) and says to rescale, instead of the
    # generic "row losses: the solve produced NaN or Inf".
    rng = np.random.default_rng(8)
    X = rng.standard_normal((8, 40))
    H = 2 / 40 * X @ X.T
    big = rng.standard_normal((2, 8)) * 1e160
    small = rng.standard_normal((2, 8))
    w_msg = r"^W: values too large: the loss .* overflows float64 .*rescale W or H"
    hat_msg = r"^W_hat: values too large: the loss .* overflows float64 .*rescale W_hat or H"
    with pytest.raises(ValueError, match=w_msg):
        obc.layer_loss(big, small, H)
    with pytest.raises(ValueError, match=hat_msg):
        obc.layer_loss(small, big, H)
    with pytest.raises(ValueError, match=w_msg):
        obc.quantize_rtn(big, H, 4)
    # float32 weights near FLT_MAX: fine with a unit-scale H (float64 losses), too large with a
    # huge one.
    W32 = (small * 1e38).astype(np.float32)
    assert np.all(np.isfinite(obc.quantize_rtn(W32, H, 4).row_losses))
    with pytest.raises(ValueError, match=w_msg):
        obc.quantize_rtn(W32, H * 1e300, 4)
    with pytest.raises(ValueError, match=w_msg):
        obc.layer_loss(W32, np.zeros_like(W32), H * 1e300)


@pytest.mark.parametrize("dtype,exponent", [(np.float32, 40), (np.float64, 400)])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_large_but_safe_scales_are_solved_exactly(mode, dtype, exponent):
    # Nothing is rejected that the precision can handle: scaling W by a power of two scales every
    # weight exactly and every loss by its square, so the results must agree bit for bit.
    rng = np.random.default_rng(5)
    X = rng.standard_normal((8, 40))
    H = 2 / 40 * X @ X.T
    W = rng.standard_normal((3, 8)).astype(dtype)
    W[0, 2] = 0
    scale = 2.0**exponent
    small, large = MODES[mode](W, H), MODES[mode](W * dtype(scale), H)
    for (a, power), (b, _) in zip(_parts(small), _parts(large)):
        np.testing.assert_array_equal(a * a.dtype.type(scale) ** power, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_hessian_scale(dtype):
    # H in scale 1e-300 (float64 fine) has an inverse of 1e300, which float32 kernels cannot hold.
    rng = np.random.default_rng(6)
    X = rng.standard_normal((8, 40))
    H = 2 / 40 * X @ X.T * 1e-300
    W = rng.standard_normal((3, 8)).astype(dtype)
    for mode in ("unstructured", "nm", "quantize", "trace", "structured"):
        _finite_or_overflow(lambda: MODES[mode](W, H))
