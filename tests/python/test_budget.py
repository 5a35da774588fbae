"""Tests for obc_native.budget: the budgeted DP against brute force, budgets and their parsing.

Levels: test_level_builder.py, test_layer_solve.py; costs: test_costs.py; database files:
test_level_database.py, test_level_database_files.py."""

from __future__ import annotations

import functools
import itertools
import math
import sys
import threading

import numpy as np
import pytest
from level_fixtures import small_db  # noqa: F401 - a fixture

import obc_native
from obc_native import budget as B

# ---------------------------------------------------------------------------------------------
# brute-force references


def _rfold(values):
    """Right-to-left sum, the summation order of the DP (exact ties compare equal)."""
    return functools.reduce(lambda acc, v: v + acc, reversed(list(values)), 0.0)


def exact_optimum(losses, costs, budget):
    """(loss, cost, choice) minimal among selections with true cost <= budget, or None."""
    best = None
    for choice in itertools.product(*[range(len(lo)) for lo in losses]):
        cost = _rfold(c[j] for c, j in zip(costs, choice))
        if cost > budget:
            continue
        key = (_rfold(lo[j] for lo, j in zip(losses, choice)), cost, choice)
        if best is None or key < best:
            best = key
    return best


def discretized_optimum(losses, costs, budget, buckets):
    """The solver's discretized problem (obc/dp.hpp), enumerated: extra cost over the layer's
    cheapest level, rounded up to units of (budget - min_cost) / buckets after forgiving a
    relative 1e-12; selections within `buckets` units; ties by (loss, cost, choice). When every
    selection fits the budget nothing is discretized."""
    max_cost = 0.0
    for c in costs:
        max_cost += float(np.max(c))
    if max_cost <= budget:
        return exact_optimum(losses, costs, budget)
    layer_min = [float(np.min(c)) for c in costs]
    min_cost = 0.0
    for m in layer_min:
        min_cost += m
    free = budget - min_cost
    width = free / buckets

    def units(c, cmin):
        extra = c - cmin
        if extra == 0.0:
            return 0
        if not (width > 0.0 and extra <= free):
            return None
        u = math.ceil(extra / width * (1.0 - 1e-12))
        return u if u <= buckets else None

    table = [[units(c, m) for c in co] for co, m in zip(costs, layer_min)]
    best = None
    for choice in itertools.product(*[range(len(lo)) for lo in losses]):
        us = [table[l][j] for l, j in enumerate(choice)]
        if any(u is None for u in us) or sum(us) > buckets:
            continue
        key = (_rfold(lo[j] for lo, j in zip(losses, choice)),
               _rfold(c[j] for c, j in zip(costs, choice)), choice)
        if best is None or key < best:
            best = key
    return best


def _random_instance(rng, integer):
    layers = int(rng.integers(1, 7))
    sizes = rng.integers(1, 6, size=layers)
    if integer:  # few distinct values: many exact ties
        losses = [rng.integers(0, 5, size=s).astype(float) for s in sizes]
        costs = [rng.integers(0, 8, size=s).astype(float) for s in sizes]
    else:
        losses = [rng.random(s) for s in sizes]
        costs = [10 * rng.random(s) for s in sizes]
    return losses, costs


def _sum_min(costs):
    total = 0.0
    for c in costs:
        total += float(np.min(c))
    return total


# ---------------------------------------------------------------------------------------------
# solve_levels (numpy level)


def test_solve_levels_matches_discretized_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(150):
        losses, costs = _random_instance(rng, integer=trial % 2 == 0)
        lo, hi = _sum_min(costs), sum(float(np.max(c)) for c in costs)
        budget = lo + rng.random() * 1.1 * (hi - lo)
        buckets = int(rng.choice([1, 3, 10, 50]))
        sel = B.solve_levels(losses, costs, budget, buckets=buckets)
        ref = discretized_optimum(losses, costs, budget, buckets)
        assert ref is not None
        assert tuple(sel.choice.tolist()) == ref[2]
        assert sel.cost <= budget
        assert sel.units_used <= buckets


