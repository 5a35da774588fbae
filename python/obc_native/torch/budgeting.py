"""Budgets for whole models: solving a level database, measuring a model's costs, and the
uniform sparsity that a non-uniform allocation is compared against."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _arrays
from ..budget import BudgetSolution, BudgetSpec, InfeasibleBudgetError, parse_budget, solve_budget
from ..costs import BUILTIN_COSTS, level_costs
from ..level_database import LevelDatabase
from ..levels import LayerLevels
from .layers import LayerInfo, find_layers, weight_matrix

__all__ = [
    "OBJECTIVES",
    "as_budget_spec",
    "check_budget_reachable",
    "measure_costs",
    "solve_database",
    "uniform_sparsity",
]

#: What the budget solver minimizes, summed over layers: "layer" (exact layer losses
#: ``||(W - W_hat) X||^2 / n``), "normalized" (each layer's losses divided by its loss of zeroing
#: the layer, which makes layers whose outputs differ in scale comparable), "model" (stitched model
#: losses) or "auto": "model" when every level has a model loss, else "normalized".
OBJECTIVES = ("auto", "layer", "normalized", "model")


def as_budget_spec(budget: Any) -> BudgetSpec:
    """A budget as a :class:`BudgetSpec`: a string such as "flops=2x", "bits=4.5" (bits per
    weight) or "params=2e6" (absolute), or a BudgetSpec. ValueError for a malformed or negative
    budget; TypeError for anything else."""
    if isinstance(budget, BudgetSpec):
        spec = budget
    elif isinstance(budget, str):
        cost, sep, value = budget.partition("=")
        if sep and value.strip().startswith("-"):
            raise ValueError(f"budget: expected a value >= 0, got {budget!r}")
        spec = parse_budget(budget)
    else:
        raise TypeError(f"budget: expected a string such as 'flops=2x' or a BudgetSpec, got {type(budget).__name__}")
    if not (isinstance(spec.value, (int, float)) and math.isfinite(spec.value) and spec.value >= 0):
        raise ValueError(f"budget: expected a finite value >= 0, got {spec}")
    return spec


def _resolve_objective(db: LevelDatabase, objective: str) -> str:
    objective = _arrays.as_choice(objective, "objective", OBJECTIVES)
    if objective == "auto":
        stitched = all(level.model_loss is not None for layer in db for level in layer.levels)
        return "model" if stitched else "normalized"
    return objective


def solve_database(db: LevelDatabase, budget: Any, *, objective: str = "auto") -> BudgetSolution:
    """One level per layer of ``db`` within ``budget`` (see :func:`as_budget_spec`).

    ``objective``: one of :data:`OBJECTIVES`. Raises InfeasibleBudgetError (stating the smallest
    achievable cost) or ValueError (unknown cost type, negative budget, missing model losses).
    """
    spec = as_budget_spec(budget)
    objective = _resolve_objective(db, objective)
    if objective == "model":
        return solve_budget(db, spec, loss="model")
    return solve_budget(db, spec, loss="layer", normalize=objective == "normalized")


def _cheapest_cost_floor(
    info: LayerInfo, hessians: list, levels: Any, cost: str, flops_per_weight: float
) -> tuple[float, float]:
    """The dense cost of one layer and a lower bound of its cheapest level's cost among the
    ``levels`` (a LevelSpec) a database would build for it, before any solve.

    Costs are nondecreasing in the number of non-zeros, so each level's cost is bounded below by
    its cost at a floor of its non-zeros: the dense weights' own count (exact); for a pruning
    level the weights its pattern keeps (``s * total`` pruned, plus one block per row for the
    per-row rounding of a uniform spread) less every weight of a dead input (the solvers zero
    them); for a quantized level 0 (any weight may round to zero)."""
    rows, cols = info.out_features, info.cols
    total = rows * cols
    dense_nnz = int(torch.count_nonzero(weight_matrix(info)))
    dead = sum(int(np.count_nonzero(np.diagonal(h) == 0)) for h in hessians) * info.rows
    span = info.in_per_group if info.is_conv else cols
    costs_at = {"flops_per_weight": flops_per_weight, "act_bits": levels.act_bits}
    candidates = [level_costs((rows, cols), dense_nnz, **costs_at)[cost]]
    block = levels.block or 1
    if levels.block is None or span % levels.block == 0:
        for s in levels.sparsities:
            pruned = math.ceil(s * total) + rows * block
            candidates.append(level_costs((rows, cols), max(0, total - pruned - dead), **costs_at)[cost])
    for n, m in levels.nm:
        if span % m == 0:
            candidates.append(level_costs((rows, cols), max(0, total // m * n - dead), **costs_at)[cost])
    if levels.group_size is None or cols % levels.group_size == 0:
        for b in [*levels.bits, *(b for n, m, b in levels.joint if span % m == 0)]:
            candidates.append(level_costs((rows, cols), 0, bits=b, group_size=levels.group_size, **costs_at)[cost])
    return candidates[0], min(candidates)


def check_budget_reachable(
    spec: BudgetSpec,
    infos: Mapping[str, LayerInfo],
    hessians: Mapping[str, Any],
    flops_per_weight: Mapping[str, float],
    levels: Any,
) -> None:
    """Raise InfeasibleBudgetError when ``spec`` is below what any database of ``levels`` (a
    LevelSpec) for these layers could reach, before the database is built (minutes to hours).

    ``infos`` in the database's layer order, ``hessians``: name -> LayerHessian (for the dead
    inputs), ``flops_per_weight``: name -> applications per sample. The bound (see
    ``_cheapest_cost_floor``) never exceeds the built database's ``min_cost`` (same per-layer
    formulas, summed in the same order), so a budget passing here may still prove infeasible
    once the levels are known (``solve_database`` then says so), never the other way round."""
    cost = spec.cost
    dense_total = floor_total = 0.0
    for name, info in infos.items():
        dense, floor = _cheapest_cost_floor(info, hessians[name].hessians(), levels, cost, flops_per_weight[name])
        dense_total += dense
        floor_total += floor
    if spec.unit == "absolute":
        budget = spec.value
    elif spec.unit == "factor":
        budget = dense_total / spec.value
    else:
        budget = spec.value * sum(info.out_features * info.cols for info in infos.values())
    if not budget >= floor_total:
        raise InfeasibleBudgetError(
            f"budget: the {cost} budget {budget!r} ({spec}) is infeasible: no choice of the requested levels "
            f"can reach it (their smallest {cost} is at least {floor_total!r}, from the layers' shapes; "
            "checked before building the level database)", cost_type=cost, budget=budget, min_cost=floor_total,
        )


def measure_costs(
    model: nn.Module,
    database: LevelDatabase | Mapping[str, float],
    *,
    quantized: Mapping[str, tuple[int, int | None]] | None = None,
) -> dict[str, float]:
    """The built-in costs (params, bits, flops, bops) of the model's current weights, summed over
    the database's layers (or the layers of a ``{name: flops_per_weight}`` mapping).

    Non-zeros are counted in the weights themselves; ``quantized``: ``{name: (bits, group_size)}``
    of layers whose weights are on a quantization grid (for "bits" and "bops"; others count as
    float32). The costs are those of ``obc_native.budget.level_costs``.
    """
    if isinstance(database, LevelDatabase):
        settings = {layer.name: layer.settings for layer in database}
    elif isinstance(database, Mapping):
        settings = {name: {"flops_per_weight": float(value)} for name, value in database.items()}
    else:
        raise TypeError(f"database: expected a LevelDatabase or a mapping name -> flops_per_weight, "
                        f"got {type(database).__name__}")
    quantized = dict(quantized or {})
    found = find_layers(model)
    missing = [name for name in settings if name not in found]
    if missing:
        raise ValueError(f"database: layers {missing} are not supported layers of the model")
    totals = dict.fromkeys(BUILTIN_COSTS, 0.0)
    for name, setting in settings.items():
        info = found[name]
        matrix = weight_matrix(info)
        bits, group_size = quantized.get(name, (None, None))
        costs = level_costs(
            (info.out_features, info.cols), int(torch.count_nonzero(matrix)), bits=bits, group_size=group_size,
            flops_per_weight=setting.get("flops_per_weight", 1.0), act_bits=setting.get("act_bits"),
            dense_bits=setting.get("dense_bits", 32),
        )
        for cost in totals:
            totals[cost] += costs[cost]
    return totals


def uniform_sparsity(
    database: LevelDatabase,
    budget: Any,
    *,
    layers: Iterable[str] | None = None,
    spread: str = "global",
) -> float:
    """The smallest sparsity ``s`` such that unstructured pruning of ``layers`` (default every
    layer of the database) to ``s``, the other layers dense, meets ``budget`` by the database's
    costs: the uniform allocation to compare a non-uniform one against. ``s`` is a round fraction
    ``k / size`` of one selected layer (size: its weights, or its columns for "uniform"), the
    smallest such fraction that meets the budget.

    ``spread`` as in :class:`LayerConfig`: "global" prunes ``ceil(s * rows * cols)`` weights per
    layer, "uniform" ``ceil(s * cols)`` per row (counted by the solvers' rule,
    :func:`obc_native._arrays.count_for_sparsity`). Budgets on "params", "flops", "bops" or "bits".
    Raises InfeasibleBudgetError when even ``s = 1`` does not meet the budget.
    """
    spec = as_budget_spec(budget)
    cost = spec.cost
    if cost not in BUILTIN_COSTS:
        raise ValueError(f"cost: uniform_sparsity supports {BUILTIN_COSTS}, got {cost!r}")
    absolute = spec.resolve(database)
    _arrays.as_choice(spread, "spread", ("global", "uniform"))
    names = database.names if layers is None else list(layers)
    unknown = [n for n in names if n not in database]
    if unknown:
        raise ValueError(f"layers: not in the database: {unknown}")

    def zeros(layer: LayerLevels, s: float) -> int:
        rows, cols = layer.shape
        if spread == "uniform":
            return rows * _arrays.count_for_sparsity(cols, s)
        return _arrays.count_for_sparsity(rows * cols, s)

    def total(s: float) -> float:
        value = 0.0
        for layer in database:
            settings = layer.settings
            nnz = layer.num_weights - (zeros(layer, s) if layer.name in names else 0)
            value += level_costs(
                layer.shape, nnz, flops_per_weight=settings.get("flops_per_weight", 1.0),
                act_bits=settings.get("act_bits"), dense_bits=settings.get("dense_bits", 32),
            )[cost]
        return value

    if total(1.0) > absolute:
        raise InfeasibleBudgetError(
            f"budget: the {cost} budget {absolute!r} ({spec}) cannot be met by uniform sparsity; the "
            f"smallest achievable {cost} is {total(1.0)!r} (every selected layer fully pruned)",
            cost_type=cost, budget=absolute, min_cost=total(1.0))
    if total(0.0) <= absolute:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        if total(mid) <= absolute:
            high = mid
        else:
            low = mid
    # Return a round sparsity: the smallest k / size (size: a selected layer's weights, or columns
    # for "uniform") that meets the budget; the float k / size counts exactly k. `high` meets it,
    # so that is one of each layer's two fractions next to `high` (the counts are monotone).
    candidates = set()
    for layer in database:
        if layer.name in names:
            rows, cols = layer.shape
            size = cols if spread == "uniform" else rows * cols
            k = _arrays.count_for_sparsity(size, high)
            candidates.update(c / size for c in (k, k + 1) if c <= size)
    for candidate in sorted(candidates):
        if total(candidate) <= absolute:
            return min(1.0, candidate)
    return high

