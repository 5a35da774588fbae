"""Non-uniform compression: per-layer level databases and a budgeted level solver.

A *level database* holds, for every layer of a model, a list of compression levels (dense,
unstructured or blocked sparsities, N:M patterns, quantization bit widths, joint N:M +
quantization), each with its exact layer loss ``||(W - W_hat) X||_F^2 / n`` (see
``obc_native.layer_loss``), optionally a model-level loss attached later by a model layer, and
its costs. :func:`solve_budget` then picks one level per layer minimizing the summed loss
subject to a total-cost budget, with the C++ dynamic-programming solver (``obc/dp.hpp``).

Typical use (numpy level; ``obc_native.torch`` builds databases for whole models)::

    db = LevelDatabase()
    for name, (W, H) in layers.items():
        db.add(build_layer_levels(W, H, name=name, sparsities=(0.5, 0.7), nm=[(2, 4)], bits=[4]))
    db.save("levels.json")
    solution = solve_budget(db, "flops=2x")        # 2x fewer FLOPs than the dense model
    for name, level in solution.choice.items():
        result = db[name].apply(W_of[name], H_of[name], level)

Cost types (all per layer weight matrix, ``rows x cols``; ``nnz`` = non-zero weights after
compression, ``total = rows * cols``; ``b`` = the level's weight bits):

- ``"params"``: ``nnz``.
- ``"flops"``: ``2 * nnz * flops_per_weight`` (a multiply and an add per non-zero weight
  application; ``flops_per_weight`` is how often each weight is applied per sample: 1 for a
  linear layer per token, ``H_out * W_out`` for a convolution per image).
- ``"bops"``: ``nnz * flops_per_weight * b_w * b_a`` (bit operations of the multiply-accumulates):
  ``b_w = b`` for quantized levels and ``dense_bits`` otherwise; ``b_a = act_bits`` (``None``:
  32-bit float activations; ``"same"``: equal to ``b_w``).
- ``"bits"``: storage bits of the weight matrix in the ``obc_native.compressed`` format (version
  1, ``obc_native.torch.serialize``), which stores each layer in the smallest of::

      dense             total * dense_bits
      sparse            8 * ceil(total / 8) + nnz * dense_bits        (bitmask + values)
      quantized         8 * ceil(total * b / 8) + grid
      sparse quantized  8 * ceil(total / 8) + 8 * ceil(nnz * b / 8) + grid

  where ``grid = rows * groups * 40`` (a float32 scale and a uint8 zero point per row and
  group, stored for symmetric grids too) and ``groups = cols / group_size`` (1 per row when
  ``group_size`` is None). N:M masks are stored as the same 1 bit per weight bitmask (not as
  ``log2 C(m, n)`` bits per group). ``dense_bits = 32`` is float32 storage.
- any user-supplied table, e.g. measured ``"time"``: :meth:`LayerLevels.add_cost`.

Budgets (:func:`parse_budget`): ``"COST=VALUE"`` where ``VALUE`` is ``"<f>x"`` (``f`` times less
than the dense model: budget = dense cost / f), for ``bits`` ``"<b>"`` or ``"<b>bpw"`` (``b`` bits
per weight on average: budget = b * total weights), and otherwise a plain number (an absolute
budget in the cost's units).

Database files are JSON (no pickle): ``{"format": "obc_native.level_database", "version": 1,
"checksum": "sha256:...", "meta": {...}, "layers": [...]}``; the checksum is the SHA-256 of the
canonical JSON (sorted keys, no spaces) of everything but the checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from . import _api, _arrays, _core
from ._files import read_regular_file
from ._results import QUANT_METHODS, PruneResult, QuantResult

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

LEVEL_KINDS = ("dense", "unstructured", "blocked", "nm", "quant", "joint")
BUILTIN_COSTS = ("params", "bits", "flops", "bops")
# quantize(method=) choices of quant and joint levels, and what a level saved without one means
QUANT_LEVEL_METHODS = ("auto", *QUANT_METHODS)
LEGACY_QUANT_METHOD = "obq"
#: Sparsity levels of :func:`build_layer_levels` when none are given.
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DATABASE_FORMAT = "obc_native.level_database"
DATABASE_VERSION = 1
_GRID_BITS = 40  # float32 scale + uint8 zero point per row and group (serialize format v1)
_RECORD_BYTES = 256 << 20  # most memory a trace may spend recording levels' weights at once

CompressionResult = Union[PruneResult, QuantResult]


class LevelDatabaseError(ValueError):
    """A level database file that is corrupted, malformed, or does not match a model."""


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest achievable cost (every layer at its cheapest level).

    Attributes: cost_type, budget, min_cost.
    """

    def __init__(self, message: str, *, cost_type: str, budget: float, min_cost: float):
        super().__init__(message)
        self.cost_type = cost_type
        self.budget = budget
        self.min_cost = min_cost


