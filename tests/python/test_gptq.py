"""quantize(method=...): fixed-order GPTQ, coordinate-descent refinement, per-row choice.

GPTQ (lazy blocks through the Cholesky factor of the permuted H itself, float64) against reference.py's
step-by-step replay with inverses re-solved from scratch; refinement against a brute-force
check of every single code change; "auto" against the candidates run one by one.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native
import reference as ref
from obc_native import _core
from problems import ILL_DAMP, assert_close, make_problem, make_realistic_layer

# name: (kind, damp, fraction of existing zeros, dead inputs)
CASES = {
    "random": ("random", 0.01, 0.0, 0),
    "random-zeros-dead": ("random", 0.01, 0.3, 3),
    "illcond": ("illcond", ILL_DAMP, 0.0, 0),
    "illcond-zeros-dead": ("illcond", ILL_DAMP, 0.2, 2),
}
# (bits, sym, group_size, grid)
GRIDS = [(4, True, None, "mse"), (3, False, 16, "minmax"), (2, False, None, "mse"), (4, True, 8, "mse")]


def problem(case, rows=10, cols=48, seed=0):
    kind, damp, zeros, dead = CASES[case]
    W, H, _ = make_problem(rows, cols, seed=seed + 31 * rows + cols, kind=kind, zeros=zeros, dead=dead)
    return W, H, damp


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits,sym,group_size,grid", GRIDS)
@pytest.mark.parametrize("method", ["gptq", "gptq-natural"])
def test_fixed_order_matches_sequential_reference(case, bits, sym, group_size, grid, method):
    W, H, damp = problem(case)
    weight, codes, losses = ref.quantize_fixed_order(W, H, bits, sym, group_size, grid, damp,
                                                     act_order=method == "gptq")
    # block 7 < cols: several lazy blocks, one of them partial
    res = obc_native.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, damp=damp,
                              method=method, refine=False, gptq_block_size=7)
    what = f"{method} {case} {bits}b sym={sym} gs={group_size} {grid}"
    mism = np.argwhere(res.codes != codes)
    assert mism.size == 0, f"{what}: codes differ at {mism[:8].tolist()} (of {len(mism)})"
    assert_close(res.weight, weight, 1e-12, what + " weight")
    assert_close(res.row_losses, losses, 1e-6, what + " losses")
    assert np.all(res.weight[W == 0] == 0)
    assert res.row_method_names().tolist() == [method] * W.shape[0]
    assert res.refine_passes == 0 and np.array_equal(res.row_losses_unrefined, res.row_losses)


@pytest.mark.parametrize("method", ["gptq", "gptq-natural"])
def test_wide_layer_matches_sequential_reference(method):
    # 448 inputs: from 384 up the factor of the permuted H runs blocked and parallel (panels of
    # 64, copies in chunks of 128 columns, the last one partial), unlike the 48 inputs above.
    W, H, _ = make_problem(3, 448, seed=11, zeros=0.2, dead=5)
    weight, codes, losses = ref.quantize_fixed_order(W, H, 4, damp=0.01, act_order=method == "gptq",
                                                     downdate=True)
    runs = [obc_native.quantize(W, H, 4, method=method, refine=False, num_threads=t)
            for t in (1, 2, 3)]
    assert np.array_equal(runs[0].codes, codes)
    assert_close(runs[0].weight, weight, 1e-12, method + " weight")
    assert_close(runs[0].row_losses, losses, 1e-6, method + " losses")
    for r in runs[1:]:  # bit-identical for any thread count
        assert np.array_equal(r.weight, runs[0].weight)
        assert np.array_equal(r.row_losses, runs[0].row_losses)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gptq_hessian_errors(dtype):
    # GPTQ factors the permuted H itself (no H^-1): the same errors as the other solvers'.
    rng = np.random.default_rng(7)
    X = rng.standard_normal((16, 8))  # 8 samples of 16 inputs: rank 8
    H = 2 / 8 * X @ X.T
    W = rng.standard_normal((3, 16)).astype(dtype)
    for method in ("gptq", "gptq-natural", "auto"):
        with pytest.raises(obc_native.HessianError, match="not positive definite after damping"):
            obc_native.quantize(W, H, 4, damp=0.0, method=method, refine=False)
    # H in scale 1e-300: its inverse (1e300) is out of float32 range for float32 weights. GPTQ
    # factors H in float32 for float32 weights, and where that factor cannot hold it (here H
    # itself underflows float32) it redoes the layer in float64, as the float64 fallback of the
    # other modes does: a result on the float32 grid, reported as precision "float64" (it used
    # to raise "out of float32 range" when the check ran on a float64 factor; the fallback makes
    # the check's error unnecessary for GPTQ). "auto" still raises: its OBQ candidate keeps H^-1.
    X = rng.standard_normal((16, 64))
    tiny = 2 / 64 * X @ X.T * 1e-300
    res = obc_native.quantize(W, tiny, 4, method="gptq", refine=False)
    assert np.all(np.isfinite(res.weight)) and np.all(np.isfinite(res.row_losses))
    assert res.weight.dtype == dtype and res.precision == "float64"
    if dtype == np.float32:
        with pytest.raises(ValueError, match="out of float32 range"):
            obc_native.quantize(W, tiny, 4, method="auto", refine=False)


def test_block_size_changes_rounding_only():
    W, H, damp = problem("random", rows=80, cols=96)  # two row chunks
    a = obc_native.quantize(W, H, 3, method="gptq", refine=False, gptq_block_size=1)
    b = obc_native.quantize(W, H, 3, method="gptq", refine=False, gptq_block_size=128)
    assert np.array_equal(a.codes, b.codes)
    assert_close(a.row_losses, b.row_losses, 1e-10)


def test_act_order_is_descending_diagonal():
    # Two inputs, one with a far larger diag(H): act-order fixes it first; with the natural order
    # (small one first) its error is absorbed by the large one; the replay says which is which.
    W, H, damp = problem("random", rows=6, cols=16)
    H = H.copy()
    H[5, :] *= 7.0
    H[:, 5] *= 7.0
    w_act, _, _ = ref.quantize_fixed_order(W, H, 3, damp=damp, act_order=True)
    w_nat, _, _ = ref.quantize_fixed_order(W, H, 3, damp=damp, act_order=False)
    assert not np.array_equal(w_act, w_nat)
    got = obc_native.quantize(W, H, 3, damp=damp, method="gptq", refine=False)
    assert np.array_equal(got.codes, ref.quantize_fixed_order(W, H, 3, damp=damp)[1])


def test_float32_gptq_is_on_grid_and_close_to_float64():
    W, H, damp = problem("random-zeros-dead", rows=20, cols=64)
    r64 = obc_native.quantize(W, H, 4, method="gptq", refine=False)
    r32 = obc_native.quantize(W.astype(np.float32), H, 4, method="gptq", refine=False)
    assert r32.weight.dtype == np.float32
    g = r32.group_index()
    assert np.array_equal(r32.weight, r32.scale[:, g] * (r32.codes.astype(np.float32) - r32.zero[:, g]))
    assert np.all(r32.weight[W == 0] == 0)
    assert np.mean(r32.codes != r64.codes) < 0.01
    assert abs(r32.loss - r64.loss) <= 1e-3 * r64.loss


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits,sym,group_size,grid", GRIDS[:3])
@pytest.mark.parametrize("method", ["obq", "gptq", "rtn"])
@pytest.mark.parametrize("damped,block", [(False, 0), (False, 8), (True, 8), (False, 32)])
def test_refinement_is_monotone_and_ends_at_a_coordinate_optimum(case, bits, sym, group_size, grid, method, damped, block):
    W, H, damp = problem(case, rows=8, cols=32)
    base = obc_native.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, damp=damp,
                               method=method, refine=False, refit_rounds=0)
    res = obc_native.quantize(W, H, bits, sym=sym, group_size=group_size, grid=grid, damp=damp,
                              method=method, refine=True, refine_passes=100, refine_tol=0.0,
                              refine_damped=damped, refine_block_size=block, refit_rounds=0)
    what = f"refine {method} {case} {bits}b sym={sym} gs={group_size} {grid} damped={damped} block={block}"
    assert np.array_equal(res.scale, base.scale) and np.array_equal(res.zero, base.zero)
    assert np.array_equal(res.row_losses_unrefined, base.row_losses), what
    objective_damp = damp if damped else 0.0
    before = ref.refine_objective(W, base.weight, H, objective_damp)
    after = ref.refine_objective(W, res.weight, H, objective_damp)
    assert np.all(after <= before * (1 + 1e-12)), what
    if not damped:  # the objective is the reported loss
        assert np.all(res.row_losses <= res.row_losses_unrefined * (1 + 1e-12)), what
    assert res.refine_passes < 100, what  # converged: the last pass changed nothing
    best = ref.best_single_code_changes(W, res.weight, H, bits, res.scale, res.zero, objective_damp)
    assert np.all(best >= -1e-10 * np.maximum(after, 1e-300)), f"{what}: {best.min()} {after}"
    assert np.all(res.weight[W == 0] == 0), what
    _, dead, _ = ref.damped_hessian(H, damp)
    assert np.all(res.weight[:, dead] == 0), what
    g = res.group_index()
    assert np.array_equal(res.weight, res.scale[:, g] * (res.codes - res.zero[:, g].astype(np.float64)))


def test_refinement_lowers_the_loss_of_rtn():
    W, H, damp = problem("random", rows=16, cols=64)
    res = obc_native.quantize(W, H, 3, method="rtn", refine=True)
    rtn = obc_native.quantize_rtn(W, H, 3)
    assert np.array_equal(res.row_losses_unrefined, rtn.row_losses)
    assert res.loss < 0.8 * rtn.loss
    assert res.refine_passes >= 2


def test_block_moves_find_what_single_code_moves_cannot():
    W, H = make_realistic_layer(64, 256, seed=3, dtype=np.float64)
    gptq = obc_native.quantize(W, H, 4, method="gptq", refine=False)
    single = obc_native.quantize(W, H, 4, method="gptq", refine_block_size=0, refine_tol=0.0,
                                 refine_passes=200)
    blocks = obc_native.quantize(W, H, 4, method="gptq", refine_block_size=64, refine_tol=0.0,
                                 refine_passes=200)
    assert np.all(blocks.row_losses <= gptq.row_losses)
    assert blocks.loss < 0.98 * single.loss < 0.98 * gptq.loss, (blocks.loss, single.loss, gptq.loss)


def test_refine_passes_bounds_the_passes():
    W, H, damp = problem("random", rows=16, cols=64)
    # without refit rounds: with them, fewer passes can end in a better basin
    one = obc_native.quantize(W, H, 3, method="rtn", refine_passes=1, refit_rounds=0)
    assert one.refine_passes == 1
    many = obc_native.quantize(W, H, 3, method="rtn", refine_passes=50, refine_tol=0.0,
                               refit_rounds=0)
    assert many.refine_passes > 1 and many.loss < one.loss
    off = obc_native.quantize(W, H, 3, method="rtn", refine_passes=0, refit_rounds=0)
    assert off.refine_passes == 0 and np.array_equal(off.weight, obc_native.quantize_rtn(W, H, 3).weight)


@pytest.mark.parametrize("case", ["random", "illcond-zeros-dead"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_auto_keeps_the_best_candidate_per_row(case, dtype):
    W, H, damp = problem(case, rows=24, cols=64)
    W = W.astype(dtype)
    kw = dict(sym=False, group_size=16, damp=damp)  # each candidate refined and refitted
    auto = obc_native.quantize(W, H, 3, **kw)
    cands = [obc_native.quantize(W, H, 3, method=m, **kw) for m in ("obq", "gptq")]
    losses = np.stack([c.row_losses for c in cands])
    winner = np.argmin(losses, axis=0)  # ties: the first candidate (obq)
    assert np.array_equal(auto.row_methods, np.array([0, 1], np.uint8)[winner])
    assert np.array_equal(auto.row_losses, losses.min(axis=0))
    for i, c in enumerate(cands):
        rows = winner == i
        assert np.array_equal(auto.weight[rows], c.weight[rows])
        assert np.array_equal(auto.codes[rows], c.codes[rows])
        assert np.array_equal(auto.scale[rows], c.scale[rows])
        assert np.array_equal(auto.row_losses_unrefined[rows], c.row_losses_unrefined[rows])
    assert auto.loss <= min(c.loss for c in cands)
    assert set(auto.row_method_names()) <= {"obq", "gptq"}


def test_candidate_sequence_and_ties_to_the_first():
    W, H, damp = problem("random", rows=12, cols=32)
    kw = dict(refine=False, refit_rounds=0)
    a = obc_native.quantize(W, H, 4, method=("gptq", "gptq-natural"), **kw)
    g = obc_native.quantize(W, H, 4, method="gptq", **kw)
    n = obc_native.quantize(W, H, 4, method="gptq-natural", **kw)
    expect = np.where(n.row_losses < g.row_losses, 2, 1)
    assert np.array_equal(a.row_methods, expect)
    # the same candidate's rows are bit-identical, so a list of one equals the single method
    same = obc_native.quantize(W, H, 4, method=["gptq"], **kw)
    assert np.array_equal(same.weight, g.weight)


def test_auto_candidates_by_width():
    assert obc_native.AUTO_OBQ_MAX_COLS == 1024
    assert obc_native.auto_quant_methods(0) == ["obq", "gptq"]
    assert obc_native.auto_quant_methods(1024) == ["obq", "gptq"]
    assert obc_native.auto_quant_methods(1025) == ["gptq"]
    assert obc_native.auto_quant_methods(np.int64(11008)) == ["gptq"]
    with pytest.raises(ValueError, match="cols"):
        obc_native.auto_quant_methods(-1)
    with pytest.raises(TypeError, match="cols"):
        obc_native.auto_quant_methods(1.5)


@pytest.mark.parametrize("kind", ["realistic", "white"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auto_above_the_obq_width_is_refined_gptq(kind, dtype):
    # 1032 inputs: "auto" runs refined GPTQ alone, so it equals method="gptq" bit for bit and
    # no row records OBQ; the explicit pair still runs OBQ at this width (on white inputs OBQ
    # wins most rows). Groups of 129 inputs cut across GPTQ's blocks of 128.
    if kind == "realistic":
        W, H = make_realistic_layer(6, 1032, seed=3, dtype=dtype)
    else:
        W, H, _ = make_problem(6, 1032, seed=3, kind="random")
        W = W.astype(dtype)
    kw = dict(group_size=129, refine_passes=2, refit_rounds=1)
    auto = obc_native.quantize(W, H, 4, **kw)
    gptq = obc_native.quantize(W, H, 4, method="gptq", **kw)
    for field in ("weight", "codes", "scale", "zero", "row_losses", "row_losses_unrefined",
                  "row_methods"):
        assert np.array_equal(getattr(auto, field), getattr(gptq, field)), field
    assert set(auto.row_method_names()) == {"gptq"}
    if kind == "white":
        both = obc_native.quantize(W, H, 4, method=("obq", "gptq"), **kw)
        assert "obq" in set(both.row_method_names())
        assert np.all(both.row_losses <= gptq.row_losses) and both.loss < gptq.loss


def test_auto_at_the_obq_width_keeps_both_candidates():
    W, H, damp = problem("random", rows=4, cols=1024)
    kw = dict(damp=damp, refine_passes=1, refit_rounds=0)
    auto = obc_native.quantize(W, H, 4, **kw)
    both = obc_native.quantize(W, H, 4, method=("obq", "gptq"), **kw)
    assert np.array_equal(auto.weight, both.weight)
    assert np.array_equal(auto.row_methods, both.row_methods)
    assert "obq" in set(auto.row_method_names())  # OBQ ran: it wins these white-noise rows


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_obq_without_refinement_is_the_greedy_bit_for_bit(dtype):
    W, H, damp = problem("random-zeros-dead", rows=12, cols=48)
    W = W.astype(dtype)
    res = obc_native.quantize(W, H, 3, sym=False, group_size=16, method="obq", refine=False,
                              refit_rounds=0)
    old = (_core.f64 if dtype == np.float64 else _core.f32).quantize(W, H, 3, False, 16, "mse", 0.01, 0)
    assert np.array_equal(res.weight, old["weight"]) and np.array_equal(res.codes, old["codes"])
    assert np.array_equal(res.row_losses, old["row_losses"])
    assert res.row_method_names().tolist() == ["obq"] * 12


@pytest.mark.parametrize("method", ["auto", "gptq"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bit_identical_for_any_thread_count(method, dtype):
    W, H, damp = problem("random-zeros-dead", rows=300, cols=64)  # 3 row chunks of 128
    W = W.astype(dtype)
    runs = [obc_native.quantize(W, H, 3, group_size=16, method=method, num_threads=t) for t in (1, 2, 3)]
    for r in runs[1:]:
        assert np.array_equal(r.weight, runs[0].weight)
        assert np.array_equal(r.row_losses, runs[0].row_losses)
        assert np.array_equal(r.row_methods, runs[0].row_methods)
        assert r.refine_passes == runs[0].refine_passes


def _exact_row_losses(W, W_hat, H):
    """1/2 dw H dw^T per row in extended precision (long double), the reference for the tight
    checks below."""
    D = (np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)).astype(np.longdouble)
    return np.asarray(0.5 * np.einsum("ri,ij,rj->r", D, H.astype(np.longdouble), D), np.float64)


# (kind, damp, zeros, dead, n_samples): the last two have a rank-20 H, where most of the damped
# loss is damping, so (some of) their 256-row chunks are measured instead (see gptq_row_losses).
STEP_LOSS_CASES = [
    ("random", 0.01, 0.0, 0, None),
    ("random", 0.01, 0.3, 3, None),
    ("illcond", ILL_DAMP, 0.0, 0, None),
    ("illcond", ILL_DAMP, 0.2, 2, None),
    ("random", 0.01, 0.0, 0, 20),
    ("random", 1.0, 0.0, 0, 20),
]


@pytest.mark.parametrize("kind,damp,zeros,dead,n_samples", STEP_LOSS_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_row_losses_from_the_sweep_are_exact(kind, damp, zeros, dead, n_samples, dtype, group_size):
    # GPTQ's row losses are its sweep's summed step losses minus the damping's share (no second
    # O(rows cols^2) pass): within 1e-12 of the exact loss of the returned weights (measured
    # relative errors are <= 5e-14), on 300 rows (two 256-row chunks), sparse rows, dead inputs.
    W, H, _ = make_problem(300, 96, seed=5, kind=kind, zeros=zeros, dead=dead, n_samples=n_samples,
                           dtype=dtype)
    res = obc_native.quantize(W, H, 4, group_size=group_size, damp=damp, method="gptq", refine=False)
    exact = _exact_row_losses(W, res.weight, H)
    assert np.all(exact > 0)
    # float32 weights: the factor and the sweep run in float32 (only the loss sums in double), so
    # the step losses are those of H up to float32 rounding of its factor and of w~: measured
    # <= 2e-6 on this scale (assert_close's floor; the largest per-row relative error 2.4e-5,
    # "illcond"), where float64 reaches <= 5e-14.
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert_close(res.row_losses, exact, rtol, f"{kind} damp={damp} rows losses")
    assert np.array_equal(res.row_losses_unrefined, res.row_losses)
    # The same numbers from every path that runs GPTQ: the per-row choice (GPTQ first, so it
    # keeps every row it ties), the C API's route (quantize_select), any thread count.
    both = obc_native.quantize(W, H, 4, group_size=group_size, damp=damp, method=["gptq", "obq"],
                               refine=False)
    won = both.row_method_names() == "gptq"
    assert won.any()
    assert np.array_equal(both.row_losses[won], res.row_losses[won])
    for threads in (1, 3):
        again = obc_native.quantize(W, H, 4, group_size=group_size, damp=damp, method="gptq",
                                    refine=False, num_threads=threads)
        assert np.array_equal(again.weight, res.weight)
        assert np.array_equal(again.row_losses, res.row_losses)


@pytest.mark.parametrize("kind,damp,zeros,dead,n_samples", STEP_LOSS_CASES[:4])
def test_refinement_never_reads_as_raising_a_gptq_row_loss(kind, damp, zeros, dead, n_samples):
    # The unrefined losses come from the sweep, the refined ones are measured: a row that
    # refinement leaves alone keeps its unrefined value bit for bit, and no row's loss rises.
    W, H, _ = make_problem(80, 64, seed=3, kind=kind, zeros=zeros, dead=dead, n_samples=n_samples)
    plain = obc_native.quantize(W, H, 3, damp=damp, method="gptq", refine=False)
    res = obc_native.quantize(W, H, 3, damp=damp, method="gptq", refine=True, refit_rounds=0,
                              refine_passes=1)
    assert np.array_equal(res.row_losses_unrefined, plain.row_losses)
    same = np.all(res.weight == plain.weight, axis=1)
    assert same.any() and not same.all()
    assert np.array_equal(res.row_losses[same], plain.row_losses[same])
    assert np.all(res.row_losses <= res.row_losses_unrefined)


def test_gptq_row_losses_do_not_depend_on_the_row_split():
    # Row ranges that start at multiples of 256 (how the Ray executor splits a layer) give the
    # same bits as the whole layer, in the step-loss rows and in measured chunks alike.
    for n_samples, damp in ((None, 0.01), (20, 1.0)):
        W, H, _ = make_problem(600, 64, seed=9, n_samples=n_samples, zeros=0.1)
        whole = obc_native.quantize(W, H, 4, damp=damp, method="gptq", refine=False)
        for r0, r1 in ((0, 256), (256, 512), (512, 600)):
            part = obc_native.quantize(W[r0:r1], H, 4, damp=damp, method="gptq", refine=False)
            assert np.array_equal(part.weight, whole.weight[r0:r1])
            assert np.array_equal(part.row_losses, whole.row_losses[r0:r1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [33, 128])
def test_multi_block_sweep_does_not_depend_on_threads_or_row_split(dtype, block):
    # Several lazy blocks (300 inputs; 33: a block width that is no multiple of a SIMD width)
    # and 9 row chunks, one of them short: the bits must not change with the thread count or a
    # Ray-style row split (the row-split test above has a single block).
    W, H, _ = make_problem(1100, 300, seed=4, zeros=0.05)
    W = W.astype(dtype)
    runs = [obc_native.quantize(W, H, 4, method="gptq", refine=False, gptq_block_size=block,
                                num_threads=threads) for threads in (1, 2, 3)]
    for other in runs[1:]:
        assert np.array_equal(other.weight, runs[0].weight)
        assert np.array_equal(other.row_losses, runs[0].row_losses)
    for r0, r1 in ((0, 256), (256, 768), (768, 1100)):
        part = obc_native.quantize(W[r0:r1], H, 4, method="gptq", refine=False,
                                   gptq_block_size=block, num_threads=2)
        assert np.array_equal(part.weight, runs[0].weight[r0:r1])
        assert np.array_equal(part.row_losses, runs[0].row_losses[r0:r1])
    # The sweep's step losses add up to the exact loss of its weights.
    exact = ref.layer_losses(W.astype(np.float64), runs[0].weight.astype(np.float64), H)
    assert_close(runs[0].row_losses, exact, 1e-5 if dtype == np.float32 else 1e-11)


def test_dead_inputs_are_zero_and_loss_is_exact():
    W, H, damp = problem("random-zeros-dead", rows=10, cols=32)
    res = obc_native.quantize(W, H, 4)
    _, dead, _ = ref.damped_hessian(H, damp)
    assert dead.any() and np.all(res.weight[:, dead] == 0)
    assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-9)
    assert not res.mask[:, dead].any()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="gptq2"), ValueError, "method"),
        (dict(method="AUTO"), ValueError, "method"),
        (dict(method=()), ValueError, "method"),
        (dict(method=("obq", "obq")), ValueError, "method"),
        (dict(method=("obq", "auto")), ValueError, "method"),
        (dict(method=3), TypeError, "method"),
        # a set's order (the tie-break) follows string hashing, which varies between processes
        (dict(method={"gptq", "obq"}), TypeError, "method: expected .* list or tuple"),
        (dict(method=frozenset({"gptq"})), TypeError, "method: expected .* list or tuple"),
        (dict(refine="yes"), TypeError, "refine"),
        (dict(refine_passes=-1), ValueError, "refine_passes"),
        (dict(refine_passes=1.5), TypeError, "refine_passes"),
        (dict(refine_tol=-1e-3), ValueError, "refine_tol"),
        (dict(refine_tol=float("nan")), ValueError, "refine_tol"),
        (dict(gptq_block_size=0), ValueError, "gptq_block_size"),
        (dict(refine_damped=1), TypeError, "refine_damped"),
        (dict(refine_block_size=-1), ValueError, "refine_block_size"),
        (dict(refit_rounds=-1), ValueError, "refit_rounds"),
        (dict(refit_rounds=1.5), TypeError, "refit_rounds"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    W, H, _ = problem("random", rows=4, cols=16)
    with pytest.raises(exc, match=match):
        obc_native.quantize(W, H, 4, **kwargs)


def test_core_rejects_bad_method_names_and_lists():
    W, H, _ = problem("random", rows=4, cols=16)
    with pytest.raises(ValueError, match="method"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, ["nope"], 0, 0.0)
    with pytest.raises(ValueError, match="listed twice"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, ["gptq", "gptq"], 0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, [], 0, 0.0)
    with pytest.raises(ValueError, match="refine_passes"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, ["obq"], -2, 0.0)
    with pytest.raises(ValueError, match="block_size"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, ["gptq"], 0, 0.0, gptq_block_size=0)
    with pytest.raises(ValueError, match="refit_rounds"):
        _core.f64.quantize_select(W, H, 4, True, 0, "mse", 0.01, 1, ["gptq"], 0, 0.0, refit_rounds=-1)


@pytest.mark.slow
def test_realistic_layer_auto_beats_gptq():
    # 384 x 1536, correlated inputs with a decaying spectrum and 6 outlier features at 10-50x.
    # Measured (float32, 4 bits, per-row symmetric MSE grid, damp 0.01): gptq/rtn 0.039,
    # obq/gptq 10.3 (OBQ leaves the outlier inputs for the end), GPTQ + single-code moves 0.957,
    # auto (OBQ and GPTQ, each refined with block and single-code moves) 0.878.
    W, H = make_realistic_layer(384, 1536)
    gptq = obc_native.quantize(W, H, 4, method="gptq", refine=False)
    auto = obc_native.quantize(W, H, 4)
    assert np.all(auto.row_losses <= gptq.row_losses)
    assert auto.loss <= 0.9 * gptq.loss, auto.loss / gptq.loss
    assert_close(auto.row_losses, ref.layer_losses(W, auto.weight, H), 1e-6)


# Scale refit (refit_rounds): each row's scales re-solved given its codes.
@pytest.mark.parametrize("case", ["random", "illcond-zeros-dead"])
@pytest.mark.parametrize("bits,sym,group_size,grid", GRIDS)
def test_scale_refit_is_the_float64_least_squares(case, bits, sym, group_size, grid):
    W, H, damp = problem(case, rows=12, cols=48)
    kw = dict(sym=sym, group_size=group_size, grid=grid, damp=damp, method="gptq", refine=False)
    base = obc_native.quantize(W, H, bits, refit_rounds=0, **kw)
    res = obc_native.quantize(W, H, bits, refit_rounds=1, **kw)
    what = f"{case} {bits}b sym={sym} gs={group_size} {grid}"
    # without refinement a round changes the scales only: same codes and zero points
    assert np.array_equal(res.codes, base.codes) and np.array_equal(res.zero, base.zero), what
    g = res.group_index()
    assert np.array_equal(res.weight, res.scale[:, g] * (res.codes - res.zero[:, g].astype(np.float64)))
    _, dead, _ = ref.damped_hessian(H, damp)
    pruned = (W == 0) | dead[None, :]
    s = ref.refit_scales(W, base.codes, base.zero.astype(np.float64), g, H, pruned)
    kept = res.row_losses < base.row_losses
    assert kept.sum() >= len(kept) // 2, what  # the refit helps most rows of a fresh grid
    assert np.all(res.row_losses[~kept] == base.row_losses[~kept]), what
    assert np.array_equal(res.scale[~kept], base.scale[~kept]), what
    solved = kept[:, None] & np.isfinite(s)
    assert_close(res.scale[solved], s[solved], 1e-9)
    unsolved = kept[:, None] & ~np.isfinite(s)
    assert np.array_equal(res.scale[unsolved], base.scale[unsolved]), what
    assert np.all(res.scale > 0) and np.all(res.weight[pruned] == 0), what
    assert_close(res.row_losses, ref.layer_losses(W, res.weight, H), 1e-9)


@pytest.mark.parametrize("case", ["random-zeros-dead", "illcond"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_refit_rounds_never_raise_a_row_loss(case, dtype):
    W, H, damp = problem(case, rows=20, cols=64)
    W = W.astype(dtype)
    kw = dict(sym=False, group_size=16, damp=damp)
    cands = [obc_native.quantize(W, H, 3, method=m, refit_rounds=0, **kw) for m in ("obq", "gptq")]
    best = np.min(np.stack([c.row_losses for c in cands]), axis=0)
    prev = best
    for rounds in (0, 1, 2, 4):
        res = obc_native.quantize(W, H, 3, refit_rounds=rounds, **kw)  # auto + refine
        assert np.all(res.row_losses <= prev), rounds  # monotone in the rounds, row by row
        prev = res.row_losses
        assert np.all(res.weight[W == 0] == 0) and np.all(res.scale > 0)
        g = res.group_index()
        assert np.array_equal(res.weight, (res.scale[:, g] * (res.codes.astype(dtype) -
                                                              res.zero[:, g].astype(dtype))))
        assert np.array_equal(res.zero, cands[0].zero)
    assert np.array_equal(obc_native.quantize(W, H, 3, refit_rounds=0, **kw).row_losses, best)
    assert prev.sum() < best.sum()


def test_refit_lowers_the_loss_of_a_realistic_layer():
    # 96 x 512 (float32, 4 bits, symmetric MSE grids, groups of 128) with outlier input features;
    # measured / gptq's loss: auto + refinement without refit 0.767, one refit round 0.569,
    # two (the default) 0.490.
    W, H = make_realistic_layer(96, 512, seed=5)
    gptq = obc_native.quantize(W, H, 4, group_size=128, method="gptq", refine=False, refit_rounds=0)
    no_refit = obc_native.quantize(W, H, 4, group_size=128, refit_rounds=0)
    auto = obc_native.quantize(W, H, 4, group_size=128)
    assert np.all(auto.row_losses <= no_refit.row_losses)
    assert auto.loss <= 0.6 * gptq.loss, (auto.loss / gptq.loss, no_refit.loss / gptq.loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_memory_alignment(dtype):
    """README: results are bit-identical whatever the arrays' alignment. W and H are placed at
    every element offset within a 64-byte line (vectorized loops whose split into a peeled head
    and aligned body followed the address would sum in another order)."""
    W, H = make_realistic_layer(96, 600, seed=11, dtype=dtype)
    base = obc_native.quantize(W, H, 4, group_size=100)
    for offset in range(1, 64 // np.dtype(dtype).itemsize):
        w_buffer = np.empty(W.size + offset, dtype=dtype)
        W_moved = w_buffer[offset:].reshape(W.shape)
        W_moved[...] = W
        h_buffer = np.empty(H.size + offset % 8, dtype=H.dtype)
        H_moved = h_buffer[offset % 8:].reshape(H.shape)
        H_moved[...] = H
        result = obc_native.quantize(W_moved, H_moved, 4, group_size=100)
        np.testing.assert_array_equal(result.weight, base.weight)
        np.testing.assert_array_equal(result.row_losses, base.row_losses)
