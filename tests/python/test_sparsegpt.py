"""method="sparsegpt": the SparseGPT kernel against the float64 replay (sparsegpt_reference.py),
its patterns and counting rule, thread-count independence, bad input, and ExactOBS <= SparseGPT."""

from __future__ import annotations

import math

import numpy as np
import pytest
from problems import ILL_DAMP, hessian_from_x, make_problem
from reference import count_for_sparsity, layer_losses, make_grid, quantize_value
from sparsegpt_reference import realistic_inputs, sparsegpt

import obc_native as obc

# The kernel runs float32 layers in float32 (U rounded to float32); the replay is float64.
RTOL = {np.float64: 1e-10, np.float32: 1e-5}

PATTERNS = {
    "unstructured": dict(sparsity=0.5),
    "unstructured-uniform": dict(sparsity=0.4, spread="uniform"),
    "nm": dict(n=2, m=4),
    "nm-1:3": dict(n=1, m=3),
    "blocked": dict(sparsity=0.5, block=4),
    "blocked-uniform": dict(sparsity=0.3, block=2, spread="uniform"),
}


def run(pattern, W, H, **kw):
    """The public API call for a PATTERNS entry."""
    kind = pattern.split("-")[0]
    args = {**PATTERNS[pattern], **kw}
    if kind == "unstructured":
        s = args.pop("sparsity")
        return obc.prune_unstructured(W, H, s, method="sparsegpt", **args)
    if kind == "nm":
        return obc.prune_nm(W, H, args.pop("n"), args.pop("m"), method="sparsegpt", **args)
    s, b = args.pop("sparsity"), args.pop("block")
    return obc.prune_blocked(W, H, s, b, method="sparsegpt", **args)


def replay(pattern, W, H, **kw):
    return sparsegpt(W, H, pattern=pattern.split("-")[0], **{**PATTERNS[pattern], **kw})


def assert_rel(got, expected, rtol, what):
    scale = float(np.max(np.abs(expected)))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - expected)))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["random", "illcond"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_matches_float64_replay(pattern, kind, dtype):
    # 90 rows = two row chunks; lazy_block 12 gives several lazy blocks (4 of them span cols).
    W, H, _ = make_problem(90, 48, seed=3, kind=kind, zeros=0.1, dead=2, dtype=dtype)
    damp = 0.01 if kind == "random" else ILL_DAMP
    res = run(pattern, W, H, lazy_block=12, damp=damp, num_threads=2)
    w_ref, pruned_ref = replay(pattern, W, H, lazy_block=12, damp=damp)
    np.testing.assert_array_equal(~res.mask, pruned_ref)
    assert_rel(res.weight, w_ref, RTOL[dtype], "weight")
    assert res.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_float64_replay_wide(dtype):
    # 600 inputs: U is rounded to float32 in place in stages (65536 elements, then doubling
    # ranges, the last one partial: 360000 in all), which 48 inputs never reach.
    W, H, _ = make_problem(70, 600, seed=8, zeros=0.05, dead=3, n_samples=900, dtype=dtype)
    res = run("unstructured", W, H, num_threads=2)
    w_ref, pruned_ref = replay("unstructured", W, H)
    np.testing.assert_array_equal(~res.mask, pruned_ref)
    assert_rel(res.weight, w_ref, RTOL[dtype], "weight")


def test_lazy_block_changes_only_rounding_for_a_fixed_mask():
    # N:M masks do not depend on lazy block boundaries: any lazy_block gives the same result
    # up to rounding (the lazy GEMM is exact algebra), and matches the replay.
    W, H, _ = make_problem(20, 64, seed=5, zeros=0.05, dead=1)
    a = obc.prune_nm(W, H, 2, 4, method="sparsegpt", lazy_block=4)
    b = obc.prune_nm(W, H, 2, 4, method="sparsegpt", lazy_block=1000)
    w_ref, pruned_ref = sparsegpt(W, H, pattern="nm", n=2, m=4)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(~a.mask, pruned_ref)
    assert_rel(a.weight, w_ref, 1e-10, "lazy_block=4")
    assert_rel(b.weight, w_ref, 1e-10, "lazy_block=1000")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_result_fields_consistent_with_exact_path(dtype):
    W, H, X = make_problem(30, 40, seed=7, zeros=0.1, dead=3, dtype=dtype)
    res = obc.prune_unstructured(W, H, 0.5, method="sparsegpt", damp=0.02)
    exact = obc.prune_unstructured(W, H, 0.5, damp=0.02)
    assert res.damp == exact.damp == 0.02
    assert res.damp_absolute == pytest.approx(exact.damp_absolute, rel=1e-15)
    assert res.mask.dtype == np.bool_ and res.mask.shape == W.shape
    assert np.all(res.weight[~res.mask] == 0)
    # row_losses: 1/2 dw H dw^T with the undamped H, in float64 after the sweep.
    expected = layer_losses(W, res.weight, H)
    np.testing.assert_allclose(res.row_losses, expected, rtol=1e-9 if dtype == np.float64 else 1e-5)
    assert res.row_losses.dtype == np.float64


@pytest.mark.parametrize("spread", ["global", "uniform"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_unstructured_count(spread, sparsity):
    rows, cols = 23, 40
    W, H, _ = make_problem(rows, cols, seed=11, zeros=0.08, dead=2)
    res = obc.prune_unstructured(W, H, sparsity, spread=spread, method="sparsegpt", lazy_block=16)
    pruned = ~res.mask
    already = (W == 0) | (np.diag(H) == 0)[None, :]
    assert np.all(pruned[already]) and np.all(res.weight[already] == 0)
    if spread == "global":
        assert pruned.sum() == max(count_for_sparsity(sparsity, rows * cols), already.sum())
    else:
        target = count_for_sparsity(sparsity, cols)
        np.testing.assert_array_equal(pruned.sum(axis=1), np.maximum(target, already.sum(axis=1)))


def test_existing_zeros_beyond_the_target_are_kept_and_nothing_more_is_pruned():
    W, H, _ = make_problem(10, 32, seed=12, zeros=0.6)
    res = obc.prune_unstructured(W, H, 0.5, spread="uniform", method="sparsegpt")
    zeros = (W == 0).sum(axis=1)
    np.testing.assert_array_equal((~res.mask).sum(axis=1), np.maximum(zeros, 16))
    assert np.all(res.weight[W == 0] == 0)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 3), (4, 8)])
