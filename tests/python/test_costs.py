"""Tests for obc_native.costs: the cost of every level follows the storage model."""

from __future__ import annotations

import math

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

