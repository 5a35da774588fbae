"""One sparsity-count rule: the core's count_for_sparsity, used by the solvers, the Python
helpers and the magnitude baselines alike (issue 16, item 1).

A plain ``math.ceil(s * n)`` overshoots wherever ``s * n`` is an integer that binary rounding
lifts a hair above it (``ceil(0.07 * 100)`` is 8): a baseline counting that way prunes one item
more than ExactOBS at the same nominal sparsity. The torch baselines are checked against the
same rule in tests/torch/test_sparsity_counts_torch.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from problems import make_problem

import obc_native
from obc_native import _arrays, _core

SPARSITIES = [i / 100 for i in range(101)]


def exact_count(total: int, percent: int) -> int:
    """ceil(percent / 100 * total) in exact integer arithmetic."""
    return -(-percent * total // 100)


def float_ceil_overshoots(max_total: int = 3000) -> list[tuple[int, int]]:
    """(total, percent) pairs below max_total where math.ceil(percent / 100 * total) is wrong."""
    totals = np.arange(max_total)[:, None]
    percents = np.arange(101)[None, :]
    naive = np.ceil(percents / 100 * totals).astype(np.int64)
    exact = -(-percents * totals // 100)
    return [(int(n), int(i)) for n, i in zip(*np.nonzero(naive != exact))]


OVERSHOOTS = float_ceil_overshoots()


def test_the_pitfall_exists():
    # guards the tests below against testing nothing: the overshooting pairs are many
    assert math.ceil(0.07 * 100) == 8
    assert (100, 7) in OVERSHOOTS and len(OVERSHOOTS) > 100


def test_core_rule_is_the_exact_ceiling_for_every_percent_and_total_below_3000():
    wrong = [(n, i) for n in range(3000) for i in range(101)
             if _core.count_for_sparsity(n, i / 100) != exact_count(n, i)]
    assert wrong == []


def test_python_helper_is_the_core_rule():
    for n, i in OVERSHOOTS[:50] + [(0, 50), (1, 0), (1, 100), (7, 50)]:
        assert _arrays.count_for_sparsity(n, i / 100) == _core.count_for_sparsity(n, i / 100)
    assert _arrays.count_for_sparsity(np.int64(100), np.float32(0.5)) == 50


@pytest.mark.parametrize("total, sparsity, error, match", [
    (-1, 0.5, ValueError, "total: expected an integer in \\[0, inf\\], got -1"),
    (10, 1.5, ValueError, "sparsity: expected a value in \\[0, 1\\], got 1.5"),
    (10, float("nan"), ValueError, "sparsity"),
    (2.0, 0.5, TypeError, "total: expected an integer, got float"),
    (True, 0.5, TypeError, "total: expected an integer, got bool"),
    (10, "0.5", TypeError, "sparsity: expected a number"),
])
def test_python_helper_rejects_bad_input(total, sparsity, error, match):
    with pytest.raises(error, match=match):
        _arrays.count_for_sparsity(total, sparsity)


def test_core_binding_rejects_bad_input():
    with pytest.raises(ValueError, match="total: expected a count >= 0, got -3"):
        _core.count_for_sparsity(-3, 0.5)
    with pytest.raises(ValueError, match="sparsity: expected a value in \\[0, 1\\]"):
        _core.count_for_sparsity(3, -0.1)


def _distinct_weights(rows, cols, seed=0):
    """No zeros and no ties in |w|, so the count of zeros after pruning is the count pruned."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(rows * cols) + 1.0
    return (values * rng.choice([-1.0, 1.0], size=values.size)).reshape(rows, cols)


def test_prune_magnitude_counts_like_the_core_where_float_ceil_overshoots():
    for n, i in OVERSHOOTS:
        W = _distinct_weights(1, n, seed=n)
        for spread in ("global", "uniform"):
            zeros = int((obc_native.prune_magnitude(W, i / 100, spread=spread) == 0).sum())
            assert zeros == exact_count(n, i), (n, i, spread)


def test_prune_magnitude_global_and_uniform_counts_over_a_layer():
    W = _distinct_weights(3, 100)
    for i in range(101):
        s = i / 100
        assert (obc_native.prune_magnitude(W, s) == 0).sum() == exact_count(300, i)
        per_row = (obc_native.prune_magnitude(W, s, spread="uniform") == 0).sum(axis=1)
        assert per_row.tolist() == [exact_count(100, i)] * 3


@pytest.fixture(scope="module")
def layer():
    W, H, _ = make_problem(2, 100, seed=16)
    return W, H


def test_exactobs_prunes_as_many_as_magnitude_at_every_percent(layer):
    W, H = layer
    for i in range(101):
        s = i / 100
        for spread in ("global", "uniform"):
            obs = obc_native.prune_unstructured(W, H, s, spread=spread)
            mag = obc_native.prune_magnitude(W, s, spread=spread)
            assert (~obs.mask).sum() == (mag == 0).sum() == (
                exact_count(200, i) if spread == "global" else 2 * exact_count(100, i)), (i, spread)


def test_trace_steps_count_like_the_solvers(layer):
    W, H = layer
    trace = obc_native.trace_unstructured(W, H)
    for i in range(101):
        assert trace.steps_per_row(i / 100, "global").sum() == exact_count(200, i)
        assert trace.steps_per_row(i / 100, "uniform").tolist() == [exact_count(100, i)] * 2
