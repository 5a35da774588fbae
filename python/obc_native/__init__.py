"""obc_native: Optimal Brain Compression (ExactOBS pruning, OBQ quantization) with a C++ core.

The numpy-level API lives here; the optional PyTorch model layer is ``obc_native.torch``
(never imported by this package).
"""

from ._api import (
    AUTO_OBQ_MAX_COLS,
    auto_quant_methods,
    build_info,
    layer_loss,
    prune_blocked,
    prune_magnitude,
    prune_nm,
    prune_quantize_sparsegpt,
    prune_structured,
    prune_unstructured,
    quantize,
    quantize_rtn,
    solve_masked,
    trace_blocked,
    trace_unstructured,
)
from ._core import HessianError
from ._results import QUANT_METHODS, PruneResult, QuantResult, Trace
from .budget import (
    BudgetSolution,
    BudgetSpec,
    InfeasibleBudgetError,
    LayerLevels,
    Level,
    LevelDatabase,
    LevelDatabaseError,
    LevelSelection,
    apply_level,
    build_layer_levels,
    parse_budget,
    solve_budget,
    solve_levels,
)
from .hessian import HessianAccumulator, load_hessian, save_hessian
from .layer_config import LayerConfig
from .layer_solve import UnitResult, solve

__version__ = build_info()["version"]

__all__ = [
    "AUTO_OBQ_MAX_COLS",
    "HessianAccumulator",
    "HessianError",
    "PruneResult",
    "QUANT_METHODS",
    "QuantResult",
    "Trace",
    "__version__",
    "auto_quant_methods",
    "build_info",
    "layer_loss",
    "load_hessian",
    "prune_blocked",
    "prune_magnitude",
    "prune_nm",
    "prune_quantize_sparsegpt",
    "prune_structured",
    "prune_unstructured",
    "quantize",
    "quantize_rtn",
    "save_hessian",
    "solve_masked",
    "trace_blocked",
    "trace_unstructured",
    "BudgetSolution",
    "BudgetSpec",
    "InfeasibleBudgetError",
    "LayerLevels",
    "Level",
    "LevelDatabase",
    "LevelDatabaseError",
    "LevelSelection",
    "apply_level",
    "build_layer_levels",
    "parse_budget",
    "solve_budget",
    "solve_levels",
    "LayerConfig",
    "UnitResult",
    "solve",
]
