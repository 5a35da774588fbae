"""GPTQ's sweep on the Cholesky factor of the permuted, damped Hessian itself (gptq_factor in
cpp/src/gptq.cpp: H_p = L^T L, no inverse) against a float64 brute-force replay.

The replay re-solves the least-squares problem at every step it checks: with Q the steps already
taken (their values fixed to the library's own results) and F the live columns not yet rounded,
the optimal free weights are w_F = w0_F + inv(Hd_FF) Hd_FQ (w0_Q - q_Q), so the weight step k
rounds is w~_j = w0_j + e_Q . (Hd_QF g) with g = inv(Hd_FF)[:, 0], and its OBS step loss is
(w~_j - q_j)^2 / (2 g_0). Driving the replay with the library's own earlier codes keeps every
step independent: one rounding tie decided the other way does not spread to the later steps, and
a sample of steps can be checked on wide layers. A code may differ from the replay's only where
w~_j lies within TIE of a rounding boundary (in units of the grid step), which float64 round-off
in either computation can move it across; the test reports how many did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import obc_native
import reference as ref
from problems import assert_close, make_problem, make_realistic_layer

# Half-integer distance (in grid steps) within which float64 round-off may decide a rounding:
# w~ comes out of sums of ~cols products, each side's error is ~cols * 1e-16 relative to the
# weights on well-conditioned H and up to cond(Hd) * 1e-16 on ill-conditioned ones.
# float32 weights run the factor and the sweep in float32 (test_gptq_float32.py): w~ then carries
# float32 round-off, ~sqrt(cols) * 6e-8 relative to the weights on well-conditioned H (measured:
# no code differs from the replay on the random and realistic cases), more with cond(Hd).
TIE = {"random": 1e-9, "illcond": 1e-5, "float32": 1e-3, "float32-illcond": 1e-2}


def _order(H, act_order):
    diag = np.diag(np.asarray(H, np.float64))
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(len(diag))
    return [int(j) for j in order if diag[j] != 0]


def replay_check(W, H, damp, res, bits, act_order, *, kind="random", steps=None):
    """Checks res (quantize(..., method="gptq" / "gptq-natural", refine=False)) step by step
    against the brute-force optimum (module docstring) at the given step indices (all when None).
    Returns (number of steps checked, number of near-ties decided differently, summed step losses
    per row over the checked steps)."""
    W = np.asarray(W, np.float64)
    out = np.asarray(res.weight, np.float64)
    Hd, dead, _ = ref.damped_hessian(H, damp)
    order = _order(H, act_order)
    g_idx = res.group_index()
    scale = np.asarray(res.scale, np.float64)[:, g_idx]
    zero = np.asarray(res.zero, np.float64)[:, g_idx]
    pruned = W == 0
    assert np.all(out[:, dead] == 0) and np.all(out[pruned] == 0)
    ties, losses = 0, np.zeros(W.shape[0])
    checked = range(len(order)) if steps is None else sorted(set(s for s in steps if s < len(order)))
    for k in checked:
        j, Q, F = order[k], order[:k], order[k:]
        unit = np.zeros(len(F))
        unit[0] = 1.0
        g = np.linalg.solve(Hd[np.ix_(F, F)], unit)
        wt = W[:, j] + (W[:, Q] - out[:, Q]) @ (Hd[np.ix_(Q, F)] @ g) if Q else W[:, j].copy()
        x = wt / scale[:, j] + zero[:, j]
        target = np.where(pruned[:, j], 0.0, ref.quantize_value(wt, scale[:, j], zero[:, j], bits))
        target = target.astype(res.weight.dtype).astype(np.float64)  # float32 grids: their values
        differ = out[:, j] != target
        if differ.any():
            near = np.abs(np.abs(x - np.floor(x)) - 0.5) < TIE[kind]
            bad = differ & ~near
            assert not bad.any(), (
                f"step {k} (column {j}): rows {np.nonzero(bad)[0][:8].tolist()} rounded "
                f"{out[bad, j][:4]} where the replay's w~ = {wt[bad][:4]} gives {target[bad][:4]}")
            ties += int(differ.sum())
        losses += (wt - out[:, j]) ** 2 / (2 * g[0])
    return len(checked), ties, losses


def _illcond_problem(rows, cols, seed, dead=0, zeros=0.0):
    # make_problem's "illcond" H has cond 1e12; damp 1e-10 leaves cond(Hd) ~ 1e10.
    W, H, _ = make_problem(rows, cols, seed=seed, kind="illcond", zeros=zeros, dead=dead)
    return W, H, 1e-10


def _quantize(W, H, bits, damp, act_order, **kw):
    return obc_native.quantize(W, H, bits, damp=damp, method="gptq" if act_order else "gptq-natural",
                               refine=False, **kw)


@pytest.mark.parametrize("kind", ["random", "illcond"])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits,sym,group_size,zeros,dead", [
    (4, True, None, 0.0, 0),      # per row
    (3, False, 20, 0.3, 4),       # static groups, sparse rows, dead inputs
    (2, True, 60, 0.0, 2),
])
def test_sweep_matches_brute_force_replay(kind, act_order, bits, sym, group_size, zeros, dead):
    # 300 inputs: panels of 64 (the factor runs blocked from 384 on: see the next test), lazy
    # blocks of 128 and of 7 (one partial), 150 rows: two row chunks, the second partial.
    if kind == "random":
        W, H, _ = make_problem(150, 300, seed=5, zeros=zeros, dead=dead)
        damp = 0.01
    else:
        W, H, damp = _illcond_problem(150, 300, seed=5, zeros=zeros, dead=dead)
    for block in (128, 7):
        res = _quantize(W, H, bits, damp, act_order, sym=sym, group_size=group_size, grid="minmax",
                        gptq_block_size=block)
        n, ties, step_losses = replay_check(W, H, damp, res, bits, act_order, kind=kind)
        assert n == 300 - dead
        assert ties <= 2, f"{ties} near-ties decided differently"
        # The library's row losses (its step losses minus the damping's share) are the undamped
        # 1/2 dw H dw^T; the replay's step losses add up to the damped one.
        expected = ref.layer_losses(W, res.weight, H)
        assert_close(res.row_losses, expected, 1e-9 if kind == "random" else 1e-6, "row losses")
        assert_close(step_losses, ref.refine_objective(W, res.weight, H, damp),
                     1e-9 if kind == "random" else 1e-6, "replay step losses")
        assert np.all(res.weight[W == 0] == 0)


@pytest.mark.parametrize("kind", ["random", "illcond"])
def test_blocked_factor_1100_inputs(kind):
    # 1100 inputs: the Cholesky runs blocked and parallel (panels of 128 above 1024, a partial last
    # one); a sample of steps is re-solved from scratch, the whole result against the downdating
    # replay of reference.py (independent of the factor) on the random case.
    if kind == "random":
        W, H, _ = make_problem(40, 1100, seed=9, zeros=0.1, dead=3)
        damp = 0.01
    else:
        W, H, damp = _illcond_problem(40, 1100, seed=9, zeros=0.1, dead=3)
    res = _quantize(W, H, 4, damp, True, group_size=100, grid="minmax", num_threads=2)
    steps = [0, 1, 63, 64, 127, 128, 129, 500, 900, 1023, 1024, 1050, 1090, 1095, 1096]
    n, ties, _ = replay_check(W, H, damp, res, 4, True, kind=kind, steps=steps)
    assert n == len(steps) and ties <= 1
    assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-9 if kind == "random" else 1e-6)
    if kind == "random":
        weight, codes, losses = ref.quantize_fixed_order(W, H, 4, group_size=100, grid="minmax",
                                                         damp=damp, downdate=True)
        assert np.mean(res.codes != codes) < 1e-3
        if np.array_equal(res.codes, codes):
            assert_close(res.weight, weight, 1e-12)


@pytest.mark.slow
def test_realistic_wide_layer():
    # 256 x 4224 (a transformer projection's shape class, 33 groups of 128): panels of 256 above
    # 4096 inputs, float32 weights; steps sampled (late ones are cheap to re-solve, early not).
    W, H = make_realistic_layer(256, 4224, seed=3)
    res = _quantize(W, H, 4, 0.01, True, group_size=128, grid="minmax")
    steps = [0, 1, 255, 256, 257, 3000, 4095, 4096, 4150, 4223]
    n, ties, _ = replay_check(W, H, 0.01, res, 4, True, kind="float32", steps=steps)
    assert n == len(steps) and ties <= 1
    assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-5)


def test_bit_identical_for_any_thread_count():
    # 1100 inputs (parallel factor) and 300 rows (three row chunks, the last partial).
    W, H, _ = make_problem(300, 1100, seed=2, zeros=0.2, dead=2)
    runs = [_quantize(W, H, 3, 0.01, True, group_size=50, num_threads=t) for t in (1, 2, 3)]
    for r in runs[1:]:
        assert np.array_equal(r.weight, runs[0].weight)
        assert np.array_equal(r.row_losses, runs[0].row_losses)
    W32 = W.astype(np.float32)
    runs = [_quantize(W32, H, 4, 0.01, False, num_threads=t) for t in (1, 2)]
    assert np.array_equal(runs[0].weight, runs[1].weight)
    assert np.array_equal(runs[0].row_losses, runs[1].row_losses)


_SIMD_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import obc_native as obc
from problems import make_problem
W, H, _ = make_problem(200, 700, seed=4, zeros=0.1, dead=2)
res = obc.quantize(W, H, 4, group_size=70, grid="minmax", method="gptq", refine=False)
json.dump({"avx512": obc.build_info()["avx512_kernels"], "codes": res.codes.tolist(),
           "losses": res.row_losses.tolist()}, sys.stdout)
"""