def test_solve_levels_exact_when_units_are_whole_costs():
    # integer costs and buckets == budget - min_cost: width 1, discretization is exact
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(200):
        losses, costs = _random_instance(rng, integer=True)
        lo = _sum_min(costs)
        hi = sum(float(np.max(c)) for c in costs)
        budget = float(rng.integers(int(lo), int(hi) + 1))
        if budget <= lo:
            continue
        sel = B.solve_levels(losses, costs, budget, buckets=int(budget - lo))
        ref = exact_optimum(losses, costs, budget)
        assert (sel.loss, sel.cost, tuple(sel.choice.tolist())) == ref
        assert sel.bucket_width == 1.0
        checked += 1
    assert checked > 100


def test_solve_levels_is_bracketed_by_exact_optima():
    rng = np.random.default_rng(2)
    for _ in range(100):
        losses, costs = _random_instance(rng, integer=False)
        lo, hi = _sum_min(costs), sum(float(np.max(c)) for c in costs)
        budget = lo + rng.random() * (hi - lo)
        for buckets in (2, 100, 10000):
            sel = B.solve_levels(losses, costs, budget, buckets=buckets)
            exact = exact_optimum(losses, costs, budget)
            assert sel.cost <= budget
            assert sel.loss >= exact[0] - 1e-12
            assert sel.loss_lower_bound <= exact[0] + 1e-12
            reduced = exact_optimum(losses, costs, budget - sel.cost_slack_bound)
            if reduced is not None:
                assert sel.loss <= reduced[0] + 1e-12
            assert sel.cost_slack_bound == pytest.approx(
                sum(np.ptp(c) > 0 for c in costs) * (budget - lo) / buckets)


def test_solve_levels_monotone_in_budget():
    rng = np.random.default_rng(3)
    for _ in range(20):
        losses, costs = _random_instance(rng, integer=False)
        lo, hi = _sum_min(costs), sum(float(np.max(c)) for c in costs)
        previous = math.inf
        for budget in np.linspace(lo, hi, 25):
            sel = B.solve_levels(losses, costs, float(budget))
            assert sel.cost <= budget
            assert sel.loss <= previous + 1e-12
            previous = sel.loss


def test_solve_levels_infeasible_states_smallest_cost():
    with pytest.raises(B.InfeasibleBudgetError, match=r"smallest achievable cost is 2\.5") as info:
        B.solve_levels([[1.0, 0.0], [1.0, 0.0]], [[1.5, 2.0], [1.0, 4.0]], 2.0)
    assert info.value.min_cost == 2.5
    assert isinstance(info.value, ValueError)
    # exactly the smallest cost is feasible: the cheapest levels
    sel = B.solve_levels([[1.0, 0.0], [1.0, 0.0]], [[1.5, 2.0], [1.0, 4.0]], 2.5)
    assert sel.choice.tolist() == [0, 0]


def test_core_checks_feasibility_too():
    with pytest.raises(ValueError, match="smallest achievable cost is 3"):
        obc_native._core.solve_levels([np.array([1.0])], [np.array([3.0])], 2.0, 10, True)


@pytest.mark.parametrize("losses, costs, budget, exc, match", [
    ([], [], 1.0, ValueError, "at least one layer"),
    ([[1.0]], [[1.0], [2.0]], 5.0, ValueError, "expected 1 layers to match losses, got 2"),
    ([[1.0, 2.0]], [[1.0]], 5.0, ValueError, "costs\\[0\\]: expected 2 levels"),
    ([[]], [[]], 5.0, ValueError, "at least one level"),
    ([[np.nan]], [[1.0]], 5.0, ValueError, "losses\\[0\\]: expected finite"),
    ([[1.0]], [[np.inf]], 5.0, ValueError, "costs\\[0\\]: expected finite"),
    ([[1.0]], [[-1.0]], 5.0, ValueError, ">= 0"),
    ([[1.0]], [[1.0]], -1.0, ValueError, "budget"),
    ([[1.0]], [[1.0]], float("nan"), ValueError, "budget"),
    ([["a"]], [[1.0]], 5.0, TypeError, "losses\\[0\\]"),
    ([[[1.0]]], [[1.0]], 5.0, ValueError, "1-D"),
    ("ab", [[1.0]], 5.0, TypeError, "losses"),
])
def test_solve_levels_bad_input(losses, costs, budget, exc, match):
    with pytest.raises(exc, match=match):
        B.solve_levels(losses, costs, budget)


