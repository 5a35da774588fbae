"""Whole-model compression: calibrate, solve every layer, correct statistics, report.

:func:`compress` (a recipe) and :func:`compress_to_budget` (a level database and a budget) both
turn into a plan ``{layer name: LayerConfig}`` executed by one loop (:class:`_Run`): calibrate ->
for each layer: solve -> write back -> bias correction; then BatchNorm re-estimation, undo on
error, report (with where the time went: ``report.time_line()``). :func:`recipe_plan` and
:func:`budget_plan` return the plan without running it; :func:`compress` accepts a plan in place
of a recipe. A layer of a level database is solved to its level's configuration
(``Level.config``); what the loop needs beyond the plan (the layer's shapes, the database's
column order and the level's costs for the report) it looks up itself.

Layers that read the same input tensor in a forward pass (the query, key and value projections
of an attention block; in general any layers called on one tensor object, unchanged in between,
that they unfold into the same samples) share one Hessian: it is accumulated once. The results
are those of separate accumulation, bit for bit.

Where the dense calibration pass and the solves run is the ``executor``'s business (see
``executors.py``): this process (default), or a Ray cluster (calibration shards, and every
layer's solves as tasks over (unit, row range), submitted ahead); the results are bit-identical.
With ``checkpoint=`` each finished layer is written to a directory, and a rerun resumes there.

Two calibration modes:

- dense (``sequential=False``, the paper's way): one forward pass over the calibration set with
  hooks on every layer to compress; all Hessians are held at once (sum over distinct inputs of
  ``groups * cols^2`` float64), then each layer is solved. One pass, fastest. When they exceed
  ``hessian_memory`` (default: 75% of the available memory; ``hessian_memory.py``), the pass is
  split into groups of layers in execution order, each group's Hessians from a pass of its own
  over the dense model (the layers solved so far have their dense weights swapped back in for
  it), freed before the next: bit for bit the one-pass result, at the cost of more passes.
- sequential (``sequential=True``): layers are compressed one at a time in execution order
  (discovered by a first pass); each layer's Hessian is collected from a fresh pass through the
  model whose earlier layers are already compressed, so it sees the inputs it will see after
  compression. Layers sharing an input (each called once per forward) share that pass. Only one
  Hessian is alive at a time. Cost: 1 + (number of distinct inputs) passes over the calibration
  set, each stopped right after the last call of the layer it calibrates (layers late in the
  model cost nearly a full forward). With ``cache_outputs=True`` (opt-in) the modules already
  finished are looked up instead of recomputed (``output_cache.py``): same results, each pass
  runs only from the last finished module to the layer it calibrates.

Everything that can be checked is checked before the first weight is written: the recipe
against every layer's shape, the calibration batches (dense mode: all of them; sequential:
one dense pass). Should anything fail later (a singular Hessian, NaN activations produced by a
compressed layer, Ctrl-C), every modified weight, bias and BatchNorm statistic is restored before
the error propagates, unless ``restore_on_error=False``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import _arrays
from .._results import QUANT_METHODS
from ..budget import BUILTIN_COSTS, BudgetSpec, LayerLevels, Level, LevelDatabase
from ._solvers import get_core
from .calibration import Forward, TokenMask, as_batches, as_token_mask, model_device, run_calibration
from .checkpoint import NoCheckpoint, as_checkpoint
from .correction import batchnorm_layers, corrected_bias, recalibrate_batchnorm
from .executor_choice import as_executor
from .executors import Executor, LayerJob, UnitSolveError
from .hessian import CalibrationError, LayerHessian, LayerHooks
from .hessian_memory import (
    ACCUMULATION_COPIES, HessianMemoryError, format_bytes, hessian_bytes, resolve_budget, split_in_groups,
)
from .output_cache import ModuleTrace, OutputCache
from .embeddings import EmbeddingRule, quantize_embedding, resolve_embeddings
from .layers import LayerInfo, find_layers, set_weight_matrix, weight_matrix
from .budgeting import OBJECTIVES, as_budget_spec, check_budget_reachable, measure_costs, solve_database
from .database import _as_level_spec, _build, _database_layers
from .layer_selection import left_out_layers, select_layers
from .level_calibration import _Applications
from .recipe import LayerConfig, LayerPlan, Recipe, RecipeError, as_recipe, is_plan, resolve_plan
from .report import CompressionReport, LayerReport, QuantGrid
from .solve import UnitResult

__all__ = ["compress", "compress_to_budget", "recipe_plan", "budget_plan", "CompressionError"]

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

    def keys(self) -> set[int]:
        """Which tensors are saved (by id)."""
        return set(self._saved)

    @contextmanager
    def originals(self, keep: set[int] = frozenset()) -> Iterator[None]:
        """Every saved tensor but those in ``keep`` (ids) holds its original values for the
        duration: the saved copy is swapped in as its storage (no copy made), and the current
        values are swapped back on exit, also on error. Split dense calibration runs its passes
        on the dense model this way (see ``_Run.compress_in_groups``)."""
        swapped = [(tensor, copy) for key, (tensor, copy) in self._saved.items() if key not in keep]
        current: list[torch.Tensor] = []
        try:
            for tensor, copy in swapped:
                current.append(tensor.data)
                tensor.data = copy
            yield
        finally:
            for (tensor, _), data in zip(swapped, current):
                tensor.data = data

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in self._saved.values():
                tensor.copy_(copy)
        self._saved.clear()


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# Elements per exact finiteness check: a boolean temporary of at most 1 MiB.
_FINITE_CHUNK = 1 << 20


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor (any shape, device, layout) is finite,
    without a temporary of the tensor's size (torch.isfinite(t).all() makes one of t.numel()
    bytes: 131 MB for a 32000 x 4096 embedding).

    Fast path: a sum is finite only if every term is (NaN and Inf propagate), and a reduction
    needs no full-size temporary. A non-finite sum can also come from finite values overflowing
    (easily in float16), so then each chunk of at most _FINITE_CHUNK elements is checked exactly.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return _all_finite_chunked(tensor)


def _all_finite_chunked(tensor: torch.Tensor) -> bool:
    if tensor.dim() == 0 or tensor.numel() <= _FINITE_CHUNK:
        return bool(torch.isfinite(tensor).all())
    if tensor.is_contiguous():  # a flat view: chunks of exactly _FINITE_CHUNK elements
        flat = tensor.view(-1)
        return all(
            bool(torch.isfinite(flat[start : start + _FINITE_CHUNK]).all())
            for start in range(0, flat.numel(), _FINITE_CHUNK)
        )
    # strided: views of whole sub-tensors along the first dimension, as many as fit in a chunk,
    # or one sub-tensor at a time (recursively, one dimension less) when one alone does not fit
    inner = tensor[0].numel()
    if inner > _FINITE_CHUNK:
        return all(_all_finite_chunked(tensor[index]) for index in range(tensor.shape[0]))
    step = _FINITE_CHUNK // inner
    return all(
        bool(torch.isfinite(tensor[start : start + step]).all()) for start in range(0, tensor.shape[0], step)
    )


def _check_model_tensors(model: nn.Module) -> None:
    """ValueError naming the model's tensors that compression cannot use, before any work.

    - Parameters and buffers created under ``torch.inference_mode()`` (a model built or loaded
      there) refuse in-place writes outside that mode: found only after the first solve
      otherwise, and the undo of the failed run would fail the same way.
    - A NaN or Inf parameter (a diverged checkpoint) would otherwise surface as "calibration
      input contains NaN or Inf" at the next layer, pointing at the data instead.
    """
    if not torch.is_inference_mode_enabled():  # inside it, in-place writes to them are allowed
        named = list(model.named_parameters()) + list(model.named_buffers())
        frozen = [name for name, tensor in named if tensor.is_inference()]
        if frozen:
            raise ValueError(
                f"model: {_listing(frozen)} are inference tensors (created under torch.inference_mode()), which "
                "cannot be written in place outside it; build or load the model outside inference_mode, or call "
                "compress inside torch.inference_mode()"
            )
    with torch.no_grad():
        broken = [
            name for name, param in model.named_parameters() if param.is_floating_point() and not _all_finite(param)
        ]
    if broken:
        raise ValueError(f"model: parameter(s) {_listing(broken)} contain NaN or Inf")


def _plan(model: nn.Module, recipe: Recipe | Mapping[str, LayerConfig | None]) -> dict[str, LayerPlan]:
    """Every supported layer's LayerPlan from a Recipe or a plan ``{name: LayerConfig or None}``
    (checked against the layers' shapes; the layers of :func:`left_out_layers` skipped, e.g. tied
    weights). RecipeError when nothing is left."""
    layers = find_layers(model)
    if not layers:
        if isinstance(recipe, Recipe) and recipe.embeddings:  # only embeddings to quantize
            return {}
        raise RecipeError("the model has no supported layers (nn.Linear, nn.Conv1d, nn.Conv2d, HF Conv1D)")
    plans = recipe.resolve(layers) if isinstance(recipe, Recipe) else resolve_plan(recipe, layers)
    active = {name: plan.info for name, plan in plans.items() if plan.config is not None}
    for name, reason in left_out_layers(model, active).items():
        logger.warning("layer %r: %s", name, reason)
        plans[name] = LayerPlan(plans[name].info, None, reason)
    if not (isinstance(recipe, Recipe) and recipe.embeddings) and not any(plan.config is not None for plan in plans.values()):
        listing = "; ".join(f"{n}: {p.reason}" for n, p in plans.items())
        raise RecipeError(f"no layer matches the recipe, nothing to compress ({listing})")
    return plans


def _resolve_correction(model: nn.Module, correction: str | None) -> str | None:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if correction == "auto":
        return "batchnorm" if batchnorm_layers(model) else "bias"
    return correction


def recipe_plan(
    model: nn.Module, recipe: Recipe | LayerConfig | Mapping[str, Any] | str | os.PathLike
) -> dict[str, LayerConfig]:
    """The plan of ``recipe`` on ``model``: ``{layer name: LayerConfig}`` for every layer it
    compresses, in the model's layer order (skipped and tied layers are left out).

    ``compress(model, calibration, recipe_plan(model, recipe))`` is ``compress(model,
    calibration, recipe)`` (the report's skipped rows then say "not in the plan"). Raises
    RecipeError as :func:`compress` does (every problem of the recipe against the layers).
    """
    plans = _plan(model, as_recipe(recipe))
    return {name: p.config for name, p in plans.items() if p.config is not None}


def _choice_plan(
    database: LevelDatabase, choice: Mapping[str, Level], names: list[str]
) -> dict[str, LayerConfig | None]:
    """``{name: the chosen level's LayerConfig}`` (None for the dense level) for ``names``, with
    the damping the database was built with."""
    plan: dict[str, LayerConfig | None] = {}
    for name in names:
        plan[name] = choice[name].config(database[name].settings.get("damp", 0.01))
    return plan


def budget_plan(
    model: nn.Module,
    database: LevelDatabase | str | os.PathLike,
    budget: str | BudgetSpec,
    *,
    objective: str = "auto",
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
) -> dict[str, LayerConfig | None]:
    """The plan :func:`compress_to_budget` runs for ``database`` and ``budget``: ``{layer name:
    LayerConfig of its chosen level}``, None for a layer left dense, in the database's order.

    Args:
        model: the model the database was built on (LevelDatabaseError otherwise).
        database: a LevelDatabase or the path of a saved one.
        budget, objective, recipe: as in :func:`compress_to_budget`.

    ``compress(model, calibration, plan)`` gives the weights of ``compress_to_budget(model,
    calibration, budget, database=database)`` bit for bit when the database was built in the
    channels-last column order (every database this version builds); the report then lacks the
    level columns. Raises InfeasibleBudgetError (a ValueError) when no choice fits the budget.
    """
    spec = as_budget_spec(budget)
    objective = _arrays.as_choice(objective, "objective", OBJECTIVES)
    database = _as_database(database)
    infos, _ = _database_layers(model, database, recipe)
    solution = solve_database(database, spec, objective=objective)
    return _choice_plan(database, solution.choice, [name for name in database.names if name in infos])


def _as_database(database: Any) -> LevelDatabase:
    if isinstance(database, (str, os.PathLike)):
        return LevelDatabase.load(database)
    if not isinstance(database, LevelDatabase):
        raise TypeError(f"database: expected a LevelDatabase or a path, got {type(database).__name__}")
    return database


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


def _never_called(stats: Mapping[str, int], what: str, hint: str = "skip them in the recipe") -> None:
    missing = [name for name, count in stats.items() if count == 0]
    if missing:
        raise CalibrationError(
            f"layer(s) {missing} were never called during the {what} (or only on batches of 0 samples); "
            f"they cannot be calibrated ({hint})"
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


class _Run:
    """One compression run, recipe or budget: the shared loop and its bookkeeping.

    The loop: calibrate (one pass per group of layers reading the same input) -> for each
    layer: solve -> write back -> bias correction; then BatchNorm re-estimation. It keeps the
    copies to undo a failed run, the report and where the time went.
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Any,
        infos: Mapping[str, LayerInfo],
        *,
        mode: str,
        forward: Forward | None,
        correction: str | None,
        baseline: bool,
        num_threads: int | None,
        quiet: bool,
        restore_on_error: bool,
        executor: Executor,
        checkpoint: NoCheckpoint | None = None,
        token_mask: TokenMask = "auto",
        hessian_memory: Any = "auto",
    ):
        self.start = time.perf_counter()
        self.token_mask = as_token_mask(token_mask)  # a bad option fails before any work
        _check_model_tensors(model)
        self.model = model
        self.infos = infos  # the layers a plan may name
        # name -> (LayerLevels, chosen Level) of a budget run: the database's column order for
        # the solve, the level's label, costs and model loss for the report
        self.levels: dict[str, tuple[LayerLevels, Level]] = {}
        self.correction = _resolve_correction(model, correction)
        self.batches = as_batches(calibration)
        self.device = model_device(model)
        # how many bytes of Hessians the run may hold at once (a bad option fails before any work)
        self.hessian_budget = resolve_budget(hessian_memory, self.device)
        self.forward = forward
        self.baseline = baseline
        self.num_threads = num_threads
        self.threads = {} if num_threads is None else {"num_threads": num_threads}
        self.quiet = quiet
        self.restore_on_error = restore_on_error
        self.report = CompressionReport(calibration=mode, correction=self.correction)
        self.backup = _Backup()
        self.core = get_core()  # fail early if the solvers are missing
        self.executor = executor
        self.saved = checkpoint or NoCheckpoint()

    @contextmanager
    def guarded(self) -> Iterator[None]:
        """Executor started (a missing ray package or an unreachable cluster fails here, before
        any work) and closed after; model in eval mode while running (training flags restored
        after); on any error, undo every modification (unless told not to) before it propagates."""
        self.executor.start(quiet=self.quiet)
        training = {module: module.training for module in self.model.modules()}
        try:
            self.model.eval()
            yield
        except BaseException as err:
            _on_failure(err, self.backup, self.restore_on_error)
            raise
        finally:
            self.executor.close()
            for module, flag in training.items():
                module.train(flag)

    # ---------------------------------------------------------------- calibration

    def calibrate(
        self, infos: Mapping[str, LayerInfo], *, extra: Any = None, begin_batch: Any = None, **options: Any
    ) -> LayerHooks:
        """One pass over the calibration set with :class:`LayerHooks` (``options``) on ``infos``
        and the optional context manager ``extra`` (more hooks); ``begin_batch(index, batch)``
        is called before each batch (see ``run_calibration``); counted in the report."""
        start = time.perf_counter()
        with LayerHooks(infos, **options) as hooks, (extra or nullcontext()):
            self.report.batches = run_calibration(
                self.model, self.batches, hooks, device=self.device, forward=self.forward, begin_batch=begin_batch,
                token_mask=self.token_mask,
            )
        self.report.passes += 1
        self.report.hessian_seconds += hooks.hessian_seconds
        self.report.pass_seconds += time.perf_counter() - start - hooks.hessian_seconds
        return hooks

    def dense_hessians(
        self, infos: Mapping[str, LayerInfo], *, hint: str, counter: Any = None,
        stop_after: Mapping[str, int] | None = None,
    ) -> tuple[dict[str, LayerHessian], list[str], dict[str, int] | None]:
        """Every layer's Hessian from one pass over the dense model (layers reading the same
        input share one object), the layers in call order, and the totals of ``counter`` (a
        context manager class ``counter(infos)`` with ``.totals``, e.g. ``_Applications``;
        None without one). Layers whose inputs were only partly shared get a second pass of
        their own. ``hint``: what to do about a layer the pass never reached (CalibrationError).
        ``stop_after``: ``{name: calls per forward pass}`` to stop each local pass after (see
        ``LayerHooks``; a pass over part of the layers, see :meth:`compress_in_groups`).

        An executor that calibrates elsewhere (Ray: shards of the batches) runs the pass instead;
        its Hessians are accumulated layer by layer, without input sharing (bit for bit the same).
        """
        if self.executor.calibrates_remotely:
            start = time.perf_counter()
            done = self.executor.calibrate(
                self.model, infos, self.batches, device=self.device, forward=self.forward, counter=counter,
                token_mask=self.token_mask,
            )
            self.report.batches = done.batches
            self.report.passes += 1
            self.report.pass_seconds += time.perf_counter() - start
            hessians, order, totals = done.hessians, list(done.order), done.applications
        else:
            counting = counter(infos) if counter is not None else None
            hooks = self.calibrate(
                infos, record_order=True, share_inputs=_SHARE_INPUTS, extra=counting, stop_after=stop_after
            )
            _, mixed = hooks.share_hessians()
            hessians = hooks.hessians
            if mixed:
                stop = None if stop_after is None else {name: stop_after[name] for name in mixed}
                hessians.update(self.calibrate({name: infos[name] for name in mixed}, stop_after=stop).hessians)
            order = list(hooks.order)
            totals = None if counting is None else dict(counting.totals)
        _never_called({name: hessians[name].n for name in infos}, "calibration pass", hint)
        return hessians, order, totals

    # ---------------------------------------------------------------- Hessian memory

    def check_largest_hessian(self, infos: Mapping[str, LayerInfo]) -> None:
        """HessianMemoryError before any pass when the largest Hessian of ``infos`` alone (a
        Hessian is never split; layers sharing one hold it once) exceeds ``hessian_memory``."""
        limit = self.hessian_budget.limit
        if limit is None or not infos:
            return
        needs = {name: ACCUMULATION_COPIES * hessian_bytes(info) for name, info in infos.items()}
        name = max(needs, key=needs.__getitem__)  # the first of the largest
        if needs[name] > limit:
            raise HessianMemoryError(
                f"hessian_memory: layer {name!r} alone needs {format_bytes(needs[name])} to calibrate (its float64 "
                f"Hessian of {format_bytes(needs[name] // ACCUMULATION_COPIES)} and one batch's partial sum), more "
                f"than {self.hessian_budget.origin} allows; pass a larger hessian_memory, or leave the layer out"
            )

    def dense_plan(
        self, infos: Mapping[str, LayerInfo], *, hint: str, split: bool = True, advice: str = ""
    ) -> tuple[list[str], list[list[str]], dict[str, int]] | None:
        """How the dense calibration of ``infos`` fits in ``hessian_memory``; checked before any
        Hessian is accumulated. None: every Hessian fits at once (one pass, as without a limit).
        Else ``(order, groups, calls)``: the layers in call order, consecutive groups of them
        whose Hessians fit together (layers sharing an input in one group), and each layer's
        most calls per forward pass, from a pass without Hessians (counted in the report).

        HessianMemoryError when one Hessian alone does not fit, or, with ``split=False`` (the
        budget runs, which need all at once), when they do not fit together (``advice``: what
        to do then). The bytes of a layer: :data:`ACCUMULATION_COPIES` times its Hessian's.
        """
        budget = self.hessian_budget
        if budget.limit is None:
            return None
        self.check_largest_hessian(infos)
        needs = {name: ACCUMULATION_COPIES * hessian_bytes(info) for name, info in infos.items()}
        if sum(needs.values()) <= budget.limit:
            return None
        # Which layers share an input is known only from a pass: one without Hessians (the
        # executor's remote pass shares nothing, so there every layer is its own unit)
        share = _SHARE_INPUTS and not self.executor.calibrates_remotely
        trace = self.calibrate(infos, hessians=False, record_order=True, share_inputs=share)
        _never_called({name: trace.calls_total(name) for name in infos}, "calibration pass", hint)
        owner, _ = trace.input_owners() if share else ({}, [])
        units: dict[str, list[str]] = {}  # owner -> its layers, in call order
        for name in trace.order:
            units.setdefault(owner.get(name, name), []).append(name)
        total = sum(needs[name] for name in units)
        if total <= budget.limit:
            logger.info(
                "dense calibration: the Hessians fit in %s once layers reading one input share one (%s)",
                budget.origin, format_bytes(total),
            )
            return None
        if not split:
            raise HessianMemoryError(
                f"hessian_memory: the {len(units)} Hessian(s) of {len(infos)} layer(s) need {format_bytes(total)} at "
                f"once, more than {budget.origin} allows; {advice}"
            )
        groups = [
            [name for unit in group for name in units[unit]]
            for group in split_in_groups(((unit, needs[unit]) for unit in units), budget.limit)
        ]
        logger.info(
            "dense calibration in %d groups of layers, one pass each: the Hessians need %s at once, more than %s "
            "allows", len(groups), format_bytes(total), budget.origin,
        )
        return list(trace.order), groups, dict(trace.most_calls)

    def compress_in_groups(
        self, plan: Mapping[str, LayerConfig | None], order: list[str], groups: list[list[str]],
        calls: Mapping[str, int], *, hint: str,
    ) -> None:
        """Dense calibration in ``groups`` of layers (from :meth:`dense_plan`): each group's
        Hessians come from a pass of its own over the dense model, stopped after the group's
        last call, and are freed as their layers are solved, before the next group's pass.

        The layers solved so far are written back as usual, and their dense values swapped in
        for each later pass (:meth:`_Backup.originals`; the embedding tables quantized before
        stay quantized, as in one pass): every Hessian is that of one pass, bit for bit.
        """
        group_of = {name: index for index, group in enumerate(groups) for name in group}
        before = self.backup.keys()  # modified before the layers: stays so in every pass
        hessians: dict[str, LayerHessian] = {}

        def calibrate_group(name: str) -> LayerHessian:
            names = [other for other in groups[group_of[name]] if not self.saved.done(other)]
            with self.backup.originals(keep=before):
                found, _, _ = self.dense_hessians(
                    {other: self.infos[other] for other in names}, hint=hint,
                    stop_after={other: calls[other] for other in names},
                )
            hessians.update(found)
            for other in names if self.executor.runs_ahead else ():  # a cluster solves the group at once
                if plan[other] is not None:  # (its layers still hold their dense weights here)
                    self.executor.submit_layer(self._job(other, plan[other], found[other]))
            return found[name]

        self.compress_layers(plan, order, {name: name for name in order}, hessians, calibrate_group=calibrate_group)

    # ---------------------------------------------------------------- the layer loop

    def compress_layers(
        self,
        plan: Mapping[str, LayerConfig | None],
        order: list[str],
        owner: Mapping[str, str],
        hessians: dict[str, LayerHessian],
        *,
        calibrate_group: Any = None,
        dense_means: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Solve and write back the layers of ``plan`` (``{name: LayerConfig}``; None: left
        dense, reported with its Hessian's sample count) in ``order``. A layer uses the Hessian of
        its ``owner`` (the layer whose input it reads; itself when not shared): from
        ``hessians``, or when missing from ``calibrate_group(owner)`` (a pass over the model
        compressed so far; sequential mode). A Hessian is dropped after its last user."""
        users = Counter(owner[name] for name in order)
        progress = tqdm(
            total=len(order), desc="obc", unit="layer", disable=self.quiet or self.executor.shows_progress, leave=False
        )
        for name in order if self.executor.runs_ahead else ():  # a cluster solves them all at once
            config, source = plan[name], owner[name]
            if config is not None and source in hessians and not self.saved.done(name):
                self.executor.submit_layer(self._job(name, config, hessians[source]))
        try:
            for name in order:
                progress.set_postfix_str(name)
                source = owner[name]
                layer_start = time.perf_counter()
                if self.saved.done(name):  # written back, so that later layers calibrate on it
                    row = self.saved.restore(self.infos[name], self.backup.save)
                else:
                    if source not in hessians:
                        hessians[source] = calibrate_group(source)
                    mean = None if dense_means is None else dense_means[name]
                    row = self.compress_layer(name, plan[name], hessians[source], mean)
                    row.seconds = time.perf_counter() - layer_start
                    self.saved.save(self.infos[name], row)
                self.report.layers.append(row)
                users[source] -= 1
                if not users[source]:
                    hessians.pop(source, None)
                if row.loss is not None:
                    progress.set_postfix_str(f"{name} loss={row.loss:.4g}")
                progress.update(1)
        finally:
            progress.close()

    def _job(self, name: str, config: LayerConfig, stats: LayerHessian) -> LayerJob:
        """The solves of layer ``name`` for the executor: every unit to ``config``
        (``executors.solve_rows``, the one place a unit is solved), in the level database's
        column order for a budget run's layer, and the magnitude / RTN baseline when asked."""
        info = self.infos[name]
        dense = weight_matrix(info).to(torch.float32).cpu().numpy()
        layer, level = self.levels.get(name, (None, None))
        channels_last = layer is None or layer.settings.get("column_order") == "channels_last"
        return LayerJob(
            info, dense, stats.hessians(), config, level, self.baseline and not config.is_baseline, self.num_threads,
            channels_last,
        )

    def compress_layer(
        self, name: str, config: LayerConfig | None, stats: LayerHessian, dense_output_mean: np.ndarray | None
    ) -> LayerReport:
        """Solve layer ``name`` to ``config`` (every unit), write it back, correct its bias; its
        report row (None: the layer stays dense)."""
        start = time.perf_counter()
        info = self.infos[name]
        if config is None:
            row = _dense_report(info, stats)
        else:
            dense, new, row = self._solve_layer(name, config, stats)
            module = info.module
            self.backup.save(module.weight, getattr(module, "bias", None))
            set_weight_matrix(info, torch.from_numpy(new))
            self.report.solve_seconds += time.perf_counter() - start
            if self.correction == "bias" and isinstance(getattr(module, "bias", None), torch.Tensor):
                start = time.perf_counter()
                bias = module.bias.detach().to(torch.float64).cpu().numpy()
                target = corrected_bias(bias, dense, new, stats.input_mean(), dense_output_mean)
                with torch.no_grad():
                    module.bias.copy_(torch.from_numpy(target).to(module.bias.dtype))
                row.bias_corrected = True
                self.report.correction_seconds += time.perf_counter() - start
        if name in self.levels:
            level = self.levels[name][1]
            row.level = level.label
            row.level_costs = dict(level.costs)
            row.model_loss = level.model_loss
        return row

    def _solve_layer(
        self, name: str, config: LayerConfig, stats: LayerHessian
    ) -> tuple[np.ndarray, np.ndarray, LayerReport]:
        """The dense and compressed ``out x cols*groups`` weight matrices, and the report row."""
        info = self.infos[name]
        job = self._job(name, config, stats)
        dense = job.dense
        new = np.empty_like(dense)
        rows = info.rows
        loss = 0.0
        baseline_loss = 0.0 if (self.baseline or config.is_baseline) else None
        damps, units = [], []
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
        new[new == 0] = 0.0  # no negative zeros: masks on disk are "bits != 0"
        loss_unrounded = None
        stored = info.module.weight.dtype
        if stored not in (torch.float32, torch.float64):
            # A float16 / bfloat16 model holds the float32 solution rounded to its dtype: report
            # the loss and sparsity of those weights (what the model computes with; rounding
            # can also flush tiny weights to zero) and keep the solver's loss beside it.
            rounded = torch.from_numpy(new).to(stored).to(torch.float32).numpy()
            if not np.all(np.isfinite(rounded)):
                raise CompressionError(
                    f"layer {info.name!r}: compressed weights exceed the range of the model's dtype {stored} "
                    f"(largest magnitude {float(np.max(np.abs(new))):.6g}); compress the model in float32")
            rounded[rounded == 0] = 0.0
            loss_unrounded = loss
            loss = 0.0
            for g, hessian in enumerate(job.hessians):
                part = slice(g * rows, (g + 1) * rows)
                loss += float(np.sum(self.core.layer_loss(dense[part], rounded[part], hessian, **self.threads)))
            new = rounded

        grid = None
        if config.bits is not None:
            grid = QuantGrid(
                bits=config.bits,
                sym=config.sym,
                group_size=config.group_size or info.cols,
                column_order="channels_last" if info.is_conv else "native",
                scale=np.concatenate([unit.scale for unit in units], axis=0),
                zero=np.concatenate([unit.zero for unit in units], axis=0),
            )
        present = [d for d in damps if d is not None]
        row = LayerReport(
            name=info.name,
            kind=info.kind,
            shape=info.weight_shape,
            mode=config.label,
            method=config.method,
            sparsity=float(np.mean(new == 0)),
            bits=config.bits,
            loss=loss,
            loss_unrounded=loss_unrounded,
            baseline_loss=baseline_loss,
            damp=max(present) if present else None,
            samples=stats.n,
            config=_config_dict(config),
            grid=grid,
            **_quantizer_fields(units),
        )
        return dense, new, row

    def quantize_embeddings(self, embeddings: Mapping[str, tuple[LayerInfo, EmbeddingRule]]) -> None:
        """Quantize the recipe's embedding tables (``embeddings.py``) and report them."""
        for name, (info, rule) in embeddings.items():
            start = time.perf_counter()
            table, row = quantize_embedding(info, rule, num_threads=self.num_threads)
            weight = info.module.weight
            self.backup.save(weight)
            with torch.no_grad():
                weight.copy_(torch.from_numpy(table).to(device=weight.device, dtype=weight.dtype))
            row.seconds = time.perf_counter() - start
            self.report.solve_seconds += row.seconds
            self.report.layers.append(row)
            logger.info("embedding %r: %s, %d rows", name, rule.label, info.out_features)

    # ---------------------------------------------------------------- after the layers

    def recalibrate_batchnorm(self) -> None:
        """BatchNorm correction: re-estimate the running statistics on the compressed model."""
        if self.correction != "batchnorm":
            return
        start = time.perf_counter()
        for norm in batchnorm_layers(self.model).values():
            self.backup.save(norm.running_mean, norm.running_var, norm.num_batches_tracked)
        recalibrate_batchnorm(self.model, self.batches, device=self.device, forward=self.forward)
        self.report.passes += 1
        self.report.correction_seconds += time.perf_counter() - start

    def finish(self, skipped: list[LayerReport]) -> CompressionReport:
        self.report.layers += skipped
        self.report.seconds = time.perf_counter() - self.start
        return self.report


# Share one calibration pass and Hessian between layers reading the same input (off only to
# measure what it saves: benchmarks/bench_whole_model.py).
_SHARE_INPUTS = True


def _dense_report(info: LayerInfo, stats: LayerHessian) -> LayerReport:
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


def _sequential_groups(trace: LayerHooks) -> dict[str, str]:
    """Owner of each layer for sequential calibration: a layer shares the pass of the layer whose
    inputs it reads only when that layer is called once per forward pass. (The input then
    exists before the owner's call, so compressing the owner, or any layer first called after
    it, cannot change it: the shared pass gives the Hessian a pass of its own would. A layer
    called twice may read at its second call what its own first call produced.)"""
    owner, mixed = trace.input_owners()
    for name in mixed:
        owner[name] = name
    for name, other in owner.items():
        if other != name and trace.most_calls[other] != 1:
            owner[name] = name
    return owner


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
    *,
    sequential: bool = False,
    cache_outputs: bool = False,
    forward: Forward | None = None,
    token_mask: TokenMask = "auto",
    correction: str | None = "auto",
    baseline: bool = True,
    num_threads: int | None = None,
    quiet: bool = False,
    restore_on_error: bool = True,
    executor: str | Executor = "local",
    checkpoint: str | bytes | os.PathLike | None = None,
    hessian_memory: int | str = "auto",
    budget: str | BudgetSpec | None = None,
    **budget_options: Any,
) -> CompressionReport:
    """Compress ``model`` in place following ``recipe``; returns a :class:`CompressionReport`.

    Args:
        model: any ``nn.Module``; its Linear, Conv1d, Conv2d and Hugging Face Conv1D layers are
            candidates. Layers whose weight is tied to another parameter are skipped (reported).
            ``nn.Embedding`` tables are quantized only where the recipe's ``embeddings`` names
            them (per-row round to nearest, before the other layers; see ``embeddings.py``).
        calibration: iterable of batches (tensors, tuples or dicts; see ``calibration.py``).
        recipe: a :class:`Recipe`, a :class:`LayerConfig` for all layers, a dict, or a path to
            a JSON / YAML recipe file; or a plan ``{layer name: LayerConfig}`` (a dict whose
            values are LayerConfig objects, see :func:`recipe_plan` and :func:`budget_plan`):
            the layers it names are compressed to their configurations, the others (and those
            mapped to None) are left as they are.
        sequential: calibrate each layer on the outputs of the already-compressed earlier layers
            (see the module docstring for the cost); default: one pass over the dense model.
        cache_outputs: sequential mode only: keep, per calibration batch, the outputs of the
            modules whose layers are all compressed (and whose inputs are final), and look them
            up instead of recomputing them in later passes (see ``torch/output_cache.py``): the
            same results bit for bit, far less forward work, memory for about one activation of
            the calibration set per cached module. Opt-in: needs modules without side effects or
            randomness in eval mode and the same batches in the same order every pass.
        forward: optional ``forward(model, batch)`` replacing the default call of the model.
        token_mask: which positions of padded token batches count in the Hessians and every other
            calibration statistic: "auto" (default: a dict batch's ``"attention_mask"``, where
            present), the key of the mask in dict batches, a callable ``token_mask(batch) -> (B,
            T) tensor``, or None / False (every position). Applies to layer inputs (and outputs)
            whose leading dimensions are the mask's ``(B, T)``; see ``calibration.py``.
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
        checkpoint: a directory (str, bytes or os.PathLike): each finished layer is written
            there, and a rerun of the same compression (same model, recipe and mode) resumes after
            a crash without redoing the layers found there (see ``torch/checkpoint.py``); with a
            budget the level database is kept there too.
        hessian_memory: the most memory the Hessians may take at once, in bytes (int) or as a
            string such as "8GiB" or "500MB"; default "auto": 75% of the memory available when
            the run starts (Linux ``MemAvailable``; a CUDA model's free GPU memory; no limit
            where unknown). A layer counts twice its float64 Hessian (``groups * cols^2 * 8``
            bytes): the running total and one batch's partial sum. Dense mode whose Hessians
            do not fit at once runs in groups of layers, in execution order, one pass over the
            dense model each (plus one pass to find the order and the shared inputs): the same
            result bit for bit, more passes (``report.passes``; the log says why). A single
            Hessian larger than this raises HessianMemoryError (a ValueError) before any pass,
            in sequential mode too (which holds one at a time).
        budget, budget_options: ``compress(model, calibration, recipe, budget=b, **options)`` is
            ``compress_to_budget(model, calibration, b, recipe=recipe, **options)`` (non-uniform
            compression; ``sequential`` is not supported there).

    Layers reading the same input tensor (e.g. the query, key and value projections of an
    attention block) share one Hessian, and in sequential mode one pass; results are those of
    separate passes, bit for bit. ``report.pass_seconds`` etc. say where the time went.
    """
    if num_threads is not None:
        _arrays.as_threads(num_threads)  # a bad count fails here, not as the first layer's solver error
    executor = as_executor(executor)
    if not isinstance(cache_outputs, bool):
        raise TypeError(f"cache_outputs: expected a bool, got {type(cache_outputs).__name__}")
    if cache_outputs and not sequential:
        raise ValueError("cache_outputs: applies to sequential calibration: pass sequential=True")
    if budget is not None:
        if sequential:
            raise ValueError("sequential: not supported with a budget (the level database is built on the dense model)")
        return compress_to_budget(
            model, calibration, budget, recipe=recipe, forward=forward, token_mask=token_mask, correction=correction,
            baseline=baseline,
            num_threads=num_threads, quiet=quiet, restore_on_error=restore_on_error, executor=executor,
            checkpoint=checkpoint, hessian_memory=hessian_memory, **budget_options,
        )
    unknown = sorted(set(budget_options) - _BUDGET_OPTIONS)
    if unknown:
        raise TypeError(f"compress() got unexpected keyword argument(s) {unknown}")
    if budget_options:
        raise ValueError(f"{', '.join(sorted(budget_options))} apply to non-uniform compression: pass budget=")
    if recipe is None:
        raise ValueError("recipe: expected a recipe (or a budget such as budget='flops=2x'), got None")
    if not is_plan(recipe):
        recipe = as_recipe(recipe)
    plans = _plan(model, recipe)
    rules = recipe.embeddings if isinstance(recipe, Recipe) else ()  # a plan names no embeddings
    embeddings = resolve_embeddings(model, rules)  # checked before any work
    plan = {name: p.config for name, p in plans.items() if p.config is not None}
    infos = {name: plans[name].info for name in plan}
    run = _Run(
        model, calibration, infos, mode="sequential" if sequential else "dense", forward=forward, correction=correction,
        baseline=baseline, num_threads=num_threads, quiet=quiet, restore_on_error=restore_on_error,
        executor=executor, token_mask=token_mask, hessian_memory=hessian_memory,
    )
    with run.guarded():
        description = {"recipe": recipe, "sequential": sequential, "correction": correction, "baseline": baseline}
        if rules:
            description["embeddings"] = [rule.to_dict() for rule in rules]
        description.update(_token_mask_description(run.token_mask))
        run.saved = as_checkpoint(checkpoint, description, infos)
        # first, so that the layers after them calibrate on the quantized tables
        run.quantize_embeddings(embeddings)
        if not plan:  # the recipe names only embeddings: no layer to calibrate or solve
            pass
        elif not sequential:
            split = run.dense_plan(infos, hint="skip them in the recipe")
            if split is None:
                hessians, order, _ = run.dense_hessians(infos, hint="skip them in the recipe")
                owner = {name: name for name in order}  # shared Hessians are already the same object
                run.compress_layers(plan, order, owner, hessians)
            else:
                run.compress_in_groups(plan, *split, hint="skip them in the recipe")
        else:
            run.check_largest_hessian(infos)  # one Hessian at a time
            # a first pass for the order of calls, the inputs layers share and the dense outputs
            bias = run.correction == "bias"
            modules = ModuleTrace(model, infos) if cache_outputs else None
            trace = run.calibrate(
                infos, hessians=False, output_means=bias, record_order=True, share_inputs=_SHARE_INPUTS,
                extra=modules, begin_batch=None if modules is None else modules.begin_batch,
            )
            calls = dict(trace.calls)  # of the last batch (all are assumed alike)
            _never_called(calls, "calibration pass")
            order = list(trace.order)
            cache = OutputCache(modules, order) if modules is not None else None

            def calibrate_group(name: str) -> LayerHessian:
                """A pass over the model compressed so far, stopped after ``name``'s last call
                (the layers before ``name`` in ``order`` are done; with the output cache, the
                modules they finished are looked up, not run)."""
                if cache is None:
                    return run.calibrate({name: infos[name]}, stop_after={name: calls[name]}).hessians[name]
                with cache.pass_with(order.index(name)) as begin_batch:
                    hooks = run.calibrate({name: infos[name]}, stop_after={name: calls[name]}, begin_batch=begin_batch)
                return hooks.hessians[name]

            dense_means = {name: trace.outputs[name].mean() for name in infos} if bias else None
            run.compress_layers(
                plan, order, _sequential_groups(trace), {},
                calibrate_group=calibrate_group, dense_means=dense_means,
            )
        run.recalibrate_batchnorm()
    report = run.finish([_skipped_report(p) for p in plans.values() if p.config is None])
    logger.info(
        "compressed %d layer(s), skipped %d, in %.2f s", len(report.compressed), len(report.skipped), report.seconds
    )
    return report


# What to do when a budget run's Hessians do not fit in hessian_memory together (it holds them all).
_BUDGET_MEMORY_ADVICE = (
    "a budget run holds every layer's Hessian at once: pass a larger hessian_memory, select fewer layers "
    "(recipe=), or compress with a recipe and sequential=True (one Hessian at a time)"
)

_BUDGET_OPTIONS = frozenset({"database", "levels", "objective", "stitch", "loss_fn", "damp"})


def _budget_run_description(
    spec: Any, objective: str, database: Any, level_spec: Any, damp: float, stitch: bool, loss_fn: Any,
    recipe: Any, correction: str | None, baseline: bool,
) -> dict[str, Any]:
    """What a budget run's checkpoint must match: everything that changes its result (a given
    database by its content, a loss function by its name)."""
    return {
        "budget": repr(spec), "objective": objective, "damp": damp, "stitch": stitch,
        "levels": None if level_spec is None else level_spec.to_dict(),
        "database": None if database is None else json.dumps(database.to_dict(), sort_keys=True),
        "loss_fn": None if loss_fn is None else getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
        "recipe": repr(recipe), "correction": correction, "baseline": baseline,
    }


def _token_mask_description(token_mask: TokenMask) -> dict[str, Any]:
    """The token_mask entry of a checkpoint's description: "auto", the key, the callable's name,
    or None (checkpoints written before the option existed lack it: see ``torch/checkpoint.py``)."""
    if callable(token_mask):
        return {"token_mask": getattr(token_mask, "__qualname__", type(token_mask).__name__)}
    return {"token_mask": token_mask}


def compress_to_budget(
    model: nn.Module,
    calibration: Any,
    budget: str | BudgetSpec,
    *,
    database: LevelDatabase | str | os.PathLike | None = None,
    levels: Any = None,
    objective: str = "auto",
    stitch: bool = False,
    loss_fn: Any = None,
    damp: float = 0.01,
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
    forward: Forward | None = None,
    token_mask: TokenMask = "auto",
    correction: str | None = "auto",
    baseline: bool = True,
    num_threads: int | None = None,
    quiet: bool = False,
    restore_on_error: bool = True,
    executor: str | Executor = "local",
    checkpoint: str | bytes | os.PathLike | None = None,
    hessian_memory: int | str = "auto",
) -> CompressionReport:
    """Compress ``model`` in place non-uniformly: the least total loss within ``budget``.

    The level database (every level of every layer with its loss and costs, see
    ``nonuniform.py``) is built from one calibration pass, or taken from ``database``; the DP
    solver picks one level per layer minimizing the total loss with total cost <= budget; each
    layer is then compressed to its level by the same loop as :func:`compress`.

    Args:
        model, calibration, forward, token_mask, correction, baseline, num_threads, quiet,
        restore_on_error, executor: as in :func:`compress` (with Ray, the database's layers are
            tasks too; ``token_mask`` also applies to the stitched losses' squared error).
        checkpoint: a directory (str, bytes or os.PathLike): the level database, once built, and
            each finished layer are written there; a rerun of the same compression (same model,
            budget, levels and options) resumes without rebuilding the database or redoing those layers.
        budget: a total-cost budget such as "flops=2x" (2x fewer FLOPs than the dense layers),
            "params=2x", "bits=4.5" (bits per weight on average) or an absolute "flops=1e6", or a
            BudgetSpec (see ``obc_native.budget``).
        database: a LevelDatabase or the path of a saved one, instead of building it; it must
            match the model's layers (LevelDatabaseError otherwise).
        levels: what levels to build (``LevelSpec`` or dict; default ``LevelSpec.preset`` of the
            budget's cost type).
        objective: "auto", "layer", "normalized" or "model" (see ``nonuniform.OBJECTIVES``).
        stitch, loss_fn: compute stitched model losses while building (see ``build_database``).
        hessian_memory: as in :func:`compress`, but a budget run holds every layer's Hessian at
            once and does not split: HessianMemoryError (a ValueError) before the calibration
            pass when they do not fit.
        damp: relative damping of the database's solves.
        recipe: only selects the layers (its skip patterns, and layers no rule matches, are left
            out; see ``select_layers``).

    ``report.budget`` and each layer's ``level``, ``level_costs`` and ``model_loss`` describe
    the choice; ``report.database`` holds the database (save it with
    ``report.database.save(path)``). Budget errors are raised before any weight is modified:
    InfeasibleBudgetError (a ValueError stating the smallest achievable cost), ValueError for an
    unknown cost type or a negative budget, LevelDatabaseError for a database of another model.
    """
    if num_threads is not None:
        _arrays.as_threads(num_threads)
    if recipe is not None and as_recipe(recipe).embeddings:
        raise ValueError("recipe: 'embeddings' are not supported with a budget; quantize them with compress(recipe)")
    executor = as_executor(executor)
    start = time.perf_counter()
    spec = as_budget_spec(budget)
    objective = _arrays.as_choice(objective, "objective", OBJECTIVES)
    if objective == "model" and database is None and not stitch:
        raise ValueError("objective: 'model' needs stitched model losses: pass stitch=True (or such a database)")
    solution = None
    if database is not None:
        if levels is not None or stitch or loss_fn is not None:
            raise ValueError("levels, stitch and loss_fn apply when building a database, not with database=")
        database = _as_database(database)
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
    run = _Run(
        model, calibration, infos, mode="dense", forward=forward, correction=correction, baseline=baseline,
        num_threads=num_threads, quiet=quiet, restore_on_error=restore_on_error, executor=executor,
        token_mask=token_mask, hessian_memory=hessian_memory,
    )
    run.start = start
    with run.guarded():
        run.saved = as_checkpoint(checkpoint, _budget_run_description(
            spec, objective, database, None if database is not None else level_spec, damp, stitch, loss_fn,
            recipe, correction, baseline,
        ) | _token_mask_description(run.token_mask), infos)
        run.dense_plan(infos, hint="leave them out", split=False, advice=_BUDGET_MEMORY_ADVICE)
        hessians, order, applications = run.dense_hessians(infos, hint="leave them out", counter=_Applications)
        if database is None:
            database = run.saved.load_database()  # built by an interrupted run of this compression
            if database is not None:
                solution = solve_database(database, spec, objective=objective)
        if database is None:
            database_start = time.perf_counter()
            per_sample = {name: total / run.report.batches for name, total in applications.items()}
            names = [n for n in order if n in infos] + [n for n in infos if n not in order]  # the database's
            check_budget_reachable(spec, {n: infos[n] for n in names}, hessians, per_sample, level_spec)
            database = _build(
                model, infos, hessians, per_sample, order, level_spec,
                damp=damp, stitch=stitch, loss_fn=loss_fn, batches=run.batches, batch_count=run.report.batches,
                forward=forward, num_threads=num_threads, quiet=quiet, executor=executor, token_mask=run.token_mask,
            )
            if stitch:
                run.report.passes += 1 + sum(len(layer.levels) - 1 for layer in database)  # dense reference + levels
            solution = solve_database(database, spec, objective=objective)
            run.saved.save_database(database)
            run.report.database_seconds += time.perf_counter() - database_start
        plan = _choice_plan(database, solution.choice, [n for n in order if n in infos])
        run.levels = {name: (database[name], solution.choice[name]) for name in plan}
        run.compress_layers(plan, list(plan), {name: name for name in plan}, hessians)
        run.recalibrate_batchnorm()
    skipped = [
        _skipped_report(LayerPlan(info, None, left_out[name]))
        for name, info in find_layers(model).items()
        if name in left_out
    ]
    report = run.finish(skipped)
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