def run_with_simd(script: str, env_simd: str | None):
    """JSON printed by ``script`` run in a fresh interpreter with OBC_SIMD=env_simd (None: unset,
    the dispatched copies); argv[1] is this folder, so the script can import problems.py."""
    env = dict(os.environ)
    env.pop("OBC_SIMD", None)
    if env_simd:
        env["OBC_SIMD"] = env_simd
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    return json.loads(proc.stdout)


def _simd_run(env_simd):
    return run_with_simd(_SIMD_SCRIPT, env_simd)


def test_avx2_and_avx512_copies_agree():
    # Not bitwise: the copies' GEMMs sum in different orders. A code may flip at a near-tie.
    default, avx2 = _simd_run(None), _simd_run("avx2")
    assert avx2["avx512"] is False
    if not default["avx512"]:
        pytest.skip("no AVX-512 copy on this CPU/build")
    codes_a, codes_b = np.array(default["codes"]), np.array(avx2["codes"])
    assert np.mean(codes_a != codes_b) < 1e-4
    assert_close(default["losses"], avx2["losses"], 1e-6 if (codes_a != codes_b).any() else 1e-11)


@pytest.mark.parametrize("cols", [48, 700])
def test_singular_hessian_without_damping_raises(cols):
    # rank cols / 2: a pivot of the (blocked, for 700) factor falls below prepare_hessian's
    # tolerance; the same error as every other solver's.
    rng = np.random.default_rng(1)
    X = rng.standard_normal((cols, cols // 2))
    H = 2 / X.shape[1] * X @ X.T
    W = rng.standard_normal((4, cols))
    for method in ("gptq", "gptq-natural"):
        with pytest.raises(obc_native.HessianError, match="not positive definite after damping"):
            obc_native.quantize(W, H, 4, damp=0.0, method=method, refine=False)