# --------------------------------------------------------------------------------------------
# levels


def level_label(kind: str, params: Mapping[str, Any]) -> str:
    """Short unique name of a level within a layer, e.g. ``"sparse:0.5"``, ``"block4:0.5"``,
    ``"nm2:4"``, ``"q4"``, ``"q4a:g128"`` (asymmetric, groups of 128), ``"nm2:4+q4"``, ``"dense"``."""
    def quant(p):
        text = f"q{p['bits']}" + ("" if p.get("sym", True) else "a")
        return text + (f":g{p['group_size']}" if p.get("group_size") else "")

    if kind == "dense":
        return "dense"
    if kind == "unstructured":
        return f"sparse:{float(params['sparsity'])!r}"
    if kind == "blocked":
        return f"block{params['block']}:{float(params['sparsity'])!r}"
    if kind == "nm":
        return f"nm{params['n']}:{params['m']}"
    if kind == "quant":
        return quant(params)
    if kind == "joint":
        return f"nm{params['n']}:{params['m']}+{quant(params)}"
    raise ValueError(f"kind: expected one of {LEVEL_KINDS}, got {kind!r}")


@dataclass(eq=False)
class Level:
    """One compression level of one layer.

    Attributes:
        kind: "dense", "unstructured", "blocked", "nm", "quant" or "joint" (N:M, then OBQ of the
            pruned weights).
        params: what reproduces the level with :func:`apply_level`: ``sparsity`` and ``spread``
            (unstructured, blocked), ``block`` (blocked), ``n`` and ``m`` (nm, joint), ``bits``,
            ``sym``, ``group_size`` (None = per row), ``grid``, ``method`` (the quantizer, as
            ``quantize(method=)``) and ``refine`` (quant, joint). A quant or joint level without
            ``method`` (a database saved before quantize() had methods) was computed by OBQ
            without refinement, so it means ``method="obq"``, ``refine=False``: applying it
            reproduces its recorded loss.
        loss: exact layer loss ``||(W - W_hat) X||_F^2 / n`` against the original W (undamped H).
        costs: cost type -> value (see the module docstring).
        model_loss: optional model-level loss of this level, attached by a model layer.
        weight: the compressed weights, only with ``build_layer_levels(keep_weights=True)``;
            never saved.
    """

    kind: str
    params: dict
    loss: float
    costs: dict
    model_loss: float | None = None
    weight: np.ndarray | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return level_label(self.kind, self.params)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params), "loss": float(self.loss),
                "model_loss": None if self.model_loss is None else float(self.model_loss),
                "costs": {k: float(v) for k, v in self.costs.items()}}


