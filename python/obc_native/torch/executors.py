"""Executors: where the calibration passes and the layer solves run (here, or on a Ray cluster).

``compress`` and ``build_database`` talk to an :class:`Executor` through four calls:

- :meth:`Executor.start` before any work (a missing package or an unreachable cluster fails here);
- :meth:`Executor.calibrate`: one dense pass over the calibration set, returning every layer's
  :class:`~obc_native.torch.hessian.LayerHessian`;
- :meth:`Executor.submit_layer` / :meth:`Executor.layer_solution`: a layer's solves, split into
  tasks over (unit, row range) where the mode allows it (:func:`row_separable`), gathered in
  order; :meth:`Executor.submit` / :meth:`Executor.result` for any other per-layer function
  (level databases);
- :meth:`Executor.close`.

``executor_choice.as_executor`` turns ``"local"`` / ``"ray"`` / an object into an executor.
:class:`LocalExecutor` (the default) runs everything in this process, lazily, in the order the
results are asked for: exactly the computation of a run without executors. The Ray executor
(``ray_executor.py``, imported only when asked for) runs the same functions as Ray tasks.

Why the results are bit-identical to a local run whatever the split:

- Hessians: a layer's samples are summed per calibration batch, and the batches' float64 partial
  sums are added in batch order (see :class:`~obc_native.torch.hessian.LayerHessian`). A worker
  returns the partial sums of each of its batches, not their total, and the driver adds them in
  batch order: the same additions in the same order as one process running every batch.
- Solves: the kernels of the row-separable modes solve every row on its own, in a fixed order,
  independently of the thread count (tests/torch/test_ray_executor.py checks rows solved in
  separate calls against one call, bit for bit, for every mode :func:`row_separable` accepts);
  the other modes are one task per unit. Losses are per-row vectors concatenated in row order
  before the one ``np.sum`` a local run makes; a row's loss does not depend on the rows solved
  with it, so they are the same bits too (row ranges start at multiples of ``ROW_ALIGN``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .calibration import Forward, TokenMask, run_calibration
from .hessian import LayerHessian, LayerHooks
from .layers import LayerInfo
from .recipe import LayerConfig
from .solve import UnitResult, baseline_config, solve_unit

__all__ = [
    "Executor",
    "LocalExecutor",
    "Calibration",
    "LayerJob",
    "RowsSolution",
    "UnitSolution",
    "UnitSolveError",
    "row_separable",
    "row_ranges",
    "ROW_ALIGN",
    "solve_rows",
]

class UnitSolveError(Exception):
    """A unit's solver failed (ValueError or ArithmeticError); ``unit`` says which conv group."""

    def __init__(self, unit: int, error: BaseException):
        super().__init__(unit, error)  # both in args: the error pickles (it crosses processes)
        self.unit = unit
        self.error = error

    def __str__(self) -> str:
        return str(self.error)


@dataclass
class Calibration:
    """What one dense calibration pass collected.

    Attributes:
        hessians: layer name -> its LayerHessian (every batch merged, in batch order).
        order: layer names in the order of their first call.
        batches: batches run.
        applications: layer name -> applications of each weight summed over all calls (output
            positions of a conv, tokens of a linear layer), when asked for; else None.
    """

    hessians: dict[str, LayerHessian]
    order: list[str]
    batches: int
    applications: dict[str, int] | None = None


@dataclass
class LayerJob:
    """The solves of one layer: every unit compressed by ``config``.

    Attributes:
        info: the layer (its ``module`` is dropped before the job is shipped to a worker).
        dense: ``(groups * rows, cols)`` float32 weights, native column order.
        hessians: one ``(cols, cols)`` float64 Hessian per unit.
        config: the LayerConfig of every unit (a database level's: ``Level.config``).
        level: the database Level the layer is solved to, or None (a recipe's layer). Only
            the task split looks at it: such layers are one task per unit (``row_separable``).
        baseline: also solve the magnitude / RTN baseline and return its per-row losses.
        num_threads: threads of each solver call (None: the executor's choice).
        channels_last: solve a convolution's ``config`` in the channels-last column order (False:
            the native order, as level databases saved without a ``column_order`` were built;
            the baseline is always channels-last).
    """

    info: LayerInfo
    dense: np.ndarray
    hessians: list[np.ndarray]
    config: LayerConfig
    level: Any = None
    baseline: bool = False
    num_threads: int | None = None
    channels_last: bool = True


@dataclass
class RowsSolution:
    """Rows ``[start, stop)`` of one unit, solved.

    Attributes:
        result: UnitResult of these rows (weight ``(stop - start, cols)`` float32 native order).
        row_losses: ``(stop - start,)`` float64, ``core.layer_loss`` of each row.
        baseline_row_losses: the same for the baseline's weights, or None.
    """

    start: int
    stop: int
    result: UnitResult
    row_losses: np.ndarray
    baseline_row_losses: np.ndarray | None


