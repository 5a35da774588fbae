"""Problem generators and comparison helpers shared by the obc_native Python tests.

(Not in conftest.py: tests/torch has its own conftest, and both would be imported as the
module "conftest".)"""

from __future__ import annotations

import numpy as np

# Relative damping used with the ill-conditioned Hessians: small enough that the damped
# Hessian keeps a condition number of 1e6..1e8, large enough that it stays positive definite.
ILL_DAMP = 1e-5


def make_x(cols, *, seed, kind="random", n_samples=None, dead=0):
    """Calibration inputs X (cols x n) and the list of dead inputs (rows of X that are zero).

    kind="random": correlated Gaussian inputs, well conditioned.
    kind="illcond": X = U diag(s) V^T with s log-spaced over 1e-4..1e2 (cond(H) = 1e12).
    """
    rng = np.random.default_rng(seed)
    if kind == "random":
        n = n_samples or 4 * cols
        mix = np.eye(cols) + 0.4 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
        X = mix @ rng.standard_normal((cols, n)) + 0.3 * rng.standard_normal((cols, 1))
    elif kind == "illcond":
        n = n_samples or 2 * cols
        U, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
        V, _ = np.linalg.qr(rng.standard_normal((n, cols)))
        s = np.logspace(-4, 2, cols)
        X = U @ np.diag(s) @ V.T
    else:
        raise ValueError(kind)
    dead_idx = np.sort(rng.choice(cols, size=dead, replace=False)) if dead else np.array([], dtype=int)
    X[dead_idx, :] = 0.0
    return X, dead_idx


def hessian_from_x(X):
    """H = 2/n X X^T, made exactly symmetric (dead inputs give exactly zero rows)."""
    n = X.shape[1]
    H = 2.0 / n * (X @ X.T)
    return 0.5 * (H + H.T)


def make_problem(rows, cols, *, seed, kind="random", zeros=0.0, dead=0, n_samples=None, dtype=np.float64):
    """Returns (W, H, X): weights (rows x cols) with a fraction `zeros` of exact zeros."""
    X, _ = make_x(cols, seed=seed, kind=kind, n_samples=n_samples, dead=dead)
    H = hessian_from_x(X)
    rng = np.random.default_rng(seed + 10_000)
    W = rng.standard_normal((rows, cols))
    if zeros:
        W[rng.random((rows, cols)) < zeros] = 0.0
    return W.astype(dtype), H, X


def loss_from_x(W, W_hat, X):
    """||(W - W_hat) X||_F^2 / n per row, straight from the inputs."""
    D = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return np.sum((D @ X) ** 2, axis=1) / X.shape[1]


def assert_close(got, expected, rtol=1e-6, what="value"):
    """|got - expected| <= rtol * (|expected| + max|expected|) elementwise: relative to each entry,
    with the array's scale as the floor for entries near zero."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    floor = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = np.abs(got - expected)
    tol = rtol * (np.abs(expected) + floor)
    bad = err > tol
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} entries differ beyond rtol={rtol} "
            f"(first at {idx}); worst at {tuple(int(i) for i in worst)}: got {got[worst]!r}, "
            f"expected {expected[worst]!r}"
        )


def make_realistic_layer(rows, cols, *, seed=0, outliers=6, dtype=np.float32):
    """A layer shaped like a transformer projection: (W, H).

    Inputs X (cols x 2 cols) are correlated (a random rotation of independent components) with a
    decaying spectrum (component i has variance 1 / (1 + i / 8)), non-zero means, and `outliers`
    input features scaled by 10..50. W: Gaussian with std 1/sqrt(cols).
    """
    rng = np.random.default_rng(seed)
    n = 2 * cols
    Q, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    s = 1.0 / np.sqrt(1.0 + np.arange(cols) / 8.0)
    X = (Q * s) @ rng.standard_normal((cols, n))
    X += 0.5 * rng.standard_normal((cols, 1))
    if outliers:
        idx = rng.choice(cols, size=outliers, replace=False)
        X[idx] *= rng.uniform(10, 50, size=outliers)[:, None]
    H = hessian_from_x(X)
    W = rng.standard_normal((rows, cols)) / np.sqrt(cols)
    return W.astype(dtype), H
