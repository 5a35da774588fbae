"""Non-uniform compression of whole models: level databases of every layer, budgets, stitching.

A *level database* (:class:`obc_native.budget.LevelDatabase`) lists, for every layer to compress,
its compression levels (dense, sparsities, N:M, bit widths, ...) with their exact layer losses and
costs. :func:`build_database` computes it for a PyTorch model from one calibration pass;
``compress(model, calibration, budget="flops=2x")`` then picks one level per layer with the
dynamic-programming solver (:func:`obc_native.budget.solve_budget`) and applies it. A database is
saved as checksummed JSON (``db.save(path)``) and reloaded with :func:`load_database` to solve
many budgets without recomputing the levels.

Layer geometry (see ``layers.py``): a layer's database entry is its whole ``out_features x cols``
weight matrix (``cols = C * K`` for convolutions); conv groups are solved separately and summed.
Convolutions are solved in the channels-last column order ``(kh, kw, c_in)``, as ``compress``
does, so N:M groups, blocks and quantization groups run along input channels at one kernel
position; N:M and block levels are left out (``LayerLevels.skipped``) when ``m`` or the block does
not divide the input channels per group. ``flops_per_weight`` of a layer is how often each of its
weights is applied per calibration sample (the leading dimension of a batch), measured on the
calibration pass: the output positions ``H_out * W_out`` of a convolution, the tokens per sample
of a linear layer on ``(B, T, C)`` inputs (1 on ``(B, C)``), summed over the calls of a layer that
runs several times per forward pass, and averaged over the calibration batches.

Stitched model losses (``stitch=True``): for every level of every layer, that one layer's weights
are replaced by the level's weights in the otherwise dense model and the model is run on the
calibration batches; the layer's weights are restored afterwards. The level's ``model_loss`` is

- without ``loss_fn``: the mean squared error of the model outputs against the dense model's
  outputs, over every output element of the calibration set (0 for the dense level);
- with ``loss_fn(output, batch) -> scalar``: the task loss, averaged over the calibration
  batches, minus the dense model's (so the dense level has 0, and a level may be negative).

Outputs that are not tensors: a mapping's ``"logits"`` (Hugging Face outputs) or the first
tensor of a tuple or list is used for the squared error; anything else needs a ``loss_fn``. The
dense outputs of all calibration batches are held in memory while stitching. Cost:
``levels x batches`` forward passes per layer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import _arrays
from .._results import QuantResult
from ..budget import (
    BUILTIN_COSTS,
    DEFAULT_SPARSITIES,
    BudgetSolution,
    BudgetSpec,
    InfeasibleBudgetError,
    LayerLevels,
    Level,
    LevelDatabase,
    QUANT_LEVEL_METHODS,
    LevelDatabaseError,
    apply_level,
    build_layer_levels,
    level_costs,
    level_label,
    level_quantizer,
    parse_budget,
    solve_budget,
)
from .calibration import Forward, as_batches, model_device, run_batch, run_calibration
from .executor_choice import as_executor
from .executors import shipped_info
from .hessian import CalibrationError, LayerHessian
from .layers import LayerInfo, channels_last_perm, find_layers, param_key, set_weight_matrix, weight_matrix
from .recipe import LayerConfig, Recipe, RecipeError, as_recipe
from .solve import UnitResult, quantizer_rows

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

logger = logging.getLogger("obc_native.torch")

#: What the budget solver minimizes, summed over layers: "layer" (exact layer losses
#: ``||(W - W_hat) X||^2 / n``), "normalized" (each layer's losses divided by its loss of zeroing
#: the layer, which makes layers whose outputs differ in scale comparable), "model" (stitched model
#: losses) or "auto": "model" when every level has a model loss, else "normalized".
OBJECTIVES = ("auto", "layer", "normalized", "model")


# --------------------------------------------------------------------------------------------
# what levels to build


def _tuples(values, name: str, size: int) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a list of {size}-tuples, got {type(values).__name__}")
    out = []
    for item in values:
        if isinstance(item, (str, bytes)) or not isinstance(item, Iterable):
            raise TypeError(f"{name}: expected {size}-tuples of integers, got {item!r}")
        item = tuple(item)
        if len(item) != size:
            raise ValueError(f"{name}: expected {size}-tuples of integers, got {item!r}")
        out.append(tuple(_arrays.as_int(v, name, low=1) for v in item))
    return tuple(out)


@dataclass(frozen=True)
class LevelSpec:
    """Which levels :func:`build_database` computes for every layer (see ``build_layer_levels``).

    Attributes:
        sparsities: unstructured sparsities (or fractions of blocks with ``block``), in [0, 1].
        block: None for unstructured levels, else blocks of this many consecutive inputs.
        nm: ``(n, m)`` N:M patterns; bits: quantization bit widths (2..8); joint: ``(n, m, bits)``.
        sym, group_size, grid: the quantization grid of quant and joint levels.
        quant_method, refine: their quantizer, as ``quantize(method=, refine=)`` ("auto", "obq",
            "gptq", "gptq-natural" or "rtn"); recorded in each level's params.
        spread: how a sparsity is spread over rows: "uniform" (every row the same, so a level's
            cost does not depend on the data) or "global".
        act_bits: activation bits for the "bops" cost (None: 32-bit floats, or "same").

    :meth:`preset` gives the default levels of a budget's cost type; a dict with these keys is
    accepted wherever a LevelSpec is.
    """

    sparsities: tuple = DEFAULT_SPARSITIES
    block: int | None = None
    nm: tuple = ((2, 4),)
    bits: tuple = ()
    joint: tuple = ()
    sym: bool = True
    group_size: int | None = None
    grid: str = "mse"
    spread: str = "uniform"
    act_bits: Any = None
    quant_method: str = "auto"
    refine: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sparsities, (str, bytes)) or not isinstance(self.sparsities, Iterable):
            raise TypeError(f"sparsities: expected a list of fractions, got {type(self.sparsities).__name__}")
        sparsities = tuple(_arrays.as_fraction(s, "sparsities") for s in self.sparsities)
        if len(set(sparsities)) != len(sparsities):
            raise ValueError(f"sparsities: expected distinct values, got {list(sparsities)}")
        if isinstance(self.bits, (str, bytes)) or not isinstance(self.bits, Iterable):
            raise TypeError(f"bits: expected a list of bit widths, got {type(self.bits).__name__}")
        set_ = object.__setattr__
        set_(self, "sparsities", sparsities)
        set_(self, "nm", _tuples(self.nm, "nm", 2))
        set_(self, "joint", _tuples(self.joint, "joint", 3))
        set_(self, "bits", tuple(_arrays.as_int(b, "bits", low=2, high=8) for b in self.bits))
        for n, m, *rest in self.nm + self.joint:
            if not n < m:
                raise ValueError(f"nm: expected 0 < n < m, got {n}:{m}")
            if rest:
                _arrays.as_int(rest[0], "joint bits", low=2, high=8)
        if self.block is not None:
            set_(self, "block", _arrays.as_int(self.block, "block", low=1))
        if self.group_size is not None:
            set_(self, "group_size", _arrays.as_int(self.group_size, "group_size", low=1))
        if not isinstance(self.sym, bool):
            raise TypeError(f"sym: expected a bool, got {type(self.sym).__name__}")
        _arrays.as_choice(self.grid, "grid", ("mse", "minmax"))
        _arrays.as_choice(self.quant_method, "quant_method", QUANT_LEVEL_METHODS)
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine: expected a bool, got {type(self.refine).__name__}")
        _arrays.as_choice(self.spread, "spread", ("global", "uniform"))
        if self.act_bits is not None and self.act_bits != "same":
            set_(self, "act_bits", _arrays.as_int(self.act_bits, "act_bits", low=1, high=64))
        if not (sparsities or self.nm or self.bits or self.joint):
            raise ValueError("levels: expected at least one level besides dense (sparsities, nm, bits or joint)")

    @classmethod
    def preset(cls, cost: str | None = None) -> LevelSpec:
        """Default levels for a budget on ``cost``: "params" and "flops" (and anything else):
        the sparsities of ``DEFAULT_SPARSITIES`` and 2:4; "bits": 2, 3, 4, 5, 6 and 8 bits on an
        asymmetric grid; "bops": both."""
        if cost == "bits":
            return cls(sparsities=(), nm=(), bits=(2, 3, 4, 5, 6, 8), sym=False)
        if cost == "bops":
            return cls(bits=(4, 8), sym=False)
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"levels: unknown field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("sparsities", "bits"):
            data[key] = list(data[key])
        for key in ("nm", "joint"):
            data[key] = [list(item) for item in data[key]]
        return data


def _as_level_spec(levels: Any, cost: str | None = None) -> LevelSpec:
    if levels is None:
        return LevelSpec.preset(cost)
    if isinstance(levels, LevelSpec):
        return levels
    if isinstance(levels, Mapping):
        return LevelSpec.from_dict(levels)
    raise TypeError(f"levels: expected a LevelSpec, a dict of its fields or None, got {type(levels).__name__}")


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


# --------------------------------------------------------------------------------------------
# which layers


def _tied(model: nn.Module, infos: Mapping[str, LayerInfo]) -> dict[str, str]:
    """Layers whose weight is reachable under another name too -> why they are left out."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied = {}
    for name, info in infos.items():
        others = [n for n in owners.get(id(info.module.weight), []) if n != param_key(name, "weight")]
        if others:
            tied[name] = f"weight is shared with {', '.join(others)} (tied); not compressed"
    return tied


