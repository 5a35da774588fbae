"""Level databases of whole models: which levels to build (:class:`LevelSpec`), building them
from one calibration pass (:func:`build_database`), and matching a database to a model.

A *level database* (:class:`obc_native.level_database.LevelDatabase`) lists, for every layer to
compress, its compression levels (dense, sparsities, N:M, bit widths, ...) with their exact layer
losses and costs. Layer geometry (see ``layers.py``): a layer's database entry is its whole
``out_features x cols`` weight matrix (``cols = C * K`` for convolutions); conv groups are solved
separately and summed. Convolutions are solved in the channels-last column order
``(kh, kw, c_in)``, as ``compress`` does, so N:M groups, blocks and quantization groups run along
input channels at one kernel position; N:M and block levels are left out
(``LayerLevels.skipped``) when ``m`` or the block does not divide the input channels per group.
``flops_per_weight``: see ``level_calibration.py``; stitched model losses: ``stitching.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import _arrays
from ..costs import level_costs
from ..layer_solve import from_solver_columns, to_solver_columns
from ..level_builder import DEFAULT_SPARSITIES, build_layer_levels
from ..level_database import LevelDatabase, LevelDatabaseError
from ..layer_config import PRUNE_METHODS, LayerConfig
from ..levels import QUANT_LEVEL_METHODS, LayerLevels, Level
from .calibration import Forward, TokenMask, as_batches, as_token_mask, model_device
from .executor_choice import as_executor
from .executors import shipped_info
from .hessian import LayerHessian
from .hessian_memory import ACCUMULATION_COPIES, HessianMemoryError, format_bytes, hessian_bytes, resolve_budget
from .layer_selection import select_layers
from .layers import LayerInfo, channels_last_perm, find_layers, weight_matrix
from .level_calibration import _calibrate
from .stitching import _Stitcher

__all__ = ["LevelSpec", "build_database", "check_database", "load_database"]

logger = logging.getLogger("obc_native.torch")


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
        prune_method: the pruner of the sparsity, N:M and joint levels: "exact" (ExactOBS, the
            default) or "sparsegpt" (SparseGPT, for wide layers; see ``build_layer_levels``);
            recorded in those levels' params (databases saved before it load as "exact").

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
    prune_method: str = "exact"

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
        _arrays.as_choice(self.prune_method, "prune_method", PRUNE_METHODS)
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
        if data["prune_method"] == "exact":  # the default: a database's meta stays as it was before the choice
            del data["prune_method"]
        return data


def _as_level_spec(levels: Any, cost: str | None = None) -> LevelSpec:
    if levels is None:
        return LevelSpec.preset(cost)
    if isinstance(levels, LevelSpec):
        return levels
    if isinstance(levels, Mapping):
        return LevelSpec.from_dict(levels)
    raise TypeError(f"levels: expected a LevelSpec, a dict of its fields or None, got {type(levels).__name__}")


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
    nm = [(n, m) for n, m in spec.nm if span % m == 0]
    joint = [(n, m, b) for n, m, b in spec.joint if span % m == 0]

    def label(**config) -> str:
        return Level.of(LayerConfig(**config, prune_method=spec.prune_method), 0.0, {}).label

    for n, m, *bits in [*spec.nm, *spec.joint]:
        if span % m:
            quant = {"bits": bits[0], "sym": spec.sym, "group_size": spec.group_size} if bits else {}
            skipped.append((label(prune="nm", n=n, m=m, **quant), f"m {m} does not divide the {span_name} ({span})"))
    sparsities = spec.sparsities
    if spec.block is not None and span % spec.block:
        reason = f"block {spec.block} does not divide the {span_name} ({span})"
        skipped += [(label(prune="blocked", block=spec.block, sparsity=s), reason) for s in sparsities]
        sparsities = ()
    options = dict(
        sparsities=sparsities, block=spec.block, nm=nm, bits=spec.bits, joint=joint, sym=spec.sym,
        group_size=spec.group_size, grid=spec.grid, damp=damp, spread=spec.spread,
        quant_method=spec.quant_method, refine=spec.refine, prune_method=spec.prune_method,
        flops_per_weight=applications, act_bits=spec.act_bits, keep_weights=keep_weights, num_threads=num_threads,
    )
    perm = channels_last_perm(info)
    rows = info.rows
    units = []
    for g, hessian in enumerate(hessians):
        unit, hessian = to_solver_columns(np.ascontiguousarray(dense[g * rows : (g + 1) * rows]), hessian, perm)
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
        config = first.config()
        quantized = config is not None and config.bits is not None
        costs = level_costs(
            shape, nnz, bits=config.bits if quantized else None, group_size=config.group_size if quantized else None,
            flops_per_weight=applications, act_bits=spec.act_bits,
        )
        weight = None
        if keep_weights:
            weight = from_solver_columns(np.concatenate([p.weight for p in parts], axis=0), perm)
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
    token_mask: TokenMask = "auto",
) -> LevelDatabase:
    """The database from collected Hessians (layers in call order); the layers' levels are
    computed by ``executor`` (default here; one task per layer). ``token_mask``: the padding
    positions left out of the stitched losses' squared error."""
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
            stitcher = _Stitcher(model, batches, model_device(model), forward, loss_fn, token_mask)

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


