"""Compress whole PyTorch models with ExactOBS / OBQ (optional extra: needs ``torch``).

Typical use::

    from obc_native.torch import LayerConfig, Recipe, Override, compress, save_compressed

    recipe = Recipe(default=LayerConfig(prune="nm", n=2, m=4), skip=["features.0"])
    report = compress(model, calibration_batches, recipe)
    print(report.table())
    save_compressed(model, "out/", report)

    # non-uniform: one level per layer chosen by a DP within a budget (see nonuniform.py)
    db = build_database(model, calibration_batches)       # db.save("levels.json")
    report = compress_to_budget(model, calibration_batches, "flops=2x", database=db)

See ``compress`` for calibration modes, ``recipe`` for pattern rules, ``serialize`` for the
file format and ``layers`` for the weight-matrix layout of each layer type.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError("obc_native.torch needs PyTorch: pip install 'obc_native[torch]'") from err

from .actquant import ActQuantWrapper, quantize_activations, remove_activation_quantization
from .calibration import as_batches, collect_hessians
from .compress import CompressionError, budget_plan, compress, compress_to_budget, recipe_plan
from .correction import recalibrate_batchnorm
from .export_onnx import ExportError, OnnxExport, export_onnx
from .gguf_export import GGUFExportError, gguf_layer_config, save_gguf
from .hessian import CalibrationError, LayerHessian, LayerHooks
from .hessian_memory import HessianMemoryError
from .hf_checkpoint import HFCheckpointError, save_hf_checkpoint
from .layers import LayerInfo, describe_layer, find_layers
from .nonuniform import (
    LevelSpec,
    build_database,
    check_database,
    flops_per_weight,
    load_database,
    measure_costs,
    select_layers,
    solve_database,
    uniform_sparsity,
)
from .fold import fold_batchnorm
from .recipe import EmbeddingRule, LayerConfig, Override, Recipe, RecipeError, as_recipe, load_recipe
from .report import CompressionReport, LayerReport
from .serialize import SerializationError, load_compressed, read_manifest, save_compressed
from .shrink import ShrinkError, ShrinkReport, ShrunkChain, hf_ffn_chains, shrink_structured
from .shrink_heads import HeadShrinkReport, ShrunkHeads, hf_attention_heads, shrink_attention_heads

__all__ = [
    "compress",
    "compress_to_budget",
    "recipe_plan",
    "budget_plan",
    "CompressionReport",
    "LayerReport",
    "CompressionError",
    "HessianMemoryError",
    "CalibrationError",
    "LayerConfig",
    "EmbeddingRule",
    "Override",
    "Recipe",
    "RecipeError",
    "as_recipe",
    "load_recipe",
    "save_compressed",
    "load_compressed",
    "read_manifest",
    "SerializationError",
    "export_onnx",
    "OnnxExport",
    "ExportError",
    "ActQuantWrapper",
    "quantize_activations",
    "remove_activation_quantization",
    "recalibrate_batchnorm",
    "collect_hessians",
    "LayerHessian",
    "LayerHooks",
    "LayerInfo",
    "describe_layer",
    "find_layers",
    "as_batches",
    "LevelSpec",
    "build_database",
    "load_database",
    "check_database",
    "solve_database",
    "select_layers",
    "flops_per_weight",
    "measure_costs",
    "uniform_sparsity",
    "shrink_structured",
    "fold_batchnorm",
    "hf_ffn_chains",
    "ShrinkReport",
    "ShrunkChain",
    "ShrinkError",
    "shrink_attention_heads",
    "hf_attention_heads",
    "HeadShrinkReport",
    "ShrunkHeads",
    "save_hf_checkpoint",
    "HFCheckpointError",
    "save_gguf",
    "gguf_layer_config",
    "GGUFExportError",
]