def _finite(value, name: str, *, nonneg: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (nonneg and value < 0):
        raise ValueError(f"{name}: expected a finite value{' >= 0' if nonneg else ''}, got {value}")
    return value


@dataclass(eq=False)
class LayerLevels:
    """The levels of one layer.

    Attributes:
        name: layer name (e.g. the module path).
        shape: ``(rows, cols)`` of the weight matrix the levels were computed for (outputs x
            inputs; for a convolution ``out x in*kh*kw``).
        levels: the levels, with unique labels.
        reference_loss: ``1/2 sum_rows w H w^T`` = the loss of zeroing the layer; the scale that
            ``solve_budget(normalize=True)`` divides this layer's losses by.
        settings: how the levels were computed (damp, spread, grid, flops_per_weight,
            act_bits, dense_bits).
        skipped: ``(label, reason)`` of requested levels impossible for this shape (e.g. N:M with
            ``cols % m != 0``).
    """

    name: str
    shape: tuple
    levels: list
    reference_loss: float = 0.0
    settings: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape: expected (rows, cols) >= 1, got {self.shape}")
        self.shape = shape
        self.levels = list(self.levels)
        if not self.levels:
            raise ValueError(f"levels: layer {self.name!r} has no levels")
        seen: set = set()
        dup_set: set = set()
        for lv in self.levels:  # one pass with a set: linear in the number of levels
            label = lv.label
            (dup_set if label in seen else seen).add(label)
        dup = sorted(dup_set)
        if dup:
            raise ValueError(f"levels: layer {self.name!r} has duplicate levels {dup}")

    @property
    def labels(self) -> list:
        return [lv.label for lv in self.levels]

    @property
    def num_weights(self) -> int:
        return self.shape[0] * self.shape[1]

    def index(self, level) -> int:
        """Index of a level given as a label, an index or a Level of this layer."""
        if isinstance(level, Level):
            level = level.label
        if isinstance(level, numbers.Integral) and not isinstance(level, bool):
            if not 0 <= int(level) < len(self.levels):
                raise IndexError(f"level: layer {self.name!r} has {len(self.levels)} levels, got {level}")
            return int(level)
        labels = self.labels
        if level not in labels:
            raise KeyError(f"level: layer {self.name!r} has no level {level!r}; it has {labels}")
        return labels.index(level)

    def level(self, level) -> Level:
        return self.levels[self.index(level)]

    def cost_types(self) -> tuple:
        """Cost types every level of this layer has."""
        common = set(self.levels[0].costs)
        for lv in self.levels[1:]:
            common &= set(lv.costs)
        return _ordered_costs(common)

    def costs(self, cost: str) -> np.ndarray:
        """(levels,) float64 cost of every level."""
        if cost not in self.cost_types():
            raise ValueError(f"cost: unknown cost type {cost!r} for layer {self.name!r}; "
                             f"available: {list(self.cost_types())}")
        return np.array([lv.costs[cost] for lv in self.levels], dtype=np.float64)

    def losses(self, source: str = "layer", normalize: bool = False) -> np.ndarray:
        """(levels,) float64 losses: "layer" (exact layer loss, divided by reference_loss when
        normalize and it is > 0) or "model" (model_loss, which every level must have)."""
        source = _arrays.as_choice(source, "loss", ("layer", "model"))
        if source == "model":
            missing = [lv.label for lv in self.levels if lv.model_loss is None]
            if missing:
                raise ValueError(f"loss: layer {self.name!r} has no model_loss for levels {missing}")
            return np.array([lv.model_loss for lv in self.levels], dtype=np.float64)
        values = np.array([lv.loss for lv in self.levels], dtype=np.float64)
        if normalize and self.reference_loss > 0:
            values = values / self.reference_loss
        return values

    def _per_level(self, values, what: str) -> list:
        """Values aligned with the levels, from a sequence or a mapping label -> value."""
        if isinstance(values, Mapping):
            missing = [x for x in self.labels if x not in values]
            extra = [x for x in values if x not in self.labels]
            if missing or extra:
                raise ValueError(f"{what}: layer {self.name!r}: expected a value for every level "
                                 f"label; missing {missing}, unknown {extra}")
            return [values[x] for x in self.labels]
        values = list(values)
        if len(values) != len(self.levels):
            raise ValueError(f"{what}: layer {self.name!r} has {len(self.levels)} levels, "
                             f"got {len(values)} values")
        return values

    def add_cost(self, cost: str, values) -> None:
        """Attach a cost type (e.g. measured "time"): a sequence aligned with the levels or a
        mapping label -> value; finite values >= 0. Replaces an existing cost of that name."""
        if not isinstance(cost, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cost):
            raise ValueError(f"cost: expected an identifier such as 'time', got {cost!r}")
        values = self._per_level(values, cost)
        checked = [_finite(v, f"{cost}[{self.name!r}][{i}]", nonneg=True) for i, v in enumerate(values)]
        for lv, v in zip(self.levels, checked):
            lv.costs[cost] = v

    def set_model_losses(self, values) -> None:
        """Attach model-level losses: a sequence aligned with the levels or a mapping
        label -> value (finite)."""
        values = self._per_level(values, "model_loss")
        checked = [_finite(v, f"model_loss[{self.name!r}][{i}]") for i, v in enumerate(values)]
        for lv, v in zip(self.levels, checked):
            lv.model_loss = v

    def apply(self, W, H, level, *, num_threads=None) -> CompressionResult:
        """Compress W to one of this layer's levels with the database's settings (damp)."""
        if tuple(np.shape(W)) != self.shape:
            raise ValueError(f"W: expected shape {self.shape} for layer {self.name!r}, "
                             f"got {tuple(np.shape(W))}")
        return apply_level(W, H, self.level(level), damp=self.settings.get("damp", 0.01),
                           num_threads=num_threads)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape),
                "reference_loss": float(self.reference_loss), "settings": dict(self.settings),
                "skipped": [list(s) for s in self.skipped],
                "levels": [lv.to_dict() for lv in self.levels]}


def _ordered_costs(names) -> tuple:
    return tuple([c for c in BUILTIN_COSTS if c in names] + sorted(set(names) - set(BUILTIN_COSTS)))


# --------------------------------------------------------------------------------------------
# costs


