"""The MSE grid fit's fast paths (early exit, screening) choose exactly the plain scan's grid.

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


def _grid(xmin: float, xmax: float, bits: int, sym: bool,
          dtype=np.float32) -> tuple[np.float32, int]:
    """(scale, zero) of the range [xmin, xmax] as the core's grid_for_range<float> (or <double>)."""
    maxq = 2**bits - 1
    scale, zero = 1.0, 0
    if sym:
        amax = max(-xmin, xmax)
        zero = 2 ** (bits - 1)
        if amax > 0:
            scale = amax / (zero - 1)
    elif xmax > xmin:
        scale = float(dtype((xmax - xmin) / maxq))
        zero = int(np.clip(np.rint(-xmin / scale), 0, maxq))
    s = dtype(scale)
    if not (s > 0) or not np.isfinite(s):
        s = dtype(1.0)
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


# make_grid's fast path (screening, early exits, no exact sum when one candidate is left) against
# the core's own plain scan (every error summed in full), through the private binding _make_grid:
# bit-identical scales and zero points on random and adversarial rows, float32 and float64.


def _kernels(dtype):
    from obc_native import _core

    return _core.f32 if dtype == np.float32 else _core.f64


def _adversarial_rows(rng, cols):
    """Rows that stress ties, the screen's range limits and its early exits."""
    rows = []
    rows.append(np.zeros(cols))  # every shrink factor has error 0: a 80-way tie
    rows.append(np.full(cols, 0.37))  # constant, one-sided
    rows.append(np.full(cols, -2.5e-3))
    one = np.zeros(cols)
    one[cols // 3] = 1.0
    rows.append(one)  # a single non-zero weight
    two = np.zeros(cols)
    two[::2] = 0.5
    two[1::2] = -0.5
    rows.append(two)  # two values: exact representations at several steps
    rows.append(np.round(rng.standard_normal(cols) * 3) / 7)  # on a grid: many zero errors
    rows.append(np.round(rng.standard_normal(cols) * 7) / 15)
    sym = rng.standard_normal(cols)
    sym[cols // 2:] = -sym[:cols - cols // 2]  # mirror image: sym and asym grids alike
    rows.append(sym)
    g = rng.standard_normal(cols) * 0.02
    g[rng.integers(0, cols, 3)] *= 60  # a few strong outliers: the best grid clips them
    rows.append(g)
    rows.append(rng.standard_normal(cols) * 1e-19)  # tiny: below the screen's range (2^-60)
    rows.append(rng.standard_normal(cols) * 1e-17)  # near the bottom of the screen's range
    rows.append(rng.standard_normal(cols) * 1e17)  # near its top (2^60)
    rows.append(rng.standard_normal(cols) * 1e25)  # above it
    mixed = rng.standard_normal(cols)
    mixed[1::2] = 1e-9 * rng.standard_normal(cols // 2)  # errors below the screen's 2^-20
    rows.append(mixed)
    rows.append(np.abs(rng.standard_normal(cols)))  # no negative weight
    rows.append(rng.uniform(-1, 1, cols))
    heavy = rng.standard_t(2, cols)  # heavy tails
    rows.append(heavy)
    return np.array(rows)


def _random_rows(rng, rows, cols):
    w = rng.standard_normal((rows, cols)) * 0.02
    w[rng.random((rows, cols)) < 0.002] *= 8  # sparse outliers, like LLM weights
    w[: rows // 4] *= np.exp(rng.uniform(-8, 8, (rows // 4, 1)))  # rows of every magnitude
    return w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
def test_make_grid_equals_plain_scan_binding(dtype, group):
    rng = np.random.default_rng(17 + group)
    cols = 512
    W = np.concatenate([_adversarial_rows(rng, cols), _random_rows(rng, 24, cols)])
    W = np.ascontiguousarray(W, dtype=dtype)
    k = _kernels(dtype)
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            fast = k._make_grid(W, bits, sym, group, "mse", 2, False)
            plain = k._make_grid(W, bits, sym, group, "mse", 1, True)
            assert fast[0].dtype == dtype and fast[1].dtype == np.uint8
            for a, b in zip(fast, plain):
                bad = np.argwhere(a != b)
                assert bad.size == 0, (bits, sym, bad[:5].tolist())


def test_plain_scan_binding_is_the_reference_scan():
    # the C++ plain scan against this file's numpy scan: both references agree
    rng = np.random.default_rng(5)
    W = np.ascontiguousarray(_random_rows(rng, 8, 256), dtype=np.float32)
    for bits, sym in ((3, True), (4, False)):
        scale, zero = _kernels(np.float32)._make_grid(W, bits, sym, 0, "mse", 1, True)
        for r in range(W.shape[0]):
            s, z = _plain_scan(W[r], bits, sym)
            assert scale[r, 0] == s and zero[r, 0] == z


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cols", [4096, 11008])
def test_make_grid_equals_plain_scan_realistic_rows(cols, dtype):
    # realistic row lengths, per channel and in groups of 128, both screened dtypes
    rng = np.random.default_rng(cols)
    W = np.ascontiguousarray(_random_rows(rng, 4, cols), dtype=dtype)
    k = _kernels(dtype)
    for bits, sym, group in ((3, True, 0), (4, False, 0), (4, True, 128), (3, False, 128)):
        fast = k._make_grid(W, bits, sym, group, "mse", 2, False)
        plain = k._make_grid(W, bits, sym, group, "mse", 2, True)
        assert np.array_equal(fast[0], plain[0]) and np.array_equal(fast[1], plain[1])


_ISA_SCRIPT = r"""
import sys
import numpy as np
import obc_native as obc
from obc_native import _core
W = np.load(sys.argv[1])
out = {"isa": np.array(obc.build_info()["grid_screen_isa"])}
for kern, Wd in ((_core.f32, W), (_core.f64, W.astype(np.float64))):
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for group in (0, 64, 128):
                s, z = kern._make_grid(Wd, bits, sym, group, "mse", 2, False)
                ps, pz = kern._make_grid(Wd, bits, sym, group, "mse", 2, True)
                key = f"{Wd.dtype}|{bits}|{sym}|{group}"
                out[key] = np.array(np.array_equal(s, ps) and np.array_equal(z, pz))
np.savez(sys.argv[2], **out)
"""


@pytest.mark.parametrize("simd", ["generic", "avx2"])
def test_each_screening_copy_equals_plain_scan(tmp_path, simd):
    # OBC_SIMD=generic: the SSE2 copy; =avx2: the AVX2+FMA one even on AVX-512 CPUs (the default
    # run above checks whichever copy this CPU dispatches to, AVX-512 where present).
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(23)
    W = np.concatenate([_adversarial_rows(rng, 256), _random_rows(rng, 16, 256)])
    np.save(tmp_path / "w.npy", np.ascontiguousarray(W, dtype=np.float32))
    env = dict(os.environ, OBC_SIMD=simd)
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "w.npy"),
                    str(tmp_path / "out.npz")], env=env, check=True, timeout=300)
    out = np.load(tmp_path / "out.npz")
    expected = {"generic": {"generic"}, "avx2": {"avx2+fma", "generic"}}[simd]
    assert str(out["isa"]) in expected
    for key in out.files:
        if key != "isa":
            assert bool(out[key]), key


def test_build_info_reports_the_screening_isa():
    info = obc.build_info()
    assert info["grid_screen_isa"] in ("avx512", "avx2+fma", "generic")
    if info["kernel_isa"] == "generic":
        assert info["grid_screen_isa"] == "generic"
    if info["avx512_kernels"]:
        assert info["grid_screen_isa"] == "avx512"


# The screen's table estimate (ScreenPow: exponent table and mantissa polynomial per norm) and its
# rounding by a product with 1 / scale (the division only near half-integers): rows built to
# sit on rounding ties of the shrunk grids, denormal / tiny / huge magnitudes, constant rows,
# every norm the table is fitted for, every bit width, groups of 32 and 128, each SIMD copy.

NORMS = (1.0, 2.0, 2.4, 3.0, 4.0)


def _tie_rows(rng, cols, bits, sym, dtype=np.float32):
    """Rows whose weights lie at, and one ulp around, (n + 1/2) scale_i of several shrink
    factors i (the scales as grid_for_range<float> (<double>) computes them from the row's own
    range)."""
    rows = []
    for _ in range(4):
        amax = float(dtype(np.exp(rng.uniform(-5, 5))))
        xmin = float(dtype(-amax * float(rng.uniform(0.3, 1.0))))
        w = np.empty(cols, dtype=dtype)
        w[0], w[1] = amax, xmin  # fix the range: every step's scale is known
        for j in range(2, cols):
            i = int(rng.integers(0, 80))
            p = 1.0 - i / 100.0
            s, z = _grid(p * xmin, p * amax, bits, sym, dtype)
            lo, hi = -z, 2**bits - 1 - z
            n = int(rng.integers(lo, hi))  # n + 1/2 inside the grid
            x = dtype((n + 0.5) * float(s))
            x = np.nextafter(x, dtype(np.inf * rng.choice([-1, 1]))) if rng.random() < 0.5 else x
            w[j] = np.clip(x, xmin, amax)
        rows.append(w)
    return rows


def _magnitude_rows(rng, cols):
    rows = []
    rows.append(np.full(cols, 1e-40, dtype=np.float32))  # all denormal: not screened
    d = (rng.standard_normal(cols) * 0.02).astype(np.float32)
    d[::3] = np.float32(1e-41) * rng.choice([-1, 1], cols)[::3]  # denormals among normal weights
    rows.append(d)
    rows.append((rng.standard_normal(cols) * 1e-17).astype(np.float32))  # scales near 2^-60
    rows.append((rng.standard_normal(cols) * 1e17).astype(np.float32))  # near 2^60
    rows.append((rng.standard_normal(cols) * 1e30).astype(np.float32))  # beyond: the exact path
    rows.append(np.full(cols, 0.37, dtype=np.float32))  # constant
    rows.append(np.full(cols, -3.0e-3, dtype=np.float32))
    rows.append(np.zeros(cols, dtype=np.float32))
    g = (rng.standard_normal(cols) * 0.02).astype(np.float32)
    g[rng.integers(0, cols, 4)] *= 200  # outliers far beyond the shrunk ranges (u up to ~1e3)
    rows.append(g)
    return rows


def _screen_cases(cols, bits_list, sym_list, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    for bits in bits_list:
        for sym in sym_list:
            rows = [r.astype(dtype) for r in _magnitude_rows(rng, cols)]
            if dtype == np.float64:  # magnitudes only float64 holds, and double ties
                rows += [np.full(cols, 1e-310), rng.standard_normal(cols) * 1e-200,
                         rng.standard_normal(cols) * 1e200]
            rows = _tie_rows(rng, cols, bits, sym, dtype) + rows
            rows += list(_random_rows(rng, 6, cols).astype(dtype))
            yield bits, sym, np.ascontiguousarray(np.array(rows), dtype=dtype)


def _check_screen_cases(core, cols, bits_list, sym_list, groups, norms, seed, dtype=np.float32):
    bad = []
    kern = core.f32 if dtype == np.float32 else core.f64
    for bits, sym, W in _screen_cases(cols, bits_list, sym_list, seed, dtype):
        for group in groups:
            for norm in norms:
                fast = kern._make_grid(W, bits, sym, group, "mse", 2, False, norm)
                plain = kern._make_grid(W, bits, sym, group, "mse", 1, True, norm)
                for a, b in zip(fast, plain):
                    if not np.array_equal(a, b):
                        bad.append((bits, sym, group, norm, np.argwhere(a != b)[:3].tolist()))
    return bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_screen_tables_equal_plain_scan_quick(dtype):
    from obc_native import _core

    bad = _check_screen_cases(_core, 512, (3, 4, 8), (True, False), (0, 128), NORMS, seed=31,
                              dtype=dtype)
    assert not bad, bad[:5]


@pytest.mark.slow
def test_screen_tables_equal_plain_scan_every_width():
    from obc_native import _core

    bad = _check_screen_cases(_core, 512, range(2, 9), (True, False), (0, 32, 128), NORMS,
                              seed=37)
    assert not bad, bad[:5]


_SCREEN_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import obc_native as obc
from obc_native import _core
import test_grid_fit as t
import numpy as np
bad = t._check_screen_cases(_core, 512, (2, 4, 8), (True, False), (0, 32), t.NORMS, seed=41)
bad += t._check_screen_cases(_core, 512, (2, 4, 8), (True, False), (0, 32), t.NORMS, seed=43,
                             dtype=np.float64)
print(obc.build_info()["grid_screen_isa"])
print(len(bad), bad[:3])
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("simd", ["generic", "avx2", "default"])
def test_screen_tables_each_copy(simd):
    # OBC_SIMD picks the copy per process: generic (no tables), AVX2 (the split 8-entry tables),
    # default (AVX-512 where present: the 32-entry table)
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    if simd != "default":
        env["OBC_SIMD"] = simd
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _SCREEN_SCRIPT, str(here)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    isa = out.stdout.split()[0]
    expected = {"generic": {"generic"}, "avx2": {"avx2+fma", "generic"},
                "default": {"avx512", "avx2+fma", "generic"}}[simd]
    assert isa in expected
