"""obc_native: Optimal Brain Compression (ExactOBS pruning, OBQ quantization) with a C++ core.

The numpy-level API lives here; the optional PyTorch model layer is ``obc_native.torch``
(never imported by this package).
"""

from ._api import (
    build_info,
    layer_loss,
    prune_blocked,
    prune_magnitude,
    prune_nm,
    prune_structured,
    prune_unstructured,
    quantize,
    quantize_rtn,
    solve_masked,
    trace_blocked,
    trace_unstructured,
)
from ._core import HessianError
from ._results import PruneResult, QuantResult, Trace

__version__ = build_info()["version"]

__all__ = [
    "HessianError",
    "PruneResult",
    "QuantResult",
    "Trace",
    "__version__",
    "build_info",
    "layer_loss",
    "prune_blocked",
    "prune_magnitude",
    "prune_nm",
    "prune_structured",
    "prune_unstructured",
    "quantize",
    "quantize_rtn",
    "solve_masked",
    "trace_blocked",
    "trace_unstructured",
]
