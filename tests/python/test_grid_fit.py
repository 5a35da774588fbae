"""The MSE grid fit's fast paths (early exit, float32 screening) choose exactly the plain scan's grid.

The reference here is the plain scan written in the core's own arithmetic for float32 layers:
w / scale, round half to even, clamp and scale * (code - zero) in float32, |q - w|^2.4 summed
in float64 in index order (np.cumsum), the first minimum over the 80 shrink factors. Any
candidate the screening wrongly dropped, or an early exit that changed a comparison, shows up as
a different scale or zero point.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc

MSE_NORM = 2.4
STEPS = 80


def _grid(xmin: float, xmax: float, bits: int, sym: bool) -> tuple[np.float32, int]:
    """(scale, zero) of the range [xmin, xmax] as the core's grid_for_range<float>."""
    maxq = 2**bits - 1
    scale, zero = 1.0, 0
    if sym:
        amax = max(-xmin, xmax)
        zero = 2 ** (bits - 1)
        if amax > 0:
            scale = amax / (zero - 1)
    elif xmax > xmin:
        scale = float(np.float32((xmax - xmin) / maxq))
        zero = int(np.clip(np.rint(-xmin / scale), 0, maxq))
    s = np.float32(scale)
    if not (s > 0) or not np.isfinite(s):
        s = np.float32(1.0)
    return s, zero


def _plain_scan(w: np.ndarray, bits: int, sym: bool) -> tuple[np.float32, int]:
    w = w.astype(np.float32)
    xmin = min(0.0, float(w.min()))
    xmax = max(0.0, float(w.max()))
    maxq = 2**bits - 1
    best, best_err = None, np.inf
    for i in range(STEPS):
        p = 1.0 - i / 100.0
        s, z = _grid(p * xmin, p * xmax, bits, sym)
        code = np.clip(np.rint(w / s) + np.float32(z), 0, maxq).astype(np.float32)
        q = (s * (code - np.float32(z))).astype(np.float32)
        d = np.abs((q - w).astype(np.float64))
        err = float(np.cumsum(d**MSE_NORM)[-1])  # index order, as the core sums
        if err < best_err:
            best, best_err = (s, z), err
    return best


def _layers():
    rng = np.random.default_rng(7)
    cols = 256
    yield "gauss", rng.standard_normal((6, cols)) / 16
    w = rng.standard_normal((6, cols)) / 16
    w[:, :3] *= 40  # outliers: the best grid clips them
    yield "outliers", w
    yield "uniform", rng.uniform(-1, 1, (6, cols))
    # weights on a grid: many errors exactly zero, near ties between shrink factors
    yield "on-grid", np.round(rng.standard_normal((6, cols)) * 3) / 7
    w = rng.standard_normal((6, cols)) * 1e-12  # tiny scales (the screen's range is scaled)
    w[:, ::5] = 0
    yield "tiny+zeros", w
    yield "huge", rng.standard_normal((6, cols)) * 1e15
    w = rng.standard_normal((6, cols))
    w[:, 1::2] = 1e-9 * rng.standard_normal((6, cols // 2))  # many errors below the screen's 2^-20
    yield "mixed-magnitude", w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [None, 64, 128])
def test_mse_grid_equals_plain_scan(bits, sym, group):
    for name, w in _layers():
        W = np.ascontiguousarray(w, dtype=np.float32)
        H = np.eye(W.shape[1])
        res = obc.quantize_rtn(W, H, bits, sym=sym, group_size=group, grid="mse", num_threads=2)
        gs = W.shape[1] if group is None else group
        for r in range(W.shape[0]):
            for g in range(W.shape[1] // gs):
                s, z = _plain_scan(W[r, g * gs:(g + 1) * gs], bits, sym)
                assert res.scale[r, g] == s and res.zero[r, g] == z, (name, r, g)


def test_mse_grid_independent_of_threads():
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((300, 512)) / 20).astype(np.float32)
    H = np.eye(512)
    one = obc.quantize_rtn(W, H, 3, group_size=128, num_threads=1)
    two = obc.quantize_rtn(W, H, 3, group_size=128, num_threads=2)
    assert np.array_equal(one.scale, two.scale) and np.array_equal(one.zero, two.zero)


_GENERIC_SCRIPT = r"""
import sys
import numpy as np
import obc_native as obc
layers = np.load(sys.argv[1])
out = {}
for name in layers.files:
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for group in (None, 64):
                res = obc.quantize_rtn(layers[name], np.eye(layers[name].shape[1]), bits, sym=sym,
                                       group_size=group, grid="mse", num_threads=2)
                key = f"{name}|{bits}|{sym}|{group}"
                out[key + "|scale"], out[key + "|zero"] = res.scale, res.zero
out["isa"] = np.array(obc.build_info()["kernel_isa"])
np.savez(sys.argv[2], **out)
"""


def test_generic_screening_chooses_the_same_grids(tmp_path):
    # The screening is compiled per SIMD level (4 SSE2 lanes in the generic copy, 8 AVX2+FMA
    # lanes in the other); the test above checks whichever this CPU dispatches to against the
    # plain scan, this one the generic copy (OBC_SIMD=generic) against the dispatched one.
    import os
    import subprocess
    import sys

    layers = {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in _layers()}
    np.savez(tmp_path / "layers.npz", **layers)
    env = dict(os.environ, OBC_SIMD="generic")
    subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT, str(tmp_path / "layers.npz"),
                    str(tmp_path / "generic.npz")], env=env, check=True, timeout=300)
    generic = np.load(tmp_path / "generic.npz")
    assert str(generic["isa"]) == "generic"
    for name, W in layers.items():
        for bits in (2, 3, 4, 8):
            for sym in (True, False):
                for group in (None, 64):
                    res = obc.quantize_rtn(W, np.eye(W.shape[1]), bits, sym=sym, group_size=group,
                                           grid="mse", num_threads=2)
                    key = f"{name}|{bits}|{sym}|{group}"
                    assert np.array_equal(generic[key + "|scale"], res.scale), key
                    assert np.array_equal(generic[key + "|zero"], res.zero), key