def level_costs(shape, nnz: int, *, bits: int | None = None, group_size: int | None = None,
                flops_per_weight: float = 1.0, act_bits=None, dense_bits: int = 32) -> dict:
    """The built-in costs of a ``shape = (rows, cols)`` weight matrix with ``nnz`` non-zeros,
    quantized to ``bits`` (None: not quantized) with ``group_size`` inputs per grid (None: one
    grid per row). See the module docstring for the definitions."""
    rows, cols = (int(s) for s in shape)
    total = rows * cols
    nnz = int(nnz)
    mask_bits = 8 * math.ceil(total / 8)
    storage = [total * dense_bits, mask_bits + nnz * dense_bits]
    if bits is not None:
        groups = 1 if not group_size else cols // int(group_size)
        grid = rows * groups * _GRID_BITS
        storage.append(8 * math.ceil(total * bits / 8) + grid)
        storage.append(mask_bits + 8 * math.ceil(nnz * bits / 8) + grid)
    weight_bits = dense_bits if bits is None else int(bits)
    if act_bits is None:
        act = 32
    elif act_bits == "same":
        act = weight_bits
    else:
        act = int(act_bits)
    macs = nnz * float(flops_per_weight)
    return {"params": float(nnz), "bits": float(min(storage)), "flops": 2.0 * macs,
            "bops": macs * weight_bits * act}


# --------------------------------------------------------------------------------------------
# building a layer's levels


def _pairs(values, name: str, size: int) -> list:
    out = []
    for item in values:
        item = tuple(item)
        if len(item) != size:
            raise ValueError(f"{name}: expected tuples of {size} integers, got {item!r}")
        out.append(tuple(_arrays.as_int(v, name, low=1) for v in item))
    return out


def _check_quantizer(params: Mapping, j: int) -> None:
    """ValueError unless a quant / joint level's optional ``method`` and ``refine`` are valid."""
    method = params.get("method", LEGACY_QUANT_METHOD)
    if not isinstance(method, str) or method not in QUANT_LEVEL_METHODS:
        raise ValueError(f"level {j}: params 'method' must be one of {QUANT_LEVEL_METHODS}, "
                         f"got {method!r}")
    if not isinstance(params.get("refine", False), bool):
        raise ValueError(f"level {j}: params 'refine' must be true or false, got "
                         f"{params['refine']!r}")


def _check_quant_level(cols: int, group_size) -> str | None:
    if group_size is not None and cols % group_size:
        return f"group_size {group_size} does not divide cols {cols}"
    return None


