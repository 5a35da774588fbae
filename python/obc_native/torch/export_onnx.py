"""Export a compressed model to ONNX for onnxruntime, storing the quantization codes we chose.

:func:`export_onnx` exports the model with ``torch.onnx.export`` (the TorchScript exporter; it
works offline), then rewrites the graph with the ``onnx`` package so that each quantized layer
keeps exactly the integer codes, scales and zero points of its compression grid (nothing is
re-quantized by another tool):

- quantized ``Linear`` / HF ``Conv1D`` feeding one MatMul or Gemm: onnxruntime's contrib op
  ``com.microsoft.MatMulNBits`` (weight-only, executed natively on packed 2/4/8-bit codes).
  It quantizes blocks of ``block_size`` (a power of two >= 16) consecutive inputs of each output
  row; our group of ``group_size`` columns becomes ``group_size / block_size`` blocks sharing the
  group's scale and zero point, so the dequantized weights are unchanged. 3-bit codes are stored
  as 4-bit, 5..7-bit codes as 8-bit (same values, same zero point).
- other quantized layers (a group size without such a block size, convolutions, a weight shared
  by several nodes): ``DequantizeLinear`` (opset 21) of uint4 (bits <= 4) or uint8 codes with
  per-channel (one group per row) or blocked scales and zero points, feeding the original node.
  Convolutions grouped in channels-last order (``column_order="channels_last"``) dequantize the
  ``out x (kernel, in)`` matrix, then Reshape and Transpose it to ``(out, in, *kernel)``.
- static activation quantization (:class:`~obc_native.torch.ActQuantWrapper`): QuantizeLinear +
  DequantizeLinear with the calibrated scale and zero point on the layer's input (uint8 for 8-bit,
  uint4 for 4-bit, uint16 for 16-bit grids); other widths, whose clamp range no ONNX integer type
  has, as the same float arithmetic as :func:`~obc_native.torch.actquant.fake_quantize`.
- quantized ``nn.Embedding`` tables (recipe ``embeddings``) read only by Gather: onnxruntime's
  ``com.microsoft.GatherBlockQuantized`` (uint8 data holding 2/4/8-bit codes, blocks of a power
  of two >= 16 along the embedding dimension, as for MatMulNBits; it dequantizes only the rows
  looked up); otherwise, or with ``matmul_nbits=False``, ``DequantizeLinear`` feeding the Gather.
  (onnxruntime returns zeros for an out-of-range token id where PyTorch raises.)
- pruned-only and uncompressed layers: dense float weights (sparsity is not a runtime format).

Dequantization (ONNX and ours) is ``scale * (code - zero)`` in float32: the weights onnxruntime
computes with are bit-identical to the PyTorch model's. Outputs then differ only by the order of
float operations (MatMulNBits accumulates differently).

The graph's opset is 21 (converted from the exporter's with ``onnx.version_converter``), plus
``com.microsoft`` version 1 when MatMulNBits is used.

Large models: protobuf cannot serialize a message of 2 GiB or more, so the weights of a model that
big go to an external-data file next to the ``.onnx`` (ONNX's external data format; onnxruntime
reads it from the model's folder). While the graph is built, every initializer of 1 KiB or more
is held outside the ONNX proto (:class:`_TensorData`), so that neither the version converter, the
rewrite nor the checker ever serializes the weights; torch exports a model whose parameters pass
``_IN_MEMORY_TRACE_LIMIT`` into a staging folder rather than into memory (its in-memory export
refuses more than 2 GiB).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import make_staging_folder, output_file_problem, path_str, write_file_atomically
from .actquant import ActQuantWrapper, fake_quantize
from .embeddings import describe_embedding
from .layers import LayerInfo, channels_last_perm, describe_layer, layer_kind, param_key, weight_matrix
from .report import CompressionReport, QuantGrid
from .serialize import _grid_fits, _quantize_exact

__all__ = ["ExportError", "OnnxExport", "export_onnx", "grids_from_saved"]

logger = logging.getLogger("obc_native.torch")

OPSET = 21  # blocked DequantizeLinear, uint4 and uint16 Q/DQ
_EXPORT_OPSET = 17  # what torch.onnx.export writes before the conversion to OPSET
_MAX_BLOCK = 256  # largest MatMulNBits block_size used (onnxruntime's CPU kernels go to 256)
_MSFT = "com.microsoft"
_PLACEHOLDER_DOMAIN = "obc_native"

_PROTOBUF_LIMIT = 2**31 - 1  # protobuf serializes no message larger (bytes)
# external_data=None: a model whose graph and weights together pass this writes its weights to an
# external-data file (the margin covers the fields the size estimate leaves out). Tests lower it.
_SINGLE_FILE_LIMIT = _PROTOBUF_LIMIT - (64 << 20)
# A model whose parameters and buffers pass this is exported by torch into a staging folder rather
# than into memory: torch's in-memory export refuses models above 2 GiB, and constant folding can
# add copies of weights (e.g. a tied embedding's transpose), so half the limit.
_IN_MEMORY_TRACE_LIMIT = 1 << 30
_DETACH_BYTES = 1024  # initializers of at least this size are held outside the proto while building
_DATA_SUFFIX = ".data"  # the external-data file of "model.onnx" is "model.onnx.data"
# Offsets of tensors of 1 MiB or more in the data file are multiples of 64 KiB (Windows' allocation
# granularity, which onnx.save also uses): onnxruntime can map them from the file instead of
# copying them.
_ALIGN_BYTES = 1 << 20
_ALIGNMENT = 1 << 16


class ExportError(ValueError):
    """A model, layer or path that cannot be exported; the message says what to do."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        file_size: its size in bytes.
        layers: per exported layer (``named_modules`` name) how its weight is stored, e.g.
            ``"MatMulNBits 4-bit block 128"``, ``"DequantizeLinear uint4 blocked 64"``,
            ``"DequantizeLinear uint8 per-channel"``; layers not listed are dense float32.
        activations: per activation-quantized layer, ``"QDQ uint8"`` / ``"QDQ uint4"`` /
            ``"QDQ uint16"`` or ``"fake-quantize 3-bit (float ops)"``.
        opset: the default-domain opset of the graph.
        data_path: the external-data file holding the weights (``path + ".data"``), or None when
            the weights are inside the ONNX file.
        data_size: its size in bytes (0 without one).
    """

    path: str
    file_size: int
    layers: dict[str, str] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)
    opset: int = OPSET
    data_path: str | None = None
    data_size: int = 0

    @property
    def files(self) -> dict[str, int]:
        """The files written, ``{path: size in bytes}``: the ONNX file, then its data file if any."""
        files = {self.path: self.file_size}
        if self.data_path is not None:
            files[self.data_path] = self.data_size
        return files

    def table(self) -> str:
        """One line per quantized layer, then one per file written, with its size."""
        lines = [f"{name or '(model)'}: {form}" for name, form in self.layers.items()]
        lines += [f"{name} input: {form}" for name, form in self.activations.items()]
        lines.append(f"{self.path}: {self.file_size} bytes, opset {self.opset}")
        if self.data_path is not None:
            lines.append(f"{self.data_path}: {self.data_size} bytes (external data: the weights)")
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    example_args: Any,
    path: str | bytes | os.PathLike,
    *,
    report: CompressionReport | str | bytes | os.PathLike | None = None,
    example_kwargs: dict[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    matmul_nbits: bool = True,
    accuracy_level: int = 0,
    dense: Sequence[str] = (),
    external_data: bool | None = None,
) -> OnnxExport:
    """Export ``model`` (compressed by :func:`compress`) to the ONNX file ``path``.

    Args:
        model: the compressed model (on any device; exported on the CPU, in eval mode, and left
            as it was). Layers wrapped in :class:`ActQuantWrapper` get activation Q/DQ.
        example_args: a tensor or a tuple of positional inputs used to trace the model.
        path: the ``.onnx`` file to write (str, bytes or os.PathLike); its folder must exist and be
            writable (checked first).
        report: where the quantization grids come from: the :class:`CompressionReport` returned
            by ``compress`` (its per-layer grids), or the folder written by ``save_compressed``
            (the grids stored there; str, bytes or os.PathLike). None: every weight is exported
            dense. A layer whose grid no longer has its weight's shape (a layer that
            ``shrink_structured`` cut after compression, or the report of a model of other
            widths) is exported with float weights, with a warning naming it, as
            ``save_compressed`` stores it as values.
        example_kwargs: keyword inputs for the trace (e.g. ``{"attention_mask": mask}``).
        input_names, output_names: graph input / output names (default ``input_0``, ... and
            ``output_0``, ...; keyword inputs keep their keyword).
        dynamic_batch: dimension 0 of every input and output is symbolic ("batch").
        matmul_nbits: use ``com.microsoft.MatMulNBits`` for Linear layers and
            ``com.microsoft.GatherBlockQuantized`` for embeddings where possible; False:
            ``DequantizeLinear`` + the original MatMul/Gemm/Gather everywhere (standard ONNX).
        accuracy_level: MatMulNBits' ``accuracy_level``: 0 (unset: float32 inputs on CPU) ...
            4 (onnxruntime may quantize the *inputs* to int8 per block: faster, less accurate).
        dense: fnmatch patterns of quantized layers to export with dense float weights.
        external_data: where the weights go. None (automatic): into the ONNX file, unless the
            file would pass protobuf's 2 GiB limit; then as with True. True: into the file
            ``path + ".data"`` next to it (ONNX's external data format: the ``.onnx`` file names
            it relative to its own folder, where onnxruntime reads it; keep the two together).
            False: always one file (ExportError, after the export work, if it would pass 2 GiB).
            Initializers under 1 KiB stay in the ONNX file either way. A single-file export
            removes a ``path + ".data"`` left by an earlier export to ``path``.

    Returns an :class:`OnnxExport` (files written and their sizes, per-layer storage).

    Raises :class:`ExportError` (a ``ValueError``) for a path that cannot be written (before any
    work), a report naming layers the model lacks, a quantized layer whose weights are no longer
    on its grid or whose weight the exported graph does not use as a MatMul/Gemm/Conv constant,
    and for models ``torch.onnx.export`` cannot export; the message names the layer and what to
    do (leave it out of the recipe, or list it in ``dense``). Also, with ``external_data=False``,
    for a model too large for one file (after the export work), and for a directory or other
    non-file at ``path + ".data"`` unless ``external_data=False`` (before any work).

    Files are written through a staging folder next to ``path`` and renamed into place: a failed
    or interrupted export leaves the previous files (``path`` and its data file) as they were and
    no new or temporary file (a staging folder a killed export left is removed by the next one).
    With external data the data file is renamed first, then ``path``: only a crash between the two
    renames can leave a new data file next to an older ``path``.
    """
    import onnx  # noqa: F401 - ImportError before any work

    path = _check_output_path(path)
    if external_data is not None and not isinstance(external_data, bool):
        raise TypeError(f"external_data must be None, True or False, got {external_data!r}")
    data_path = path + _DATA_SUFFIX
    problem = output_file_problem(data_path)
    if problem is not None and external_data is not False:
        raise ExportError(f"external data file {problem}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(accuracy_level, int) or not 0 <= accuracy_level <= 4:
        raise ValueError(f"accuracy_level must be an integer in 0..4, got {accuracy_level!r}")
    if isinstance(dense, str):
        dense = [dense]
    if not isinstance(dense, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in dense):
        raise TypeError(f"dense: expected a list of layer-name patterns (str), got {dense!r}")
    saved = isinstance(report, (str, bytes, os.PathLike))
    grids = _collect_grids(model, report)
    layers: dict[str, tuple[LayerInfo, QuantGrid, np.ndarray]] = {}
    for name, (info, grid) in grids.items():
        if any(fnmatchcase(name, pattern) for pattern in dense):
            continue
        if not _grid_fits(info, grid):
            # its codes did not survive the cut (or never were this layer's): its float weights are
            # still exactly the model's, as save_compressed stores them
            logger.warning("layer %r: the report's grid (scales %s, groups of %s) does not fit the %d x %d weight "
                           "(a layer shrink_structured cut, or the report of another model); exported with float "
                           "weights", name, tuple(np.shape(grid.scale)), grid.group_size, info.out_features, info.cols)
            continue
        layers[name] = (info, grid, _codes_of(name, info, grid, saved=saved))

    try:
        staging = make_staging_folder(os.path.dirname(path))
    except OSError as err:
        raise ExportError(f"path {path}: cannot create a staging folder next to it ({err.strerror or err})") from err
    try:
        graph_model, placeholders, tensors = _torch_export(
            model, example_args, example_kwargs, input_names, output_names, dynamic_batch, staging
        )
        rewriter = _GraphRewriter(graph_model, tensors)
        summary_layers: dict[str, str] = {}
        for name, (info, grid, codes) in layers.items():
            if info.kind == "embedding":
                summary_layers[name] = rewriter.quantize_embedding(name, info, grid, codes, matmul_nbits)
            else:
                summary_layers[name] = rewriter.quantize_weight(
                    name, info, grid, codes, matmul_nbits, accuracy_level
                )
        activations = rewriter.lower_activation_placeholders(placeholders)
        rewriter.finish()
        del rewriter  # its cache of weight arrays
        graph_model.metadata_props.add(key="obc_native.layers", value=json.dumps(summary_layers, sort_keys=True))
        external = _write_files(graph_model, tensors, path, data_path, staging, external_data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if external:
        return OnnxExport(path, os.path.getsize(path), summary_layers, activations, OPSET,
                          data_path, os.path.getsize(data_path))
    return OnnxExport(path, os.path.getsize(path), summary_layers, activations, OPSET)


def grids_from_saved(directory: str | bytes | os.PathLike) -> dict[str, QuantGrid]:
    """The quantization grids stored by :func:`save_compressed` in ``directory``, by layer name.

    Only layers stored with codes (``quantized`` / ``sparse_quantized``) have a grid; the manifest
    and the tensor file's checksum are verified. Export a model that holds the saved weights
    (:func:`load_compressed`): its weights must lie on these grids.
    """
    from safetensors.torch import load_file

    from .serialize import SerializationError, _own_file, _sha256, read_manifest

    directory = path_str(directory, "directory")
    manifest = read_manifest(directory)
    tensor_path = _own_file(directory, manifest["tensors"])
    if _sha256(tensor_path) != manifest["sha256"]:
        raise SerializationError(f"{tensor_path}: checksum mismatch; the file is corrupted or not the one saved")
    tensors = load_file(tensor_path)
    grids = {}
    for name, entry in manifest["layers"].items():
        if entry["storage"] not in ("quantized", "sparse_quantized"):
            continue
        key = entry["weight_key"]
        scale, zero = tensors.get(f"{key}:scale"), tensors.get(f"{key}:zero")
        if scale is None or zero is None:
            raise SerializationError(f"layer {name!r}: scale or zero tensor missing from {tensor_path}")
        grids[name] = QuantGrid(
            bits=entry["bits"],
            sym=entry["sym"],
            group_size=entry["group_size"],
            column_order=entry["column_order"],
            scale=scale.numpy().astype(np.float32),
            zero=zero.numpy().astype(np.uint8),
        )
    return grids


# ----------------------------------------------------------------------------- checks and inputs


def _check_output_path(path: str | bytes | os.PathLike) -> str:
    """The absolute output path, after checking that a file can be created next to it."""
    path = os.path.abspath(path_str(path))
    problem = output_file_problem(path)
    if problem is not None:
        raise ExportError(f"path {problem}")
    return path


def _layer_module(model: nn.Module, name: str) -> nn.Module | None:
    """The layer ``name`` (inside its ActQuantWrapper if wrapped), or None if absent."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module.module if isinstance(module, ActQuantWrapper) else module


