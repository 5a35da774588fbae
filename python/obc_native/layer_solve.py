"""Solve one weight matrix for a LayerConfig: the entry point every compression path calls.

:func:`solve` compresses one ``rows x cols`` weight matrix (a layer, or one group of a grouped
convolution) given its Hessian, as a :class:`~obc_native.layer_config.LayerConfig` says: prune
(if ``prune``), then quantize keeping the zeros (if ``bits``); the two together are joint
compression, written here once. Recipes (``obc_native.torch.solve.solve_unit``), level databases
(:func:`obc_native.levels.apply_level`, ``obc_native.torch.solve.apply_unit_level``) and the
level builder all come here.

Column order: N:M groups, blocks and quantization groups are runs of consecutive columns. A
convolution's matrix has the native column order ``(c_in, kh, kw)``; its consecutive input
channels at one kernel position are made consecutive by ``column_perm`` (the channels-last
order, ``obc_native.torch.layers.channels_last_perm``), applied here with
:func:`to_solver_columns` and undone with :func:`from_solver_columns` (the only place either is
written). Structured pruning runs in the native order, on groups of ``structured_group``
columns per input channel (a convolution's ``kh * kw``: whole input channels) times
``LayerConfig.structured_group`` channels (e.g. an attention head's columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from . import _api, _arrays
from ._arrays import count_for_sparsity
from ._results import QUANT_METHODS, PruneResult, QuantResult
from .layer_config import LayerConfig, RecipeError, check_field, structured_sparsity

__all__ = [
    "UnitResult",
    "from_solver_columns",
    "magnitude_blocked",
    "magnitude_nm",
    "magnitude_structured",
    "quantizer_rows",
    "solve",
    "to_solver_columns",
]

SolverResult = Union[PruneResult, QuantResult]
_HESSIAN_PRUNERS = ("unstructured", "nm", "blocked")  # the modes that run in the solver order


@dataclass
class UnitResult:
    """Compressed weights of one unit (a weight matrix, or one conv group of it).

    Attributes:
        weight: ``rows x cols``, the input's float dtype, in the input's column order.
        scale, zero: quantization grid ``rows x groups`` (groups along the solver columns, i.e.
            channels-last for convolutions), or None without quantization.
        damp: largest relative damping the solvers used (None for magnitude pruning alone).
        quant_rows: quantizer name -> rows it produced (e.g. ``{"gptq": 760, "obq": 8}``), or
            None without a Hessian-aware quantization.
        quant_loss_unrefined, quant_loss: the quantization's loss ``1/2 dw H dw^T`` summed over
            rows, before and after refinement, against the quantizer's input (the pruned weights
            for joint compression; the dense ones for a joint SparseGPT sweep), or None.
        solver_result: the last solver's own result (a PruneResult or QuantResult, in the solver
            column order; its losses are against that solver's input), or None for magnitude
            pruning alone.
    """

    weight: np.ndarray
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    damp: float | None = None
    quant_rows: dict[str, int] | None = None
    quant_loss_unrefined: float | None = None
    quant_loss: float | None = None
    solver_result: SolverResult | None = None


def quantizer_rows(result: QuantResult) -> dict[str, int] | None:
    """``{quantizer name: rows}`` of a QuantResult in QUANT_METHODS order (None if unrecorded)."""
    if result.row_methods is None:
        return None
    names, counts = np.unique(result.row_method_names(), return_counts=True)
    found = dict(zip(names.tolist(), counts.tolist()))
    return {name: int(found[name]) for name in QUANT_METHODS if name in found}


def magnitude_nm(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    """Zero the ``n`` smallest-magnitude weights of every ``m`` consecutive columns of each row."""
    rows, cols = weight.shape
    groups = np.abs(weight).reshape(rows, cols // m, m)
    order = np.argsort(groups, axis=2, kind="stable")[:, :, :n]
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order, False, axis=2)
    return np.where(keep.reshape(rows, cols), weight, 0).astype(weight.dtype)


def magnitude_blocked(weight: np.ndarray, sparsity: float, block: int, spread: str = "global") -> np.ndarray:
    """Zero the blocks of ``block`` consecutive columns with the smallest L2 norm.

    ``ceil(sparsity * rows * cols / block)`` blocks over the layer (global) or
    ``ceil(sparsity * cols / block)`` per row (uniform), counted by the solvers' rule
    (:func:`obc_native._arrays.count_for_sparsity`), so ExactOBS prunes as many.
    """
    rows, cols = weight.shape
    scores = np.square(weight.astype(np.float64)).reshape(rows, cols // block, block).sum(axis=2)
    keep = np.ones(scores.shape, dtype=bool)
    if spread == "uniform":
        count = count_for_sparsity(scores.shape[1], sparsity)
        order = np.argsort(scores, axis=1, kind="stable")[:, :count]
        np.put_along_axis(keep, order, False, axis=1)
    else:
        count = count_for_sparsity(scores.size, sparsity)
        np.put(keep, np.argsort(scores.reshape(-1), kind="stable")[:count], False)  # in place, any layout
    return np.where(np.repeat(keep, block, axis=1), weight, 0).astype(weight.dtype)


def magnitude_structured(weight: np.ndarray, sparsity: float, group: int) -> np.ndarray:
    """Zero the ``ceil(sparsity * cols / group)`` column groups with the smallest L2 norm (counted
    by the solvers' rule, :func:`obc_native._arrays.count_for_sparsity`)."""
    rows, cols = weight.shape
    scores = np.square(weight.astype(np.float64)).reshape(rows, cols // group, group).sum(axis=(0, 2))
    keep = np.ones(scores.shape, dtype=bool)
    keep[np.argsort(scores, kind="stable")[: count_for_sparsity(scores.size, sparsity)]] = False
    return np.where(np.repeat(keep, group)[None, :], weight, 0).astype(weight.dtype)


def to_solver_columns(
    weight: np.ndarray, hessian: np.ndarray, column_perm: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``weight[:, perm]`` and ``hessian[perm][:, perm]`` (C-contiguous copies): the matrices in
    the solvers' column order; unchanged when ``column_perm`` is None."""
    if column_perm is None:
        return weight, hessian
    return (np.ascontiguousarray(weight[:, column_perm]),
            np.ascontiguousarray(hessian[np.ix_(column_perm, column_perm)]))


def from_solver_columns(weight: np.ndarray, column_perm: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`to_solver_columns` for a ``rows x cols`` weight matrix (a new array; the
    same one when ``column_perm`` is None)."""
    if column_perm is None:
        return weight
    native = np.empty_like(weight)
    native[:, column_perm] = weight
    return native


def _max_damp(*values: float | None) -> float | None:
    present = [float(v) for v in values if v is not None]
    return max(present) if present else None


def _prune(config: LayerConfig, weight: np.ndarray, hessian: np.ndarray, solvers: Any,
           threads: dict) -> tuple[np.ndarray, SolverResult | None]:
    """Unstructured, N:M or blocked pruning in the solver column order, by ExactOBS / SparseGPT
    or the magnitude baseline; the pruned weights (the input's dtype) and the solver's result."""
    if config.is_baseline:
        if config.prune == "unstructured":
            pruned = solvers.prune_magnitude(weight, config.sparsity, spread=config.spread)
        elif config.prune == "nm":
            pruned = magnitude_nm(weight, config.n, config.m)
        else:
            pruned = magnitude_blocked(weight, config.sparsity, config.block, config.spread)
        return np.asarray(pruned, dtype=weight.dtype), None
    method = {} if config.prune_method == "exact" else {"method": config.prune_method}
    options = dict(damp=config.damp, **method, **threads)
    if config.prune == "unstructured":
        result = solvers.prune_unstructured(weight, hessian, config.sparsity, spread=config.spread, **options)
    elif config.prune == "nm":
        result = solvers.prune_nm(weight, hessian, config.n, config.m, **options)
    else:
        result = solvers.prune_blocked(weight, hessian, config.sparsity, config.block, spread=config.spread,
                                       **options)
    return np.asarray(result.weight, dtype=weight.dtype), result


def _check_config(config) -> None:
    """TypeError unless ``config`` is a LayerConfig; RecipeError (a ValueError) naming the field for
    an invalid field value or n >= m. A LayerConfig is not validated when constructed, and an
    unknown ``prune`` (e.g. "bogus") would otherwise return W unchanged."""
    if not isinstance(config, LayerConfig):
        raise TypeError(f"config: expected a LayerConfig, got {type(config).__name__}")
    for name in config.field_names():
        check_field(name, getattr(config, name))
    if config.prune == "nm" and not config.n < config.m:
        raise RecipeError(f"N:M pruning needs integers 0 < n < m, got n={config.n!r}, m={config.m!r}")


def _as_column_perm(column_perm, cols: int) -> np.ndarray | None:
    """column_perm as an int64 permutation of range(cols), or None. A repeated index would
    duplicate a column (and drop another) silently, so anything but a permutation raises."""
    if column_perm is None:
        return None
    perm = np.asarray(column_perm)
    if perm.dtype.kind not in "iu":
        raise TypeError(f"column_perm: expected an integer array, got dtype {perm.dtype}")
    if perm.shape != (cols,):
        raise ValueError(f"column_perm: expected shape ({cols},), one index per column of W, got "
                         f"shape {perm.shape}")
    if not np.array_equal(np.sort(perm), np.arange(cols)):
        raise ValueError(f"column_perm: expected a permutation of range({cols}), got repeated or "
                         f"out-of-range indices")
    return perm.astype(np.int64, copy=False)


def _check_baseline_pattern(config: LayerConfig, cols: int, structured_group: int) -> None:
    """ValueError naming the field when the magnitude baseline's pattern does not tile ``cols``."""
    if config.prune == "nm" and cols % config.m:
        raise ValueError(f"m: expected a divisor of cols ({cols}), got m = {config.m}")
    if config.prune == "blocked" and cols % config.block:
        raise ValueError(f"block: expected a positive divisor of cols ({cols}), got {config.block}")
    if config.prune == "structured" and cols % (structured_group * config.structured_group):
        raise ValueError(f"structured_group: expected structured_group * config.structured_group "
                         f"({structured_group} * {config.structured_group}) to divide cols ({cols})")


def solve(
    config: LayerConfig,
    W: np.ndarray,
    H: np.ndarray,
    *,
    column_perm: np.ndarray | None = None,
    structured_group: int = 1,
    num_threads: int | None = None,
    solvers: Any = None,
) -> UnitResult:
    """Compress one weight matrix: prune (if ``config.prune``), then quantize keeping the zeros (if
    ``config.bits``).

    Args:
        config: what to do; ``config.method`` picks the Hessian-aware solvers or magnitude / RTN,
            ``config.prune_method`` ExactOBS or SparseGPT, ``config.quant_method`` and
            ``config.refine`` the quantizer. SparseGPT pruning with ``quant_method="auto"`` and
            ``bits`` is one joint sweep (``prune_quantize_sparsegpt``).
        W: ``(rows, cols)`` float32 or float64 weights (kept in that dtype), in their own column
            order; H: ``(cols, cols)`` Hessian in the same order.
        column_perm: ``(cols,)`` permutation into the order where N:M groups, blocks and
            quantization groups are consecutive (a convolution's channels-last order), or None.
        structured_group: columns per input channel of structured pruning (1, or ``kh * kw``);
            a pruned group is ``config.structured_group`` consecutive channels of them.
        num_threads: threads of the solvers (None: all).
        solvers: the namespace of the numpy-level solvers (default ``obc_native``'s own; a test
            may wrap them to record their calls).
    Returns:
        a UnitResult in W's column order.
    """
    solvers = _api if solvers is None else solvers
    _check_config(config)
    threads = {} if num_threads is None else {"num_threads": num_threads}
    baseline = config.is_baseline
    damp = None
    quant_stats: dict = {}
    current = _arrays.as_weight(W, "W")
    solver_result = None
    column_perm = _as_column_perm(column_perm, current.shape[1])
    structured_group = _arrays.as_int(structured_group, "structured_group", low=1)
    if baseline:  # the solvers check their own patterns; the numpy baselines would only fail to reshape
        _check_baseline_pattern(config, current.shape[1], structured_group)

    if config.prune == "structured":
        group = structured_group * config.structured_group
        # channel_multiple: the kept count rounded down to a multiple (at least the asked fraction pruned)
        sparsity = structured_sparsity(current.shape[1] // group, config.sparsity, config.channel_multiple)
        if baseline:
            current = magnitude_structured(current, sparsity, group)
        else:
            solver_result = solvers.prune_structured(current, H, sparsity, group=group,
                                                     damp=config.damp, **threads)
            current, damp = np.asarray(solver_result.weight, dtype=current.dtype), solver_result.damp

    w_cl, h_cl = to_solver_columns(current, H, column_perm)

    # SparseGPT pruning with the default quantizer: prune and quantize in one sweep
    joint_sweep = (not baseline and config.prune_method == "sparsegpt" and config.bits is not None
                   and config.quant_method == "auto" and config.prune in _HESSIAN_PRUNERS)
    scale = zero = quant = None
    if joint_sweep:
        pattern = ({"n": config.n, "m": config.m} if config.prune == "nm" else
                   {"sparsity": config.sparsity, "spread": config.spread,
                    "block": config.block if config.prune == "blocked" else 1})
        quant = solvers.prune_quantize_sparsegpt(
            w_cl, h_cl, config.bits, **pattern, sym=config.sym, group_size=config.group_size, grid=config.grid,
            damp=config.damp, **threads,
        )
    elif config.prune in _HESSIAN_PRUNERS:
        w_cl, pruned_by = _prune(config, w_cl, h_cl, solvers, threads)
        if pruned_by is not None:
            solver_result, damp = pruned_by, pruned_by.damp

    if config.bits is not None:
        if quant is None:
            pruned = w_cl == 0
            kwargs = dict(sym=config.sym, group_size=config.group_size, grid=config.grid, **threads)
            if baseline:
                result = solvers.quantize_rtn(w_cl, h_cl, config.bits, **kwargs)
            else:
                result = solvers.quantize(
                    w_cl, h_cl, config.bits, damp=config.damp, method=config.quant_method, refine=config.refine,
                    **kwargs,
                )
        else:  # the joint sweep pruned and quantized: its mask says which weights it pruned
            result, pruned = quant, ~np.asarray(quant.mask)
        w_cl = np.array(result.weight, dtype=current.dtype)
        w_cl[pruned] = 0.0  # zeros are on every grid (integer zero point); keep pruned weights pruned
        scale = np.asarray(result.scale, dtype=np.float32)
        zero = np.asarray(result.zero, dtype=np.uint8)
        damp = _max_damp(damp, None if baseline else result.damp)
        solver_result = result
        if not baseline:
            quant_stats = dict(
                quant_rows=quantizer_rows(result),
                quant_loss_unrefined=result.loss_unrefined,
                quant_loss=result.loss,
            )

    return UnitResult(weight=from_solver_columns(w_cl, column_perm), scale=scale, zero=zero, damp=damp,
                      solver_result=solver_result, **quant_stats)