@dataclass
class UnitSolution:
    """One unit (conv group) of a layer, solved: result, loss and baseline loss (or None)."""

    result: UnitResult
    loss: float
    baseline_loss: float | None


def row_separable(config: LayerConfig | None, level: Any = None) -> bool:
    """Whether the rows of a unit can be solved in separate calls with the same bits as one call.

    True for quantization (per-row grids, every quantizer), N:M pruning, and unstructured /
    blocked pruning with ``spread="uniform"`` (a count per row), and their joint combinations,
    with the ExactOBS pruner, and for the magnitude / RTN baseline of each. False for
    ``spread="global"`` (one sparsity over the whole layer), structured pruning (columns shared
    by all rows), database levels (their traces are per layer) and SparseGPT pruning (its row
    blocks are not bit-identical across row splits: 2:4 on 200 x 384 differs); those are one
    task per unit.
    """
    if config is None or level is not None:
        return False
    if config.prune is not None and config.method == "obc" and config.prune_method == "sparsegpt":
        return False
    if config.prune is None or config.prune == "nm":
        return True
    if config.prune in ("unstructured", "blocked"):
        return config.spread == "uniform"
    return False


# Row ranges of solve tasks start at multiples of this. Any split gives the same bits (weights,
# and per-row losses: the core's row-loss kernel, row_kernels.cpp row_losses_with, computes each
# row by itself); 256 is the row chunk that kernel works in.
ROW_ALIGN = 256


