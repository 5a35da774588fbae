"""Straightforward batched PyTorch GPTQ: the baseline for obc_native.quantize(method="gptq").

GPTQ as "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar, Ashkboos, Hoefler, Alistarh 2023) describes it, written the direct way:

* all rows at once (one ``rows x cols`` tensor), one shared inverse Hessian;
* act-order: columns quantized in order of descending diag(H) (stable: ties keep the lower
  index first), dead inputs (diag 0) last;
* the upper Cholesky factor U of the permuted damped inverse, ``Hinv_perm = U^T U``: step k
  rounds column k and spreads its error ``(w_k - q_k) / U_kk`` over the later columns with row k
  of U;
* lazy blocks of 128 columns: inside a block the updates are applied column by column, the
  block's accumulated errors reach the remaining columns in one matrix product;
* static groups: the grid of every (row, group of group_size inputs in the ORIGINAL column order)
  is fixed before the sweep.

The grid (scale and zero point per row and group) is not fitted here: it is passed in, taken
from ``obc_native.quantize_rtn(W, H, bits, sym=..., group_size=..., grid=...)``, which fits it
with the same make_grid as obc_native.quantize, so both quantize onto identical grids. Rounding
is ``clamp(round_half_even(w / scale) + zero, 0, 2**bits - 1)`` in the layer's dtype, as in the
core. Conventions otherwise follow docs/python_api.md: relative damping
``lambda = damp * mean(diag H over live inputs)``, dead inputs (diag H == 0) and weights that are
exactly zero on input end exactly zero (their error is still spread, as for any other column).

``dtype`` is the precision of the sweep: float32 (the benchmark's, as a GPU implementation runs)
or float64 (obc_native's own sweep precision, used by the agreement check, where codes should
then agree except for rare rounding ties). This module never imports obc_native.

Run ``python benchmarks/gptq_baseline.py --check`` to compare it against obc_native on small
layers (codes agreement and loss ratio); see :func:`check`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

LAZY_BLOCK = 128


@dataclass
class GptqOut:
    """weight: (rows, cols) dequantized, layer dtype; codes: (rows, cols) int64 in [0, maxq];
    order: (cols,) the original column quantized at each step; seconds: wall time of the call
    (Hessian inversion and factorization included)."""

    weight: np.ndarray
    codes: np.ndarray
    order: np.ndarray
    seconds: float


def _damped_inverse_factor(H, order: torch.Tensor, damp: float, dtype) -> tuple[torch.Tensor,
                                                                                torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of inv(H_damped) permuted by ``order``; dead (cols,)
    bool = diag(H) == 0. Dead inputs are decoupled (row/column zeroed, diagonal 1)."""
    h = torch.as_tensor(np.asarray(H, dtype=np.float64)).to(dtype).clone()
    h = 0.5 * (h + h.T)
    diag = torch.diagonal(h)
    dead = diag == 0
    lam = float(diag[~dead].mean()) * damp if bool((~dead).any()) else 0.0
    h[dead, :] = 0
    h[:, dead] = 0
    idx = torch.arange(h.shape[0])
    h[idx[dead], idx[dead]] = 1.0
    h[idx[~dead], idx[~dead]] += lam
    hinv = torch.cholesky_solve(torch.eye(h.shape[0], dtype=dtype), torch.linalg.cholesky(h))
    hinv = 0.5 * (hinv + hinv.T)
    hinv = hinv[order][:, order]
    # hinv = U^T U with U upper: the transpose of the lower factor.
    upper = torch.linalg.cholesky(hinv, upper=True)
    return upper, dead