def test_solve_levels_bad_buckets():
    with pytest.raises(ValueError, match="buckets"):
        B.solve_levels([[1.0]], [[1.0]], 5.0, buckets=0)
    with pytest.raises(TypeError, match="buckets"):
        B.solve_levels([[1.0]], [[1.0]], 5.0, buckets=2.5)
    with pytest.raises(ValueError, match="table limit"):
        B.solve_levels([[1.0, 0.0]] * 3, [[1.0, 2.0]] * 3, 5.0, buckets=400_000_000)


def test_solve_levels_threads_agree():
    rng = np.random.default_rng(4)
    losses = [rng.random(8) for _ in range(40)]
    costs = [rng.random(8) for _ in range(40)]
    expected = B.solve_levels(losses, costs, 15.0, buckets=20000).choice
    results = []

    def work():
        for _ in range(3):
            results.append(B.solve_levels(losses, costs, 15.0, buckets=20000).choice)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    for r in results:
        np.testing.assert_array_equal(r, expected)


# ---------------------------------------------------------------------------------------------
# the DP over a level database


def test_database_dp_matches_brute_force_for_every_cost_type(small_db):
    rng = np.random.default_rng(6)
    layers = list(small_db)
    for cost_type in ("params", "bits", "flops", "bops", "time"):
        assert cost_type in small_db.cost_types()
        losses = [layer.losses() for layer in layers]
        costs = [layer.costs(cost_type) for layer in layers]
        lo = small_db.min_cost(cost_type)
        hi = sum(float(c.max()) for c in costs)
        previous = math.inf
        for frac in sorted(rng.random(6)) + [1.0]:
            budget = lo + frac * (hi - lo)
            for buckets in (7, 10000):
                sol = B.solve_budget(small_db, cost=cost_type, budget=budget, buckets=buckets)
                ref = discretized_optimum(losses, costs, budget, buckets)
                assert tuple(sol.indices.values()) == ref[2]
                assert sol.cost <= budget
                assert sol.loss == pytest.approx(ref[0], rel=1e-12, abs=1e-300)
                exact = exact_optimum(losses, costs, budget)
                assert sol.loss >= exact[0] - 1e-12 * abs(exact[0])
            assert sol.loss <= previous * (1 + 1e-12)  # monotone in the budget
            previous = sol.loss
        with pytest.raises(B.InfeasibleBudgetError, match="smallest achievable") as info:
            B.solve_budget(small_db, cost=cost_type, budget=lo * 0.999 - 1e-9)
        assert info.value.min_cost == lo
        assert info.value.cost_type == cost_type


# ---------------------------------------------------------------------------------------------
# budgets


def test_parse_budget():
    assert B.parse_budget("flops=2x") == B.BudgetSpec("flops", 2.0, "factor")
    assert B.parse_budget(" bits = 4.5 ") == B.BudgetSpec("bits", 4.5, "per_weight")
    assert B.parse_budget("bits=4.5bpw") == B.BudgetSpec("bits", 4.5, "per_weight")
    assert B.parse_budget("bits=8X") == B.BudgetSpec("bits", 8.0, "factor")
    assert B.parse_budget("params=2e6") == B.BudgetSpec("params", 2e6, "absolute")
    assert B.parse_budget("time=1.5x") == B.BudgetSpec("time", 1.5, "factor")
    assert str(B.parse_budget("flops=2x")) == "flops=2x"
    assert str(B.parse_budget("bits=4.5")) == "bits=4.5bpw"
    assert str(B.BudgetSpec("bits", 1000.0, "absolute")) == "bits=1000 (absolute)"
    for spec in ("flops=2.5x", "bits=3bpw", "params=1234.5", "time=2x"):
        assert B.parse_budget(str(B.parse_budget(spec))) == B.parse_budget(spec)
    for bad in ("flops", "flops=", "flops=abc", "flops=-2x", "flops=0x", "params=4bpw", "=2x"):
        with pytest.raises(ValueError, match="budget"):
            B.parse_budget(bad)
    with pytest.raises(TypeError):
        B.parse_budget(2.0)


