"""Float64 SparseGPT replay for the tests and the benchmark: no lazy blocks, no chunks.

The sequential column loop of the SparseGPT paper with the upper Cholesky factor U of the damped
H^-1 (U^T U = H^-1), applying every column's update to all later columns at once. The masks are
chosen at the same points as obc_native's kernel (the start of each lazy block; an N:M group's
first column) with the same counting rule (see obc/sparsegpt.hpp), so masks and weights must
agree; the lazy-block arithmetic of the kernel is not replayed here.
"""

from __future__ import annotations


import numpy as np

from reference import count_for_sparsity, damped_hessian, quantize_value


def upper_factor(H, damp=0.01):
    """(U, dead, lam): U upper with U^T U = inverse of the damped, dead-decoupled H (float64)."""
    Hd, dead, lam = damped_hessian(H, damp)
    Hd = 0.5 * (Hd + Hd.T)
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    Hd[dead, dead] = 1.0
    L = np.linalg.cholesky(Hd)
    L_inv = np.linalg.solve(L, np.eye(len(Hd)))
    hinv = L_inv.T @ L_inv
    hinv = 0.5 * (hinv + hinv.T)
    return np.linalg.cholesky(hinv).T, dead, lam


def _smallest(scores, ids, count):
    """The `count` ids with the smallest (score, id)."""
    order = np.lexsort((ids, scores))
    return ids[order[:count]]


def sparsegpt(W, H, *, pattern="unstructured", sparsity=0.5, spread="global", block=1, n=2, m=4,
              lazy_block=128, damp=0.01, grid=None):
    """Returns (weight float64, pruned bool). grid: None or (scale, zero, bits, group_size) with
    scale, zero (rows, groups): kept weights are rounded to it (joint pruning + quantization)."""
    W = np.array(W, dtype=np.float64)
    rows, cols = W.shape
    U, dead, _ = upper_factor(H, damp)
    d2 = np.diag(U) ** 2
    pruned = (W == 0) | dead[None, :]
    unit = {"unstructured": 1, "blocked": block, "nm": m}[pattern]
    lazy = max(unit, lazy_block - lazy_block % unit)
    units = cols // unit
    if pattern != "nm":
        live = ~pruned.reshape(rows, units, unit).all(axis=2)
        row_live = live.sum(axis=1)
        if spread == "uniform":
            target = count_for_sparsity(sparsity, units)
            row_new = np.maximum(0, target - (units - row_live))
            row_before = np.zeros(rows, dtype=np.int64)
        else:
            layer_live = int(row_live.sum())
            target = count_for_sparsity(sparsity, rows * units)
            layer_new = max(0, target - (rows * units - layer_live))
            layer_before = 0
    for j in range(cols):
        if pattern != "nm" and j % lazy == 0:
            b1 = min(cols, j + lazy)
            nu = (b1 - j) // unit
            part = pruned[:, j:b1].reshape(rows, nu, unit)
            block_live = ~part.all(axis=2)
            per_weight = np.where(pruned[:, j:b1], 0.0, W[:, j:b1] ** 2) / d2[j:b1]
            scores = per_weight.reshape(rows, nu, unit).sum(axis=2)
            if spread == "uniform":
                for r in range(rows):
                    before = int(row_before[r])
                    after = before + int(block_live[r].sum())
                    total, new = int(row_live[r]), int(row_new[r])
                    quota = (new * after // total - new * before // total) if total else 0
                    row_before[r] = after
                    ids = np.nonzero(block_live[r])[0]
                    for u in _smallest(scores[r, ids], ids, quota):
                        pruned[r, j + u * unit : j + (u + 1) * unit] = True
            else:
                before = layer_before
                after = before + int(block_live.sum())
                quota = 0
                if layer_live:
                    quota = layer_new * after // layer_live - layer_new * before // layer_live
                layer_before = after
                ids = np.nonzero(block_live.ravel())[0]
                for i in _smallest(scores.ravel()[ids], ids, quota):
                    r, u = divmod(int(i), nu)
                    pruned[r, j + u * unit : j + (u + 1) * unit] = True
        if pattern == "nm" and j % m == 0:
            for r in range(rows):
                need = n - int(pruned[r, j : j + m].sum())
                if need > 0:
                    ids = np.nonzero(~pruned[r, j : j + m])[0]
                    sc = W[r, j + ids] ** 2 / d2[j + ids]
                    pruned[r, j + _smallest(sc, ids, need)] = True
        kept = W[:, j].copy()
        if grid is not None:
            scale, zero, bits, group_size = grid
            g = j // group_size
            kept = quantize_value(kept, scale[:, g], zero[:, g], bits)
        target = np.where(pruned[:, j], 0.0, kept)
        err = (W[:, j] - target) / U[j, j]
        W[:, j] = target
        W[:, j + 1 :] -= np.outer(err, U[j, j + 1 :])
    return W, pruned


def realistic_inputs(cols, n_samples, *, seed, outliers=4, outlier_scale=(10.0, 50.0)):
    """Inputs X (cols x n) shaped like a transformer layer's: correlated features with a decaying
    spectrum (singular values ~ 1/sqrt(k)) and a few outlier features 10-50x larger."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    spectrum = 1.0 / np.sqrt(np.arange(1, cols + 1))
    X = (basis * spectrum) @ rng.standard_normal((cols, n_samples))
    X += 0.2 * rng.standard_normal((cols, 1))  # a shared offset, as after a residual stream
    idx = rng.choice(cols, size=outliers, replace=False)
    X[idx] *= rng.uniform(*outlier_scale, size=(outliers, 1))
    return X


def white_inputs(cols, n_samples, *, seed):
    """White-noise inputs X (cols x n)."""
    return np.random.default_rng(seed).standard_normal((cols, n_samples))


__all__ = ["upper_factor", "sparsegpt", "realistic_inputs", "white_inputs"]