def _collect_grids(model: nn.Module, report: Any) -> dict[str, tuple[LayerInfo, QuantGrid]]:
    """Layer geometry and grid of every quantized layer named by ``report``."""
    if report is None:
        return {}
    if isinstance(report, (str, bytes, os.PathLike)):
        grids = grids_from_saved(path_str(report, "report"))
    elif isinstance(report, CompressionReport):
        grids = {layer.name: layer.grid for layer in report.compressed if layer.grid is not None}
        lacking = [layer.name for layer in report.compressed if layer.bits is not None and layer.grid is None]
        if lacking:
            raise ExportError(
                f"the report has no quantization grid for layer(s) {lacking} (a report read back from JSON); "
                "pass the folder written by save_compressed as report= instead"
            )
    else:
        raise TypeError(
            f"report must be a CompressionReport, a saved model folder or None, got {type(report).__name__}"
        )
    result = {}
    for name, grid in grids.items():
        module = _layer_module(model, name)
        if isinstance(module, nn.Embedding):
            result[name] = (describe_embedding(name, module), grid)
            continue
        if module is None or layer_kind(module) is None:
            raise ExportError(
                f"the report names layer {name!r}, which the model does not have (or is no longer a supported "
                "layer); export the model the report was made for"
            )
        result[name] = (describe_layer(name, module), grid)
    return result