def test_nm_pattern(n, m):
    rows, cols = 17, 48
    W, H, _ = make_problem(rows, cols, seed=13, zeros=0.15, dead=2)
    res = obc.prune_nm(W, H, n, m, method="sparsegpt", lazy_block=10)
    already = ((W == 0) | (np.diag(H) == 0)[None, :]).reshape(rows, cols // m, m).sum(axis=2)
    zeros = (res.weight == 0).reshape(rows, cols // m, m).sum(axis=2)
    pruned = (~res.mask).reshape(rows, cols // m, m).sum(axis=2)
    np.testing.assert_array_equal(pruned, np.maximum(already, n))
    np.testing.assert_array_equal(zeros, pruned)  # kept weights are non-zero here
    assert np.all(res.weight[W == 0] == 0)


@pytest.mark.parametrize("spread", ["global", "uniform"])
def test_blocked_pattern(spread):
    rows, cols, block = 19, 48, 4
    W, H, _ = make_problem(rows, cols, seed=14, zeros=0.3, dead=4)
    res = obc.prune_blocked(W, H, 0.5, block, spread=spread, method="sparsegpt", lazy_block=20)
    already = ((W == 0) | (np.diag(H) == 0)[None, :])
    pruned = ~res.mask
    # Whole blocks are pruned, plus the zeros on entry wherever they are.
    blocks = pruned.reshape(rows, cols // block, block)
    whole = blocks.all(axis=2)
    np.testing.assert_array_equal(pruned, np.repeat(whole, block, axis=1) | already)
    already_blocks = already.reshape(rows, cols // block, block).all(axis=2)
    units = cols // block
    if spread == "global":
        assert whole.sum() == max(count_for_sparsity(0.5, rows * units), already_blocks.sum())
    else:
        np.testing.assert_array_equal(
            whole.sum(axis=1),
            np.maximum(count_for_sparsity(0.5, units), already_blocks.sum(axis=1)))
    assert np.all(res.weight[pruned] == 0)


@pytest.mark.parametrize("pattern", ["unstructured", "nm", "blocked-uniform"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bit_identical_for_any_thread_count(pattern, dtype):
    # 260 rows = 5 row chunks (enough work for the column sweep to run in parallel too); 768
    # columns: the first lazy GEMM spans 2 column panels.
    W, H, _ = make_problem(260, 768, seed=15, zeros=0.02, dead=3, n_samples=800, dtype=dtype)
    results = [run(pattern, W, H, num_threads=t) for t in (1, 2, 3)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.weight, results[0].weight)
        np.testing.assert_array_equal(other.mask, results[0].mask)
        np.testing.assert_array_equal(other.row_losses, results[0].row_losses)


def test_float32_hessian_accepted():
    W, H, _ = make_problem(8, 24, seed=16)
    a = obc.prune_unstructured(W, H.astype(np.float32), 0.5, method="sparsegpt")
    b = obc.prune_unstructured(W, H.astype(np.float32).astype(np.float64), 0.5, method="sparsegpt")
    np.testing.assert_array_equal(a.weight, b.weight)


# ---------------------------------------------------------------------------------------------
# Joint pruning + quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sym, group_size", [(True, None), (False, 8)])
@pytest.mark.parametrize("pattern", ["unstructured", "nm", "blocked"])
def test_prune_quantize_matches_replay(pattern, sym, group_size, dtype):
    W, H, _ = make_problem(30, 48, seed=17, zeros=0.05, dead=2, dtype=dtype)
    args = PATTERNS[pattern]
    res = obc.prune_quantize_sparsegpt(W, H, 4, sym=sym, group_size=group_size, lazy_block=16,
                                       **args)
    scale, zero = make_grid(W, 4, sym, group_size)
    np.testing.assert_allclose(res.scale, scale, rtol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(res.zero, zero)
    grid = (res.scale.astype(np.float64), res.zero.astype(np.float64), 4, group_size or 48)
    w_ref, pruned_ref = sparsegpt(W, H, pattern=pattern, lazy_block=16, grid=grid, **args)
    np.testing.assert_array_equal(~res.mask, pruned_ref)
    assert np.all(res.weight[~res.mask] == 0)
    # Every weight lies exactly on its grid and matches its code.
    gs = group_size or 48
    s_col = np.repeat(res.scale, gs, axis=1)
    z_col = np.repeat(res.zero, gs, axis=1).astype(np.float64)
    np.testing.assert_array_equal(res.weight, (s_col * (res.codes - z_col)).astype(dtype))
    # Rounding may differ where the replay's float64 lands within rounding of a half step; the
    # rest must agree (float64 everywhere, float32 nearly everywhere).
    agree = np.isclose(res.weight, w_ref, rtol=1e-4, atol=1e-6)
    assert agree.mean() >= (1.0 if dtype == np.float64 else 0.99), f"{agree.mean():.4f}"
    np.testing.assert_allclose(res.row_losses, layer_losses(W, res.weight, H), rtol=1e-5)


def test_prune_quantize_loss_vs_separate_steps():
    # One joint pass must beat (or match) pruning, then rounding the kept weights without
    # feedback: the joint pass compensates the rounding error.
    W, H, _ = make_problem(40, 64, seed=18)
    joint = obc.prune_quantize_sparsegpt(W, H, 3, n=2, m=4)
    pruned = obc.prune_nm(W, H, 2, 4, method="sparsegpt")
    scale, zero = make_grid(W, 3)
    rounded = quantize_value(pruned.weight, scale, zero, 3)
    assert joint.row_losses.sum() < layer_losses(W, rounded, H).sum()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_method_and_options():
    W, H, _ = make_problem(4, 8, seed=19)
    with pytest.raises(ValueError, match=r"method: expected one of \('exact', 'sparsegpt'\)"):
        obc.prune_unstructured(W, H, 0.5, method="sparse_gpt")
    with pytest.raises(TypeError, match="method: expected one of"):
        obc.prune_nm(W, H, 2, 4, method=None)
    with pytest.raises(ValueError, match="'sparsegpt' is not available for structured"):
        obc.prune_structured(W, H, 0.5, method="sparsegpt")
    with pytest.raises(ValueError, match="'sparsegpt' is not available for traces"):
        obc.trace_unstructured(W, H, method="sparsegpt")
    with pytest.raises(ValueError, match="'sparsegpt' is not available for traces"):
        obc.trace_blocked(W, H, 2, method="sparsegpt")
    with pytest.raises(ValueError, match="lazy_block: only used by method='sparsegpt'"):
        obc.prune_blocked(W, H, 0.5, 2, lazy_block=16)
    with pytest.raises(ValueError, match="lazy_block: expected an integer in"):
        obc.prune_nm(W, H, 2, 4, method="sparsegpt", lazy_block=0)
    with pytest.raises(TypeError, match="lazy_block"):
        obc.prune_unstructured(W, H, 0.5, method="sparsegpt", lazy_block=1.5)
    with pytest.raises(ValueError, match="sparsity"):
        obc.prune_unstructured(W, H, 1.5, method="sparsegpt")
    with pytest.raises(ValueError, match="spread"):
        obc.prune_unstructured(W, H, 0.5, method="sparsegpt", spread="rows")
    with pytest.raises(ValueError, match="n: expected 0 < n < m"):
        obc.prune_nm(W, H, 4, 4, method="sparsegpt")
    with pytest.raises(ValueError, match="block"):
        obc.prune_blocked(W, H, 0.5, 3, method="sparsegpt")


def test_bad_layer_input():
    W, H, _ = make_problem(4, 8, seed=20)
    bad = W.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="W"):
        obc.prune_unstructured(bad, H, 0.5, method="sparsegpt")
    with pytest.raises(ValueError, match="H"):
        obc.prune_nm(W, H[:4, :4], 2, 4, method="sparsegpt")
    asym = H.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        obc.prune_unstructured(W, asym, 0.5, method="sparsegpt")
    # Singular H without damping: the preparation's error, not a silent retry.
    x = np.random.default_rng(0).standard_normal((8, 3))
    with pytest.raises(obc.HessianError, match="damp"):
        obc.prune_unstructured(W, hessian_from_x(x), 0.5, method="sparsegpt", damp=0.0)
    with pytest.raises(ValueError, match="num_threads"):
        obc.prune_unstructured(W, H, 0.5, method="sparsegpt", num_threads=-1)


def test_bad_prune_quantize_input():
    W, H, _ = make_problem(4, 8, seed=21)
    with pytest.raises(ValueError, match="either sparsity or n and m"):
        obc.prune_quantize_sparsegpt(W, H, 4)
    with pytest.raises(ValueError, match="either sparsity or n and m"):
        obc.prune_quantize_sparsegpt(W, H, 4, sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="both or neither"):
        obc.prune_quantize_sparsegpt(W, H, 4, n=2)
    with pytest.raises(ValueError, match="bits"):
        obc.prune_quantize_sparsegpt(W, H, 9, sparsity=0.5)
    with pytest.raises(ValueError, match="group_size"):
        obc.prune_quantize_sparsegpt(W, H, 4, sparsity=0.5, group_size=3)
    with pytest.raises(ValueError, match="m: expected a divisor"):
        obc.prune_quantize_sparsegpt(W, H, 4, n=1, m=3)


# ---------------------------------------------------------------------------------------------
# ExactOBS against SparseGPT on realistic inputs
# ---------------------------------------------------------------------------------------------


def _realistic_layer(rows, cols, seed):
    X = realistic_inputs(cols, 2 * cols, seed=seed)
    W = np.random.default_rng(seed + 1).standard_normal((rows, cols)) / math.sqrt(cols)
    return W.astype(np.float32), hessian_from_x(X).astype(np.float32)


def _check_exact_not_worse(rows, cols):
    W, H = _realistic_layer(rows, cols, seed=22)
    for exact, fast in (
        (obc.prune_unstructured(W, H, 0.5), obc.prune_unstructured(W, H, 0.5, method="sparsegpt")),
        (obc.prune_nm(W, H, 2, 4), obc.prune_nm(W, H, 2, 4, method="sparsegpt")),
    ):
        assert exact.row_losses.sum() <= fast.row_losses.sum()
        assert (~exact.mask).sum() == (~fast.mask).sum()


def test_exact_not_worse_than_sparsegpt_small():
    _check_exact_not_worse(32, 256)


@pytest.mark.slow
def test_exact_not_worse_than_sparsegpt_realistic():
    # ExactOBS at this size takes 20-30 s per pattern on 2 cores (about 2 min in all when loaded).
    _check_exact_not_worse(256, 2048)
