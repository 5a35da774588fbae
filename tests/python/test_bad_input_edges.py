"""Edge cases found by a red-team audit of the numpy API: each failed (wrong exception type, an
internal message, a huge allocation, a silent wrong answer or a wrong file) before its fix."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import obc_native
from obc_native import LayerConfig, LevelDatabase, LevelDatabaseError
from obc_native.hessian import HessianAccumulator, read_hessian_info
from problems import make_problem

ROWS, COLS = 6, 16


@pytest.fixture(scope="module")
def wh():
    W, H, _ = make_problem(ROWS, COLS, seed=11)
    return W, H


def names(arg):
    """A regex matching the argument's name as a word."""
    return rf"(?<![A-Za-z_]){arg}(?![A-Za-z_])"


# ----------------------------------------------------------------------------------------------
# Integers too large for the core's C int / int64 arguments: a ValueError naming the argument,
# not pybind11's "incompatible function arguments" TypeError listing the internal signature.
# ----------------------------------------------------------------------------------------------

HUGE_INT_CALLS = {
    "lazy_block": lambda W, H, v: obc_native.prune_unstructured(W, H, 0.5, method="sparsegpt",
                                                                lazy_block=v),
    "refine_passes": lambda W, H, v: obc_native.quantize(W, H, 4, refine_passes=v),
    "refit_rounds": lambda W, H, v: obc_native.quantize(W, H, 4, refit_rounds=v),
    "gptq_block_size": lambda W, H, v: obc_native.quantize(W, H, 4, gptq_block_size=v),
    "refine_block_size": lambda W, H, v: obc_native.quantize(W, H, 4, refine_block_size=v),
    "cols": lambda W, H, v: obc_native.auto_quant_methods(v),
    "buckets": lambda W, H, v: obc_native.solve_levels([[1.0, 0.0]], [[2.0, 1.0]], 1.5,
                                                       buckets=v),
}


# C int arguments from 2**31, int64 ones from 2**63 (below that a lazy or GPTQ block wider than
# the layer is the whole layer, and the core's own limit answers for buckets).
HUGE_INT_CASES = [(arg, value) for arg in HUGE_INT_CALLS for value in (2**31, 2**63, 2**64)
                  if value >= 2**63 or arg in ("refine_passes", "refit_rounds")]


@pytest.mark.parametrize("arg,value", HUGE_INT_CASES)
def test_huge_integers_name_the_argument(wh, arg, value):
    W, H = wh
    with pytest.raises(ValueError, match=names(arg)):
        HUGE_INT_CALLS[arg](W, H, value)


# ----------------------------------------------------------------------------------------------
# SparseGPT's lazy block wider than the layer: the whole layer in one block, not a
# rows x lazy_block buffer (MemoryError for lazy_block = 1e12 on a 16-column layer).
# ----------------------------------------------------------------------------------------------

WIDE_LAZY = {
    "unstructured": lambda W, H, lb: obc_native.prune_unstructured(W, H, 0.5, method="sparsegpt",
                                                                   lazy_block=lb),
    "nm": lambda W, H, lb: obc_native.prune_nm(W, H, 2, 4, method="sparsegpt", lazy_block=lb),
    "blocked": lambda W, H, lb: obc_native.prune_blocked(W, H, 0.5, 4, method="sparsegpt",
                                                         lazy_block=lb),
    "joint": lambda W, H, lb: obc_native.prune_quantize_sparsegpt(W, H, 4, sparsity=0.5,
                                                                  lazy_block=lb),
}


@pytest.mark.parametrize("mode", WIDE_LAZY)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lazy_block_wider_than_the_layer_is_the_whole_layer(wh, mode, dtype):
    W, H = wh
    W = W.astype(dtype)
    whole = WIDE_LAZY[mode](W, H, COLS)
    for lazy in (COLS + 4, 10**12, 2**63 - 1):
        wide = WIDE_LAZY[mode](W, H, lazy)
        assert np.array_equal(wide.weight, whole.weight)
        assert np.array_equal(wide.mask, whole.mask)


# ----------------------------------------------------------------------------------------------
# Silent wrong answers
# ----------------------------------------------------------------------------------------------


def test_layer_loss_of_mixed_dtypes_is_measured_in_float64(wh):
    # A float64 W_hat was rounded to a float32 W's dtype first: a W_hat within float32 rounding
    # of W measured 0, whatever it was.
    W, H = wh
    W32 = W.astype(np.float32)
    expected = obc_native.layer_loss(W32.astype(np.float64), W, H)
    assert np.all(expected > 0)
    np.testing.assert_array_equal(obc_native.layer_loss(W32, W, H), expected)
    np.testing.assert_array_equal(obc_native.layer_loss(W, W32, H),
                                  obc_native.layer_loss(W, W32.astype(np.float64), H))