def _codes_of(name: str, info: LayerInfo, grid: QuantGrid, saved: bool = False) -> np.ndarray:
    """``out x cols`` uint8 codes of the layer's current weights on its grid (native order);
    ``saved``: the grid comes from a saved folder (an off-grid error then says to load it)."""
    weight = info.module.weight
    if weight.dtype != torch.float32:
        raise ExportError(
            f"layer {name!r}: weights are {weight.dtype}; export quantized layers from a float32 model holding "
            "the float32 grid values: save_compressed(model, folder, report), then load_compressed(float32_model, "
            "folder, widen=True) and export it with report=folder (model.float() keeps the "
            f"{weight.dtype} rounding, off the grid); or list the layer in dense=[...]"
        )
    matrix = weight_matrix(info).cpu().numpy()
    codes = _quantize_exact(info, matrix, grid)
    if codes is None:
        loaded = ("; with report= a saved folder, load its weights into the model first "
                  "(load_compressed(model, folder))" if saved else "")
        raise ExportError(
            f"layer {name!r}: its weights are no longer on its quantization grid (changed after compression?); "
            f"export the model as compressed, or list the layer in dense=[...] to store float weights{loaded}"
        )
    return codes


# ----------------------------------------------------------------------------- torch export


class _ActQuantPlaceholder(torch.autograd.Function):
    """Fake quantization in PyTorch; one ``obc_native::ActQuant`` node in the traced graph."""

    @staticmethod
    def forward(ctx, x, scale, zero, bits):  # noqa: ARG004 - autograd.Function signature
        return fake_quantize(x, torch.tensor(scale, dtype=x.dtype), torch.tensor(zero, dtype=x.dtype), bits)

    @staticmethod
    def symbolic(g, x, scale, zero, bits):
        return g.op(
            f"{_PLACEHOLDER_DOMAIN}::ActQuant",
            x,
            bits_i=int(bits),
            scale_f=float(scale),
            zero_f=float(zero),
        )


@contextlib.contextmanager
def _activation_placeholders(model: nn.Module):
    """Let every ActQuantWrapper of ``model`` trace as one placeholder node (restored after)."""
    wrappers = [m for m in model.modules() if isinstance(m, ActQuantWrapper)]

    def make_forward(wrapper: ActQuantWrapper):
        scale, zero = float(wrapper.scale), float(wrapper.zero)
        if zero != round(zero) or not 0 <= zero <= (1 << wrapper.bits) - 1:
            raise ExportError(f"{wrapper}: zero point {zero} is not an integer code; recalibrate the activations")

        def forward(x, *args, **kwargs):
            return wrapper.module(_ActQuantPlaceholder.apply(x, scale, zero, wrapper.bits), *args, **kwargs)

        return forward

    try:
        for wrapper in wrappers:
            wrapper.forward = make_forward(wrapper)
        yield
    finally:
        for wrapper in wrappers:
            wrapper.__dict__.pop("forward", None)


def _has_activation_wrappers(model: nn.Module) -> bool:
    """Whether ``model`` holds an ActQuantWrapper (traced as an ``obc_native::ActQuant`` node)."""
    return any(isinstance(module, ActQuantWrapper) for module in model.modules())


