"""The Ray executor: calibration shards and layer solves as Ray tasks, bit-identical to a local run.

Imported only when asked for (``executor="ray"``, ``RayExecutor(...)``, ``--ray``); ``ray`` is
the optional extra ``obc_native[ray]``.

- Calibration (dense mode): the calibration batches are cut into contiguous shards, one task per
  shard; each task runs the model (shipped once through the object store) on its batches and
  returns every batch's float64 Hessian partial sums, which the driver adds in batch order
  (see ``executors.py`` for why that is exact). The tasks run torch with the driver's thread
  count, so that the forward pass computes the same activations bit for bit (on the same kind of
  CPU and torch build: a cluster of different CPUs can differ in the last bits of activations,
  which no merge order can undo). The model must be on the CPU (a GPU model: use
  ``sequential=True``, whose passes run in the driver, or the local executor).
- Solves: each unit's Hessian is put in the object store once and shared by the tasks of its row
  ranges (every task on a node reads the same copy); row-separable modes are split into up to
  ``row_tasks`` ranges of at least ``min_rows`` rows, the others are one task per unit.
- Faults: a task whose worker dies is retried (``max_retries``); being deterministic, the retry
  returns the same bits. Errors raised by the solvers are not retried and surface unchanged.
- Progress: one bar over all tasks submitted so far, with per-layer completion in its postfix.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .calibration import Forward, TokenMask
from .executors import (
    ROW_ALIGN,
    Calibration,
    Executor,
    LayerJob,
    UnitSolution,
    UnitSolveError,
    _unit_rows,
    calibrate_here,
    merge_rows,
    row_ranges,
    row_separable,
    shipped_info,
    solve_rows,
)
from .hessian import LayerHessian
from .layers import LayerInfo, find_layers

__all__ = ["RayExecutor", "RayUnavailableError", "RayWorkerLostError"]

# How long the reachability check of a cluster address waits for a TCP connection.
_CONNECT_TIMEOUT_S = 5.0


class RayUnavailableError(RuntimeError):
    """The Ray executor cannot run: the ``ray`` package is missing or the cluster is unreachable."""


class RayWorkerLostError(RuntimeError):
    """A task's worker process (or its node) died on every attempt, ``max_retries + 1`` times:
    killed from outside, e.g. by the out-of-memory killer. Names the layer (or calibration)."""


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            "executor 'ray' needs the ray package, which is not installed: pip install 'obc_native[ray]'"
        ) from err
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast (seconds, not Ray's minute of retries) when ``host:port`` does not answer."""
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address: expected 'host:port', 'ray://host:port' or 'auto', got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise RayUnavailableError(f"Ray cluster at {address!r} is unreachable: {err}") from None


def _calibrate_shard(
    model: nn.Module,
    names: list[str],
    batches: list[Any],
    forward: Forward | None,
    torch_threads: int,
    counter: Callable | None,
    token_mask: TokenMask,
    first_batch: int,
) -> tuple[dict[str, list], list[str], int, dict[str, int] | None]:
    """A calibration task: the partial sums of each of its batches, per layer (its batches are
    the calibration set's from number ``first_batch`` on: errors name them by that number)."""
    torch.set_num_threads(torch_threads)
    model.eval()
    found = find_layers(model)
    infos = {name: found[name] for name in names}
    hooks, count, applications = calibrate_here(
        model, infos, batches, device=torch.device("cpu"), forward=forward,
        counter=counter, keep_partials=True, token_mask=token_mask, first_batch=first_batch,
    )
    partials = {name: stats.batch_partials() for name, stats in hooks.hessians.items()}
    return partials, list(hooks.order), count, applications


def _call_task(hook: Callable[[str, int], None] | None, key: str, first_row: int, fn, *args):
    if hook is not None:
        hook(key, first_row)
    return fn(*args)


def _solve_task(hook, key: str, unit: int, channels_last: bool, *args):
    if hook is not None:
        hook(key, args[-1])
    try:
        return solve_rows(*args, channels_last=channels_last)
    except (ValueError, ArithmeticError) as err:
        raise UnitSolveError(unit, err) from err


