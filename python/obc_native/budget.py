"""Budgets over a level database: one level per layer, minimal loss within a total cost.

:func:`solve_budget` picks one level per layer of a :class:`~obc_native.level_database.LevelDatabase`
minimizing the summed loss subject to a total-cost budget, with the C++ dynamic-programming
solver (``obc/dp.hpp``, :func:`solve_levels`).

Typical use (numpy level; ``obc_native.torch`` builds databases for whole models)::

    db = LevelDatabase()
    for name, (W, H) in layers.items():
        db.add(build_layer_levels(W, H, name=name, sparsities=(0.5, 0.7), nm=[(2, 4)], bits=[4]))
    db.save("levels.json")
    solution = solve_budget(db, "flops=2x")        # 2x fewer FLOPs than the dense model
    for name, level in solution.choice.items():
        result = db[name].apply(W_of[name], H_of[name], level)

Budgets (:func:`parse_budget`): ``"COST=VALUE"`` where ``VALUE`` is ``"<f>x"`` (``f`` times less
than the dense model: budget = dense cost / f), for ``bits`` ``"<b>"`` or ``"<b>bpw"`` (``b`` bits
per weight on average: budget = b * total weights), and otherwise a plain number (an absolute
budget in the cost's units). Cost types: ``obc_native.costs``.

The rest of non-uniform compression lives in modules of its own, re-exported here (their names
have been importable from ``obc_native.budget`` since it held them all): ``levels`` (Level,
LayerLevels, apply_level), ``costs`` (level_costs), ``level_builder`` (build_layer_levels) and
``level_database`` (LevelDatabase and its files).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import _arrays, _core
from .costs import BUILTIN_COSTS, level_costs
from .level_builder import DEFAULT_SPARSITIES, build_layer_levels
from .level_database import (  # noqa: F401 - re-exported
    DATABASE_FORMAT,
    DATABASE_VERSION,
    LevelDatabase,
    LevelDatabaseError,
    _checksum,
)
from .levels import (  # noqa: F401 - re-exported
    LEGACY_QUANT_METHOD,
    LEVEL_KINDS,
    QUANT_LEVEL_METHODS,
    CompressionResult,
    LayerLevels,
    Level,
    _finite,
    apply_level,
    level_config,
    level_label,
    level_quantizer,
)

__all__ = [
    "BUILTIN_COSTS",
    "BudgetSolution",
    "BudgetSpec",
    "DEFAULT_SPARSITIES",
    "InfeasibleBudgetError",
    "LayerLevels",
    "Level",
    "LevelDatabase",
    "LevelDatabaseError",
    "LevelSelection",
    "apply_level",
    "build_layer_levels",
    "level_costs",
    "level_label",
    "parse_budget",
    "solve_budget",
    "solve_levels",
]

class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest achievable cost (every layer at its cheapest level).

    Attributes: cost_type, budget, min_cost.
    """

    def __init__(self, message: str, *, cost_type: str, budget: float, min_cost: float):
        super().__init__(message)
        self.cost_type = cost_type
        self.budget = budget
        self.min_cost = min_cost


@dataclass(frozen=True)
class LevelSelection:
    """Result of :func:`solve_levels` (see ``obc/dp.hpp``).

    Attributes:
        choice: (layers,) int64, the chosen level of each layer.
        cost: true total cost of the choice (<= budget); loss: its total loss.
        budget: the budget; min_cost: smallest achievable cost (all layers at their cheapest).
        bucket_width: (budget - min_cost) / buckets, in cost units.
        cost_slack_bound: every selection costing <= budget - cost_slack_bound was considered,
            so ``loss`` is at most the exact optimum for that slightly smaller budget.
        loss_lower_bound: a lower bound on the exact optimum at ``budget`` (NaN if not computed);
            the exact optimum lies in [loss_lower_bound, loss].
        buckets, units_used: the discretization and the units the choice occupies.
    """

    choice: np.ndarray
    cost: float
    loss: float
    budget: float
    min_cost: float
    bucket_width: float
    cost_slack_bound: float
    loss_lower_bound: float
    buckets: int
    units_used: int