def test_joint_nm_rejects_a_block(wh):
    # block was silently ignored with n and m (N:M groups are single weights).
    W, H = wh
    with pytest.raises(ValueError, match=names("block")):
        obc_native.prune_quantize_sparsegpt(W, H, 4, n=2, m=4, block=4)
    obc_native.prune_quantize_sparsegpt(W, H, 4, n=2, m=4, block=1)


def test_trace_pruned_mask_checks_counts(wh):
    W, H = wh
    trace = obc_native.trace_unstructured(W, H)
    steps = trace.order.shape[1]
    np.testing.assert_array_equal(trace.pruned_mask(np.full(ROWS, steps)), np.ones_like(W, bool))
    for bad in (np.full(ROWS, steps + 1), np.full(ROWS, -1)):  # all / nothing pruned before
        with pytest.raises(ValueError, match=names("counts")):
            trace.pruned_mask(bad)
    with pytest.raises(ValueError, match=names("counts")):
        trace.pruned_mask(np.full(2, 3))
    with pytest.raises(TypeError, match=names("counts")):
        trace.pruned_mask(np.full(ROWS, 2.5))


# ----------------------------------------------------------------------------------------------
# Files and sizes
# ----------------------------------------------------------------------------------------------


def test_hessian_paths_with_nul_are_refused(tmp_path, monkeypatch, wh):
    # The C++ side stopped at the NUL: save("a\0b") wrote a file named "a".
    monkeypatch.chdir(tmp_path)
    acc = HessianAccumulator(COLS)
    acc.add(wh[0])
    for call in (lambda: acc.save("a\0b"), lambda: obc_native.save_hessian(acc, b"a\0b"),
                 lambda: obc_native.load_hessian("a\0b"), lambda: read_hessian_info("a\0b")):
        with pytest.raises(ValueError, match=names("path")):
            call()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cols", [2**28 + 1, 2**40, 2**64])
def test_accumulator_width_is_bounded(cols):
    # MemoryError (std::bad_alloc) or pybind11's TypeError before.
    with pytest.raises(ValueError, match=names("cols")):
        HessianAccumulator(cols)


@pytest.mark.parametrize("spec", ["flops=1e999", "params=1e400x", "bits=1e999bpw"])
def test_parse_budget_rejects_infinite_values(spec):
    with pytest.raises(ValueError, match="finite"):
        obc_native.parse_budget(spec)


def test_level_database_with_a_huge_integer_is_a_database_error(tmp_path):
    # Python's int_max_str_digits ValueError escaped without the file name.
    path = tmp_path / "db.json"
    path.write_text('{"format": "x", "meta": {"a": ' + "9" * 5000 + "}}")
    with pytest.raises(LevelDatabaseError, match="db.json"):
        LevelDatabase.load(path)
    json.loads('{"a": 1}')  # the parser itself is untouched


# ----------------------------------------------------------------------------------------------
# obc_native.solve: config, column_perm and structured_group
# ----------------------------------------------------------------------------------------------


def test_solve_checks_the_config(wh):
    W, H = wh
    with pytest.raises(TypeError, match=names("config")):
        obc_native.solve({"bits": 4}, W, H)
    # An unknown prune mode returned W unchanged.
    with pytest.raises(ValueError, match=names("prune")):
        obc_native.solve(LayerConfig(prune="bogus", sparsity=0.5), W, H)
    with pytest.raises(ValueError, match=names("bits")):
        obc_native.solve(LayerConfig(bits=9), W, H)
    # The magnitude baseline pruned all m weights of a group for n >= m.
    with pytest.raises(ValueError, match="n < m"):
        obc_native.solve(LayerConfig(prune="nm", n=5, m=4, method="magnitude"), W, H)


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_solve_checks_column_perm(wh, method):
    W, H = wh
    config = LayerConfig(prune="nm", n=2, m=4, method=method)
    perm = np.arange(COLS)[::-1].copy()
    expected = obc_native.solve(config, W, H, column_perm=perm).weight
    np.testing.assert_array_equal(obc_native.solve(config, W, H, column_perm=list(perm)).weight,
                                  expected)
    duplicated = perm.copy()
    duplicated[0] = duplicated[1]  # silently duplicated one column and dropped another before
    for bad, exc in ((duplicated, ValueError), (perm - COLS, ValueError), (perm[:-1], ValueError),
                     (perm[None], ValueError), (perm.astype(float), TypeError),
                     (np.ones(COLS, bool), TypeError)):
        with pytest.raises(exc, match=names("column_perm")):
            obc_native.solve(config, W, H, column_perm=bad)


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_solve_checks_structured_group(wh, method):
    W, H = wh
    config = LayerConfig(prune="structured", sparsity=0.5, method=method)
    for bad, exc in ((0, ValueError), (-1, ValueError), (None, TypeError), (2.0, TypeError),
                     (True, TypeError)):
        with pytest.raises(exc, match=names("structured_group")):
            obc_native.solve(config, W, H, structured_group=bad)
    if method == "magnitude":  # the solver names its own "group"; the baseline failed to reshape
        with pytest.raises(ValueError, match=names("structured_group")):
            obc_native.solve(config, W, H, structured_group=3)
    obc_native.solve(config, W, H, structured_group=4)


