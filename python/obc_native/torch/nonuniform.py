"""Non-uniform compression of whole models: level databases of every layer, budgets, stitching.

A *level database* (:class:`obc_native.budget.LevelDatabase`) lists, for every layer to compress,
its compression levels (dense, sparsities, N:M, bit widths, ...) with their exact layer losses and
costs. :func:`build_database` computes it for a PyTorch model from one calibration pass;
``compress(model, calibration, budget="flops=2x")`` then picks one level per layer with the
dynamic-programming solver (:func:`obc_native.budget.solve_budget`) and applies it. A database is
saved as checksummed JSON (``db.save(path)``) and reloaded with :func:`load_database` to solve
many budgets without recomputing the levels.

This module gathers the names of the modules that hold the parts (importable from here as they
always were):

- ``database.py``: :class:`LevelSpec`, :func:`build_database`, :func:`load_database`,
  :func:`check_database` (layer geometry, channels-last columns, skipped levels);
- ``layer_selection.py``: :func:`select_layers`;
- ``level_calibration.py``: the dense calibration pass and :func:`flops_per_weight`;
- ``stitching.py``: stitched model losses (``stitch=True``);
- ``budgeting.py``: :data:`OBJECTIVES`, :func:`solve_database`, :func:`as_budget_spec`,
  :func:`measure_costs`, :func:`uniform_sparsity`;
- ``solve.py``: :func:`apply_unit_level` (a layer's unit to its level).
"""

from __future__ import annotations

# Re-exported, private names included: compress.py and the tests import them from here.
from ..levels import level_config  # noqa: F401
from .budgeting import (  # noqa: F401
    OBJECTIVES,
    _resolve_objective,
    as_budget_spec,
    measure_costs,
    solve_database,
    uniform_sparsity,
)
from .database import (  # noqa: F401
    LevelSpec,
    _as_level_spec,
    _build,
    _database_layers,
    _layer_levels,
    build_database,
    check_database,
    load_database,
)
from .layer_selection import select_layers  # noqa: F401
from .level_calibration import _Applications, _calibrate, flops_per_weight  # noqa: F401
from .solve import apply_unit_level  # noqa: F401
from .stitching import _output_tensor, _Stitcher  # noqa: F401

__all__ = [
    "LevelSpec",
    "OBJECTIVES",
    "as_budget_spec",
    "build_database",
    "check_database",
    "flops_per_weight",
    "load_database",
    "measure_costs",
    "select_layers",
    "solve_database",
    "uniform_sparsity",
]