def test_budget_forms_resolve_consistently(small_db):
    dense = small_db.dense_cost("flops")
    a = B.solve_budget(small_db, "flops=2x")
    b = B.solve_budget(small_db, cost="flops", target=2)
    c = B.solve_budget(small_db, cost="flops", target="2x")
    d = B.solve_budget(small_db, cost="flops", budget=dense / 2)
    assert a.budget == b.budget == c.budget == d.budget == dense / 2
    assert a.labels == b.labels == c.labels == d.labels
    assert a.reduction >= 2.0
    bits = B.solve_budget(small_db, "bits=8")
    assert bits.budget == 8 * small_db.total_weights()
    assert bits.cost <= bits.budget
    assert B.solve_budget(small_db, cost="bits", target="8bpw").budget == bits.budget
    table = a.table()
    assert "layer0" in table and "total" in table


def test_solve_budget_errors(small_db):
    with pytest.raises(ValueError, match="unknown cost type 'latency'"):
        B.solve_budget(small_db, "latency=2x")
    with pytest.raises(ValueError, match="budget"):
        B.solve_budget(small_db, cost="flops", budget=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        B.solve_budget(small_db, cost="flops", budget=1.0, target=2.0)
    with pytest.raises(ValueError, match="not both"):
        B.solve_budget(small_db, "flops=2x", cost="flops")
    with pytest.raises(B.InfeasibleBudgetError, match=r"bits budget .* is infeasible; the smallest achievable bits"):
        B.solve_budget(small_db, "bits=1")
    with pytest.raises(ValueError, match="model_loss"):
        B.solve_budget(small_db, "flops=2x", loss="model")
    with pytest.raises(ValueError, match="normalize"):
        B.solve_budget(small_db, "flops=2x", loss="model", normalize=True)
    with pytest.raises(ValueError, match="no layers"):
        B.solve_budget(B.LevelDatabase(), "flops=2x")


def test_normalized_and_model_losses(small_db):
    sol = B.solve_budget(small_db, "params=2x", normalize=True)
    expected = 0.0
    for name, level in sol.choice.items():
        expected += level.loss / small_db[name].reference_loss
    assert sol.loss == pytest.approx(expected, rel=1e-12)
    assert sol.normalized and sol.layer_loss == pytest.approx(sum(lv.loss for lv in sol.choice.values()))

    db = B.LevelDatabase.from_dict(small_db.to_dict())
    # model losses that reverse the preference: the DP must follow them
    db.set_model_losses({layer.name: [-lv.loss for lv in layer.levels] for layer in db})
    by_model = B.solve_budget(db, "params=1x", loss="model")
    for name, level in by_model.choice.items():
        assert level.loss == max(lv.loss for lv in db[name].levels)
    assert by_model.cost_slack_bound == 0.0  # "1x": every selection fits, nothing discretized


def test_import_budget_does_not_import_torch():
    import subprocess

    code = "import sys, obc_native.budget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_exported():
    for name in ("LevelDatabase", "LayerLevels", "build_layer_levels", "solve_budget",
                 "parse_budget", "solve_levels", "BudgetSolution", "InfeasibleBudgetError"):
        assert getattr(obc_native, name) is getattr(B, name)
        assert name in obc_native.__all__
