"""Numeric validation of H shared by every numpy entry point: subnormal scale, overflowing
damping, indefinite or asymmetric H in the loss functions (never a NaN or a negative loss)."""

from __future__ import annotations

import numpy as np
import pytest

import obc_native


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    cols = 16
    X = rng.standard_normal((cols, 4 * cols))
    H = 2 / X.shape[1] * X @ X.T
    W = rng.standard_normal((3, cols))
    return W, 0.5 * (H + H.T)


def _entry_points(W, H):
    mask = np.ones(W.shape, dtype=bool)
    mask[:, ::2] = False
    return {
        "solve_masked": lambda: obc_native.solve_masked(W, H, mask),
        "prune_unstructured": lambda: obc_native.prune_unstructured(W, H, 0.5),
        "prune_nm": lambda: obc_native.prune_nm(W, H, 2, 4),
        "prune_blocked": lambda: obc_native.prune_blocked(W, H, 0.5, 4),
        "prune_structured": lambda: obc_native.prune_structured(W, H, 0.5),
        "trace_unstructured": lambda: obc_native.trace_unstructured(W, H),
        "quantize": lambda: obc_native.quantize(W, H, 4),
        "quantize_rtn": lambda: obc_native.quantize_rtn(W, H, 4),
        "layer_loss": lambda: obc_native.layer_loss(W, 0.9 * W, H),
    }


@pytest.mark.parametrize("entry", list(_entry_points(np.zeros((1, 4)), np.eye(4))))
def test_subnormal_hessian_is_rejected_clearly(layer, entry):
    W, H = layer
    with pytest.raises(ValueError, match="subnormal"):
        _entry_points(W, H * 1e-310)[entry]()


def test_solve_masked_of_subnormal_h_never_returns_nan(layer):
    W, H = layer
    mask = np.ones(W.shape, dtype=bool)
    mask[:, :3] = False  # keeps more than half: the path that needs the inverse
    with pytest.raises(ValueError, match="H: expected entries of normal float64 magnitude"):
        obc_native.solve_masked(W, H * 1e-310, mask)


def test_tiny_but_normal_hessian_still_works(layer):
    W, H = layer
    scaled = obc_native.prune_unstructured(W, H * 1e-300, 0.5)
    plain = obc_native.prune_unstructured(W, H, 0.5)
    np.testing.assert_allclose(scaled.weight, plain.weight, rtol=1e-9, atol=1e-12)


def test_overflowing_damp_says_so(layer):
    W, H = layer
    with pytest.raises(ValueError, match="damp: .*overflows"):
        obc_native.prune_unstructured(W, H, 0.5, damp=1e308)


@pytest.mark.parametrize("fn", ["layer_loss", "quantize_rtn"])
def test_indefinite_hessian_never_gives_a_negative_loss(layer, fn):
    W, _ = layer
    cols = W.shape[1]
    H = np.eye(cols)
    H[0, 1] = H[1, 0] = 3.0  # symmetric, non-negative diagonal, indefinite (eigenvalue -2)
    W = np.zeros((1, cols))
    W[0, 0], W[0, 1] = 1.0, -1.0
    W_hat = np.zeros_like(W)
    with pytest.raises(ValueError, match="indefinite"):
        if fn == "layer_loss":
            obc_native.layer_loss(W, W_hat, H)
        else:
            # Symmetric grid, step 2/255: 0.301 and -0.301 round with opposite errors.
            W = np.zeros((1, cols))
            W[0, :3] = 0.301, -0.301, 1.0
            obc_native.quantize_rtn(W, H, 8, grid="minmax")


def test_asymmetric_hessian_rejected_by_layer_loss(layer):
    W, H = layer
    Ha = H.copy()
    Ha[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        obc_native.layer_loss(W, 0.5 * W, Ha)


def test_singular_psd_hessian_gives_non_negative_losses():
    # dw in the null space of a PSD H: the exact loss is 0; rounding must not make it negative.
    rng = np.random.default_rng(3)
    cols = 64
    X = rng.standard_normal((cols, 8))
    H = 2 / 8 * X @ X.T
    H = 0.5 * (H + H.T)
    null = np.linalg.svd(X.T)[2][-5:]  # rows orthogonal to every sample
    W = null * 10.0
    losses = obc_native.layer_loss(W, np.zeros_like(W), H)
    assert np.all(losses >= 0)
    assert np.all(losses < 1e-10)