def _torch_export(model, example_args, example_kwargs, input_names, output_names, dynamic_batch, staging):
    """``(ONNX model, activation placeholders, tensor data)``: the dense ONNX model of ``model``
    traced on the examples, its initializers of ``_DETACH_BYTES`` or more held in the returned
    :class:`_TensorData` (the model proto stays small). A model above ``_IN_MEMORY_TRACE_LIMIT``
    is exported into a file in the folder ``staging`` (removed after reading)."""
    import onnx
    from onnx import version_converter

    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    if not isinstance(example_args, tuple):
        raise TypeError(f"example_args must be a tensor or a tuple of inputs, got {type(example_args).__name__}")
    example_kwargs = dict(example_kwargs or {})
    positional = [f"input_{i}" for i in range(len(example_args))]
    names_in = list(input_names) if input_names is not None else positional + list(example_kwargs)
    training = {module: module.training for module in model.modules()}
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if devices - {torch.device("cpu")}:
        raise ExportError(f"the model is on {sorted(map(str, devices))}; move it to the CPU (model.cpu()) to export")
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in example_args)
    traced = model
    if example_kwargs:
        # The TorchScript exporter matches keyword inputs against forward's signature and fails on
        # some (e.g. transformers models); a wrapper takes every input positionally instead.
        traced = _KeywordCall(model, len(args), list(example_kwargs))
        args = (*args, *(v.cpu() if isinstance(v, torch.Tensor) else v for v in example_kwargs.values()))
    trace_folder = None
    target: Any = io.BytesIO()
    if _model_bytes(model) > _IN_MEMORY_TRACE_LIMIT:
        # torch's own external-data files (one per tensor, named after it) go into a folder of
        # their own
        trace_folder = os.path.join(staging, "trace")
        os.mkdir(trace_folder)
        target = os.path.join(trace_folder, "model.onnx")
    model.eval()
    printed = _CapturedStdout()
    try:
        with torch.no_grad(), _activation_placeholders(model), _without_kv_cache(model), warnings.catch_warnings(), \
                printed:
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            outputs = model(*example_args, **example_kwargs)
            count = len(_flatten(outputs))
            names_out = list(output_names) if output_names is not None else [f"output_{i}" for i in range(count)]
            axes = None
            if dynamic_batch:  # dimension 0 of every input and output that has one
                values = [*example_args, *example_kwargs.values()][: len(names_in)] + _flatten(outputs)
                names = [*names_in[: len(values) - count], *names_out]
                axes = {
                    name: {0: "batch"}
                    for name, value in zip(names, values)
                    if isinstance(value, torch.Tensor) and value.dim() >= 1
                }
            torch.onnx.export(
                traced,
                args,
                target,
                dynamo=False,
                opset_version=_EXPORT_OPSET,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                do_constant_folding=True,
                # PRESERVE (the model is in eval mode) rather than EVAL: EVAL folds BatchNorm into the
                # preceding Conv's weights, and a quantized conv's codes would be lost; onnxruntime
                # still fuses Conv+BatchNorm of float convs when it loads the model.
                training=torch.onnx.TrainingMode.PRESERVE,
                # declared only when a placeholder can appear: torch warns about an unused domain
                custom_opsets={_PLACEHOLDER_DOMAIN: 1} if _has_activation_wrappers(model) else None,
            )
    except ExportError:
        raise
    except Exception as err:  # the exporter raises many types for an unsupported operator
        message = " ".join(str(err).split())[:600]
        caller = _operator_caller(traced, printed.graph_dump, message)
        if caller is not None and traced is not model:  # inside _KeywordCall: drop its attribute name
            caller = (caller[0].partition(".")[2], caller[1])
        if caller is None:
            where = ("where it names an operator without an ONNX form, replace the module that uses it or export "
                     "a submodule without it")
        else:
            module, cls = caller
            where = (f"the operator is called in {'module ' + repr(module) if module else 'the model'} ({cls}): "
                     "replace that module (or the call) with operators ONNX has, or export a submodule without it")
        if getattr(model, "config", None) is not None and "attention_mask" not in example_kwargs:
            # transformers' mask code has data-dependent branches (e.g. aten::diff for packed
            # sequences) that a given attention mask skips
            where += ("; for a Hugging Face model, give an attention_mask input in the example as well (e.g. "
                      "torch.ones_like(input_ids))")
        raise ExportError(
            f"torch.onnx.export cannot export this model ({type(err).__name__}: {message}); {where}"
        ) from err
    finally:
        for module, flag in training.items():
            module.train(flag)
    tensors = _TensorData()
    if trace_folder is None:
        graph_model = onnx.load_from_string(target.getvalue())
        del target
        tensors.detach_all(graph_model)
    else:
        graph_model = onnx.load_model(target, load_external_data=False)
        tensors.detach_all(graph_model, trace_folder)
        shutil.rmtree(trace_folder)  # read: its disk space is free for the output
    # The version converter refuses unknown operators: each placeholder becomes an Identity of the
    # same name until it is lowered to Q/DQ (which needs opset 21 for uint4 and uint16).
    placeholders = {}
    for node in graph_model.graph.node:
        if node.domain == _PLACEHOLDER_DOMAIN:
            attributes = {a.name: a for a in node.attribute}
            layer = _scope_of(node.name)
            if example_kwargs:  # traced inside _KeywordCall: drop its attribute name
                layer = layer.partition(".")[2]
            placeholders[node.name] = (attributes["bits"].i, attributes["scale"].f, attributes["zero"].f, layer)
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]
    for entry in [o for o in graph_model.opset_import if o.domain == _PLACEHOLDER_DOMAIN]:
        graph_model.opset_import.remove(entry)
    try:
        graph_model = version_converter.convert_version(graph_model, OPSET)
    except Exception as err:  # noqa: BLE001 - onnx raises RuntimeError/ValueError/C++ errors
        raise ExportError(f"the exported graph cannot be converted to ONNX opset {OPSET} ({err})") from err
    return graph_model, placeholders, tensors


def _model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (a tensor shared by several modules once)."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


@contextlib.contextmanager
def _without_kv_cache(model: nn.Module):
    """``model.config.use_cache`` False meanwhile (restored after): a Hugging Face decoder would
    otherwise return its key-value cache object, which the exporter cannot trace. The graph then
    maps the inputs to the logits / hidden states, without cache inputs or outputs."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


# One capture of descriptor 1 at a time: two exports in two threads would otherwise save and restore
# each other's redirection, and leave stdout pointing at a deleted file. Reentrant: an export
# nested in another (same thread) saves and restores the outer capture correctly.
_STDOUT_LOCK = threading.RLock()
_GRAPH_DUMP_START = b"Torch IR graph at exception: "
_GRAPH_DUMP_END = re.compile(rb"^  return \(.*\)\r?$", re.MULTILINE)


class _CapturedStdout:
    """A context manager: file descriptor 1 writes into a temporary file meanwhile.

    torch's TorchScript exporter prints its whole graph to the process's stdout when an operator
    has no ONNX form (thousands of lines for a transformer); caught here, it names the module of
    that operator instead (:func:`_operator_caller`). Nothing else is kept back: on leaving, by
    return or by any exception (``KeyboardInterrupt`` included), descriptor 1 is restored first,
    then everything captured except that graph dump (what the model printed, the exporter's
    messages, other threads' output) is written to it, in order. The dump itself is in
    :attr:`graph_dump` and logged at DEBUG level. Where stdout has no descriptor (an embedding
    host), nothing is redirected.
    """

    def __init__(self) -> None:
        self.graph_dump = ""
        self._saved: int | None = None
        self._sink = None

    def __enter__(self) -> _CapturedStdout:
        _STDOUT_LOCK.acquire()
        try:
            _flush_stdout()
            try:
                self._saved = os.dup(1)
            except OSError:  # no descriptor 1
                return self
            self._sink = tempfile.TemporaryFile()
            os.dup2(self._sink.fileno(), 1)
        except BaseException:  # KeyboardInterrupt included: descriptor 1 as it was
            self._restore()
            self._close()
            _STDOUT_LOCK.release()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self._saved is None:
                return
            try:
                _flush_stdout()  # Python-level writes still buffered belong to the capture
            finally:
                self._restore()
            self._sink.seek(0)
            captured = self._sink.read()
            dump, rest = _split_graph_dump(captured)
            self.graph_dump = dump.decode(errors="replace")
            if dump:
                logger.debug("torch.onnx.export printed its graph:\n%s", self.graph_dump)
            _write_all(1, rest)
        finally:
            try:
                self._restore()  # again (idempotent), should a second interrupt have cut the above short
            finally:
                self._close()
                _STDOUT_LOCK.release()

    def _restore(self) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 1)

    def _close(self) -> None:
        if self._saved is not None:
            os.close(self._saved)
            self._saved = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def _flush_stdout() -> None:
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError, AttributeError):  # closed, or not a file: nothing to flush
        pass


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to descriptor ``fd``; a closed reader (EPIPE) ends it quietly."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


def _split_graph_dump(captured: bytes) -> tuple[bytes, bytes]:
    """``(graph dump, everything else)`` of what the exporter's call printed: the dump runs from
    "Torch IR graph at exception: graph(" to the graph's top-level "  return (...)" line and the
    blank line after it (the rest of the output stays in order)."""
    start = captured.find(_GRAPH_DUMP_START)
    if start < 0:
        return b"", captured
    match = _GRAPH_DUMP_END.search(captured, start)
    end = len(captured) if match is None else match.end()
    for ending in (b"\r\n", b"\n"):  # the line end, then the blank line printed after the graph
        if captured.startswith(ending, end):
            end += len(ending)
            if captured.startswith(ending, end):
                end += len(ending)
            break
    return captured[start:end], captured[:start] + captured[end:]


def _operator_caller(traced: nn.Module, graph_dump: str, message: str) -> tuple[str, str] | None:
    """``(module name in traced, class name)`` whose forward calls the operator that the exporter's
    ``message`` names ("operator 'aten::x'"), from that node's scope in ``graph_dump`` (the
    TorchScript graph the exporter printed); None if either does not say. The name is "" for
    ``traced``'s own forward."""
    match = re.search(r"operator '([\w:.]+)'", message)
    if match is None:
        return None
    for line in graph_dump.splitlines():
        if f"= {match.group(1)}(" in line and "scope: " in line:
            scope = line.split("scope: ", 1)[1].split(" # ", 1)[0].strip()
            return _resolve_scope(traced, scope)
    return None