@pytest.mark.parametrize("field,value", [("m", 3), ("block", 3)])
def test_solve_baseline_pattern_must_tile_the_columns(wh, field, value):
    W, H = wh
    prune = "nm" if field == "m" else "blocked"
    config = LayerConfig(prune=prune, sparsity=0.5, n=1, method="magnitude", **{field: value})
    with pytest.raises(ValueError, match=names(field)):
        obc_native.solve(config, W, H)


def test_inputs_unchanged_by_the_fixed_paths(wh):
    W, H = wh
    W0, H0 = W.copy(), H.copy()
    obc_native.prune_unstructured(W, H, 0.5, method="sparsegpt", lazy_block=10**12)
    obc_native.layer_loss(W.astype(np.float32), W, H)
    obc_native.solve(LayerConfig(prune="nm", n=2, m=4), W, H, column_perm=np.arange(COLS)[::-1])
    assert np.array_equal(W, W0) and np.array_equal(H, H0)
    assert math.isfinite(float(obc_native.layer_loss(W, W * 0.5, H).sum()))


@pytest.mark.parametrize("which", ["W", "H"])
def test_trace_does_not_alias_the_callers_arrays(wh, which):
    # Trace.weights() re-solved from the caller's own W and H, so changing them after the call
    # changed the trace's results.
    W, H = wh
    W, H = W.copy(), np.asfortranarray(H)  # a Fortran H is passed through without a copy too
    trace = obc_native.trace_unstructured(W, H, record=(0.5,))
    before = [trace.weights(0.5).weight, trace.weights(0.5, "uniform").row_losses]
    (W if which == "W" else H)[0, 0] *= 3.0
    after = [trace.weights(0.5).weight, trace.weights(0.5, "uniform").row_losses]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def _crafted_database(wh, edit):
    """A level database dict edited by ``edit`` and re-checksummed, as a crafted file would be."""
    from obc_native import level_database

    W, H = wh
    db = LevelDatabase()
    db.add(obc_native.build_layer_levels(W, H, sparsities=(0.5,), bits=(4,), joint=((2, 4, 4),)))
    data = db.to_dict()
    edit(data["layers"][0])
    data.pop("checksum")
    data["checksum"] = level_database._checksum(data)
    return json.loads(json.dumps(data))


def _level(layer, kind):
    return next(lv for lv in layer["levels"] if lv["kind"] == kind)


@pytest.mark.parametrize("edit", [
    lambda L: _level(L, "unstructured")["params"].pop("spread"),  # KeyError in apply() before
    lambda L: _level(L, "quant")["params"].pop("grid"),
    lambda L: _level(L, "quant")["params"].update(bits=9),  # RecipeError in apply() before
    lambda L: _level(L, "joint")["params"].update(sym="yes"),
    lambda L: _level(L, "unstructured")["params"].update(spread="rows"),
    lambda L: L["settings"].update(damp=-1.0),
    lambda L: L.update(shape=[6.7, 16]),  # truncated to 6 rows before
    lambda L: L.update(shape=[True, 16]),
], ids=["no-spread", "no-grid", "bits-9", "sym-str", "spread-bad", "damp-neg", "float-shape",
        "bool-shape"])
def test_level_database_levels_must_be_applicable(wh, edit):
    with pytest.raises(LevelDatabaseError, match="malformed layer"):
        LevelDatabase.from_dict(_crafted_database(wh, edit))


def test_level_database_unedited_round_trip(wh):
    db = LevelDatabase.from_dict(_crafted_database(wh, lambda L: None))
    layer = db["layer"]
    for level in layer.levels:
        layer.apply(*wh, level)


def test_level_database_paths_name_the_argument(tmp_path, monkeypatch, wh):
    monkeypatch.chdir(tmp_path)
    db = LevelDatabase()
    db.add(obc_native.build_layer_levels(*wh, sparsities=(0.5,)))
    for call, exc in ((lambda: LevelDatabase.load(None), TypeError),
                      (lambda: db.save(None), TypeError),
                      (lambda: LevelDatabase.load("a\0b"), ValueError),
                      (lambda: db.save(b"a\0b"), ValueError)):
        with pytest.raises(exc, match=names("path")):
            call()
    assert os.listdir(tmp_path) == []
