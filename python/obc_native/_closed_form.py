"""The closed-form calls that the solvers' API and ``Trace`` share: the optimal weights for a
given mask, and the layer loss of given weights.

They live apart from ``_api`` (the solvers) and ``_results`` (the result objects, ``Trace``
among them) so that both import them at module level and neither imports the other:
``_api -> _results -> _closed_form -> _arrays -> _core``.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _core


def kernels(W: np.ndarray):
    """The compiled kernels for W's dtype: ``_core.f64`` for float64, else ``_core.f32``."""
    return _core.f64 if W.dtype == np.float64 else _core.f32


def solve_masked(W: np.ndarray, H: np.ndarray, mask, damp, num_threads) -> dict:
    """The core's closed-form solve for ``mask`` (True = kept), as the core's result dict.

    W: (rows, cols) and H: (cols, cols) already validated (``_arrays.as_weight`` /
    ``as_hessian``); mask: (rows, cols) bool, checked here. Existing zeros and dead inputs are
    pruned too.
    """
    mask = np.asarray(mask)
    if mask.shape != W.shape or mask.dtype != np.bool_:
        raise ValueError(f"mask: expected a bool array of shape {W.shape}, got "
                         f"{mask.dtype} {mask.shape}")
    pruned = np.ascontiguousarray(~mask, dtype=np.uint8)
    return kernels(W).solve_masked(
        W, H, pruned, _arrays.as_damp(damp), _arrays.as_threads(num_threads))


def layer_loss(W, W_hat, H, *, num_threads=None) -> np.ndarray:
    """(rows,) float64: 1/2 (w - w_hat) H (w - w_hat)^T per row = ||(W - W_hat) X||^2 / n.

    W, W_hat: (rows, cols) float32 or float64 (float16 widened); when their dtypes differ both are
    compared in float64. H: (cols, cols) Hessian.
    """
    W = _arrays.as_weight(W, "W")
    W_hat = _arrays.as_weight(W_hat, "W_hat")
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat: expected shape {W.shape}, got {W_hat.shape}")
    if W_hat.dtype != W.dtype:
        # Compare in float64: rounding the float64 one to float32 would hide (or invent) the
        # difference being measured, e.g. a float64 W_hat within float32 rounding of W gave 0.
        W, W_hat = W.astype(np.float64), W_hat.astype(np.float64)
    H = _arrays.as_hessian(H, W.shape[1], "H")
    return kernels(W).layer_loss(W, W_hat, H, _arrays.as_threads(num_threads))
