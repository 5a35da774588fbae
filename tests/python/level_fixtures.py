"""A small level database shared by the tests of obc_native.budget and obc_native.level_database."""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem

from obc_native.level_builder import build_layer_levels
from obc_native.level_database import LevelDatabase

LEVELS = dict(sparsities=(0.5,), nm=[(2, 4)], bits=[4], joint=[(2, 4, 3)])


@pytest.fixture(scope="module")
def small_db():
    """4 small layers x 5 levels (dense, 50%, 2:4, 4-bit, 2:4 + 3-bit)."""
    db = LevelDatabase(meta={"model": "test"})
    for i, (rows, cols) in enumerate([(4, 8), (6, 12), (3, 16), (5, 8)]):
        W, H, _ = make_problem(rows, cols, seed=100 + i)
        layer = build_layer_levels(W, H, name=f"layer{i}", flops_per_weight=1 + i, **LEVELS)
        assert len(layer.levels) == 5
        db.add(layer)
    rng = np.random.default_rng(5)
    db.add_cost("time", {layer.name: list(rng.random(5).round(3)) for layer in db})
    return db