def gptq(W, H, bits: int, scale, zero, group_size: int | None = None, *, damp: float = 0.01,
         act_order: bool = True, block: int = LAZY_BLOCK, dtype=torch.float32) -> GptqOut:
    """GPTQ of W (rows, cols) with the Hessian H (cols, cols) onto a given grid.

    Args:
        W: (rows, cols) float32 or float64 weights; the result has W's dtype.
        H: (cols, cols) symmetric Hessian 2/n X X^T (undamped).
        bits: code width; codes in [0, 2**bits - 1].
        scale: (rows, groups) grid step; zero: (rows, groups) integer zero points. groups ==
            ceil(cols / group_size); input c uses group c // group_size (original order).
        group_size: inputs per grid (None = cols, one grid per row).
        damp: relative damping, lambda = damp * mean(diag H over live inputs).
        act_order: quantize in order of descending diag(H) (False: natural order).
        block: lazy block size (columns).
        dtype: torch dtype of the sweep (float32 or float64).
    """
    t0 = time.perf_counter()
    W = np.asarray(W)
    wdtype = torch.float32 if W.dtype == np.float32 else torch.float64
    rows, cols = W.shape
    gsize = cols if group_size is None else int(group_size)
    hdiag = torch.as_tensor(np.diagonal(np.asarray(H, dtype=np.float64)).copy())
    if act_order:
        order = torch.sort(hdiag, descending=True, stable=True).indices
    else:
        order = torch.arange(cols)
    upper, dead = _damped_inverse_factor(H, order, damp, dtype)
    maxq = 2**bits - 1
    group_of = torch.arange(cols) // gsize
    # Per column (in quantization order): the grid of each row, in the layer dtype.
    sc = torch.as_tensor(np.asarray(scale)).to(wdtype)[:, group_of[order]]
    zp = torch.as_tensor(np.asarray(zero).astype(np.int64))[:, group_of[order]].to(wdtype)
    w_in = torch.as_tensor(W)
    keep0 = (w_in == 0) | dead[None, :]  # exactly zero on output
    keep0 = keep0[:, order]
    w = w_in.to(dtype)[:, order].clone()
    w[:, dead[order]] = 0
    q_out = torch.zeros((rows, cols), dtype=wdtype)
    codes = torch.zeros((rows, cols), dtype=torch.int64)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        err = torch.zeros((rows, b1 - b0), dtype=dtype)
        for k in range(b0, b1):
            x = w[:, k].to(wdtype)
            c = torch.clamp(torch.round(x / sc[:, k]) + zp[:, k], 0, maxq)
            q = sc[:, k] * (c - zp[:, k])
            q = torch.where(keep0[:, k], torch.zeros_like(q), q)
            c = torch.where(keep0[:, k], zp[:, k], c)
            q_out[:, k] = q
            codes[:, k] = c.to(torch.int64)
            e = (w[:, k] - q.to(dtype)) / upper[k, k]
            err[:, k - b0] = e
            if k + 1 < b1:
                w[:, k + 1:b1] -= e[:, None] * upper[k, k + 1:b1][None, :]
        if b1 < cols:
            w[:, b1:] -= err @ upper[b0:b1, b1:]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(cols)
    weight = q_out[:, inv].numpy()
    return GptqOut(weight=weight, codes=codes[:, inv].numpy(), order=order.numpy(),
                   seconds=time.perf_counter() - t0)


MSE_STEPS = 80  # shrink factors p = 1 - i / 100, i < MSE_STEPS (docs/python_api.md)