def _check_hessian_memory(infos: Mapping[str, LayerInfo], hessian_memory: Any, device: torch.device) -> None:
    """HessianMemoryError when the Hessians of ``infos``, all held at once, exceed ``hessian_memory``."""
    budget = resolve_budget(hessian_memory, device)
    if budget.limit is None:
        return
    needs = {name: ACCUMULATION_COPIES * hessian_bytes(info) for name, info in infos.items()}
    total = sum(needs.values())
    if total > budget.limit:
        largest = max(needs, key=needs.__getitem__)
        raise HessianMemoryError(
            f"hessian_memory: the Hessians of {len(infos)} layer(s) need {format_bytes(total)} at once (each counted "
            f"twice: the running total and one batch's partial sum; the largest, {largest!r}, "
            f"{format_bytes(needs[largest])}), more than {budget.origin} allows; a level database holds every "
            "layer's Hessian at once: pass a larger hessian_memory or select fewer layers (layers=, skip=, recipe=)"
        )


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
    token_mask: TokenMask = "auto",
    num_threads: int | None = None,
    quiet: bool = False,
    executor: Any = "local",
    hessian_memory: int | str = "auto",
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
        token_mask: which positions of padded token batches count, as for :func:`compress`
            (the Hessians and the stitched losses' squared error; not ``flops_per_weight``).
        num_threads: threads for the solvers; quiet: no progress bar.
        executor: "local", "ray" or an executor object (see :func:`compress`): the calibration
            shards and each layer's levels run there; the database is bit-identical.
        hessian_memory: the most memory the Hessians may take at once, as for :func:`compress`
            (bytes, a string such as "8GiB", or "auto"). The database holds every layer's
            Hessian at once (no input sharing here): HessianMemoryError (a ValueError) before
            the calibration pass when they do not fit.
    Returns:
        a LevelDatabase, layers in execution order; ``db.save(path)`` writes it.
    """
    spec = _as_level_spec(levels)
    damp = _arrays.as_damp(damp)
    if num_threads is not None:
        _arrays.as_threads(num_threads)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(output, batch), got {type(loss_fn).__name__}")
    token_mask = as_token_mask(token_mask)
    infos, _ = select_layers(model, recipe=recipe, layers=layers, skip=skip)
    _check_hessian_memory(infos, hessian_memory, model_device(model))
    batches = as_batches(calibration)
    executor = as_executor(executor)
    executor.start(quiet=quiet)  # a missing ray package or an unreachable cluster fails here, before any work
    try:
        hessians, applications, order, count = _calibrate(model, infos, batches, forward, executor, token_mask)
        return _build(
            model, infos, hessians, applications, order, spec, damp=damp, stitch=stitch, loss_fn=loss_fn,
            batches=batches, batch_count=count, forward=forward, num_threads=num_threads, quiet=quiet,
            executor=executor, token_mask=token_mask,
        )
    finally:
        executor.close()

