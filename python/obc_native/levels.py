"""Compression levels of a layer: a :class:`Level` is a LayerConfig with its loss and costs.

A level says how one layer's weight matrix was compressed (its :meth:`Level.config`, a
:class:`~obc_native.layer_config.LayerConfig`), its exact layer loss
``||(W - W_hat) X||_F^2 / n`` (see ``obc_native.layer_loss``), optionally a model-level loss, and
its costs (``obc_native.costs``). :class:`LayerLevels` holds the levels of one layer;
:func:`apply_level` compresses a weight matrix to a level by :func:`obc_native.layer_solve.solve`.

Levels are stored (database files, ``Level.kind`` / ``Level.params``) in a compact form with one
of :data:`LEVEL_KINDS`; :func:`level_params` and :func:`level_config` convert between that form and
a LayerConfig, and :func:`level_label` names it: the only places that read the kinds.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from . import _api, _arrays
from ._results import QUANT_METHODS, PruneResult, QuantResult
from .costs import BUILTIN_COSTS
from .layer_config import LayerConfig
from .layer_solve import solve

__all__ = [
    "DEFAULT_PRUNE_METHOD",
    "LEVEL_KINDS",
    "LayerLevels",
    "Level",
    "apply_level",
    "level_config",
    "level_label",
    "level_params",
    "level_quantizer",
    "solve_level",
]

LEVEL_KINDS = ("dense", "unstructured", "blocked", "nm", "quant", "joint")
#: quantize(method=) choices of quant and joint levels, and what a level saved without one means
QUANT_LEVEL_METHODS = ("auto", *QUANT_METHODS)
LEGACY_QUANT_METHOD = "obq"
#: The pruner of a pruning level that does not name one (``params["prune_method"]``): ExactOBS.
DEFAULT_PRUNE_METHOD = "exact"

CompressionResult = Union[PruneResult, QuantResult]


def level_label(kind: str, params: Mapping[str, Any]) -> str:
    """Short unique name of a level within a layer, e.g. ``"sparse:0.5"``, ``"block4:0.5"``,
    ``"nm2:4"``, ``"q4"``, ``"q4a:g128"`` (asymmetric, groups of 128), ``"nm2:4+q4"``, ``"dense"``;
    pruning by SparseGPT is marked ``"@sparsegpt"`` (``"sparse:0.5@sparsegpt"``,
    ``"nm2:4@sparsegpt+q4"``)."""
    def quant(p):
        text = f"q{p['bits']}" + ("" if p.get("sym", True) else "a")
        return text + (f":g{p['group_size']}" if p.get("group_size") else "")

    def pruner(p):
        method = p.get("prune_method", DEFAULT_PRUNE_METHOD)
        return "" if method == DEFAULT_PRUNE_METHOD else f"@{method}"

    _arrays.as_choice(kind, "kind", LEVEL_KINDS)
    if kind == "dense":
        return "dense"
    if kind == "unstructured":
        return f"sparse:{float(params['sparsity'])!r}{pruner(params)}"
    if kind == "blocked":
        return f"block{params['block']}:{float(params['sparsity'])!r}{pruner(params)}"
    if kind == "nm":
        return f"nm{params['n']}:{params['m']}{pruner(params)}"
    if kind == "quant":
        return quant(params)
    return f"nm{params['n']}:{params['m']}{pruner(params)}+{quant(params)}"


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
            reproduces its recorded loss. ``prune_method`` (unstructured, blocked, nm, joint):
            "sparsegpt" for SparseGPT levels; absent for ExactOBS.
            :meth:`config` is the same as a LayerConfig.
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

    @classmethod
    def of(cls, config: LayerConfig | None, loss: float, costs: dict, **fields: Any) -> Level:
        """The level of ``config`` (None: dense) with its loss and costs; ``fields``:
        ``model_loss``, ``weight``."""
        kind, params = level_params(config)
        return cls(kind=kind, params=params, loss=loss, costs=costs, **fields)

    def config(self, damp: float = 0.01) -> LayerConfig | None:
        """The LayerConfig of the solve that produced this level, with relative damping ``damp``
        (None for the dense level)."""
        return level_config(self, damp)

    @property
    def label(self) -> str:
        return level_label(self.kind, self.params)

    @property
    def is_dense(self) -> bool:
        """The dense level: the weights as they are."""
        return self.kind == "dense"

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
        # int() would turn 2.7 into 2, True into 1 and 1e308 into a 309-digit size (a crafted
        # database file loaded with such a shape)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in self.shape):
            raise TypeError(f"shape: expected two integers (rows, cols), got {self.shape!r}")
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


def level_quantizer(level: Level) -> tuple[str, bool]:
    """The quantizer ``(method, refine)`` of a quant or joint level, as ``quantize(method=,
    refine=)``. A level without them comes from a database saved before quantize() had methods,
    whose losses OBQ computed without refinement: ("obq", False) reproduces them."""
    p = level.params
    return p.get("method", LEGACY_QUANT_METHOD), p.get("refine", False)


def level_params(config: LayerConfig | None) -> tuple[str, dict]:
    """``(kind, params)``, the stored form of the level ``config`` describes (None: dense).

    Levels are unstructured, blocked or N:M pruning (ExactOBS, or SparseGPT: ``params``
    ``"prune_method": "sparsegpt"``; ExactOBS levels name no pruner, as before there was a
    choice), quantization, or N:M then quantization ("joint"); anything else (structured pruning,
    the magnitude / RTN baselines, unstructured or blocked pruning with quantization) has no level
    form: ValueError.
    """
    if config is None:
        return "dense", {}
    if config.is_baseline or config.prune == "structured":
        raise ValueError(f"config: a level is Hessian-aware pruning and/or a quantize() quantizer, got {config}")
    quant = {}
    if config.bits is not None:
        quant = {"bits": config.bits, "sym": config.sym, "group_size": config.group_size, "grid": config.grid,
                 "method": config.quant_method, "refine": config.refine}
    if config.prune is None:
        if not quant:
            raise ValueError("config: expected pruning or bits, got neither (the dense level is None)")
        return "quant", quant
    pruner = {} if config.prune_method == DEFAULT_PRUNE_METHOD else {"prune_method": config.prune_method}
    if config.prune == "nm":
        return ("joint" if quant else "nm"), {"n": config.n, "m": config.m, **quant, **pruner}
    if quant:
        raise ValueError(f"config: levels quantize dense or N:M weights only, got prune={config.prune!r} "
                         "with bits")
    if config.prune == "blocked":
        return "blocked", {"block": config.block, "sparsity": config.sparsity, "spread": config.spread, **pruner}
    return "unstructured", {"sparsity": config.sparsity, "spread": config.spread, **pruner}


def level_config(level: Level, damp: float = 0.01) -> LayerConfig | None:
    """The LayerConfig of the solve that produced ``level`` (None for dense), with relative
    damping ``damp``. A quant or joint level without a quantizer means OBQ without refinement
    (see :func:`level_quantizer`)."""
    kind, p = level.kind, level.params
    if kind == "dense":
        return None
    if kind not in LEVEL_KINDS:
        raise ValueError(f"level: unknown kind {kind!r}")
    fields: dict[str, Any] = {"damp": damp}
    if kind in ("quant", "joint"):
        method, refine = level_quantizer(level)
        fields.update(bits=p["bits"], sym=p["sym"], group_size=p["group_size"], grid=p["grid"],
                      quant_method=method, refine=refine)
    if kind != "quant":
        fields["prune_method"] = p.get("prune_method", DEFAULT_PRUNE_METHOD)
    if kind in ("nm", "joint"):
        fields.update(prune="nm", n=p["n"], m=p["m"])
    elif kind in ("unstructured", "blocked"):
        fields.update(prune=kind, sparsity=p["sparsity"], spread=p["spread"])
        if kind == "blocked":
            fields["block"] = p["block"]
    return LayerConfig(**fields)


def solve_level(W: np.ndarray, H: np.ndarray, config: LayerConfig, *,
                num_threads: int | None = None) -> CompressionResult:
    """The solver result of compressing ``W`` by a level's ``config`` (see :func:`apply_level`):
    its weights, mask and row losses against this W (also for N:M then quantization, whose
    quantizer alone measures against the pruned weights)."""
    W = _arrays.as_weight(W, "W")
    joint = config.prune is not None and config.bits is not None
    if joint:
        H = _arrays.as_hessian(H, W.shape[1], "H")
    unit = solve(config, W, H, num_threads=num_threads)
    result = unit.solver_result
    if joint:  # losses against the original W, not the pruned input of the quantizer
        result = dataclasses.replace(result, weight=unit.weight,
                                     row_losses=_api.layer_loss(W, unit.weight, H, num_threads=num_threads))
    return result


def apply_level(W, H, level: Level, *, damp: float = 0.01, num_threads=None) -> CompressionResult:
    """Compress W to ``level`` (a Level, e.g. from a BudgetSolution) by the solve that produced it.

    Returns a PruneResult (dense, unstructured, blocked, nm) or a QuantResult (quant, joint),
    whose losses are measured against this W. Dense returns W unchanged with zero losses.
    """
    if not isinstance(level, Level):
        raise TypeError(f"level: expected a Level, got {type(level).__name__}")
    W = _arrays.as_weight(W, "W")
    config = level.config(damp)
    if config is None:
        _arrays.as_hessian(H, W.shape[1], "H")
        return PruneResult(weight=W.copy(), mask=W != 0, row_losses=np.zeros(W.shape[0]),
                           damp=float(damp), damp_absolute=0.0, precision=W.dtype.name)
    return solve_level(W, H, config, num_threads=num_threads)