def fit_grid(W, bits: int, *, sym: bool = True, group_size: int | None = None,
             grid: str = "mse", norm: float = 2.4) -> tuple[np.ndarray, np.ndarray]:
    """The quantization grid fitted the straightforward batched way (GPTQ's reference code fits
    it inside its quantizer): (scale (rows, groups) in W's dtype, zero (rows, groups) int64).

    Same rule as obc_native's make_grid: per row (or group of group_size consecutive inputs) the
    range [min(w, 0), max(w, 0)]; sym: zero point 2**(bits-1), scale max|w| / (2**(bits-1) - 1);
    asym: scale (xmax - xmin) / (2**bits - 1), zero round(-xmin / scale); "mse": of the ranges
    shrunk by p = 1 - i/100 (i < 80) the first with the smallest sum |q(w) - w|**norm. All groups
    of all rows at once, one shrink factor at a time (80 passes over W). The error sums run in
    W's dtype here (obc_native sums in float64), so near-ties may pick another grid."""
    W = torch.as_tensor(np.asarray(W))
    rows, cols = W.shape
    gsize = cols if group_size is None else int(group_size)
    w = W.reshape(rows * (cols // gsize), gsize)
    xmin = torch.clamp(w.min(dim=1).values.double(), max=0.0)
    xmax = torch.clamp(w.max(dim=1).values.double(), min=0.0)
    maxq = 2**bits - 1

    def grid_for(p: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = p * xmin, p * xmax
        if sym:
            half = 2 ** (bits - 1)
            scale = torch.maximum(-lo, hi) / (half - 1)
            zero = torch.full_like(scale, float(half))
        else:
            scale = (hi - lo) / maxq
            zero = torch.clamp(torch.round(-lo / scale.to(W.dtype).double()), 0, maxq)
        scale = scale.to(W.dtype)
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
        return scale, zero.to(W.dtype)

    best_scale, best_zero = grid_for(1.0)
    if grid == "mse":
        best_err = torch.full((w.shape[0],), float("inf"), dtype=W.dtype)
        for i in range(MSE_STEPS):
            scale, zero = grid_for(1.0 - i / 100)
            q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
            err = ((scale[:, None] * (q - zero[:, None]) - w).abs() ** norm).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    groups = cols // gsize
    return (best_scale.reshape(rows, groups).numpy(),
            best_zero.reshape(rows, groups).to(torch.int64).numpy())


def layer_loss(W, W_hat, H) -> np.ndarray:
    """Per-row loss 1/2 (w - w_hat) H (w - w_hat)^T with the undamped H, float64."""
    delta = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    return 0.5 * np.einsum("rc,rc->r", delta @ np.asarray(H, np.float64), delta)


# --------------------------------------------------------------------------------------------
# Agreement check against obc_native (a program, not a test)
# --------------------------------------------------------------------------------------------


def _check_layer(obc, W, H, bits, sym, group_size, grid, dtype):
    """(codes agreement fraction, loss baseline / loss obc, rows that differ) for one case."""
    ref = obc.quantize_rtn(W, H, bits, sym=sym, group_size=group_size, grid=grid,
                           num_threads=2)
    mine = obc.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, method="gptq",
                        refine=False, num_threads=2)
    assert np.array_equal(ref.scale, mine.scale) and np.array_equal(ref.zero, mine.zero)
    out = gptq(W, H, bits, ref.scale, ref.zero, group_size, dtype=dtype)
    # Compare dequantized values (a zero weight's code is its group's zero point either way).
    same = out.weight == mine.weight
    loss_b = float(layer_loss(W, out.weight, H).sum())
    return float(same.mean()), loss_b / mine.loss, int((~same).any(axis=1).sum())


def check(verbose: bool = True) -> int:
    """Compares this baseline with obc_native.quantize(method="gptq", refine=False).

    Small realistic layers (correlated inputs with outlier features, see bench_quant.py) and
    white-noise layers, 4 and 3 bits, per-channel and groups of 32, min-max and MSE grids, some
    exactly-zero weights and a dead input. In float64 the codes must agree on >= 99.9% of the
    weights and the loss within 1e-3 relative (differences come from rounding ties flipped by
    the different order of float operations, which then propagate along their row); float32
    results are reported only. Prints one line per case; returns the number of failed cases.
    """
    import obc_native as obc
    from bench_quant import make_layer

    torch.set_num_threads(2)
    failures = 0
    for kind in ("realistic", "white"):
        for shape in ((32, 96), (48, 192)):
            W, H = make_layer(*shape, kind=kind, seed=shape[1])
            W[0, :5] = 0  # exactly-zero weights stay zero
            H[7, :] = 0   # a dead input
            H[:, 7] = 0
            for bits in (4, 3):
                for group in (None, 32):
                    for grid in ("minmax", "mse"):
                        tag = (f"{kind:9s} {shape[0]}x{shape[1]} {bits}b "
                               f"g={group or 'row':>3} {grid:6s}")
                        a64, r64, d64 = _check_layer(obc, W, H, bits, True, group, grid,
                                                     torch.float64)
                        a32, r32, _ = _check_layer(obc, W, H, bits, True, group, grid,
                                                   torch.float32)
                        ok = a64 >= 0.999 and abs(r64 - 1) <= 1e-3
                        failures += not ok
                        if verbose:
                            print(f"{'ok  ' if ok else 'FAIL'} {tag} float64: codes agree "
                                  f"{100 * a64:7.3f}% ({d64} rows differ), loss ratio "
                                  f"{r64:.6f} | float32: agree {100 * a32:7.3f}%, "
                                  f"ratio {r32:.6f}")
    print("all checks passed" if not failures else f"FAILED: {failures} case(s)")
    return failures


if __name__ == "__main__":
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare against obc_native.quantize(method='gptq', refine=False)")
    args = parser.parse_args()
    if not args.check:
        parser.error("nothing to do: this module is the baseline; pass --check to compare it")
    sys.exit(1 if check() else 0)
