"""Solve one unit (one weight matrix and its Hessian) for a LayerConfig with the numpy-level core.

Column layout for convolutions (see layers.py): unstructured, N:M and blocked pruning and
quantization run in channels-last order (kh, kw, c_in), so N:M groups, blocks and quantization
groups are consecutive input channels at one kernel position; structured pruning runs in the
native order (c_in, kh, kw) with groups of K = kh*kw columns, i.e. it removes whole input
channels. Results are always returned in the native order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from .._arrays import count_for_sparsity
from .._results import QUANT_METHODS
from .layers import LayerInfo, channels_last_perm
from .recipe import LayerConfig

__all__ = ["UnitResult", "solve_unit", "quantizer_rows", "magnitude_nm", "magnitude_blocked", "magnitude_structured"]


@dataclass
class UnitResult:
    """Compressed weights of one unit.

    Attributes:
        weight: ``rows x cols`` float32, native column order.
        scale, zero: quantization grid ``rows x groups`` (groups along channels-last columns for
            convolutions), or None without quantization.
        damp: largest relative damping the solvers used (None for magnitude pruning alone).
        quant_rows: quantizer name -> rows it produced (e.g. ``{"gptq": 760, "obq": 8}``), or
            None without a Hessian-aware quantization.
        quant_loss_unrefined, quant_loss: the quantization's loss ``1/2 dw H dw^T`` summed over
            rows, before and after refinement, against the quantizer's input (the pruned weights
            for joint compression; the dense ones for a joint SparseGPT sweep), or None.
    """

    weight: np.ndarray
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    damp: float | None = None
    quant_rows: dict[str, int] | None = None
    quant_loss_unrefined: float | None = None
    quant_loss: float | None = None


def quantizer_rows(result) -> dict[str, int] | None:
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


def _max_damp(*values: float | None) -> float | None:
    present = [float(v) for v in values if v is not None]
    return max(present) if present else None


def solve_unit(
    core: ModuleType,
    info: LayerInfo,
    weight: np.ndarray,
    hessian: np.ndarray,
    config: LayerConfig,
    *,
    num_threads: int | None = None,
) -> UnitResult:
    """Compress one unit: prune (if ``config.prune``), then quantize keeping zeros (if ``config.bits``).

    Args:
        core: the obc_native module (numpy-level solvers).
        info: the layer the unit belongs to (for the column layout).
        weight: ``rows x cols`` float32, native column order.
        hessian: ``cols x cols`` float64, native order.
        config: what to do; ``config.method`` picks the solvers or magnitude/RTN,
            ``config.prune_method`` ExactOBS or SparseGPT, ``config.quant_method`` and
            ``config.refine`` the quantizer. SparseGPT pruning with ``quant_method="auto"`` and
            ``bits`` is one joint sweep (``prune_quantize_sparsegpt``).
    """
    threads = {} if num_threads is None else {"num_threads": num_threads}
    perm = channels_last_perm(info)
    baseline = config.is_baseline
    damp = None
    quant_stats: dict = {}
    current = np.ascontiguousarray(weight, dtype=np.float32)

    if config.prune == "structured":
        group = info.kernel_numel
        if baseline:
            current = magnitude_structured(current, config.sparsity, group)
        else:
            result = core.prune_structured(current, hessian, config.sparsity, group=group, damp=config.damp, **threads)
            current, damp = np.asarray(result.weight, dtype=np.float32), result.damp

    h_cl = hessian if perm is None else np.ascontiguousarray(hessian[np.ix_(perm, perm)])
    w_cl = current if perm is None else np.ascontiguousarray(current[:, perm])

    # SparseGPT pruning with the default quantizer: prune and quantize in one sweep
    sparsegpt = {} if config.prune_method == "exact" else {"method": config.prune_method}
    joint_sweep = (not baseline and config.prune_method == "sparsegpt" and config.bits is not None
                   and config.quant_method == "auto" and config.prune in ("unstructured", "nm", "blocked"))
    scale = zero = quant = None
    if joint_sweep:
        pattern = ({"n": config.n, "m": config.m} if config.prune == "nm" else
                   {"sparsity": config.sparsity, "spread": config.spread,
                    "block": config.block if config.prune == "blocked" else 1})
        quant = core.prune_quantize_sparsegpt(
            w_cl, h_cl, config.bits, **pattern, sym=config.sym, group_size=config.group_size, grid=config.grid,
            damp=config.damp, **threads,
        )
    elif config.prune in ("unstructured", "nm", "blocked"):
        if config.prune == "unstructured":
            if baseline:
                w_cl = np.asarray(core.prune_magnitude(w_cl, config.sparsity, spread=config.spread), dtype=np.float32)
            else:
                result = core.prune_unstructured(
                    w_cl, h_cl, config.sparsity, damp=config.damp, spread=config.spread, **sparsegpt, **threads
                )
        elif config.prune == "nm":
            if baseline:
                w_cl = magnitude_nm(w_cl, config.n, config.m)
            else:
                result = core.prune_nm(w_cl, h_cl, config.n, config.m, damp=config.damp, **sparsegpt, **threads)
        else:
            if baseline:
                w_cl = magnitude_blocked(w_cl, config.sparsity, config.block, config.spread)
            else:
                result = core.prune_blocked(
                    w_cl,
                    h_cl,
                    config.sparsity,
                    config.block,
                    damp=config.damp,
                    spread=config.spread,
                    **sparsegpt,
                    **threads,
                )
        if not baseline:
            w_cl, damp = np.asarray(result.weight, dtype=np.float32), result.damp

    if config.bits is not None:
        if quant is None:
            pruned = w_cl == 0
            kwargs = dict(sym=config.sym, group_size=config.group_size, grid=config.grid, **threads)
            if baseline:
                result = core.quantize_rtn(w_cl, h_cl, config.bits, **kwargs)
            else:
                result = core.quantize(
                    w_cl, h_cl, config.bits, damp=config.damp, method=config.quant_method, refine=config.refine,
                    **kwargs,
                )
        else:  # the joint sweep pruned and quantized: its mask says which weights it pruned
            result, pruned = quant, ~np.asarray(quant.mask)
        w_cl = np.array(result.weight, dtype=np.float32)
        w_cl[pruned] = 0.0  # zeros are on every grid (integer zero point); keep pruned weights pruned
        scale = np.asarray(result.scale, dtype=np.float32)
        zero = np.asarray(result.zero, dtype=np.uint8)
        damp = _max_damp(damp, None if baseline else result.damp)
        if not baseline:
            quant_stats = dict(
                quant_rows=quantizer_rows(result),
                quant_loss_unrefined=result.loss_unrefined,
                quant_loss=result.loss,
            )

    if perm is not None:
        restored = np.empty_like(w_cl)
        restored[:, perm] = w_cl
        w_cl = restored
    return UnitResult(weight=w_cl, scale=scale, zero=zero, damp=damp, **quant_stats)


def baseline_config(config: LayerConfig) -> LayerConfig:
    """The magnitude / round-to-nearest counterpart of ``config`` (the solver choices reset)."""
    return replace(config, method="magnitude", quant_method="auto", refine=True, prune_method="exact")