def build_layer_levels(W, H, *, name: str = "layer", sparsities=DEFAULT_SPARSITIES, block=None,
                       nm=((2, 4),), bits=(), joint=(), sym: bool = True, group_size=None,
                       grid: str = "mse", damp: float = 0.01, spread: str = "uniform",
                       flops_per_weight: float = 1.0, act_bits=None, dense_bits: int = 32,
                       keep_weights: bool = False, num_threads=None, quant_method: str = "auto",
                       refine: bool = True) -> LayerLevels:
    """Compute the levels of one layer: exact losses and costs.

    Levels, in this order: "dense" (always, loss 0); one per sparsity, unstructured
    (``block=None``) or blocks of ``block`` consecutive weights, all from ONE ExactOBS trace
    (``trace_unstructured`` / ``trace_blocked``): with the uniform spread its greedy's own
    weights recorded at each sparsity (``record=``; re-solved instead when holding all levels
    would take over 256 MiB and they are not kept), with the global spread re-solved in closed
    form (``Trace.weights``), which gives the weights and losses of separate
    ``prune_unstructured`` / ``prune_blocked`` solves with the same ``spread``; one per
    ``(n, m)`` in ``nm`` (``prune_nm``); one per bit width in ``bits`` (``quantize``); one per
    ``(n, m, bits)`` in ``joint`` (``prune_nm`` then ``quantize`` of the pruned weights, loss
    measured against the original W).

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian, as for the solvers.
        name: the layer's name in the database.
        sparsities: fractions in [0, 1] (of weights, or of blocks when ``block`` is set).
        block: None for unstructured levels, else the block length (a divisor of cols).
        nm: ``(n, m)`` pairs; bits: bit widths 2..8; joint: ``(n, m, bits)`` triples.
        sym, group_size, grid: the quantization grid of quant and joint levels.
        quant_method, refine: the quantizer of quant and joint levels, as ``quantize(method=,
            refine=)`` ("auto", "obq", "gptq", "gptq-natural" or "rtn"); recorded in each
            level's params as ``method`` and ``refine``.
        damp: relative damping of every solve.
        spread: how a sparsity is spread over rows: "uniform" (default for databases: every row
            gets ceil(s * cols), so each level's cost is independent of the data) or "global"
            (the paper's). The final compression must use the same spread; it is recorded in
            each level's params and honoured by :func:`apply_level`.
        flops_per_weight: applications of each weight per sample (conv: output positions).
        act_bits: activation bits for "bops": None (32-bit floats), an int, or "same" (the
            level's weight bits).
        dense_bits: bits of an unquantized stored weight (32 = float32).
        keep_weights: keep each level's compressed weights in ``Level.weight`` (memory!).
        num_threads: threads of the solvers.
    Levels that do not fit the shape (N:M with ``cols % m``, a block or group size that does not
    divide cols) are left out and listed in ``LayerLevels.skipped``.
    Returns:
        LayerLevels.
    """
    W = _arrays.as_weight(W, "W")
    H = _arrays.as_hessian(H, W.shape[1], "H")
    rows, cols = W.shape
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    spread = _arrays.as_choice(spread, "spread", ("global", "uniform"))
    grid = _arrays.as_choice(grid, "grid", ("mse", "minmax"))
    quant_method = _arrays.as_choice(quant_method, "quant_method", QUANT_LEVEL_METHODS)
    if not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"refine: expected a bool, got {type(refine).__name__}")
    refine = bool(refine)
    damp = _arrays.as_damp(damp)
    if not isinstance(sym, (bool, np.bool_)):
        raise TypeError(f"sym: expected a bool, got {type(sym).__name__}")
    sym = bool(sym)
    group_size = None if group_size is None else _arrays.as_int(group_size, "group_size", low=1)
    flops_per_weight = _finite(flops_per_weight, "flops_per_weight", nonneg=True)
    if act_bits is not None and act_bits != "same":
        act_bits = _arrays.as_int(act_bits, "act_bits", low=1, high=64)
    dense_bits = _arrays.as_int(dense_bits, "dense_bits", low=1, high=64)
    sparsities = [_arrays.as_fraction(s, "sparsities") for s in sparsities]
    if len(set(sparsities)) != len(sparsities):
        raise ValueError(f"sparsities: expected distinct values, got {sparsities}")
    block = None if block is None else _arrays.as_int(block, "block", low=1)
    nm = _pairs(nm, "nm", 2)
    joint = _pairs(joint, "joint", 3)
    bits = [_arrays.as_int(b, "bits", low=2, high=8) for b in bits]
    for n, m, b in joint:
        _arrays.as_int(b, "joint bits", low=2, high=8)
    for n, m, *_ in nm + joint:
        if not 0 < n < m:
            raise ValueError(f"nm: expected 0 < n < m, got {n}:{m}")
    threads = num_threads

    cost_args = dict(flops_per_weight=flops_per_weight, act_bits=act_bits, dense_bits=dense_bits)
    levels: list = []
    skipped: list = []

    def add(kind, params, weight, loss, quant_bits=None, quant_group=None):
        costs = level_costs(W.shape, int(np.count_nonzero(weight)), bits=quant_bits,
                            group_size=quant_group, **cost_args)
        # The loss is a quadratic form in a PSD H: >= 0 exactly, but float64 rounding can give
        # -tiny; store 0 so that a saved database passes the loader's loss >= 0 check.
        levels.append(Level(kind=kind, params=params, loss=max(0.0, float(loss)), costs=costs,
                            weight=weight if keep_weights else None))

    add("dense", {}, W.copy() if keep_weights else W, 0.0)

    if sparsities:
        kind = "unstructured" if block is None else "blocked"
        base = {} if block is None else {"block": block}
        if block is not None and cols % block:
            for s in sparsities:
                skipped.append((level_label(kind, {**base, "sparsity": s}),
                                f"block {block} does not divide cols {cols}"))
        else:
            # A uniform spread's levels come straight from the greedy (no per-row re-solve) when
            # holding them all at once is cheap, or they are kept anyway.
            record = (sparsities if spread == "uniform" and
                      (keep_weights or len(sparsities) * W.nbytes <= _RECORD_BYTES) else ())
            trace = (_api.trace_unstructured(W, H, damp=damp, num_threads=threads, record=record)
                     if block is None else
                     _api.trace_blocked(W, H, block, damp=damp, num_threads=threads,
                                        record=record))
            for s in sparsities:
                result = trace.weights(s, spread)
                add(kind, {**base, "sparsity": s, "spread": spread}, result.weight, result.loss)

    for n, m in nm:
        params = {"n": n, "m": m}
        if cols % m:
            skipped.append((level_label("nm", params), f"m {m} does not divide cols {cols}"))
            continue
        result = _api.prune_nm(W, H, n, m, damp=damp, num_threads=threads)
        add("nm", params, result.weight, result.loss)

    qparams = {"sym": sym, "group_size": group_size, "grid": grid, "method": quant_method,
               "refine": refine}
    for b in bits:
        params = {"bits": b, **qparams}
        reason = _check_quant_level(cols, group_size)
        if reason:
            skipped.append((level_label("quant", params), reason))
            continue
        result = _api.quantize(W, H, b, sym=sym, group_size=group_size, grid=grid, damp=damp,
                               method=quant_method, refine=refine, num_threads=threads)
        add("quant", params, result.weight, result.loss, b, group_size)

    for n, m, b in joint:
        params = {"n": n, "m": m, "bits": b, **qparams}
        reason = (f"m {m} does not divide cols {cols}" if cols % m
                  else _check_quant_level(cols, group_size))
        if reason:
            skipped.append((level_label("joint", params), reason))
            continue
        result = _joint(W, H, n, m, b, sym, group_size, grid, damp, threads, quant_method, refine)
        add("joint", params, result.weight, result.loss, b, group_size)

    reference = float(_api.layer_loss(W, np.zeros_like(W), H, num_threads=threads).sum())
    settings = {"damp": damp, "spread": spread, "grid": grid, "flops_per_weight": flops_per_weight,
                "act_bits": act_bits, "dense_bits": dense_bits}
    return LayerLevels(name=name, shape=(rows, cols), levels=levels, reference_loss=reference,
                       settings=settings, skipped=skipped)


