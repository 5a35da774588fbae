"""Structured pruning's reported row losses equal the direct measure on the returned weights.

They come from the greedy's own bookkeeping (the damped loss minus 1/2 lambda ||dw||^2). On
rank-deficient H (rank 1: a single calibration sample) the damping term is almost all of the
damped loss, the difference cancelled, and rows were reported up to 10% (float64: 1e-4) off;
such rows are now measured directly. The bound promised in docs/python_api.md, per row:
1e-9 relative in float64, 1e-5 in float32 (against the float64 measure of the returned weights).
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-5)])
@pytest.mark.parametrize("rank", [1, 2, 5, 40])
def test_structured_row_losses_on_low_rank_hessians(dtype, tol, rank):
    worst = 0.0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        cols = 16
        X = rng.standard_normal((cols, rank))
        H = 2 / rank * X @ X.T
        W = rng.standard_normal((6, cols)).astype(dtype)
        if seed % 3 == 0:
            W[1, 3] = 0  # a row with zeros of its own (private inverse)
        for group in (1, 2, 4):
            for damp in (0.01, 0.1, 1.0):
                result = obc.prune_structured(W, H, 0.5, group=group, damp=damp)
                direct = obc.layer_loss(W, result.weight, H)
                error = np.abs(result.row_losses - direct) / np.maximum(direct, 1e-300)
                worst = max(worst, float(error.max()))
    assert worst <= tol
