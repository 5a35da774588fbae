"""Whole-model compression: calibrate, solve every layer, correct statistics, report.

Two calibration modes:

- dense (``sequential=False``, the paper's way): one forward pass over the calibration set with
  hooks on every layer to compress; all Hessians are held at once (sum over layers of
  ``groups * cols^2`` float64), then each layer is solved. One pass, fastest.
- sequential (``sequential=True``): layers are compressed one at a time in execution order
  (discovered by a first pass); each layer's Hessian is collected from a fresh pass through the
  model whose earlier layers are already compressed, so it sees the inputs it will see after
  compression. Only one Hessian is alive at a time. Cost: 1 + (number of layers) passes over the
  calibration set, each stopped right after the layer's last call (layers late in the model cost
  nearly a full forward).

Everything that can be checked is checked before the first weight is written: the recipe
against every layer's shape, the calibration batches (dense mode: all of them; sequential:
one dense pass). Should anything fail later (a singular Hessian, NaN activations produced by a
compressed layer, Ctrl-C), every modified weight, bias and BatchNorm statistic is restored before
the error propagates, unless ``restore_on_error=False``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import _arrays
from .._results import QUANT_METHODS
from ..budget import BUILTIN_COSTS, BudgetSpec, LayerLevels, Level, LevelDatabase
from ._solvers import get_core
from .calibration import Forward, as_batches, model_device, run_calibration
from .checkpoint import as_checkpoint
from .correction import batchnorm_layers, corrected_bias, recalibrate_batchnorm
from .executor_choice import as_executor
from .executors import Executor, LayerJob, UnitSolveError
from .hessian import CalibrationError, LayerHessian, LayerHooks
from .layers import LayerInfo, find_layers, param_key, set_weight_matrix, weight_matrix
from .nonuniform import (
    OBJECTIVES,
    _as_level_spec,
    _build,
    _calibrate,
    _database_layers,
    apply_unit_level,
    as_budget_spec,
    level_config,
    measure_costs,
    select_layers,
    solve_database,
)
from .recipe import LayerConfig, LayerPlan, Recipe, RecipeError, as_recipe
from .report import CompressionReport, LayerReport, QuantGrid
from .solve import UnitResult

__all__ = ["compress", "CompressionError"]

logger = logging.getLogger("obc_native.torch")
# What state a failed run left the model in, on its own channel: the command line, which writes
# nothing then, turns it off so that its error is one line.
failure_logger = logging.getLogger("obc_native.torch.failure")

CORRECTIONS = ("auto", "batchnorm", "bias", None)


class CompressionError(RuntimeError):
    """A layer could not be compressed (e.g. its Hessian is not positive definite)."""


class _Backup:
    """Copies of tensors taken right before they are first modified, to undo a failed run."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, *tensors: torch.Tensor | None) -> None:
        for tensor in tensors:
            if tensor is not None and id(tensor) not in self._saved:
                self._saved[id(tensor)] = (tensor, tensor.detach().clone())

    def __len__(self) -> int:
        return len(self._saved)

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in self._saved.values():
                tensor.copy_(copy)
        self._saved.clear()


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every name it is reachable under (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _plan(model: nn.Module, recipe: Recipe) -> dict[str, LayerPlan]:
    layers = find_layers(model)
    if not layers:
        raise RecipeError("the model has no supported layers (nn.Linear, nn.Conv1d, nn.Conv2d, HF Conv1D)")
    plans = recipe.resolve(layers)
    owners = _shared_weights(model)
    for name, plan in plans.items():
        if plan.config is None:
            continue
        names = owners.get(id(plan.info.module.weight), [])
        others = [n for n in names if n != param_key(name, "weight")]
        if others:
            reason = f"weight is shared with {', '.join(others)} (tied); not compressed"
            logger.warning("layer %r: %s", name, reason)
            plans[name] = LayerPlan(plan.info, None, reason)
    if not any(plan.config is not None for plan in plans.values()):
        listing = "; ".join(f"{n}: {p.reason}" for n, p in plans.items())
        raise RecipeError(f"no layer matches the recipe, nothing to compress ({listing})")
    return plans


def _resolve_correction(model: nn.Module, correction: str | None) -> str | None:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if correction == "auto":
        return "batchnorm" if batchnorm_layers(model) else "bias"
    return correction


class _LayerCompressor:
    """Solves layers one by one and writes them back into the model."""

    def __init__(
        self, *, correction: str | None, baseline: bool, num_threads: int | None, backup: _Backup,
        executor: Executor | None = None,
    ):
        self.core = get_core()
        self.correction = correction
        self.baseline = baseline
        self.num_threads = num_threads
        self.backup = backup
        self.executor = executor or as_executor("local")

    def job(self, plan: LayerPlan, stats: LayerHessian, level: tuple[LayerLevels, Level] | None = None) -> LayerJob:
        """The solves of ``run(plan, stats, level=level)``, for the executor (submit ahead with
        ``self.executor.submit_layer``)."""
        info, config = plan.info, plan.config
        baseline = self.baseline and not config.is_baseline
        dense = weight_matrix(info).to(torch.float32).cpu().numpy()
        apply_level = apply_unit_level if level is not None else None
        return LayerJob(info, dense, stats.hessians(), config, level, baseline, self.num_threads, apply_level)

    def run(
        self,
        plan: LayerPlan,
        stats: LayerHessian,
        dense_output_mean: np.ndarray | None = None,
        seconds_before: float = 0.0,
        level: tuple[LayerLevels, Level] | None = None,
    ) -> LayerReport:
        """Compress one layer by ``plan.config``, or to a database level ``(layer, level)`` (then
        ``plan.config`` is the level's equivalent configuration, for the report and baseline)."""
        start = time.perf_counter()
        info, config = plan.info, plan.config
        assert config is not None
        job = self.job(plan, stats, level)
        dense = job.dense
        new = np.empty_like(dense)
        rows = info.rows
        loss = 0.0
        baseline_loss = 0.0 if (self.baseline or config.is_baseline) else None
        damps, scales, zeros, units = [], [], [], []
        try:  # the solves, by the executor (here, or its tasks over units and row ranges)
            solutions = self.executor.layer_solution(job, core=self.core)
        except UnitSolveError as failed:
            g, err = failed.unit, failed.error
            where = f"layer {info.name!r}" + (f" (group {g} of {info.groups})" if info.groups > 1 else "")
            raise CompressionError(f"{where}: {err}") from err
        for g, solution in enumerate(solutions):
            result, unit_loss = solution.result, solution.loss
            if config.is_baseline:
                baseline_loss += unit_loss
            elif baseline_loss is not None:
                baseline_loss += solution.baseline_loss
            new[g * rows : (g + 1) * rows] = result.weight
            loss += unit_loss
            damps.append(result.damp)
            units.append(result)
            scales.append(result.scale)
            zeros.append(result.zero)

        new[new == 0] = 0.0  # no negative zeros: masks on disk are "bits != 0"
        module = info.module
        self.backup.save(module.weight, getattr(module, "bias", None))
        set_weight_matrix(info, torch.from_numpy(new))
        bias_corrected = False
        if self.correction == "bias" and isinstance(getattr(module, "bias", None), torch.Tensor):
            bias = module.bias.detach().to(torch.float64).cpu().numpy()
            target = corrected_bias(bias, dense, new, stats.input_mean(), dense_output_mean)
            with torch.no_grad():
                module.bias.copy_(torch.from_numpy(target).to(module.bias.dtype))
            bias_corrected = True

        grid = None
        if config.bits is not None:
            grid = QuantGrid(
                bits=config.bits,
                sym=config.sym,
                group_size=config.group_size or info.cols,
                column_order="channels_last" if info.is_conv else "native",
                scale=np.concatenate(scales, axis=0),
                zero=np.concatenate(zeros, axis=0),
            )
        present = [d for d in damps if d is not None]
        return LayerReport(
            name=info.name,
            kind=info.kind,
            shape=info.weight_shape,
            mode=config.label,
            method=config.method,
            sparsity=float(np.mean(new == 0)),
            bits=config.bits,
            loss=loss,
            baseline_loss=baseline_loss,
            damp=max(present) if present else None,
            samples=stats.n,
            seconds=seconds_before + time.perf_counter() - start,
            bias_corrected=bias_corrected,
            config=_config_dict(config),
            grid=grid,
            **_quantizer_fields(units),
        )


def _quantizer_fields(units: list[UnitResult]) -> dict[str, Any]:
    """LayerReport's quant_rows / quant_loss_unrefined / quant_loss summed over a layer's units
    (empty when no unit recorded its quantizers)."""
    if any(unit.quant_rows is None for unit in units):
        return {}
    rows: dict[str, int] = {}
    for unit in units:
        for name, count in unit.quant_rows.items():
            rows[name] = rows.get(name, 0) + count
    fields: dict[str, Any] = {"quant_rows": {name: rows[name] for name in QUANT_METHODS if name in rows}}
    for key in ("quant_loss_unrefined", "quant_loss"):
        values = [getattr(unit, key) for unit in units]
        fields[key] = None if None in values else float(sum(values))
    return fields


def _config_dict(config: LayerConfig) -> dict[str, Any]:
    return asdict(config)


def _skipped_report(plan: LayerPlan) -> LayerReport:
    info = plan.info
    return LayerReport(name=info.name, kind=info.kind, shape=info.weight_shape, mode="skipped", skipped=plan.reason)


def _never_called(stats: Mapping[str, int], what: str) -> None:
    missing = [name for name, count in stats.items() if count == 0]
    if missing:
        raise CalibrationError(
            f"layer(s) {missing} were never called during the {what}; they cannot be calibrated "
            "(skip them in the recipe)"
        )


def _on_failure(err: BaseException, backup: _Backup, restore_on_error: bool) -> None:
    """Undo a failed run (unless told not to) and note on the error what state the model is in."""
    if not len(backup):
        note = "compression failed before any weight was modified; the model is unchanged"
    elif restore_on_error:
        backup.restore()
        note = "compression failed; the model was restored to its original weights"
    else:
        note = "compression failed; the model is PARTIALLY compressed (restore_on_error=False)"
    failure_logger.error(note)
    if hasattr(err, "add_note"):
        err.add_note(f"obc_native: {note}")


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
    *,
    budget: str | BudgetSpec | None = None,
    database: LevelDatabase | str | os.PathLike | None = None,
    levels: Any = None,
    objective: str = "auto",
    stitch: bool = False,
    loss_fn: Any = None,
    damp: float = 0.01,
    sequential: bool = False,
    forward: Forward | None = None,
    correction: str | None = "auto",
    baseline: bool = True,
    num_threads: int | None = None,
    quiet: bool = False,
    restore_on_error: bool = True,
    executor: str | Executor = "local",
    checkpoint: str | os.PathLike | None = None,
) -> CompressionReport:
    """Compress ``model`` in place following ``recipe``, or non-uniformly within ``budget``;
    returns a :class:`CompressionReport`.

    Args:
        model: any ``nn.Module``; its Linear, Conv1d, Conv2d and Hugging Face Conv1D layers are
            candidates. Layers whose weight is tied to another parameter are skipped (reported).
        calibration: iterable of batches (tensors, tuples or dicts; see ``calibration.py``).
        recipe: a :class:`Recipe`, a :class:`LayerConfig` for all layers, a dict, or a path to
            a JSON / YAML recipe file. With a ``budget`` it only selects the layers (its skip
            patterns, and layers no rule matches, are left out; see ``select_layers``).
        budget: non-uniform compression: a total-cost budget such as "flops=2x" (2x fewer FLOPs
            than the dense layers), "params=2x", "bits=4.5" (bits per weight on average) or an
            absolute "flops=1e6", or a BudgetSpec (see ``obc_native.budget``). The level database
            (every level of every layer with its loss and costs, see ``nonuniform.py``) is built
            from the calibration pass, or taken from ``database``; the DP solver picks one level
            per layer minimizing the total loss with total cost <= budget; each layer is then
            compressed to its level. ``report.budget`` and each layer's ``level``,
            ``level_costs`` and ``model_loss`` describe the choice; ``report.database`` holds the
            database (save it with ``report.database.save(path)``).
        database: a LevelDatabase or the path of a saved one, instead of building it; it must
            match the model's layers (LevelDatabaseError otherwise). Budget mode only, as are:
        levels: what levels to build (``LevelSpec`` or dict; default ``LevelSpec.preset`` of the
            budget's cost type); objective: "auto", "layer", "normalized" or "model" (see
            ``nonuniform.OBJECTIVES``); stitch, loss_fn: compute stitched model losses while
            building (see ``build_database``); damp: relative damping of the database's solves.
            Budget errors are raised before any weight is modified: InfeasibleBudgetError (a
            ValueError stating the smallest achievable cost), ValueError for an unknown cost type
            or a negative budget, LevelDatabaseError for a database of another model.
        sequential: calibrate each layer on the outputs of the already-compressed earlier layers
            (see the module docstring for the cost); default: one pass over the dense model.
        forward: optional ``forward(model, batch)`` replacing the default call of the model.
        correction: "auto" (BatchNorm re-estimation if the model has BatchNorm, else bias
            correction), "batchnorm", "bias", or None.
        baseline: also compute ``baseline_loss`` (magnitude / RTN) for every layer.
        num_threads: threads for the solvers (None: the core's default; at most 1024).
        quiet: no progress bar.
        restore_on_error: undo every modification if compression fails part way.
        executor: where calibration and solves run: "local" (this process), "ray" (a Ray
            cluster: the one ``ray.init`` connected to, or a new local one), or an executor
            object such as ``RayExecutor(address="head:6379")`` (see ``torch/executors.py``).
            Results are bit-identical to a local run.
        checkpoint: a directory: each finished layer is written there, and a rerun of the same
            compression (same model, recipe and mode) resumes after a crash without redoing the
            layers found there (see ``torch/checkpoint.py``). Not with a budget.
    """
    if num_threads is not None:
        _arrays.as_threads(num_threads)  # a bad count fails here, not as the first layer's solver error
    executor = as_executor(executor)
    if budget is not None:
        if sequential:
            raise ValueError("sequential: not supported with a budget (the level database is built on the dense model)")
        if checkpoint is not None:
            raise ValueError("checkpoint: not supported with a budget (the level database is rebuilt on a rerun)")
        return _compress_budget(
            model, calibration, recipe, budget=budget, database=database, levels=levels, objective=objective,
            stitch=stitch, loss_fn=loss_fn, damp=damp, forward=forward, correction=correction, baseline=baseline,
            num_threads=num_threads, quiet=quiet, restore_on_error=restore_on_error, executor=executor,
        )
    if database is not None or levels is not None or stitch or loss_fn is not None:
        raise ValueError("database, levels, stitch and loss_fn apply to non-uniform compression: pass budget=")
    if recipe is None:
        raise ValueError("recipe: expected a recipe (or a budget such as budget='flops=2x'), got None")
    start = time.perf_counter()
    recipe = as_recipe(recipe)
    plans = _plan(model, recipe)
    correction = _resolve_correction(model, correction)
    batches = as_batches(calibration)
    targets = {name: plan for name, plan in plans.items() if plan.config is not None}
    infos: dict[str, LayerInfo] = {name: plan.info for name, plan in targets.items()}
    device = model_device(model)
    report = CompressionReport(calibration="sequential" if sequential else "dense", correction=correction)
    get_core()  # fail early if the solvers are missing
    executor.start(quiet=quiet)  # a missing ray package or an unreachable cluster fails here, before any work
    saved = as_checkpoint(checkpoint, {"recipe": recipe, "sequential": sequential, "correction": correction,
                                       "baseline": baseline}, infos)

    training = {module: module.training for module in model.modules()}
    backup = _Backup()
    compressor = _LayerCompressor(
        correction=correction, baseline=baseline, num_threads=num_threads, backup=backup, executor=executor
    )
    progress = tqdm(total=len(targets), desc="obc", unit="layer", disable=quiet or executor.shows_progress, leave=False)
    try:
        model.eval()
        if not sequential:
            hooks = executor.calibrate(model, infos, batches, device=device, forward=forward)
            report.batches = hooks.batches
            report.passes = 1
            _never_called({n: hooks.hessians[n].n for n in infos}, "calibration pass")
            for name in hooks.order if executor.runs_ahead else ():  # a cluster solves them all at once
                if not saved.done(name):
                    executor.submit_layer(compressor.job(targets[name], hooks.hessians[name]))
            for name in hooks.order:
                progress.set_postfix_str(name)
                if saved.done(name):
                    hooks.hessians.pop(name)
                    report.layers.append(saved.restore(infos[name], backup.save))
                    progress.update(1)
                    continue
                layer = compressor.run(targets[name], hooks.hessians.pop(name))
                saved.save(infos[name], layer)
                report.layers.append(layer)
                progress.set_postfix_str(f"{name} loss={layer.loss:.4g}")
                progress.update(1)
        else:
            with LayerHooks(infos, hessians=False, output_means=correction == "bias", record_order=True) as trace:
                report.batches = run_calibration(model, batches, trace, device=device, forward=forward)
            report.passes = 1
            _never_called(trace.calls, "calibration pass")
            calls = dict(trace.calls)
            for name in trace.order:
                progress.set_postfix_str(name)
                if saved.done(name):  # written back, so that later layers calibrate on it
                    report.layers.append(saved.restore(infos[name], backup.save))
                    progress.update(1)
                    continue
                layer_start = time.perf_counter()
                with LayerHooks({name: infos[name]}, stop_after={name: calls[name]}) as hooks:
                    run_calibration(model, batches, hooks, device=device, forward=forward)
                report.passes += 1
                dense_mean = trace.outputs[name].mean() if correction == "bias" else None
                layer = compressor.run(
                    targets[name], hooks.hessians[name], dense_mean, time.perf_counter() - layer_start
                )
                saved.save(infos[name], layer)
                report.layers.append(layer)
                progress.set_postfix_str(f"{name} loss={layer.loss:.4g}")
                progress.update(1)
        if correction == "batchnorm":
            for norm in batchnorm_layers(model).values():
                backup.save(norm.running_mean, norm.running_var, norm.num_batches_tracked)
            recalibrate_batchnorm(model, batches, device=device, forward=forward)
            report.passes += 1
    except BaseException as err:
        _on_failure(err, backup, restore_on_error)
        raise
    finally:
        progress.close()
        executor.close()
        for module, flag in training.items():
            module.train(flag)

    report.layers += [_skipped_report(plan) for plan in plans.values() if plan.config is None]
    report.seconds = time.perf_counter() - start
    logger.info(
        "compressed %d layer(s), skipped %d, in %.2f s", len(report.compressed), len(report.skipped), report.seconds
    )
    return report