def _joint(W, H, n, m, bits, sym, group_size, grid, damp, threads, method,
           refine) -> QuantResult:
    pruned = _api.prune_nm(W, H, n, m, damp=damp, num_threads=threads)
    q = _api.quantize(pruned.weight, H, bits, sym=sym, group_size=group_size, grid=grid,
                      damp=damp, method=method, refine=refine, num_threads=threads)
    # losses against the original W, not the pruned input of the quantizer
    return dataclasses.replace(q, row_losses=_api.layer_loss(W, q.weight, H, num_threads=threads))


def level_quantizer(level: Level) -> tuple[str, bool]:
    """The quantizer ``(method, refine)`` of a quant or joint level, as ``quantize(method=,
    refine=)``. A level without them comes from a database saved before quantize() had methods,
    whose losses OBQ computed without refinement: ("obq", False) reproduces them."""
    p = level.params
    return p.get("method", LEGACY_QUANT_METHOD), p.get("refine", False)


def apply_level(W, H, level: Level, *, damp: float = 0.01, num_threads=None) -> CompressionResult:
    """Compress W to ``level`` (a Level, e.g. from a BudgetSolution) by the solve that produced it.

    Returns a PruneResult (dense, unstructured, blocked, nm) or a QuantResult (quant, joint),
    whose losses are measured against this W. Dense returns W unchanged with zero losses.
    """
    if not isinstance(level, Level):
        raise TypeError(f"level: expected a Level, got {type(level).__name__}")
    W = _arrays.as_weight(W, "W")
    p = level.params
    if level.kind == "dense":
        _arrays.as_hessian(H, W.shape[1], "H")
        return PruneResult(weight=W.copy(), mask=W != 0, row_losses=np.zeros(W.shape[0]),
                           damp=float(damp), damp_absolute=0.0, precision=W.dtype.name)
    if level.kind == "unstructured":
        return _api.prune_unstructured(W, H, p["sparsity"], damp=damp, spread=p["spread"],
                                       num_threads=num_threads)
    if level.kind == "blocked":
        return _api.prune_blocked(W, H, p["sparsity"], p["block"], damp=damp, spread=p["spread"],
                                  num_threads=num_threads)
    if level.kind == "nm":
        return _api.prune_nm(W, H, p["n"], p["m"], damp=damp, num_threads=num_threads)
    method, refine = level_quantizer(level)
    if level.kind == "quant":
        return _api.quantize(W, H, p["bits"], sym=p["sym"], group_size=p["group_size"],
                             grid=p["grid"], damp=damp, method=method, refine=refine,
                             num_threads=num_threads)
    if level.kind == "joint":
        H = _arrays.as_hessian(H, W.shape[1], "H")
        return _joint(W, H, p["n"], p["m"], p["bits"], p["sym"], p["group_size"], p["grid"],
                      damp, num_threads, method, refine)
    raise ValueError(f"level: unknown kind {level.kind!r}")


# --------------------------------------------------------------------------------------------
# the database


