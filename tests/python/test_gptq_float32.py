"""GPTQ on float32 weights runs its factor (the Cholesky factor of the reversed, permuted, damped
Hessian) and its sweep (block GEMMs, in-block updates) in float32, like the other modes' float32
eliminations; the Hessian preparation and the step-loss sums stay in float64. Where the float32
factor loses positive definiteness (or is not finite, or out of float32 range), the layer is
redone in float64 on the float32 grid and reported as precision "float64" (never re-damped).

Checked here against the float64 brute-force replay of test_gptq_factor.py (a code may differ
from the replay's only within TIE["float32"] of a rounding tie, in grid steps), on random,
realistic (correlated inputs with outlier features) and moderately ill-conditioned H.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native
import reference as ref
from problems import assert_close, make_problem, make_realistic_layer
from test_gptq_factor import replay_check, run_with_simd


def _case(kind):
    """(W float32, H, damp, TIE kind) for a 150 x 300 layer."""
    if kind == "random":
        W, H, _ = make_problem(150, 300, seed=5, zeros=0.1, dead=2)
        return W.astype(np.float32), H, 0.01, "float32"
    if kind == "realistic":
        W, H = make_realistic_layer(150, 300, seed=5)
        return W, H, 0.01, "float32"
    # make_problem's "illcond" H (cond 1e12) damped by 1e-3: cond(Hd) ~ 3e4, its smallest
    # Cholesky pivot ~1e-3 of its diagonal entry (float32 keeps ~4 digits of it).
    W, H, _ = make_problem(150, 300, seed=5, kind="illcond", zeros=0.1, dead=2)
    return W.astype(np.float32), H, 1e-3, "float32-illcond"


@pytest.mark.parametrize("kind", ["random", "realistic", "illcond"])
@pytest.mark.parametrize("act_order", [True, False])
def test_float32_sweep_matches_float64_replay(kind, act_order):
    W, H, damp, tie_kind = _case(kind)
    for block in (128, 7):  # lazy blocks: one full + partial, and many partial
        res = obc_native.quantize(W, H, 4, damp=damp, group_size=30, grid="minmax",
                                  method="gptq" if act_order else "gptq-natural", refine=False,
                                  gptq_block_size=block)
        assert res.precision == "float32" and res.weight.dtype == np.float32
        n, ties, step_losses = replay_check(W, H, damp, res, 4, act_order, kind=tie_kind)
        assert n == W.shape[1] - (2 if kind != "realistic" else 0)
        assert ties <= W.size * 1e-3, f"{ties} near-ties decided differently"
        # The reported losses (float32 step losses summed in double, less the damping's share)
        # against the exact 1/2 dw H dw^T of the returned weights; measured <= 3e-6.
        assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-4, "row losses")
        assert_close(step_losses, ref.refine_objective(W, res.weight, H, damp), 1e-4,
                     "replay step losses")
        assert np.all(res.weight[W == 0] == 0)


def _ill_conditioned(decades, rows=16, cols=256):
    """(W float32, H): H has condition number 10**decades, too much for a float32 Cholesky at
    damp=0 but fine in float64. Each row's largest |w| is exactly 7, so the symmetric 4-bit
    minmax scale is exactly 1 in either precision: the float32 and float64 runs share a grid."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    H = (Q * np.logspace(0, -decades, cols)) @ Q.T
    H = 0.5 * (H + H.T)
    W = np.clip(rng.standard_normal((rows, cols)), -6.5, 6.5)
    W[:, 3] = 7.0
    return W.astype(np.float32), H


