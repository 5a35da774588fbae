"""Tests for obc_native.costs: the cost of every level follows the storage model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from problems import make_problem

from obc_native.costs import level_costs
from obc_native.level_builder import build_layer_levels


def test_costs_follow_the_storage_model():
    rows, cols = 6, 16
    W, H, _ = make_problem(rows, cols, seed=10)
    layer = build_layer_levels(W, H, sparsities=(0.75,), nm=[(2, 4)], bits=[4], joint=[(2, 4, 2)],
                                 group_size=8, flops_per_weight=10, act_bits=8)
    total = rows * cols
    dense = layer.level("dense").costs
    assert dense == {"params": total, "bits": 32 * total, "flops": 2 * 10 * total,
                     "bops": 10 * total * 32 * 8}
    sparse = layer.level("sparse:0.75").costs
    nnz = total // 4
    assert sparse["params"] == nnz
    assert sparse["bits"] == 8 * math.ceil(total / 8) + 32 * nnz
    grid = rows * (cols // 8) * 40
    q4 = layer.level("q4:g8").costs
    assert q4["bits"] == 8 * math.ceil(total * 4 / 8) + grid
    assert q4["bops"] == q4["params"] * 10 * 4 * 8
    joint = layer.level("nm2:4+q2:g8").costs
    assert joint["bits"] == min(8 * math.ceil(total * 2 / 8) + grid,
                                8 * math.ceil(total / 8) + 8 * math.ceil(joint["params"] * 2 / 8) + grid)
    assert level_costs((2, 4), 8, bits=4, act_bits="same")["bops"] == 8 * 4 * 4



@pytest.mark.parametrize("args, kwargs, error, message", [
    (((4, 8), 40), {}, ValueError, r"nnz: expected an integer in \[0, 32\], got 40"),
    (((4, 8), -1), {}, ValueError, "nnz: expected an integer in"),
    (((4, 8), 10.5), {}, TypeError, "nnz: expected an integer"),
    (((4, 8), 10), {"bits": 0}, ValueError, "bits: expected an integer in"),
    (((4, 8), 10), {"bits": 4.5}, TypeError, "bits: expected an integer"),
    # a group wider than the row used to count no grid at all (cols // 16 == 0 groups)
    (((4, 8), 10), {"bits": 4, "group_size": 16}, ValueError, "group_size: expected a divisor of the 8 columns"),
    (((4, 8), 10), {"bits": 4, "group_size": 3}, ValueError, "group_size: expected a divisor"),
    (((4, 8), 10), {"bits": 4, "group_size": 0}, ValueError, "group_size: expected an integer in"),
    (((-4, 8), 1), {}, ValueError, "shape: expected an integer in"),
    (((4, 8, 3), 10), {}, TypeError, r"shape: expected \(rows, cols\)"),
    (((4, 8), 10), {"flops_per_weight": float("nan")}, ValueError, "flops_per_weight: expected a finite number"),
    (((4, 8), 10), {"act_bits": "x"}, TypeError, "act_bits: expected an integer"),
    (((4, 8), 10), {"dense_bits": 0}, ValueError, "dense_bits: expected an integer in"),
])
def test_bad_arguments_name_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        level_costs(*args, **kwargs)


def test_edge_arguments_still_cost():
    assert level_costs((4, 8), 0)["params"] == 0
    assert level_costs((4, 8), 32, bits=4, group_size=8)["bits"] == 8 * math.ceil(32 * 4 / 8) + 4 * 1 * 40
    assert level_costs((np.int64(4), np.int64(8)), np.int64(3), flops_per_weight=np.float64(2.0))["flops"] == 12