def _dense_level_report(info: LayerInfo, stats: LayerHessian) -> LayerReport:
    """A layer the budget leaves dense: its weights are not touched."""
    return LayerReport(
        name=info.name,
        kind=info.kind,
        shape=info.weight_shape,
        mode="dense",
        method="obc",
        sparsity=float((weight_matrix(info) == 0).float().mean()),
        loss=0.0,
        baseline_loss=0.0,
        samples=stats.n,
    )


def _compress_budget(
    model: nn.Module,
    calibration: Any,
    recipe: Any,
    *,
    budget: Any,
    database: Any,
    levels: Any,
    objective: str,
    stitch: bool,
    loss_fn: Any,
    damp: float,
    forward: Forward | None,
    correction: str | None,
    baseline: bool,
    num_threads: int | None,
    quiet: bool,
    restore_on_error: bool,
    executor: Executor,
) -> CompressionReport:
    """compress() with a budget: database (built or given), DP solve, each layer to its level."""
    start = time.perf_counter()
    spec = as_budget_spec(budget)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if objective == "model" and database is None and not stitch:
        raise ValueError("objective: 'model' needs stitched model losses: pass stitch=True (or such a database)")
    solution = None
    if database is not None:
        if levels is not None or stitch or loss_fn is not None:
            raise ValueError("levels, stitch and loss_fn apply when building a database, not with database=")
        if isinstance(database, (str, os.PathLike)):
            database = LevelDatabase.load(database)
        elif not isinstance(database, LevelDatabase):
            raise TypeError(f"database: expected a LevelDatabase or a path, got {type(database).__name__}")
        infos, left_out = _database_layers(model, database, recipe)
        solution = solve_database(database, spec, objective=objective)  # infeasible budgets fail here
    else:
        if spec.cost not in BUILTIN_COSTS:
            raise ValueError(
                f"cost: unknown cost type {spec.cost!r}; a database built here has {list(BUILTIN_COSTS)} "
                "(attach other costs with LevelDatabase.add_cost and pass database=)"
            )
        level_spec = _as_level_spec(levels, spec.cost)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(output, batch), got {type(loss_fn).__name__}")
        infos, left_out = select_layers(model, recipe=recipe)
    correction = _resolve_correction(model, correction)
    batches = as_batches(calibration)
    device = model_device(model)
    report = CompressionReport(calibration="dense", correction=correction)
    get_core()
    executor.start(quiet=quiet)

    training = {module: module.training for module in model.modules()}
    backup = _Backup()
    compressor = _LayerCompressor(
        correction=correction, baseline=baseline, num_threads=num_threads, backup=backup, executor=executor
    )
    progress = None
    try:
        model.eval()
        hessians, applications, order, report.batches = _calibrate(model, infos, batches, forward, executor)
        report.passes = 1
        if database is None:
            database = _build(
                model, infos, hessians, applications, order, level_spec, damp=damp, stitch=stitch, loss_fn=loss_fn,
                batches=batches, batch_count=report.batches, forward=forward, num_threads=num_threads, quiet=quiet,
                executor=executor,
            )
            if stitch:
                report.passes += 1 + sum(len(layer.levels) - 1 for layer in database)  # dense reference + levels
            solution = solve_database(database, spec, objective=objective)
        progress = tqdm(total=len(infos), desc="obc", unit="layer", disable=quiet or executor.shows_progress, leave=False)
        for name in [n for n in order if n in infos] if executor.runs_ahead else ():  # a cluster: all at once
            if solution.choice[name].kind != "dense":
                layer, level = database[name], solution.choice[name]
                plan = LayerPlan(infos[name], level_config(level, layer.settings.get("damp", 0.01)))
                executor.submit_layer(compressor.job(plan, hessians[name], (layer, level)))
        for name in [n for n in order if n in infos]:
            progress.set_postfix_str(name)
            layer_start = time.perf_counter()
            info, layer, level = infos[name], database[name], solution.choice[name]
            stats = hessians.pop(name)
            if level.kind == "dense":
                row = _dense_level_report(info, stats)
            else:
                plan = LayerPlan(info, level_config(level, layer.settings.get("damp", 0.01)))
                row = compressor.run(plan, stats, level=(layer, level))
            row.seconds = time.perf_counter() - layer_start
            row.level = level.label
            row.level_costs = dict(level.costs)
            row.model_loss = level.model_loss
            report.layers.append(row)
            progress.update(1)
        if correction == "batchnorm":
            for norm in batchnorm_layers(model).values():
                backup.save(norm.running_mean, norm.running_var, norm.num_batches_tracked)
            recalibrate_batchnorm(model, batches, device=device, forward=forward)
            report.passes += 1
    except BaseException as err:
        _on_failure(err, backup, restore_on_error)
        raise
    finally:
        if progress is not None:
            progress.close()
        executor.close()
        for module, flag in training.items():
            module.train(flag)

    report.layers += [
        _skipped_report(LayerPlan(info, None, left_out[name]))
        for name, info in find_layers(model).items()
        if name in left_out
    ]
    quantized = {
        name: (level.params["bits"], level.params["group_size"])
        for name, level in solution.choice.items()
        if level.kind in ("quant", "joint")
    }
    achieved = measure_costs(model, database, quantized=quantized)
    if solution.cost_type in achieved and achieved[solution.cost_type] > solution.budget:
        logger.warning(
            "the compressed layers' %s (%.6g) exceed the budget %.6g: the database was built on other "
            "calibration data", solution.cost_type, achieved[solution.cost_type], solution.budget,
        )
    report.budget = {
        "spec": solution.spec,
        "cost_type": solution.cost_type,
        "budget": solution.budget,
        "cost": solution.cost,
        "dense_cost": solution.dense_cost,
        "min_cost": solution.min_cost,
        "objective": solution.loss_source if not solution.normalized else "normalized",
        "loss": solution.loss,
        "layer_loss": solution.layer_loss,
        "achieved": achieved,
    }
    report.database = database
    report.seconds = time.perf_counter() - start
    logger.info(
        "compressed %d layer(s) within %s (%s %.6g of budget %.6g), skipped %d, in %.2f s",
        len(report.compressed), solution.spec, solution.cost_type, solution.cost, solution.budget,
        len(report.skipped), report.seconds,
    )
    return report