def row_ranges(rows: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous, near-equal ``[start, stop)`` ranges covering
    ``range(rows)``, every start a multiple of ``align`` (fewer ranges when rows are few)."""
    chunks = -(-rows // align)  # the last one may be short
    parts = max(1, min(int(parts), chunks))
    bounds = [min(rows, chunks * i // parts * align) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def solve_rows(
    info: LayerInfo,
    weight: np.ndarray,
    hessian: np.ndarray,
    config: LayerConfig,
    baseline: bool,
    num_threads: int | None,
    start: int = 0,
    core: Any = None,
    channels_last: bool = True,
) -> RowsSolution:
    """Solve the rows ``weight`` (``(rows, cols)`` float32, native order; rows ``start ..`` of
    the unit) against the unit's ``hessian``: the body of a local run's per-unit loop.

    ``core``: the numpy-level solvers (default: ``obc_native``'s); ``channels_last``: see
    :class:`LayerJob`. Raises the solver's ValueError / ArithmeticError unchanged.
    """
    from ._solvers import get_core

    core = core if core is not None else get_core()
    threads = {} if num_threads is None else {"num_threads": num_threads}
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    result = solve_unit(core, info, weight, hessian, config, num_threads=num_threads, channels_last=channels_last)
    row_losses = np.asarray(core.layer_loss(weight, result.weight, hessian, **threads), dtype=np.float64)
    baseline_losses = None
    if baseline:
        other = solve_unit(core, info, weight, hessian, baseline_config(config), num_threads=num_threads)
        baseline_losses = np.asarray(core.layer_loss(weight, other.weight, hessian, **threads), dtype=np.float64)
    return RowsSolution(start, start + weight.shape[0], result, row_losses, baseline_losses)


def merge_rows(pieces: Sequence[RowsSolution]) -> UnitSolution:
    """One unit's solution from its row pieces (in row order)."""
    if len(pieces) == 1:
        only = pieces[0]
        base = None if only.baseline_row_losses is None else float(np.sum(only.baseline_row_losses))
        return UnitSolution(only.result, float(np.sum(only.row_losses)), base)
    results = [p.result for p in pieces]

    def stacked(key: str) -> np.ndarray | None:
        values = [getattr(r, key) for r in results]
        return None if values[0] is None else np.concatenate(values, axis=0)

    quant_rows = None
    if all(r.quant_rows is not None for r in results):
        quant_rows = {}
        for r in results:
            for name, count in r.quant_rows.items():
                quant_rows[name] = quant_rows.get(name, 0) + count

    def summed(key: str) -> float | None:
        values = [getattr(r, key) for r in results]
        return None if None in values else float(sum(values))

    damps = [r.damp for r in results if r.damp is not None]
    merged = UnitResult(
        weight=np.concatenate([r.weight for r in results], axis=0),
        scale=stacked("scale"),
        zero=stacked("zero"),
        damp=max(damps) if damps else None,
        quant_rows=quant_rows,
        quant_loss_unrefined=summed("quant_loss_unrefined"),
        quant_loss=summed("quant_loss"),
    )
    loss = float(np.sum(np.concatenate([p.row_losses for p in pieces])))
    base = None
    if pieces[0].baseline_row_losses is not None:
        base = float(np.sum(np.concatenate([p.baseline_row_losses for p in pieces])))
    return UnitSolution(merged, loss, base)


def _unit_rows(job: LayerJob, unit: int) -> np.ndarray:
    rows = job.info.rows
    return job.dense[unit * rows : (unit + 1) * rows]


def calibrate_here(
    model: nn.Module,
    infos: Mapping[str, LayerInfo],
    batches: Iterable[Any],
    *,
    device: torch.device,
    forward: Forward | None,
    counter: Callable[[Mapping[str, LayerInfo]], Any] | None = None,
    keep_partials: bool = False,
    token_mask: TokenMask = "auto",
    first_batch: int = 0,
) -> tuple[LayerHooks, int, dict[str, int] | None]:
    """One pass in this process: the hooks (Hessians, order), the batch count, and the
    counter's totals when one is given. ``token_mask``: the padding positions left out of the
    Hessians (see ``calibration.py``); ``first_batch``: the number of the first batch in the
    whole calibration set (a shard's), for error messages."""
    options = {"device": device, "forward": forward, "token_mask": token_mask, "first_batch": first_batch}
    applications = None
    with LayerHooks(infos, record_order=True, keep_partials=keep_partials) as hooks:
        if counter is not None:
            with counter(infos) as counting:
                count = run_calibration(model, batches, hooks, **options)
            applications = dict(counting.totals)
        else:
            count = run_calibration(model, batches, hooks, **options)
    return hooks, count, applications


class Executor:
    """Where calibration and layer solves run. Subclasses override what they distribute."""

    #: True when the executor draws its own progress bar over its tasks (callers then hide theirs).
    shows_progress = False
    #: True when work submitted ahead runs meanwhile (callers then submit every layer first);
    #: False for this process, where submitting ahead would only hold every layer's arrays at once.
    runs_ahead = False
    #: True when :meth:`calibrate` runs elsewhere (shards on a cluster): ``compress`` then calls it;
    #: False: ``compress`` runs its own pass here, with input sharing (see ``LayerHooks``).
    calibrates_remotely = False

    def start(self, *, quiet: bool = False) -> None:
        """Get ready (connect to a cluster, ...): called before any work; raises on failure."""

    def close(self) -> None:
        """Drop pending work and close the progress bar (the executor can be started again)."""

    def calibrate(
        self,
        model: nn.Module,
        infos: Mapping[str, LayerInfo],
        batches: Iterable[Any],
        *,
        device: torch.device,
        forward: Forward | None = None,
        counter: Callable[[Mapping[str, LayerInfo]], Any] | None = None,
        token_mask: TokenMask = "auto",
    ) -> Calibration:
        """One dense pass of ``model`` (already in eval mode) over ``batches``.

        ``counter``: optional ``counter(infos)``, a context manager of forward hooks whose
        ``.totals`` (layer name -> int) add up over batches (e.g. ``level_calibration._Applications``,
        the applications per weight); its totals become ``Calibration.applications``.
        ``token_mask``: which positions of padded batches count (see ``calibration.py``).
        """
        hooks, count, applications = calibrate_here(
            model, infos, batches, device=device, forward=forward, counter=counter, token_mask=token_mask
        )
        return Calibration(hooks.hessians, list(hooks.order), count, applications)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` (a module-level function) under ``key`` (a layer name)."""
        raise NotImplementedError

    def result(self, key: str) -> Any:
        """The value of the call submitted under ``key`` (its exception is raised here)."""
        raise NotImplementedError

    def submit_layer(self, job: LayerJob) -> None:
        """Schedule the solves of ``job`` (no-op if already scheduled)."""
        raise NotImplementedError

    def layer_solution(self, job: LayerJob, core: Any = None) -> list[UnitSolution]:
        """Solve ``job`` (scheduling it first if needed): one UnitSolution per unit, in order.
        A unit's solver error is raised as :class:`UnitSolveError`. ``core``: the solvers a
        local executor calls (default ``obc_native``'s; remote workers always use their own)."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Everything in this process, computed when asked for (the default executor)."""

    def __init__(self) -> None:
        self._calls: dict[str, tuple[Callable[..., Any], tuple]] = {}

    def close(self) -> None:
        self._calls.clear()

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._calls[key] = (fn, args)

    def result(self, key: str) -> Any:
        fn, args = self._calls.pop(key)
        return fn(*args)

    def submit_layer(self, job: LayerJob) -> None:
        pass

    def layer_solution(self, job: LayerJob, core: Any = None) -> list[UnitSolution]:
        solutions = []
        for unit, hessian in enumerate(job.hessians):
            try:
                piece = solve_rows(
                    job.info, _unit_rows(job, unit), hessian, job.config, job.baseline, job.num_threads,
                    core=core, channels_last=job.channels_last,
                )
            except (ValueError, ArithmeticError) as err:
                raise UnitSolveError(unit, err) from err
            solutions.append(merge_rows([piece]))
        return solutions


def shipped_info(info: LayerInfo) -> LayerInfo:
    """``info`` without its module (the geometry is all a solve needs; the module would drag the
    whole layer's parameters into the task)."""
    return dataclasses.replace(info, module=None)