def select_layers(
    model: nn.Module,
    *,
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> tuple[dict[str, LayerInfo], dict[str, str]]:
    """The supported layers to compress non-uniformly, and why the others are left out.

    Args:
        recipe: layers for which the recipe has no configuration (skip patterns, no matching
            rule) are left out; the configurations themselves are not used.
        layers: names or :func:`fnmatch.fnmatchcase` patterns of the layers to include (default
            all supported layers); skip: patterns of layers to leave out.
    Every pattern must match a supported layer (RecipeError otherwise, catching typos; a
    recipe's patterns only when it is ``strict``). Layers with tied weights are left out.
    Returns ``(selected, left_out)``: ``{name: LayerInfo}`` in module order and ``{name: reason}``.
    """
    found = find_layers(model)
    if not found:
        raise RecipeError("the model has no supported layers (nn.Linear, nn.Conv1d, nn.Conv2d, HF Conv1D)")
    recipe = None if recipe is None else as_recipe(recipe)
    include = None if layers is None else _patterns(layers, "layers")
    excluded = _patterns(skip, "skip")
    problems = []
    checks = [("layers", p) for p in include or []] + [("skip", p) for p in excluded]
    if recipe is not None and recipe.strict:
        checks += [("recipe skip", p) for p in recipe.skip] + [("recipe override", o.pattern) for o in recipe.overrides]
    for what, pattern in checks:
        if not any(fnmatchcase(name, pattern) for name in found):
            problems.append(f"{what} pattern {pattern!r} matches no supported layer")
    if problems:
        raise RecipeError("layer selection cannot be applied:\n  " + "\n  ".join(problems))
    selected: dict[str, LayerInfo] = {}
    left_out: dict[str, str] = {}
    for name, info in found.items():
        if include is not None and not any(fnmatchcase(name, p) for p in include):
            left_out[name] = "not selected (layers=)"
            continue
        hit = next((p for p in excluded if fnmatchcase(name, p)), None)
        if hit is not None:
            left_out[name] = f"skipped by pattern {hit!r}"
            continue
        if recipe is not None:
            config, reason = recipe.config_for(name)
            if config is None:
                left_out[name] = reason
                continue
        selected[name] = info
    for name, reason in _tied(model, selected).items():
        logger.warning("layer %r: %s", name, reason)
        del selected[name]
        left_out[name] = reason
    if not selected:
        listing = "; ".join(f"{n}: {r}" for n, r in left_out.items())
        raise RecipeError(f"no layer selected, nothing to compress ({listing})")
    return selected, left_out


def _patterns(values: Iterable[str], name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a list of layer names or patterns, got {type(values).__name__}")
    values = list(values)
    for pattern in values:
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{name}: patterns must be non-empty strings, got {pattern!r}")
    return values


def _shapes(infos: Mapping[str, LayerInfo]) -> dict[str, tuple[int, int]]:
    return {name: (info.out_features, info.cols) for name, info in infos.items()}


def check_database(db: LevelDatabase, infos: Mapping[str, LayerInfo]) -> None:
    """LevelDatabaseError unless ``db`` has exactly the layers ``infos`` with the same weight
    matrix shapes, conv groups and layer kinds."""
    db.check_compatible(_shapes(infos))
    differ = []
    for name, info in infos.items():
        settings = db[name].settings
        if settings.get("groups", 1) != info.groups or settings.get("kind", info.kind) != info.kind:
            differ.append(
                f"{name}: database {settings.get('kind')} groups={settings.get('groups', 1)}, "
                f"model {info.kind} groups={info.groups}"
            )
    if differ:
        raise LevelDatabaseError("level database does not match the model: " + "; ".join(differ))


def _database_layers(
    model: nn.Module, db: LevelDatabase, recipe: Any
) -> tuple[dict[str, LayerInfo], dict[str, str]]:
    """The model's layers a database applies to (checked), and the supported layers it leaves out."""
    if recipe is not None:
        infos, left_out = select_layers(model, recipe=recipe)
    else:
        found = find_layers(model)
        missing = [name for name in db.names if name not in found]
        if missing:
            raise LevelDatabaseError(
                f"level database does not match the model: layers not in the model: {missing} (the "
                f"model's supported layers: {list(found)})"
            )
        infos = {name: info for name, info in found.items() if name in db}
        left_out = {name: "not in the level database" for name in found if name not in db}
    check_database(db, infos)
    return infos, left_out


def load_database(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    recipe: Any = None,
) -> LevelDatabase:
    """Read a database saved with ``db.save(path)``; with ``model``, also check that it matches
    the model's layers (names, weight shapes, conv groups); LevelDatabaseError otherwise.

    ``recipe``: the layer selection the database was built for (see :func:`select_layers`);
    without it, the database's own layers are looked up in the model.
    """
    db = LevelDatabase.load(path)
    if model is not None:
        _database_layers(model, db, recipe)
    return db


# --------------------------------------------------------------------------------------------
# calibration: Hessians and how often each weight is applied


def _positions(info: LayerInfo, output: torch.Tensor) -> int:
    """Applications of each weight per sample in one call: output positions (conv), tokens (linear)."""
    if info.is_conv:
        spatial = len(info.kernel)
        shape = output.shape[1:] if output.dim() == spatial + 1 else output.shape[2:]
        return math.prod(shape)
    return math.prod(output.shape[1:-1]) if output.dim() > 2 else 1


class _Applications:
    """Context manager: forward hooks summing, over all calls, each layer's applications per sample."""

    def __init__(self, infos: Mapping[str, LayerInfo]):
        self.infos = dict(infos)
        self.totals = {name: 0 for name in self.infos}
        self._handles: list = []

    def __enter__(self) -> _Applications:
        try:
            for name, info in self.infos.items():
                self._handles.append(info.module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, name: str):
        info = self.infos[name]

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.totals[name] += _positions(info, output)

        return hook

    def per_sample(self, batches: int) -> dict[str, float]:
        return {name: total / batches for name, total in self.totals.items()}


def _calibrate(
    model: nn.Module, infos: Mapping[str, LayerInfo], batches: Iterable[Any], forward: Forward | None,
    executor: Any = None,
) -> tuple[dict[str, LayerHessian], dict[str, float], list[str], int]:
    """One dense pass (by ``executor``, default here): Hessians, flops_per_weight, the call order
    and the batch count."""
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        done = as_executor(executor).calibrate(
            model, infos, batches, device=model_device(model), forward=forward, counter=_Applications
        )
    finally:
        for module, flag in training.items():
            module.train(flag)
    count = done.batches
    never = [name for name in infos if done.hessians[name].n == 0]
    if never:
        raise CalibrationError(
            f"layer(s) {never} were never called during the calibration pass; they cannot be "
            "calibrated (leave them out)"
        )
    return done.hessians, {name: total / count for name, total in done.applications.items()}, done.order, count


def flops_per_weight(
    model: nn.Module, calibration: Any, *, layers: Iterable[str] | None = None, forward: Forward | None = None
) -> dict[str, float]:
    """How often each weight of each supported layer (or of ``layers``, by name) is applied per
    calibration sample (see the module docstring), from one forward pass over ``calibration``."""
    found = find_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"layers: not supported layers of the model: {unknown}")
    infos = {n: found[n] for n in names}
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with _Applications(infos) as applications:
            count = run_calibration(model, as_batches(calibration), device=model_device(model), forward=forward)
    finally:
        for module, flag in training.items():
            module.train(flag)
    return applications.per_sample(count)


# --------------------------------------------------------------------------------------------
# building


def _layer_levels(
    info: LayerInfo,
    dense: np.ndarray,
    hessians: list[np.ndarray],
    spec: LevelSpec,
    *,
    damp: float,
    applications: float,
    keep_weights: bool,
    num_threads: int | None,
) -> LayerLevels:
    """The levels of one layer (all conv groups), channels-last for convolutions."""
    span, span_name = (info.in_per_group, "input channels per group") if info.is_conv else (info.cols, "columns")
    skipped: list[tuple[str, str]] = []
    quant = {"sym": spec.sym, "group_size": spec.group_size}
    nm = [(n, m) for n, m in spec.nm if span % m == 0]
    joint = [(n, m, b) for n, m, b in spec.joint if span % m == 0]
    for n, m, *bits in [*spec.nm, *spec.joint]:
        if span % m:
            kind, params = ("joint", {**quant, "bits": bits[0]}) if bits else ("nm", {})
            skipped.append((level_label(kind, {**params, "n": n, "m": m}),
                            f"m {m} does not divide the {span_name} ({span})"))
    sparsities = spec.sparsities
    if spec.block is not None and span % spec.block:
        reason = f"block {spec.block} does not divide the {span_name} ({span})"
        skipped += [(level_label("blocked", {"block": spec.block, "sparsity": s}), reason) for s in sparsities]
        sparsities = ()
    options = dict(
        sparsities=sparsities, block=spec.block, nm=nm, bits=spec.bits, joint=joint, sym=spec.sym,
        group_size=spec.group_size, grid=spec.grid, damp=damp, spread=spec.spread,
        quant_method=spec.quant_method, refine=spec.refine,
        flops_per_weight=applications, act_bits=spec.act_bits, keep_weights=keep_weights, num_threads=num_threads,
    )
    perm = channels_last_perm(info)
    rows = info.rows
    units = []
    for g, hessian in enumerate(hessians):
        unit = np.ascontiguousarray(dense[g * rows : (g + 1) * rows])
        if perm is not None:
            unit = np.ascontiguousarray(unit[:, perm])
            hessian = np.ascontiguousarray(hessian[np.ix_(perm, perm)])
        try:
            units.append(build_layer_levels(unit, hessian, name=info.name, **options))
        except (ValueError, ArithmeticError) as err:
            where = f"layer {info.name!r}" + (f" (group {g} of {info.groups})" if info.groups > 1 else "")
            raise ValueError(f"{where}: {err}") from err
    # the whole layer: losses summed over groups, costs of the full out_features x cols matrix
    shape = (info.out_features, info.cols)
    levels = []
    for j, first in enumerate(units[0].levels):
        parts = [unit.levels[j] for unit in units]
        nnz = int(sum(p.costs["params"] for p in parts))
        quantized = first.kind in ("quant", "joint")
        costs = level_costs(
            shape, nnz, bits=first.params["bits"] if quantized else None,
            group_size=first.params.get("group_size") if quantized else None,
            flops_per_weight=applications, act_bits=spec.act_bits,
        )
        weight = None
        if keep_weights:
            weight = np.concatenate([p.weight for p in parts], axis=0)
            if perm is not None:
                native = np.empty_like(weight)
                native[:, perm] = weight
                weight = native
        levels.append(Level(kind=first.kind, params=dict(first.params), loss=float(sum(p.loss for p in parts)),
                            costs=costs, weight=weight))
    settings = dict(units[0].settings)
    settings.update(kind=info.kind, groups=info.groups, column_order="channels_last" if perm is not None else "native")
    return LayerLevels(name=info.name, shape=shape, levels=levels,
                       reference_loss=float(sum(u.reference_loss for u in units)), settings=settings,
                       skipped=[*skipped, *units[0].skipped])


def _layer_levels_task(
    info: LayerInfo, dense: np.ndarray, hessians: list[np.ndarray], spec: LevelSpec, damp: float,
    applications: float, keep_weights: bool, num_threads: int | None,
) -> LayerLevels:
    """:func:`_layer_levels` with positional arguments (an executor task)."""
    return _layer_levels(
        info, dense, hessians, spec, damp=damp, applications=applications, keep_weights=keep_weights,
        num_threads=num_threads,
    )


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise CalibrationError(
        f"stitch: the model returned a {type(output).__name__}, not a tensor; pass loss_fn(output, batch) "
        "to score it"
    )


class _Stitcher:
    """Model-level loss of replacing one layer's weights, against the dense model."""

    def __init__(self, model, batches, device, forward, loss_fn):
        self.model, self.batches, self.device, self.forward, self.loss_fn = model, batches, device, forward, loss_fn
        self.reference: list[torch.Tensor] = []
        self.dense_value = 0.0
        with torch.no_grad():
            if loss_fn is None:
                self.reference = [_output_tensor(self._run(batch)).detach().double() for batch in batches]
            else:
                self.dense_value = self._task_loss()

    def _run(self, batch):
        return run_batch(self.model, batch, self.device, self.forward)

    def _task_loss(self) -> float:
        values = []
        for batch in self.batches:
            value = self.loss_fn(self._run(batch), batch)
            values.append(float(value))
        return sum(values) / len(values)

    def score(self) -> float:
        with torch.no_grad():
            if self.loss_fn is not None:
                return self._task_loss() - self.dense_value
            total, count = 0.0, 0
            for batch, reference in zip(self.batches, self.reference):
                output = _output_tensor(self._run(batch)).double()
                if output.shape != reference.shape:
                    raise CalibrationError(
                        f"stitch: output shape {tuple(output.shape)} differs from the dense {tuple(reference.shape)}"
                    )
                total += float(torch.sum((output - reference) ** 2))
                count += reference.numel()
        return total / max(count, 1)

    def losses(self, info: LayerInfo, layer: LayerLevels) -> list[float]:
        original = weight_matrix(info)
        values = []
        try:
            for level in layer.levels:
                if level.kind == "dense":
                    values.append(0.0)
                    continue
                set_weight_matrix(info, torch.from_numpy(np.ascontiguousarray(level.weight)))
                value = self.score()
                if not math.isfinite(value):
                    raise CalibrationError(f"stitch: layer {info.name!r} level {level.label}: model loss {value}")
                values.append(value)
        finally:
            set_weight_matrix(info, original)
        return values


def _build(
    model: nn.Module,
    infos: Mapping[str, LayerInfo],
    hessians: Mapping[str, LayerHessian],
    applications: Mapping[str, float],
    order: list[str],
    spec: LevelSpec,
    *,
    damp: float,
    stitch: bool,
    loss_fn: Callable[[Any, Any], Any] | None,
    batches: Iterable[Any],
    batch_count: int,
    forward: Forward | None,
    num_threads: int | None,
    quiet: bool,
    executor: Any = None,
) -> LevelDatabase:
    """The database from collected Hessians (layers in call order); the layers' levels are
    computed by ``executor`` (default here; one task per layer)."""
    executor = as_executor(executor)
    if loss_fn is not None and not stitch:
        raise ValueError("loss_fn: only used with stitch=True")
    names = [n for n in order if n in infos] + [n for n in infos if n not in order]
    training = {module: module.training for module in model.modules()}
    stitcher = None
    db = LevelDatabase(meta={
        "model": type(model).__qualname__,
        "levels": {**spec.to_dict(), "damp": damp},
        "calibration": {"batches": batch_count},
        "stitch": None if not stitch else {"loss": "mse" if loss_fn is None else "loss_fn", "batches": batch_count},
    })
    progress = tqdm(total=len(names), desc="levels", unit="layer", disable=quiet or executor.shows_progress, leave=False)
    try:
        model.eval()
        if stitch:
            stitcher = _Stitcher(model, batches, model_device(model), forward, loss_fn)

        def submit(name: str) -> None:
            info = infos[name]
            dense = weight_matrix(info).to(torch.float32).cpu().numpy()
            executor.submit(
                name, _layer_levels_task, shipped_info(info), dense, hessians[name].hessians(), spec, damp,
                applications[name], stitch, num_threads,
            )

        for name in names if executor.runs_ahead else ():  # a cluster computes them all at once
            submit(name)
        for name in names:
            progress.set_postfix_str(name)
            info = infos[name]
            if not executor.runs_ahead:
                submit(name)
            layer = executor.result(name)
            layer.settings["samples"] = hessians[name].n
            if stitcher is not None:
                layer.set_model_losses(stitcher.losses(info, layer))
                for level in layer.levels:
                    level.weight = None
            db.add(layer)
            progress.update(1)
    finally:
        progress.close()
        for module, flag in training.items():
            module.train(flag)
    logger.info("level database: %d layer(s), %d level(s)", len(db), sum(len(layer.levels) for layer in db))
    return db


def build_database(
    model: nn.Module,
    calibration: Any,
    levels: LevelSpec | Mapping[str, Any] | None = None,
    *,
    recipe: Any = None,
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    damp: float = 0.01,
    stitch: bool = False,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    forward: Forward | None = None,
    num_threads: int | None = None,
    quiet: bool = False,
    executor: Any = "local",
) -> LevelDatabase:
    """The level database of ``model``'s layers from one calibration pass over the dense model.

    Args:
        model: the dense model (unchanged on return).
        calibration: iterable of batches, as for :func:`compress`.
        levels: a :class:`LevelSpec` (or a dict of its fields); default ``LevelSpec()``: the
            sparsities of ``DEFAULT_SPARSITIES`` and 2:4.
        recipe, layers, skip: which layers (see :func:`select_layers`); default all supported
            layers.
        damp: relative damping of every solve (recorded; compress applies levels with it).
        stitch: also compute every level's model-level loss (see the module docstring), so that
            ``compress(..., objective="model")`` (the default "auto" then) can use it.
        loss_fn: ``loss_fn(output, batch) -> scalar`` task loss for stitching (default: mean
            squared error against the dense outputs).
        forward: optional ``forward(model, batch)`` replacing the default call of the model.
        num_threads: threads for the solvers; quiet: no progress bar.
        executor: "local", "ray" or an executor object (see :func:`compress`): the calibration
            shards and each layer's levels run there; the database is bit-identical.
    Returns:
        a LevelDatabase, layers in execution order; ``db.save(path)`` writes it.
    """
    spec = _as_level_spec(levels)
    damp = _arrays.as_damp(damp)
    if num_threads is not None:
        _arrays.as_threads(num_threads)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(output, batch), got {type(loss_fn).__name__}")
    infos, _ = select_layers(model, recipe=recipe, layers=layers, skip=skip)
    batches = as_batches(calibration)
    executor = as_executor(executor)
    executor.start(quiet=quiet)  # a missing ray package or an unreachable cluster fails here, before any work
    try:
        hessians, applications, order, count = _calibrate(model, infos, batches, forward, executor)
        return _build(
            model, infos, hessians, applications, order, spec, damp=damp, stitch=stitch, loss_fn=loss_fn,
            batches=batches, batch_count=count, forward=forward, num_threads=num_threads, quiet=quiet,
            executor=executor,
        )
    finally:
        executor.close()


# --------------------------------------------------------------------------------------------
# solving and applying


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


def level_config(level: Level, damp: float = 0.01) -> LayerConfig | None:
    """The recipe configuration that the level's solve corresponds to (None for dense)."""
    if level.kind == "dense":
        return None
    p = level.params
    quant = {}
    if level.kind in ("quant", "joint"):
        method, refine = level_quantizer(level)
        quant = dict(bits=p["bits"], sym=p["sym"], group_size=p["group_size"], grid=p["grid"],
                     quant_method=method, refine=refine)
    if level.kind == "unstructured":
        return LayerConfig(prune="unstructured", sparsity=p["sparsity"], spread=p["spread"], damp=damp)
    if level.kind == "blocked":
        return LayerConfig(prune="blocked", sparsity=p["sparsity"], block=p["block"], spread=p["spread"], damp=damp)
    if level.kind == "nm":
        return LayerConfig(prune="nm", n=p["n"], m=p["m"], damp=damp)
    if level.kind == "quant":
        return LayerConfig(**quant, damp=damp)
    return LayerConfig(prune="nm", n=p["n"], m=p["m"], **quant, damp=damp)


def apply_unit_level(
    info: LayerInfo,
    weight: np.ndarray,
    hessian: np.ndarray,
    layer: LayerLevels,
    level: Level,
    *,
    num_threads: int | None = None,
) -> UnitResult:
    """Compress one unit (conv group) of ``info`` to ``level`` with :func:`apply_level`, in the
    column order the database was built in; the result is in native order."""
    perm = channels_last_perm(info) if layer.settings.get("column_order") == "channels_last" else None
    if perm is not None:
        weight = np.ascontiguousarray(weight[:, perm])
        hessian = np.ascontiguousarray(hessian[np.ix_(perm, perm)])
    result = apply_level(weight, hessian, level, damp=layer.settings.get("damp", 0.01), num_threads=num_threads)
    new = np.array(result.weight, dtype=np.float32)
    scale = zero = None
    quant_stats: dict = {}
    if isinstance(result, QuantResult):
        new[~np.asarray(result.mask)] = 0.0  # zeros of the (pruned) input stay exactly zero
        scale = np.asarray(result.scale, dtype=np.float32)
        zero = np.asarray(result.zero, dtype=np.uint8)
        quant_stats = {"quant_rows": quantizer_rows(result)}
        if level.kind == "quant":  # a joint level's row_losses are against the dense W, not the pruned input
            quant_stats.update(quant_loss_unrefined=result.loss_unrefined, quant_loss=result.loss)
    if perm is not None:
        native = np.empty_like(new)
        native[:, perm] = new
        new = native
    return UnitResult(weight=new, scale=scale, zero=zero, damp=result.damp, **quant_stats)


# --------------------------------------------------------------------------------------------
# measuring


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