def _resolve_scope(traced: nn.Module, scope: str) -> tuple[str, str]:
    """The full module name and class name of a TorchScript scope ("pkg.Net::/pkg.Seq::block/
    pkg.Op::block.1"). Its parts' names are relative to an enclosing module that was called, not
    always to the parent part (containers that are only indexed are left out), so each is looked
    up below the resolved parts, nearest first; an ambiguous part ends the walk."""
    parts = [part.rpartition("::") for part in scope.split("/")]
    resolved = [("", traced)]
    for cls, _, name in parts[1:]:
        cls = cls.rsplit(".", 1)[-1]
        for prefix, ancestor in reversed(resolved):
            found = [(full, module) for full, module in ancestor.named_modules()
                     if (full == name or full.endswith("." + name)) and type(module).__name__ == cls]
            if len(found) == 1:
                full = found[0][0]
                resolved.append((f"{prefix}.{full}" if prefix else full, found[0][1]))
                break
        else:
            return name, cls  # not found below the parts resolved so far: the scope's own name
    return resolved[-1][0], type(resolved[-1][1]).__name__


class _KeywordCall(nn.Module):
    """Calls ``model(*inputs[:positional], **dict(zip(keywords, inputs[positional:])))``."""

    def __init__(self, model: nn.Module, positional: int, keywords: list[str]):
        super().__init__()
        self.model = model
        self.positional = positional
        self.keywords = keywords

    def forward(self, *inputs):
        keyword_inputs = dict(zip(self.keywords, inputs[self.positional :]))
        return self.model(*inputs[: self.positional], **keyword_inputs)


def _flatten(outputs: Any) -> list[Any]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        return [t for item in outputs for t in _flatten(item)]
    return []


# ----------------------------------------------------------------------------- graph rewriting


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes along the last axis, first code in the lowest bits of each byte."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8)
    if per_byte == 1:
        return codes
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].copy()
    for position in range(1, per_byte):  # codes < 2^bits: no bit leaves the byte
        packed |= grouped[..., position] << np.uint8(position * bits)
    return packed


def _uint_tensor(name: str, values: np.ndarray, bits: int):
    """An ONNX uint4 (bits <= 4) or uint8 initializer holding ``values``."""
    from onnx import TensorProto, helper, numpy_helper

    if bits > 4:
        return numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.uint8), name)
    flat = _pack_low_first(np.ascontiguousarray(values, dtype=np.uint8).reshape(-1), 4)
    return helper.make_tensor(name, TensorProto.UINT4, list(values.shape), flat.tobytes(), raw=True)


def _matmul_nbits_block(group_size: int) -> int | None:
    """The largest power of two in 16.._MAX_BLOCK dividing ``group_size``, or None."""
    block = _MAX_BLOCK
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    return None