class LevelDatabase:
    """Levels of every layer of a model, in layer order; save/load as checksummed JSON.

    ``db[name]`` is a LayerLevels; iteration yields LayerLevels in insertion order.
    """

    def __init__(self, layers: Iterable[LayerLevels] = (), *, meta: Mapping | None = None):
        self._layers: dict = {}
        self.meta = dict(meta or {})
        for layer in layers:
            self.add(layer)

    def add(self, layer: LayerLevels) -> None:
        if not isinstance(layer, LayerLevels):
            raise TypeError(f"layer: expected a LayerLevels, got {type(layer).__name__}")
        if layer.name in self._layers:
            raise ValueError(f"layer: the database already has a layer named {layer.name!r}")
        self._layers[layer.name] = layer

    def __getitem__(self, name: str) -> LayerLevels:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in the database") from None

    def __contains__(self, name) -> bool:
        return name in self._layers

    def __iter__(self):
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        levels = sum(len(layer.levels) for layer in self)
        return f"LevelDatabase({len(self)} layers, {levels} levels, costs {list(self.cost_types())})"

    @property
    def names(self) -> list:
        return list(self._layers)

    def shapes(self) -> dict:
        return {layer.name: layer.shape for layer in self}

    def total_weights(self) -> int:
        return sum(layer.num_weights for layer in self)

    def cost_types(self) -> tuple:
        """Cost types that every level of every layer has."""
        if not self._layers:
            return ()
        common = set(BUILTIN_COSTS) | {c for layer in self for lv in layer.levels for c in lv.costs}
        for layer in self:
            common &= set(layer.cost_types())
        return _ordered_costs(common)

    def _check_cost(self, cost: str) -> str:
        if not self._layers:
            raise ValueError("db: the database has no layers")
        if not isinstance(cost, str) or cost not in self.cost_types():
            raise ValueError(f"cost: unknown cost type {cost!r}; this database has "
                             f"{list(self.cost_types())}")
        return cost

    def dense_cost(self, cost: str) -> float:
        """Summed cost of the "dense" level of every layer (the reference of "Nx" budgets)."""
        cost = self._check_cost(cost)
        total = 0.0
        for layer in self:
            if "dense" not in layer.labels:
                raise ValueError(f"layer {layer.name!r} has no 'dense' level, so a reduction "
                                 "factor has no reference; give an absolute budget")
            total += layer.level("dense").costs[cost]
        return total

    def min_cost(self, cost: str) -> float:
        """Smallest achievable cost: every layer at its cheapest level (summed in layer order)."""
        cost = self._check_cost(cost)
        total = 0.0
        for layer in self:
            total += float(layer.costs(cost).min())
        return total

    def add_cost(self, cost: str, table: Mapping) -> None:
        """Attach a user cost (e.g. "time") to every layer: ``{layer name: values}`` with values
        as in :meth:`LayerLevels.add_cost`; every layer must be given."""
        self._check_table(table, cost)
        for name, values in table.items():
            self[name].add_cost(cost, values)

    def set_model_losses(self, table: Mapping) -> None:
        """Attach model-level losses, ``{layer name: values}`` (a subset of layers is allowed)."""
        unknown = [n for n in table if n not in self._layers]
        if unknown:
            raise ValueError(f"model_loss: unknown layers {unknown}")
        for name, values in table.items():
            self[name].set_model_losses(values)

    def _check_table(self, table: Mapping, what: str) -> None:
        if not isinstance(table, Mapping):
            raise TypeError(f"{what}: expected a mapping layer name -> values, got "
                            f"{type(table).__name__}")
        missing = [n for n in self._layers if n not in table]
        unknown = [n for n in table if n not in self._layers]
        if missing or unknown:
            raise ValueError(f"{what}: expected values for every layer; missing {missing}, "
                             f"unknown {unknown}")

    def check_compatible(self, shapes: Mapping) -> None:
        """Raise LevelDatabaseError unless the database has exactly the layers ``shapes``
        names (``{name: (rows, cols)}``) with those weight-matrix shapes."""
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes: expected a mapping name -> (rows, cols), got "
                            f"{type(shapes).__name__}")
        want = {str(n): tuple(int(s) for s in shape) for n, shape in shapes.items()}
        missing = [n for n in want if n not in self._layers]
        extra = [n for n in self._layers if n not in want]
        differ = [f"{n}: database {self[n].shape}, model {want[n]}"
                  for n in want if n in self._layers and self[n].shape != want[n]]
        if missing or extra or differ:
            parts = []
            if missing:
                parts.append(f"layers missing from the database: {missing}")
            if extra:
                parts.append(f"layers not in the model: {extra}")
            if differ:
                parts.append("shape mismatch: " + "; ".join(differ))
            raise LevelDatabaseError("level database does not match the model: " + ", ".join(parts))

    # --- serialization -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        body = {"format": DATABASE_FORMAT, "version": DATABASE_VERSION, "meta": self.meta,
                "layers": [layer.to_dict() for layer in self]}
        body["checksum"] = _checksum(body)
        return body

    @classmethod
    def from_dict(cls, data, *, source: str = "database") -> LevelDatabase:
        """Validate and rebuild a database from :meth:`to_dict` output (checksum included)."""
        return _from_dict(data, source)

    def save(self, path) -> None:
        """Write the database as JSON (atomically: a temporary file, then a rename)."""
        # Never write a file that load() would reject: layer losses are sums of squares.
        for layer in self:
            for j, lv in enumerate(layer.levels):
                if not (isinstance(lv.loss, numbers.Real) and math.isfinite(lv.loss) and lv.loss >= 0):
                    raise ValueError(f"layer {layer.name!r} level {j} ({lv.label}): loss must be a finite "
                                     f"value >= 0 to be saved, got {lv.loss!r}")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        path = os.fspath(path)
        # os.replace would put the file in place of a FIFO or device: refuse anything there but
        # a regular file or a symbolic link (the link itself is replaced, never written through).
        if os.path.lexists(path) and not (stat.S_ISREG(os.lstat(path).st_mode) or os.path.islink(path)):
            raise OSError(f"{path}: exists and is not a regular file; refusing to replace it")
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".levels-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, *, shapes: Mapping | None = None) -> LevelDatabase:
        """Read a database saved by :meth:`save`; with ``shapes``, also check_compatible.

        Raises LevelDatabaseError for invalid JSON, a wrong format or version, a checksum
        mismatch, malformed contents, or a mismatch with ``shapes``; OSError if unreadable.
        """
        path = os.fspath(path)
        data = _read_json(path)
        db = _from_dict(data, path)
        if shapes is not None:
            db.check_compatible(shapes)
        return db