def _as_level_vectors(values, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"{name}: expected a list of 1-D arrays (one per layer), got "
                        f"{type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        arr = np.asarray(v)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name}[{i}]: expected real numbers, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"{name}[{i}]: expected a 1-D array of levels, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name}[{i}]: expected at least one level, got none")
        arr = np.ascontiguousarray(arr, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}[{i}]: expected finite values, got NaN or Inf")
        out.append(arr)
    if not out:
        raise ValueError(f"{name}: expected at least one layer, got none")
    return out


def solve_levels(losses, costs, budget, *, buckets: int = 10000,
                 lower_bound: bool = True) -> LevelSelection:
    """Choose one level per layer: minimal summed loss with summed cost <= budget.

    Args:
        losses, costs: one 1-D array per layer, one entry per level; costs >= 0.
        budget: finite, >= 0 and >= the sum of each layer's smallest cost.
        buckets: units the free budget (budget - min_cost) is split into; each level's extra
            cost over its layer's cheapest is rounded UP to whole units, so the budget is never
            exceeded (see ``obc/dp.hpp``). Ties: lower loss, then lower cost, then lower level
            index at the first layer that differs.
        lower_bound: also compute LevelSelection.loss_lower_bound (round-down relaxation).
    Raises:
        InfeasibleBudgetError (a ValueError) when budget < min_cost; ValueError / TypeError for
        bad input.
    """
    losses = _as_level_vectors(losses, "losses")
    costs = _as_level_vectors(costs, "costs")
    if len(costs) != len(losses):
        raise ValueError(f"costs: expected {len(losses)} layers to match losses, got {len(costs)}")
    for i, (lo, co) in enumerate(zip(losses, costs)):
        if co.size != lo.size:
            raise ValueError(f"costs[{i}]: expected {lo.size} levels to match losses[{i}], got {co.size}")
        if (co < 0).any():
            raise ValueError(f"costs[{i}]: expected values >= 0, got {float(co.min())}")
    budget = _finite(budget, "budget", nonneg=True)
    buckets = _arrays.as_int(buckets, "buckets", low=1, high=_arrays.INDEX_MAX)
    min_cost = 0.0
    for co in costs:
        min_cost += float(co.min())
    if budget < min_cost:
        raise InfeasibleBudgetError(
            f"budget: {budget!r} is infeasible; the smallest achievable cost is {min_cost!r} "
            "(every layer at its cheapest level)", cost_type="", budget=budget, min_cost=min_cost)
    d = _core.solve_levels(losses, costs, budget, buckets, bool(lower_bound))
    return LevelSelection(choice=d["choice"], cost=d["cost"], loss=d["loss"], budget=d["budget"],
                          min_cost=d["min_cost"], bucket_width=d["bucket_width"],
                          cost_slack_bound=d["cost_slack_bound"],
                          loss_lower_bound=d["loss_lower_bound"], buckets=int(d["buckets"]),
                          units_used=int(d["units_used"]))


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: ``value`` in ``unit`` "absolute" (cost units), "factor" (times less
    than the dense model) or "per_weight" (bits per weight, cost "bits" only)."""

    cost: str
    value: float
    unit: str

    def resolve(self, db: LevelDatabase) -> float:
        """The absolute budget for ``db``."""
        if self.unit == "absolute":
            return self.value
        if self.unit == "factor":
            return db.dense_cost(self.cost) / self.value
        return self.value * db.total_weights()

    def __str__(self) -> str:
        value = repr(float(self.value))
        value = value[:-2] if value.endswith(".0") else value
        if self.unit == "absolute" and self.cost == "bits":
            return f"bits={value} (absolute)"  # "bits=<b>" alone means bits per weight
        suffix = {"absolute": "", "factor": "x", "per_weight": "bpw"}[self.unit]
        return f"{self.cost}={value}{suffix}"


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def _parse_value(cost: str, text: str, source: str) -> BudgetSpec:
    match = re.fullmatch(rf"\s*({_NUMBER})\s*(x|bpw)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"budget: expected a number, '<f>x' (f times less than dense) or, for "
                         f"bits, '<b>bpw', got {source!r}")
    value = float(match.group(1))
    if not math.isfinite(value):  # e.g. "1e999": an infinite budget or factor means nothing
        raise ValueError(f"budget: expected a finite number, got {source!r}")
    suffix = (match.group(2) or "").lower()
    if suffix == "x":
        if not value > 0:
            raise ValueError(f"budget: expected a reduction factor > 0, got {source!r}")
        return BudgetSpec(cost, value, "factor")
    if suffix == "bpw" or cost == "bits":
        if cost != "bits":
            raise ValueError(f"budget: 'bpw' (bits per weight) needs cost 'bits', got {source!r}")
        return BudgetSpec(cost, value, "per_weight")
    return BudgetSpec(cost, value, "absolute")


def parse_budget(spec: str) -> BudgetSpec:
    """Parse ``"COST=VALUE"``: e.g. ``"flops=2x"`` (half the dense FLOPs), ``"bits=4.5"`` or
    ``"bits=4.5bpw"`` (4.5 bits per weight on average), ``"params=2e6"`` (absolute),
    ``"time=1.5x"`` (a user cost). Raises ValueError for anything else."""
    if not isinstance(spec, str):
        raise TypeError(f"budget: expected a string such as 'flops=2x', got {type(spec).__name__}")
    match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)", spec)
    if not match:
        raise ValueError(f"budget: expected 'COST=VALUE' such as 'flops=2x' or 'bits=4.5', "
                         f"got {spec!r}")
    return _parse_value(match.group(1), match.group(2), spec)


@dataclass(frozen=True)
class BudgetSolution:
    """The level chosen for every layer by :func:`solve_budget`.

    Attributes:
        cost_type: the constrained cost; spec: the budget as given (e.g. "flops=2x").
        budget: the absolute budget; cost: achieved true cost (<= budget).
        choice: layer name -> chosen Level; indices: layer name -> its index in the layer.
        loss: the minimized objective (sum of the chosen levels' losses as used: layer losses,
            normalized or model losses, see loss_source / normalized).
        layer_loss: sum of the chosen levels' exact layer losses (unnormalized).
        dense_cost: cost with every layer dense (None without dense levels).
        min_cost: smallest achievable cost.
        bucket_width, cost_slack_bound, loss_lower_bound, buckets: the discretization's
            guarantees, as in LevelSelection.
    """

    cost_type: str
    spec: str
    budget: float
    cost: float
    choice: dict
    indices: dict
    loss: float
    layer_loss: float
    loss_source: str
    normalized: bool
    dense_cost: float | None
    min_cost: float
    bucket_width: float
    cost_slack_bound: float
    loss_lower_bound: float
    buckets: int

    @property
    def labels(self) -> dict:
        """Layer name -> label of the chosen level."""
        return {name: level.label for name, level in self.choice.items()}

    @property
    def reduction(self) -> float | None:
        """dense_cost / cost (e.g. 2.0 for 2x fewer FLOPs); None without a dense reference."""
        if self.dense_cost is None or self.cost == 0:
            return None
        return self.dense_cost / self.cost

    def table(self) -> str:
        """A plain-text table: one line per layer with its level, loss and cost."""
        width = max([5] + [len(n) for n in self.choice])
        lines = [f"{'layer':<{width}}  {'level':<16} {'loss':>12} {self.cost_type:>14}"]
        for name, level in self.choice.items():
            lines.append(f"{name:<{width}}  {level.label:<16} {level.loss:>12.6g} "
                         f"{level.costs[self.cost_type]:>14.6g}")
        lines.append(f"{'total':<{width}}  {'':<16} {self.layer_loss:>12.6g} {self.cost:>14.6g}"
                     f"  (budget {self.budget:.6g}, {self.spec})")
        return "\n".join(lines)


def solve_budget(db: LevelDatabase, spec=None, *, cost: str | None = None, budget=None,
                 target=None, loss: str = "layer", normalize: bool = False,
                 buckets: int = 10000) -> BudgetSolution:
    """Choose one level per layer of ``db``: minimal total loss within a cost budget.

    Give the budget either as ``spec`` (a string for :func:`parse_budget`, e.g. "flops=2x",
    "bits=4.5", or a BudgetSpec), or as ``cost`` plus exactly one of ``budget`` (absolute, in
    the cost's units) and ``target`` (a reduction factor vs the dense model: a number or "2x";
    for bits also "4.5bpw").

    Args:
        loss: "layer" (exact layer losses, the default) or "model" (model_loss of every level).
        normalize: divide each layer's losses by its reference_loss (the loss of zeroing it),
            making layers of different scale comparable; "layer" losses only.
        buckets: discretization of the DP (see :func:`solve_levels`).
    Raises:
        InfeasibleBudgetError when the budget is below the smallest achievable cost (the message
        states it); ValueError for an unknown cost type, a negative budget or bad arguments.
    """
    if not isinstance(db, LevelDatabase):
        raise TypeError(f"db: expected a LevelDatabase, got {type(db).__name__}")
    if spec is not None:
        if cost is not None or budget is not None or target is not None:
            raise ValueError("budget: give either spec or cost= with budget=/target=, not both")
        parsed = spec if isinstance(spec, BudgetSpec) else parse_budget(spec)
        source = spec if isinstance(spec, str) else str(spec)
    else:
        if cost is None:
            raise ValueError("cost: expected a cost type (e.g. 'flops') or a spec such as 'flops=2x'")
        if (budget is None) == (target is None):
            raise ValueError("budget: expected exactly one of budget= (absolute) and target= "
                             "(reduction factor)")
        if not isinstance(cost, str):
            raise TypeError(f"cost: expected a str, got {type(cost).__name__}")
        if budget is not None:
            parsed = BudgetSpec(cost, _finite(budget, "budget"), "absolute")
        elif isinstance(target, str):
            parsed = _parse_value(cost, target if re.search(r"(?i)(x|bpw)\s*$", target)
                                  else target + "x", target)
        else:
            factor = _finite(target, "target")
            if not factor > 0:
                raise ValueError(f"target: expected a reduction factor > 0, got {factor}")
            parsed = BudgetSpec(cost, factor, "factor")
        source = str(parsed)
    cost_type = db._check_cost(parsed.cost)
    if parsed.value < 0:
        raise ValueError(f"budget: expected a value >= 0, got {source!r}")
    absolute = parsed.resolve(db)
    loss = _arrays.as_choice(loss, "loss", ("layer", "model"))
    if normalize and loss == "model":
        raise ValueError("normalize: applies to layer losses only, got loss='model'")
    layers = list(db)
    losses = [layer.losses(loss, normalize) for layer in layers]
    costs = [layer.costs(cost_type) for layer in layers]
    min_cost = db.min_cost(cost_type)
    if not absolute >= min_cost:
        per_weight = (f" ({min_cost / db.total_weights():.6g} bits per weight)"
                      if cost_type == "bits" else "")
        raise InfeasibleBudgetError(
            f"budget: the {cost_type} budget {absolute!r} ({source}) is infeasible; the "
            f"smallest achievable {cost_type} is {min_cost!r}{per_weight} (every layer at its "
            "cheapest level)", cost_type=cost_type, budget=absolute, min_cost=min_cost)
    sel = solve_levels(losses, costs, absolute, buckets=buckets)
    choice = {layer.name: layer.levels[int(j)] for layer, j in zip(layers, sel.choice)}
    layer_loss = 0.0
    for level in choice.values():
        layer_loss += level.loss
    try:
        dense = db.dense_cost(cost_type)
    except ValueError:
        dense = None
    return BudgetSolution(
        cost_type=cost_type, spec=source, budget=absolute, cost=sel.cost, choice=choice,
        indices={layer.name: int(j) for layer, j in zip(layers, sel.choice)}, loss=sel.loss,
        layer_loss=layer_loss, loss_source=loss, normalized=bool(normalize), dense_cost=dense,
        min_cost=sel.min_cost, bucket_width=sel.bucket_width,
        cost_slack_bound=sel.cost_slack_bound, loss_lower_bound=sel.loss_lower_bound,
        buckets=sel.buckets)