class _GraphRewriter:
    """Replaces float weight initializers of an exported ONNX model by their quantized forms."""

    def __init__(self, graph_model, tensors: _TensorData):
        self.model = graph_model
        self.graph = graph_model.graph
        self.tensors = tensors
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.used: set[str] = set()
        self.uses_msft = False
        self._arrays: dict[str, np.ndarray] = {}

    # -- lookup

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self.tensors.array(self.initializers[name])
        return self._arrays[name]

    def _add_initializers(self, tensors) -> None:
        """Append ``tensors`` to the graph, their data held in ``self.tensors`` if large."""
        for tensor in tensors:
            self.graph.initializer.append(tensor)
            self.tensors.detach(self.graph.initializer[-1])  # the graph's copy, not the argument

    def _consumers(self, name: str) -> list[tuple[Any, int]]:
        return [(node, i) for node in self.graph.node for i, value in enumerate(node.input) if value == name]

    def _find_weight(self, name: str, info: LayerInfo) -> tuple[str, str]:
        """(initializer name, layout) of the layer's weight: "matrix" (the ``out x in`` weight
        matrix; for convolutions the module's weight) or "transposed" (its ``in x out`` transpose:
        Linear weights folded for MatMul, HF Conv1D weights as stored)."""
        if info.is_conv:
            weight = info.module.weight.detach().cpu().numpy()
        else:
            weight = weight_matrix(info).cpu().numpy()
        key = param_key(name, "weight")
        candidates = []
        for init_name, init in self.initializers.items():
            if init_name in self.used or tuple(init.dims) not in (weight.shape, weight.shape[::-1]):
                continue
            array = self._array(init_name)
            if array.dtype != np.float32:
                continue
            if array.shape == weight.shape and np.array_equal(array.view(np.uint32), weight.view(np.uint32)):
                candidates.append((init_name, "matrix"))
            elif weight.ndim == 2 and np.array_equal(array.view(np.uint32), weight.T.view(np.uint32)):
                candidates.append((init_name, "transposed"))
        if not candidates:
            raise ExportError(
                f"layer {name!r}: its weight is not a constant input of a MatMul, Gemm or Conv in the exported graph "
                "(computed, shared or used by another operator); leave the layer out of the recipe (skip it) or "
                "list it in dense=[...] to export it with float weights"
            )
        # equal values: prefer the parameter's own name (two layers may hold identical weights)
        candidates.sort(key=lambda c: (c[0] != key and not c[0].endswith("." + key), c[0]))
        return candidates[0]

    # -- weights

    def quantize_embedding(self, name: str, info: LayerInfo, grid: QuantGrid, codes: np.ndarray, contrib: bool) -> str:
        """Store an embedding table as codes: ``GatherBlockQuantized`` in place of each Gather that
        reads it (``contrib`` and a power-of-two block of 16..256 dividing the group size), else
        ``DequantizeLinear`` feeding the Gathers. Returns a description of the form used."""
        try:
            init_name, layout = self._find_weight(name, info)
        except ExportError:
            raise ExportError(
                f"embedding {name!r}: its table is not a constant of the exported graph (the exporter folds lookups "
                "of constant ids, e.g. position embeddings of a fixed length, into a float constant of their "
                "result); leave it out of the recipe's 'embeddings' or list it in dense=[...]"
            ) from None
        consumers = self._consumers(init_name)
        gathers = [
            (node, index) for node, index in consumers
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 0
            and all(a.i == 0 for a in node.attribute if a.name == "axis")
        ]
        if layout != "matrix" or not consumers or len(gathers) != len(consumers):
            others = sorted({node.op_type for node, _ in consumers if (node, 0) not in gathers}) or "nothing"
            raise ExportError(
                f"embedding {name!r}: its table is not only looked up by Gather in the exported graph (also read "
                f"by {others}); leave it out of the recipe's 'embeddings' or list it in dense=[...] to export it "
                "with float weights"
            )
        self.used.add(init_name)
        # The exporter folds other uses of the table (e.g. an output layer reading it, transposed)
        # into float constants of their own: those stay float, and the file holds both.
        table = self._array(init_name)
        copies = [
            other for other, init in self.initializers.items()
            if other != init_name and tuple(init.dims) == table.shape[::-1]
            and np.array_equal(self._array(other).view(np.uint32), table.T.view(np.uint32))
        ]
        block = _matmul_nbits_block(grid.group_size)
        if contrib and block is not None:
            form = self._to_gather_block_quantized(name, grid, codes, gathers, init_name, block)
        else:
            form = self._to_dequantize(name, info, grid, codes, init_name, layout, consumers)
        if copies:
            form += f" (+ a float32 transposed copy for {', '.join(sorted(copies))})"
        return form

    def _to_gather_block_quantized(self, name, grid, codes, gathers, init_name, block) -> str:
        """onnxruntime's ``com.microsoft.GatherBlockQuantized`` on uint8 data: ``bits`` 2/4/8
        codes packed along each row, first code in the lowest bits; ``block`` consecutive entries
        of a row share a scale and a zero point (packed like the codes); gather_axis 0,
        quantize_axis 1; output ``(code - zero) * scale`` in float32 (our dequantization)."""
        from onnx import numpy_helper, helper

        stored_bits = 2 if grid.bits <= 2 else 4 if grid.bits <= 4 else 8
        repeat = grid.group_size // block
        base = f"{name or 'model'}.weight"
        scales = np.repeat(np.asarray(grid.scale, dtype=np.float32), repeat, axis=1)
        zeros = np.repeat(np.asarray(grid.zero, dtype=np.uint8), repeat, axis=1)
        tensors = [
            numpy_helper.from_array(np.ascontiguousarray(_pack_low_first(codes, stored_bits)), f"{base}:codes"),
            numpy_helper.from_array(np.ascontiguousarray(scales), f"{base}:scales"),
            numpy_helper.from_array(np.ascontiguousarray(_pack_low_first(zeros, stored_bits)), f"{base}:zero_points"),
        ]
        self._add_initializers(tensors)
        for number, (node, _) in enumerate(gathers):
            suffix = "" if len(gathers) == 1 else f".{number}"
            new = helper.make_node(
                "GatherBlockQuantized",
                [tensors[0].name, node.input[1], tensors[1].name, tensors[2].name],
                list(node.output),
                name=f"{name or 'model'}/GatherBlockQuantized{suffix}",
                domain=_MSFT,
                bits=stored_bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            )
            self._replace_node(node, [new])
        self._drop_initializer(init_name)
        self.uses_msft = True
        return f"GatherBlockQuantized {stored_bits}-bit block {block}"

    def quantize_weight(
        self, name: str, info: LayerInfo, grid: QuantGrid, codes: np.ndarray, matmul_nbits: bool, accuracy: int
    ) -> str:
        """Store the layer's weight as codes; returns a description of the form used."""
        init_name, layout = self._find_weight(name, info)
        self.used.add(init_name)
        consumers = self._consumers(init_name)
        if not consumers:
            raise ExportError(f"layer {name!r}: its weight is not used by the exported graph; list it in dense=[...]")
        if matmul_nbits and not info.is_conv and len(consumers) == 1:
            node, index = consumers[0]
            block = _matmul_nbits_block(grid.group_size)
            if index == 1 and block is not None and self._is_plain_matmul(node, layout):
                return self._to_matmul_nbits(name, info, grid, codes, node, init_name, block, accuracy)
        return self._to_dequantize(name, info, grid, codes, init_name, layout, consumers)

    @staticmethod
    def _is_plain_matmul(node, layout: str) -> bool:
        """Whether ``node`` computes ``A @ W.T`` (+ bias) with our ``out x in`` matrix W as input 1."""
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "MatMul":
            return layout == "transposed"
        if node.op_type != "Gemm":
            return False
        attributes = {a.name: a for a in node.attribute}
        alpha = attributes["alpha"].f if "alpha" in attributes else 1.0
        beta = attributes["beta"].f if "beta" in attributes else 1.0
        trans_a = attributes["transA"].i if "transA" in attributes else 0
        trans_b = attributes["transB"].i if "transB" in attributes else 0
        if alpha != 1.0 or beta != 1.0 or trans_a:
            return False
        return (trans_b == 1) == (layout == "matrix")

    def _to_matmul_nbits(self, name, info, grid, codes, node, init_name, block, accuracy) -> str:
        from onnx import helper, numpy_helper

        rows, cols = codes.shape  # N x K
        stored_bits = 2 if grid.bits <= 2 else 4 if grid.bits <= 4 else 8
        repeat = grid.group_size // block
        blocks = cols // block
        packed = _pack_low_first(codes.reshape(rows, blocks, block), stored_bits)
        scales = np.repeat(np.asarray(grid.scale, dtype=np.float32), repeat, axis=1)
        zeros = _pack_low_first(np.repeat(np.asarray(grid.zero, dtype=np.uint8), repeat, axis=1), stored_bits)
        base = f"{name or 'model'}.weight"
        tensors = [
            numpy_helper.from_array(np.ascontiguousarray(packed), f"{base}:codes"),
            numpy_helper.from_array(np.ascontiguousarray(scales), f"{base}:scales"),
            numpy_helper.from_array(np.ascontiguousarray(zeros), f"{base}:zero_points"),
        ]
        self._add_initializers(tensors)
        inputs = [node.input[0], *(t.name for t in tensors)]
        output = node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if bias in self.initializers and tuple(self.initializers[bias].dims) == (rows,):
            inputs += ["", bias]  # MatMulNBits' own bias input (g_idx, deprecated, left out)
            bias = None
        product = f"{base}:product" if bias else output
        new_nodes = [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [product],
                name=f"{name or 'model'}/MatMulNBits",
                domain=_MSFT,
                K=cols,
                N=rows,
                bits=stored_bits,
                block_size=block,
                accuracy_level=accuracy,
            )
        ]
        if bias:  # Gemm's C with beta = 1: broadcast add
            new_nodes.append(helper.make_node("Add", [product, bias], [output], name=f"{name or 'model'}/bias"))
        self._replace_node(node, new_nodes)
        self._drop_initializer(init_name)
        self.uses_msft = True
        return f"MatMulNBits {stored_bits}-bit block {block}"

    def _to_dequantize(self, name, info, grid, codes, init_name, layout, consumers) -> str:
        from onnx import helper, numpy_helper

        rows, cols = codes.shape
        base = f"{name or 'model'}.weight"
        scale = np.asarray(grid.scale, dtype=np.float32)
        zero = np.asarray(grid.zero, dtype=np.uint8)
        perm = channels_last_perm(info) if grid.column_order == "channels_last" else None
        if perm is not None:
            codes = codes[:, perm]  # groups run along the channels-last columns
        per_channel = grid.group_size == cols
        transposed = layout == "transposed"
        if transposed:  # a 2-D weight the graph uses as in x out
            codes, scale, zero = codes.T, scale.T, zero.T
        storage = "uint4" if grid.bits <= 4 else "uint8"
        code_tensor = _uint_tensor(f"{base}:codes", codes, grid.bits)
        if per_channel:
            scale, zero = scale.reshape(-1), zero.reshape(-1)
        scale_tensor = numpy_helper.from_array(np.ascontiguousarray(scale), f"{base}:scale")
        zero_tensor = _uint_tensor(f"{base}:zero_point", zero, grid.bits)
        self._add_initializers([code_tensor, scale_tensor, zero_tensor])
        attributes: dict[str, int] = {"axis": 1 if transposed else 0}
        if not per_channel:
            attributes = {"axis": 0 if transposed else 1, "block_size": grid.group_size}
        name_prefix = name or "model"
        matrix_name = f"{base}:dequantized"
        nodes = [
            helper.make_node(
                "DequantizeLinear",
                [code_tensor.name, scale_tensor.name, zero_tensor.name],
                [matrix_name],
                name=f"{name_prefix}/weight_dequantize",
                **attributes,
            )
        ]
        weight_name = matrix_name
        if info.is_conv:
            shape = info.weight_shape  # (out, C, *kernel)
            if perm is not None:  # (out, K*C) channels-last -> (out, *kernel, C) -> (out, C, *kernel)
                staged = (shape[0], *shape[2:], shape[1])
                order = [0, len(shape) - 1, *range(1, len(shape) - 1)]
            else:
                staged, order = shape, None
            shape_name = f"{base}:shape"
            self.graph.initializer.append(numpy_helper.from_array(np.asarray(staged, dtype=np.int64), shape_name))
            reshaped = f"{base}:reshaped" if order else f"{base}:weight"
            nodes.append(
                helper.make_node("Reshape", [matrix_name, shape_name], [reshaped], name=f"{name_prefix}/weight_reshape")
            )
            weight_name = reshaped
            if order:
                weight_name = f"{base}:weight"
                nodes.append(
                    helper.make_node(
                        "Transpose", [reshaped], [weight_name], name=f"{name_prefix}/weight_transpose", perm=order
                    )
                )
        first = min(self._node_index(node) for node, _ in consumers)
        for offset, new in enumerate(nodes):
            self.graph.node.insert(first + offset, new)
        for node, index in consumers:
            node.input[index] = weight_name
        self._drop_initializer(init_name)
        form = "per-channel" if per_channel else f"blocked {grid.group_size}"
        return f"DequantizeLinear {storage} {form}"

    # -- activations

    def lower_activation_placeholders(self, placeholders: dict[str, tuple[int, float, float, str]]) -> dict[str, str]:
        """Replace each activation placeholder (an Identity node named in ``placeholders``, with
        its bits, scale, zero point and layer name) by Q/DQ, or by fake_quantize's float ops."""
        from onnx import TensorProto, helper, numpy_helper

        found: dict[str, str] = {}
        nodes = [n for n in self.graph.node if n.op_type == "Identity" and n.name in placeholders]
        if len(nodes) != len(placeholders):
            raise RuntimeError("activation quantization nodes were lost converting the graph's opset")
        for node in nodes:
            bits, scale, zero, layer = placeholders[node.name]
            base = f"{layer or 'model'}.input_quant.{len(found)}"
            scale_tensor = numpy_helper.from_array(np.asarray(scale, dtype=np.float32), f"{base}:scale")
            types = {4: TensorProto.UINT4, 8: TensorProto.UINT8, 16: TensorProto.UINT16}
            if bits in types:
                if bits == 16:
                    zero_tensor = numpy_helper.from_array(np.asarray(int(zero), dtype=np.uint16), f"{base}:zero_point")
                elif bits == 8:
                    zero_tensor = numpy_helper.from_array(np.asarray(int(zero), dtype=np.uint8), f"{base}:zero_point")
                else:
                    zero_tensor = helper.make_tensor(f"{base}:zero_point", TensorProto.UINT4, [], [int(zero)])
                self.graph.initializer.extend([scale_tensor, zero_tensor])
                io_names = [scale_tensor.name, zero_tensor.name]
                new_nodes = [
                    helper.make_node("QuantizeLinear", [node.input[0], *io_names], [f"{base}:q"], name=f"{base}/q"),
                    helper.make_node("DequantizeLinear", [f"{base}:q", *io_names], [node.output[0]], name=f"{base}/dq"),
                ]
                form = f"QDQ uint{bits}"
            else:  # clamp range 0..2^bits-1 exists in no ONNX type: fake_quantize's float arithmetic
                zero_value = numpy_helper.from_array(np.asarray(zero, dtype=np.float32), f"{base}:zero")
                low = numpy_helper.from_array(np.asarray(0.0, dtype=np.float32), f"{base}:min")
                high = numpy_helper.from_array(np.asarray((1 << bits) - 1, dtype=np.float32), f"{base}:max")
                self.graph.initializer.extend([scale_tensor, zero_value, low, high])
                x, s, z = node.input[0], scale_tensor.name, zero_value.name
                steps = [
                    ("Div", [x, s]), ("Round", None), ("Add", [None, z]), ("Clip", [None, low.name, high.name]),
                    ("Sub", [None, z]), ("Mul", [s, None]),
                ]
                new_nodes, previous = [], None
                for i, (op, inputs) in enumerate(steps):
                    inputs = [previous] if inputs is None else [previous if v is None else v for v in inputs]
                    out = node.output[0] if i == len(steps) - 1 else f"{base}:{op.lower()}"
                    new_nodes.append(helper.make_node(op, inputs, [out], name=f"{base}/{op.lower()}"))
                    previous = out
                form = f"fake-quantize {bits}-bit (float ops)"
            self._replace_node(node, new_nodes)
            found[layer] = form
        return found

    # -- helpers

    def _node_index(self, node) -> int:
        """Position of ``node`` in the graph, by identity (``==`` on protobuf messages compares
        their contents)."""
        return next(i for i, candidate in enumerate(self.graph.node) if candidate is node)

    def _replace_node(self, node, new_nodes) -> None:
        position = self._node_index(node)
        del self.graph.node[position]
        for offset, new in enumerate(new_nodes):
            self.graph.node.insert(position + offset, new)

    def _drop_initializer(self, name: str) -> None:
        if self._consumers(name):
            return
        self.initializers.pop(name)
        # by position: remove() would compare tensors by content, slow on large models
        position = next(i for i, init in enumerate(self.graph.initializer) if init.name == name)
        del self.graph.initializer[position]
        self._arrays.pop(name, None)
        self.tensors.drop(name)

    def finish(self) -> None:
        """Opset imports of the domains the rewritten graph uses; value_info of removed values."""
        from onnx import helper

        for entry in [o for o in self.model.opset_import if o.domain in (_PLACEHOLDER_DOMAIN, _MSFT)]:
            self.model.opset_import.remove(entry)
        if self.uses_msft:
            self.model.opset_import.append(helper.make_opsetid(_MSFT, 1))
        produced = {out for node in self.graph.node for out in node.output}
        produced |= {i.name for i in self.graph.input} | set(self.initializers)
        for info in [v for v in self.graph.value_info if v.name not in produced]:
            self.graph.value_info.remove(info)