def _read_json(path: str):
    """Parse the JSON file at ``path``; only a regular file is opened (a FIFO or device is refused
    without blocking). LevelDatabaseError for bad UTF-8, bad JSON or nesting too deep to parse;
    OSError when the file cannot be read."""
    try:
        raw = read_regular_file(path)
    except ValueError as exc:
        raise LevelDatabaseError(f"{path}: not a level database ({exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LevelDatabaseError(f"{path}: not a level database (not UTF-8 text: {exc})") from None
    except json.JSONDecodeError as exc:
        raise LevelDatabaseError(f"{path}: not a level database (invalid JSON: {exc})") from None
    except RecursionError:
        raise LevelDatabaseError(f"{path}: not a level database (JSON nested too deeply)") from None


def _checksum(body: Mapping) -> str:
    payload = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _from_dict(data, source: str) -> LevelDatabase:
    def fail(message):
        raise LevelDatabaseError(f"{source}: {message}")

    if not isinstance(data, dict):
        fail("not a level database (expected a JSON object)")
    if data.get("format") != DATABASE_FORMAT:
        fail(f"not a level database (format {data.get('format')!r}, expected {DATABASE_FORMAT!r})")
    if data.get("version") != DATABASE_VERSION:
        fail(f"unsupported version {data.get('version')!r} (this obc_native reads "
             f"{DATABASE_VERSION})")
    if "checksum" not in data:
        fail("no checksum")
    try:
        expected = _checksum(data)
    except (TypeError, ValueError, RecursionError) as exc:
        fail(f"malformed contents ({exc})")
    if data["checksum"] != expected:
        fail("checksum mismatch: the file was modified or corrupted")
    meta = data.get("meta", {})
    layers = data.get("layers")
    if not isinstance(meta, dict) or not isinstance(layers, list):
        fail("malformed contents ('meta' must be an object and 'layers' a list)")
    db = LevelDatabase(meta=meta)
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected an object")
            levels = []
            for j, lv in enumerate(entry["levels"]):
                if lv["kind"] not in LEVEL_KINDS:
                    raise ValueError(f"level {j}: unknown kind {lv['kind']!r}")
                if not isinstance(lv["params"], dict) or not isinstance(lv["costs"], dict):
                    raise ValueError(f"level {j}: params and costs must be objects")
                level = Level(kind=lv["kind"], params=dict(lv["params"]),
                              loss=_finite(lv["loss"], f"level {j} loss", nonneg=True),
                              costs={str(k): _finite(v, f"level {j} cost {k!r}", nonneg=True)
                                     for k, v in lv["costs"].items()},
                              model_loss=None if lv.get("model_loss") is None
                              else _finite(lv["model_loss"], f"level {j} model_loss"))
                level.label  # noqa: B018 - params must name the level
                if level.kind in ("quant", "joint"):
                    _check_quantizer(level.params, j)
                levels.append(level)
            layer = LayerLevels(
                name=entry["name"], shape=tuple(entry["shape"]), levels=levels,
                reference_loss=_finite(entry.get("reference_loss", 0.0), "reference_loss",
                                       nonneg=True),
                settings=dict(entry.get("settings", {})),
                skipped=[tuple(s) for s in entry.get("skipped", [])])
            db.add(layer)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                RecursionError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            fail(f"{where}: malformed layer ({what})")
    return db


# --------------------------------------------------------------------------------------------
# the solver


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
    buckets = _arrays.as_int(buckets, "buckets", low=1)
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