class RayExecutor(Executor):
    """Runs calibration shards and layer solves as Ray tasks.

    Args:
        address: the cluster (``"host:port"``, ``"ray://host:port"`` or ``"auto"``); None:
            the cluster ``ray.init`` already connected to, or a new local one. Checked for
            reachability in :meth:`start`, before any work.
        cpus_per_task: CPUs Ray reserves per task, and solver threads of each task when the
            caller leaves ``num_threads`` at None (results do not depend on it).
        row_tasks: at most this many row ranges per row-separable unit (default: the cluster's
            CPU count).
        min_rows: no row range smaller than this (per-task overhead is ~ms; see
            benchmarks/bench_ray.py).
        row_align: row ranges start at multiples of this (default ``ROW_ALIGN``, 256); any
            value gives a local run's weights and per-row losses bit for bit.
        calibration_tasks: shards of the calibration set (default: the cluster's CPU count,
            at most one per batch).
        max_retries: retries of a task whose worker died.
        init_kwargs: extra keyword arguments of ``ray.init`` (when this executor starts Ray).
        task_hook: ``task_hook(layer name, first row)`` called in the worker at the start of
            every solve task (fault-injection tests).
    """

    shows_progress = True
    runs_ahead = True
    calibrates_remotely = True

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_task: int = 1,
        row_tasks: int | None = None,
        min_rows: int = 16,
        row_align: int | None = None,
        calibration_tasks: int | None = None,
        max_retries: int = 3,
        init_kwargs: Mapping[str, Any] | None = None,
        task_hook: Callable[[str, int], None] | None = None,
    ):
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address: expected a str such as 'host:6379' or None, got {type(address).__name__}")
        for value, name, low in (
            (cpus_per_task, "cpus_per_task", 1), (min_rows, "min_rows", 1), (max_retries, "max_retries", 0)
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        for value, name in ((row_tasks, "row_tasks"), (calibration_tasks, "calibration_tasks"), (row_align, "row_align")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an integer >= 1 or None, got {value!r}")
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.row_tasks = row_tasks
        self.min_rows = min_rows
        self.row_align = row_align
        self.calibration_tasks = calibration_tasks
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.task_hook = task_hook
        self._ray = None
        self._cpus = 1
        self._quiet = False
        self._progress: tqdm | None = None
        self._refs: dict[str, list] = {}  # key -> its tasks' refs (None once done)
        self._layer_tasks: dict[str, int] = {}
        self._pending_layers: dict[str, list[tuple[int, int, Any]]] = {}  # key -> (unit, start, ref)
        self._calls: dict[str, Any] = {}
        self._remotes: dict[Callable, Any] = {}
        self._layers_total = 0
        self._layers_done = 0

    # ---- lifecycle

    def start(self, *, quiet: bool = False) -> None:
        ray = _import_ray()
        if self.address not in (None, "auto", "local"):
            _check_reachable(self.address)
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **self.init_kwargs}
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, TimeoutError, RuntimeError) as err:
                raise RayUnavailableError(f"could not connect to the Ray cluster {self.address!r}: {err}") from err
        self._ray = ray
        self._cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._quiet = quiet

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._ray is not None:
            for refs in self._refs.values():
                for ref in refs:
                    self._ray.cancel(ref)
        self._refs.clear()
        self._pending_layers.clear()
        self._calls.clear()
        self._layers_total = self._layers_done = 0

    def _remote(self, fn):
        """``fn`` as a Ray remote function with this executor's options (made once per function:
        each new one is exported to the cluster again)."""
        if fn not in self._remotes:
            self._remotes[fn] = self._ray.remote(fn).options(max_retries=self.max_retries, num_cpus=self.cpus_per_task)
        return self._remotes[fn]

    def _started(self):
        if self._ray is None:
            self.start()
        return self._ray

    # ---- progress over all tasks

    def _add_tasks(self, count: int, layer: bool) -> None:
        if self._progress is None:
            self._progress = tqdm(total=0, desc="obc tasks", unit="task", disable=self._quiet, leave=False)
        self._progress.total += count
        self._layers_total += int(layer)
        self._progress.refresh()

    def _wait(self, refs: list) -> None:
        """Wait for ``refs`` while advancing the bar for every task that finishes meanwhile."""
        ray = self._ray
        mine = set(refs)
        while True:
            outstanding = [ref for group in self._refs.values() for ref in group]
            if not mine.intersection(outstanding):
                return
            done, _ = ray.wait(outstanding, num_returns=1)
            for key, group in list(self._refs.items()):
                group[:] = [ref for ref in group if ref not in done]
                if not group:
                    del self._refs[key]
                    if key in self._layer_tasks:
                        self._layers_done += 1
            if self._progress is not None:
                self._progress.update(len(done))
                self._progress.set_postfix_str(f"layers {self._layers_done}/{self._layers_total}")

    def _get(self, refs: list, what: str) -> list:
        """The results of ``refs``, the tasks of ``what`` (e.g. "layer 'fc1'", for messages)."""
        self._wait(refs)
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(refs)
        except exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError) as err:
            # Ray's own message names neither the work nor the setting that retries it
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayWorkerLostError(
                f"executor 'ray': a task of {what} lost its worker on each of its {self.max_retries + 1} attempt(s) "
                f"({type(err).__name__}: {first_line}); give the workers more memory (a killed process is the usual "
                "cause), raise RayExecutor(max_retries=...), or run it locally"
            ) from err

    # ---- calibration

    def calibrate(
        self,
        model: nn.Module,
        infos: Mapping[str, LayerInfo],
        batches: Iterable[Any],
        *,
        device: torch.device,
        forward: Forward | None = None,
        counter: Callable | None = None,
        token_mask: TokenMask = "auto",
    ) -> Calibration:
        ray = self._started()
        if device.type != "cpu":
            raise ValueError(
                f"executor 'ray': calibration shards run on CPU workers, but the model is on {device}; "
                "use sequential=True (its passes run where the model is) or the local executor"
            )
        batches = list(batches)
        shards = row_ranges(len(batches), self.calibration_tasks or self._cpus)
        remote = self._remote(_calibrate_shard)
        model_ref = ray.put(model)
        names = list(infos)
        refs = [
            remote.remote(model_ref, names, batches[a:b], forward, torch.get_num_threads(), counter, token_mask, a)
            for a, b in shards
        ]
        self._refs["<calibration>"] = list(refs)
        self._add_tasks(len(refs), layer=False)
        results = self._get(refs, "calibration")
        hessians = {name: LayerHessian(info) for name, info in infos.items()}
        order: list[str] = []
        count = 0
        applications = {name: 0 for name in infos} if counter is not None else None
        for partials, shard_order, shard_count, shard_applications in results:  # in batch order
            for name, stats in hessians.items():
                stats.merge_partials(partials[name])
            order += [name for name in shard_order if name not in order]
            count += shard_count
            if applications is not None:
                for name, value in shard_applications.items():
                    applications[name] += value
        return Calibration(hessians, order, count, applications)

    # ---- any per-layer call

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._started()
        remote = self._remote(_call_task)
        ref = remote.remote(self.task_hook, key, 0, fn, *args)
        self._calls[key] = ref
        self._refs[key] = [ref]
        self._layer_tasks[key] = 1
        self._add_tasks(1, layer=True)

    def result(self, key: str) -> Any:
        ref = self._calls.pop(key)
        return self._get([ref], f"{key!r}")[0]

    # ---- layer solves

    def _threads(self, job: LayerJob) -> int:
        return job.num_threads if job.num_threads is not None else self.cpus_per_task

    def submit_layer(self, job: LayerJob) -> None:
        ray = self._started()
        key = job.info.name
        if key in self._pending_layers:
            return
        remote = self._remote(_solve_task)
        info = shipped_info(job.info)
        rows = job.info.rows
        parts = 1
        if row_separable(job.config, job.level):
            parts = min(self.row_tasks or self._cpus, max(1, rows // self.min_rows))
        align = ROW_ALIGN if self.row_align is None else self.row_align
        tasks = []
        for unit, hessian in enumerate(job.hessians):
            hessian_ref = ray.put(hessian)  # once per unit, shared by its row ranges
            unit_rows = _unit_rows(job, unit)
            for start, stop in row_ranges(rows, parts, align):
                ref = remote.remote(
                    self.task_hook, key, unit, job.channels_last, info, np.ascontiguousarray(unit_rows[start:stop]), hessian_ref,
                    job.config, job.baseline, self._threads(job), start,
                )
                tasks.append((unit, start, ref))
        self._pending_layers[key] = tasks  # the job's arrays are in the object store now, not kept here
        self._refs[key] = [ref for _, _, ref in tasks]
        self._layer_tasks[key] = len(tasks)
        self._add_tasks(len(tasks), layer=True)

    def layer_solution(self, job: LayerJob, core: Any = None) -> list[UnitSolution]:
        self.submit_layer(job)
        tasks = self._pending_layers.pop(job.info.name)
        pieces = self._get([ref for _, _, ref in tasks], f"layer {job.info.name!r}")
        solutions = []
        for unit in range(len(job.hessians)):
            solutions.append(merge_rows([piece for (u, _, _), piece in zip(tasks, pieces) if u == unit]))
        return solutions