def _scope_of(node_name: str) -> str:
    """The module name of a traced node ("/encoder/layer.0/fc/ActQuant" -> "encoder.layer.0.fc")."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


# ----------------------------------------------------------------------------- large initializers and files


class _TensorData:
    """The data of an ONNX model's large initializers, held outside its proto while it is built.

    Protobuf cannot serialize 2 GiB or more, and the version converter, the checker and
    onnxruntime's loaders all serialize the model they are given. Each initializer of
    ``_DETACH_BYTES`` or more therefore stays in the graph with its name, type and dims but no data:
    marked as external data at the placeholder location ``_DETACHED`` (the version converter and the
    rewrite keep such tensors as they are), its bytes (ONNX ``raw_data`` layout: little-endian,
    4-bit types packed) kept here by name. :meth:`embed` puts them back (one file);
    :meth:`write_external` writes them to a data file and points the tensors there.
    """

    _DETACHED = "obc-native-detached"

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held (the detached initializers' data)."""
        return sum(len(raw) for raw in self._data.values())

    def detach_all(self, graph_model, folder: str | None = None) -> None:
        """Detach every large initializer of the graph; tensors already stored as external data
        (torch's exporter does so above 2 GiB) are read from ``folder`` (their model's folder)."""
        from onnx import TensorProto

        for tensor in graph_model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                raw = _read_external(tensor, folder)
                self._data[tensor.name] = raw
                _mark_external(tensor, self._DETACHED, 0, len(raw))
            else:
                self.detach(tensor)

    def detach(self, tensor) -> None:
        """Hold ``tensor``'s data here if it has ``_DETACH_BYTES`` or more of ``raw_data``."""
        raw = tensor.raw_data
        if len(raw) < _DETACH_BYTES:
            return
        self._data[tensor.name] = raw
        _mark_external(tensor, self._DETACHED, 0, len(raw))

    def drop(self, name: str) -> None:
        """Forget the data of the initializer ``name`` (removed from the graph)."""
        self._data.pop(name, None)

    def array(self, tensor) -> np.ndarray:
        """``tensor``'s values (read-only when detached: a view of the held bytes)."""
        from onnx import TensorProto, helper, numpy_helper

        raw = self._data.get(tensor.name)
        if raw is None:
            return numpy_helper.to_array(tensor)
        plain = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.INT8,
                 TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
                 TensorProto.UINT32, TensorProto.UINT64}
        if tensor.data_type in plain and sys.byteorder == "little":  # raw_data is little-endian
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
        copy = TensorProto()  # packed 4-bit, bfloat16, float8 ...: onnx decodes them
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.ClearField("data_location")
        copy.raw_data = raw
        return numpy_helper.to_array(copy)

    def embed(self, graph_model) -> None:
        """Put every held tensor's data back into the graph (and no longer hold it)."""
        from onnx import TensorProto

        for tensor in graph_model.graph.initializer:
            raw = self._data.pop(tensor.name, None)
            if raw is not None:
                del tensor.external_data[:]
                tensor.ClearField("data_location")  # set to DEFAULT, it would still be written
                tensor.raw_data = raw
        if self._data:  # a bug: data held for initializers the graph no longer has
            raise RuntimeError(f"initializer data without an initializer: {sorted(self._data)[:5]}")

    def write_external(self, graph_model, file: str, location: str) -> None:
        """Write the held tensors, in graph order, to ``file`` and point them there as external
        data at ``location`` (the file's name relative to the ONNX file's folder)."""
        names = {tensor.name for tensor in graph_model.graph.initializer}
        if set(self._data) - names:  # a bug, as in embed
            raise RuntimeError(f"initializer data without an initializer: {sorted(set(self._data) - names)[:5]}")
        offset = 0
        with open(file, "wb") as out:
            for tensor in graph_model.graph.initializer:
                raw = self._data.get(tensor.name)
                if raw is None:
                    continue
                if len(raw) >= _ALIGN_BYTES:
                    padding = -offset % _ALIGNMENT
                    out.write(bytes(padding))
                    offset += padding
                out.write(raw)
                _mark_external(tensor, location, offset, len(raw))
                offset += len(raw)


