"""Solve one unit (one weight matrix and its Hessian) of a torch layer with the numpy-level core.

Both paths come to :func:`obc_native.layer_solve.solve`: a recipe's LayerConfig
(:func:`solve_unit`) and a level database's level (:func:`apply_unit_level`). What this module
adds is the torch layer's geometry (see layers.py): unstructured, N:M and blocked pruning and
quantization of a convolution run in channels-last order (kh, kw, c_in), so N:M groups, blocks
and quantization groups are consecutive input channels at one kernel position; structured
pruning runs in the native order (c_in, kh, kw) with groups of K = kh*kw columns, i.e. it removes
whole input channels. Results are always returned in the native order.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType

import numpy as np

from ..layer_solve import (  # noqa: F401 - re-exported: these lived here before the numpy-level solve
    UnitResult,
    magnitude_blocked,
    magnitude_nm,
    magnitude_structured,
    quantizer_rows,
    solve,
)
from ..levels import LayerLevels, Level, level_config
from .layers import LayerInfo, channels_last_perm
from .recipe import LayerConfig

__all__ = [
    "UnitResult",
    "apply_unit_level",
    "solve_unit",
    "quantizer_rows",
    "magnitude_nm",
    "magnitude_blocked",
    "magnitude_structured",
]


def solve_unit(
    core: ModuleType,
    info: LayerInfo,
    weight: np.ndarray,
    hessian: np.ndarray,
    config: LayerConfig,
    *,
    num_threads: int | None = None,
    channels_last: bool = True,
) -> UnitResult:
    """Compress one unit of ``info``: prune (if ``config.prune``), then quantize keeping zeros (if
    ``config.bits``), by :func:`obc_native.layer_solve.solve`.

    Args:
        core: the obc_native module (numpy-level solvers).
        info: the layer the unit belongs to (for the column layout).
        weight: ``rows x cols`` float32, native column order.
        hessian: ``cols x cols`` float64, native order.
        config: what to do (see LayerConfig).
        channels_last: solve a convolution in the channels-last column order (False: the native
            order, as level databases saved without a ``column_order`` were built).
    """
    return solve(
        config,
        np.ascontiguousarray(weight, dtype=np.float32),
        hessian,
        column_perm=channels_last_perm(info) if channels_last else None,
        structured_group=info.kernel_numel,
        num_threads=num_threads,
        solvers=core,
    )


def apply_unit_level(
    info: LayerInfo,
    weight: np.ndarray,
    hessian: np.ndarray,
    layer: LayerLevels,
    level: Level,
    *,
    num_threads: int | None = None,
    core: ModuleType | None = None,
) -> UnitResult:
    """Compress one unit (conv group) of ``info`` to a database ``level`` of ``layer``: the solve
    of :func:`solve_unit` for the level's LayerConfig, with the database's damping, in the column
    order the database was built in; the result is in native order."""
    config = level_config(level, layer.settings.get("damp", 0.01))
    if config is None:
        raise ValueError(f"level: layer {layer.name!r}: the dense level leaves the weights as they are")
    channels_last = layer.settings.get("column_order") == "channels_last"
    return solve_unit(core, info, weight, hessian, config, num_threads=num_threads, channels_last=channels_last)


def baseline_config(config: LayerConfig) -> LayerConfig:
    """The magnitude / round-to-nearest counterpart of ``config`` (the solver choices reset)."""
    return replace(config, method="magnitude", quant_method="auto", refine=True, prune_method="exact")
