"""The torch layer's magnitude baselines and uniform_sparsity count pruned items by the solvers'
rule (the core's count_for_sparsity), so that at the same nominal sparsity they prune exactly as
many weights, blocks or groups as ExactOBS (issue 16, item 1). A plain math.ceil(s * n) prunes
one more wherever binary rounding lifts an integer s * n (ceil(0.07 * 100) == 8)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import obc_native
from obc_native.budget import LayerLevels, Level, LevelDatabase, level_costs
from obc_native.torch import LayerConfig, describe_layer, uniform_sparsity
from obc_native.torch.solve import magnitude_blocked, magnitude_structured, solve_unit

pytestmark = pytest.mark.torch

PERCENTS = range(101)


def exact_count(total: int, percent: int) -> int:
    """ceil(percent / 100 * total) in exact integer arithmetic."""
    return -(-percent * total // 100)


def _problem(rows: int, cols: int, seed: int = 0):
    """Distinct non-zero |w| (no ties) and a well-conditioned H."""
    rng = np.random.default_rng(seed)
    W = (rng.permutation(rows * cols) + 1.0).reshape(rows, cols) * rng.choice([-1.0, 1.0], (rows, cols))
    X = rng.standard_normal((cols, 4 * cols))
    return W, X @ X.T / X.shape[1]


def test_magnitude_blocked_counts_like_exactobs_at_every_percent():
    W, H = _problem(2, 200)  # 100 blocks of 2 per row
    for i in PERCENTS:
        s = i / 100
        for spread, expected in (("global", exact_count(200, i)), ("uniform", 2 * exact_count(100, i))):
            baseline = (magnitude_blocked(W, s, 2, spread) == 0).sum() // 2
            obs = (~obc_native.prune_blocked(W, H, s, 2, spread=spread).mask).sum() // 2
            assert baseline == obs == expected, (i, spread)


def test_magnitude_structured_counts_like_exactobs_at_every_percent():
    W, H = _problem(2, 100)
    for i in PERCENTS:
        s = i / 100
        baseline = (magnitude_structured(W, s, 1) == 0).all(axis=0).sum()
        obs = (~obc_native.prune_structured(W, H, s).mask).all(axis=0).sum()
        assert baseline == obs == exact_count(100, i), i


@pytest.mark.parametrize("prune, extra", [
    ("unstructured", {}),
    ("blocked", {"block": 2}),
    ("structured", {}),
])
def test_solve_unit_baseline_and_exactobs_prune_the_same_count(prune, extra):
    layer = nn.Linear(100, 2, bias=False)
    info = describe_layer("fc", layer)
    W, H = _problem(2, 100, seed=3)
    W = W.astype(np.float32)
    # the percents where math.ceil(i / 100 * 100) overshoots, and a few where it does not
    for i in (7, 14, 28, 29, 55, 56, 57, 58, 0, 50, 100):
        counts = []
        for method in ("magnitude", "obc"):
            config = LayerConfig(prune=prune, sparsity=i / 100, method=method, **extra)
            counts.append(int((solve_unit(obc_native, info, W, H, config).weight == 0).sum()))
        assert counts[0] == counts[1], (prune, i, counts)


def _database(shapes) -> LevelDatabase:
    layers = []
    for index, shape in enumerate(shapes):
        rows, cols = shape
        dense = Level(kind="dense", params={}, loss=0.0, costs=level_costs(shape, rows * cols))
        layers.append(LayerLevels(name=f"layer{index}", shape=shape, levels=[dense]))
    return LevelDatabase(layers)


@pytest.mark.parametrize("spread", ["global", "uniform"])
def test_uniform_sparsity_is_the_smallest_that_meets_the_budget_as_the_solvers_count(spread):
    shapes = [(1, 100), (1, 200), (2, 75)]
    db = _database(shapes)
    total = sum(rows * cols for rows, cols in shapes)

    def nonzeros(s: float) -> int:  # as the solvers prune
        if spread == "uniform":
            return total - sum(rows * obc_native._arrays.count_for_sparsity(cols, s) for rows, cols in shapes)
        return total - sum(obc_native._arrays.count_for_sparsity(rows * cols, s) for rows, cols in shapes)

    # the counts change only at the sparsities k / size: the smallest one that meets a budget is
    # the smallest sparsity that does
    sizes = [cols if spread == "uniform" else rows * cols for rows, cols in shapes]
    steps = sorted({k / size for size in sizes for k in range(size + 1)})
    for budget in range(total, -1, -1):
        s = uniform_sparsity(db, f"params={budget}", spread=spread)
        smallest = next(step for step in steps if nonzeros(step) <= budget)
        assert (s, nonzeros(s)) == (smallest, nonzeros(smallest)), budget