def _mark_external(tensor, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external-data tensor: ``length`` bytes at ``offset`` in ``location``."""
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read_external(tensor, folder: str | None) -> bytes:
    """The bytes of an external-data ``tensor`` whose file lies in ``folder``."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if folder is None:
        raise RuntimeError(f"initializer {tensor.name!r} refers to external data {location!r} without a folder")
    folder = os.path.abspath(folder)
    file = os.path.abspath(os.path.join(folder, location))
    if os.path.commonpath([file, folder]) != folder:
        raise RuntimeError(f"initializer {tensor.name!r}: external data {location!r} lies outside {folder}")
    offset = int(info.get("offset", 0))
    with open(file, "rb") as handle:
        handle.seek(offset)
        if "length" in info:
            raw = handle.read(int(info["length"]))
            if len(raw) != int(info["length"]):
                raise RuntimeError(f"initializer {tensor.name!r}: {file} ends before its data")
            return raw
        return handle.read()


def _write_files(graph_model, tensors: _TensorData, path: str, data_path: str, staging: str,
                 external_data: bool | None) -> bool:
    """Write the ONNX file ``path`` (and with external data, ``data_path``) through ``staging``;
    returns whether the weights went to ``data_path``. Both are made and checked in ``staging``,
    then renamed into place, the data file first; should renaming ``path`` fail, the previous data
    file is put back (or the new one removed), so that no new file is left."""
    import onnx

    size = graph_model.ByteSize() + tensors.nbytes
    external = size > _SINGLE_FILE_LIMIT if external_data is None else external_data
    if not external and size > _SINGLE_FILE_LIMIT:
        raise ExportError(
            f"the ONNX model takes about {size} bytes, more than one file can hold (protobuf's 2 GiB limit); "
            f"export with external_data=True (or None) to write the weights to {data_path}"
        )
    staged = os.path.join(staging, os.path.basename(path))
    staged_data = os.path.join(staging, os.path.basename(data_path))
    if external:
        tensors.write_external(graph_model, staged_data, os.path.basename(data_path))
    else:
        tensors.embed(graph_model)
    if graph_model.ByteSize() > _PROTOBUF_LIMIT:  # external: constants of nodes alone pass 2 GiB
        raise ExportError(
            f"the ONNX graph without its initializers still takes {graph_model.ByteSize()} bytes (large constants "
            "inside nodes), more than protobuf can write; this model cannot be exported to ONNX"
        )
    with open(staged, "wb") as handle:
        handle.write(graph_model.SerializeToString())
    try:
        onnx.checker.check_model(staged)  # by path: reads the external data's folder, never serializes it
    except onnx.checker.ValidationError as err:  # a rewrite bug, not a user error
        raise RuntimeError(f"the rewritten ONNX graph is invalid: {err}") from err
    if not external:
        _install(staged, path)
        if os.path.isfile(data_path) and not os.path.islink(data_path):
            os.remove(data_path)  # an earlier export's weights, which the new file does not read
            logger.info("removed %s, the external data of the ONNX file this export replaced", data_path)
        return False
    previous = _keep_previous(data_path, os.path.join(staging, "previous" + _DATA_SUFFIX))
    _install(staged_data, data_path)
    try:
        _install(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if previous is not None:
                os.replace(previous, data_path)
            else:
                os.remove(data_path)
        raise
    return True


def _keep_previous(data_path: str, backup: str) -> str | None:
    """A second name ``backup`` for the regular file at ``data_path`` (a hard link; where the file
    system has none, the file is moved there), or None if there is none."""
    if not os.path.isfile(data_path) or os.path.islink(data_path):
        return None
    try:
        os.link(data_path, backup)
    except OSError:
        try:
            os.replace(data_path, backup)
        except OSError:
            return None
    return backup


def _install(staged: str, target: str) -> None:
    """Rename the finished file ``staged`` onto ``target`` through ``write_file_atomically`` (a
    replaced file keeps its mode, a link at ``target`` is replaced, the file is flushed to disk)."""
    write_file_atomically(target, lambda temp: os.replace(staged, temp), error=ExportError)