@pytest.mark.parametrize("method", ["gptq", "gptq-natural"])
def test_fallback_equals_the_float64_run(method):
    W32, H = _ill_conditioned(10)
    r32 = obc_native.quantize(W32, H, 4, damp=0, grid="minmax", method=method, refine=False)
    r64 = obc_native.quantize(W32.astype(np.float64), H, 4, damp=0, grid="minmax", method=method,
                              refine=False)
    assert r32.precision == "float64" and r64.precision == "float64"
    assert r32.damp == 0 and r32.damp_absolute == 0  # never re-damped
    assert r32.weight.dtype == np.float32 and r32.scale.dtype == np.float32
    np.testing.assert_array_equal(r32.scale.astype(np.float64), r64.scale)
    np.testing.assert_array_equal(r32.codes, r64.codes)
    np.testing.assert_array_equal(r32.weight, r64.weight.astype(np.float32))
    # r32's losses are measured on the weights, r64's come from its sweep.
    assert_close(r32.row_losses, r64.row_losses, 1e-6, "row losses")
    # The same through the per-row choice (OBQ's float32 elimination falls back there too).
    auto = obc_native.quantize(W32, H, 4, damp=0, grid="minmax", method=[method, "rtn"],
                               refine=False)
    assert auto.precision == "float64"


def test_fallback_does_not_fire_on_a_well_conditioned_h():
    W32, _ = _ill_conditioned(10)
    X = np.random.default_rng(1).standard_normal((W32.shape[1], 4 * W32.shape[1]))
    H = 2 / X.shape[1] * X @ X.T
    for method in ("gptq", "gptq-natural", "auto"):
        assert obc_native.quantize(W32, H, 4, method=method).precision == "float32"
    # Mildly ill-conditioned (cond 1e4, damp=0): float32 keeps it.
    W32, H = _ill_conditioned(4)
    assert obc_native.quantize(W32, H, 4, damp=0, method="gptq", refine=False).precision == "float32"


def test_float32_bit_identical_for_any_thread_count():
    # 1100 inputs (a blocked, parallel float32 factor) and 300 rows (three row chunks).
    W, H, _ = make_problem(300, 1100, seed=2, zeros=0.2, dead=2)
    W = W.astype(np.float32)
    runs = [obc_native.quantize(W, H, 3, group_size=50, method="gptq", refine=False, num_threads=t)
            for t in (1, 2, 3)]
    for r in runs[1:]:
        assert r.precision == "float32"
        assert np.array_equal(r.weight, runs[0].weight)
        assert np.array_equal(r.row_losses, runs[0].row_losses)


_SIMD_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import obc_native as obc
from problems import make_problem
W, H, _ = make_problem(200, 700, seed=4, zeros=0.1, dead=2)
res = obc.quantize(W.astype(np.float32), H, 4, group_size=70, grid="minmax", method="gptq",
                   refine=False)
json.dump({"avx512": obc.build_info()["avx512_kernels"], "precision": res.precision,
           "codes": res.codes.tolist(), "losses": res.row_losses.tolist()}, sys.stdout)
"""


def _simd_run(env_simd):
    return run_with_simd(_SIMD_SCRIPT, env_simd)


def test_simd_copies_agree_in_float32():
    # Not bitwise: the copies' float32 GEMMs sum in different orders (and the generic one has no
    # FMA), so w~ differs by float32 round-off and a code may flip at a near-tie.
    runs = {name: _simd_run(name) for name in ("generic", "avx2", None)}
    codes = {name: np.array(r["codes"]) for name, r in runs.items()}
    for name, r in runs.items():
        assert r["precision"] == "float32"
        assert np.mean(codes[name] != codes["generic"]) < 1e-3
        assert_close(r["losses"], runs["generic"]["losses"], 1e-4, f"losses {name}")


@pytest.mark.slow
def test_realistic_512x4096_float32():
    # A transformer projection's shape (32 groups of 128), float32 end to end; steps sampled from
    # the replay (early ones cost a 4096-wide solve each).
    W, H = make_realistic_layer(512, 4096, seed=11)
    res = obc_native.quantize(W, H, 4, damp=0.01, group_size=128, grid="minmax", method="gptq",
                              refine=False)
    assert res.precision == "float32"
    steps = [0, 1, 127, 128, 129, 2000, 4000, 4095]
    n, ties, _ = replay_check(W, H, 0.01, res, 4, True, kind="float32", steps=steps)
    assert n == len(steps) and ties <= 2
    assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-4, "row losses")
