"""GGUF files of compressed models: Linear layers as Q4_0 / Q8_0 blocks holding our exact codes.

Quantized embedding tables (a recipe's ``embeddings``, ``num_embeddings x embedding_dim``, blocks
along the embedding dimension) are written the same way.

GGUF's two plain block formats are symmetric grids with one scale per block of 32 consecutive
inputs of a row, stored as float16 ``d``:

- ``Q4_0``: 4-bit codes ``q`` in 0..15, value ``d * (q - 8)`` (18 bytes per block: ``d``, then
  16 bytes, byte ``j`` holding element ``j`` in its low and element ``j + 16`` in its high nibble);
- ``Q8_0``: signed 8-bit ``q`` in -128..127, value ``d * q`` (34 bytes per block).

These are exactly obc_native's symmetric grids (zero point ``2^(bits-1)``) with
``group_size=32``: ``gguf_layer_config("Q4_0")`` is that recipe entry. The one difference is the
float16 scale: :func:`save_gguf` rounds each group's scale to float16 and stores the codes OBQ/GPTQ
chose, unchanged, so the file's values are ``float16(scale) * (code - zero)`` (a relative change of
at most 2^-11 per group from the model's weights, reported as ``max_abs_change``). Nothing is
re-quantized by another tool, and the model is not changed: a writer leaves its input as it was, so
the same model and report can be written again (a second file is bit-identical to the first).
A float16 / bfloat16 model's weights are its float32 grid values rounded to its dtype; the file
holds the exact codes and scales.

Tensors keep their PyTorch state-dict names and other tensors are stored as float32 (or
float16): the file holds the weights, not a llama.cpp architecture (whose runners expect their
own tensor names and hyper-parameter keys, e.g. ``blk.0.attn_q.weight``; rename the tensors for
that). Needs the ``gguf`` package (``pip install gguf``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._arrays import as_choice
from .._files import output_file_problem, path_str, write_file_atomically
from .recipe import LayerConfig
from .report import CompressionReport

__all__ = ["save_gguf", "gguf_layer_config", "GGUFLayer", "GGUFExportError", "GGUF_BLOCK"]

logger = logging.getLogger("obc_native.torch")

GGUF_BLOCK = 32  # inputs per block (one float16 scale) of Q4_0 and Q8_0
_BITS = {"Q4_0": 4, "Q8_0": 8}
_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64)  # I8..I64, what gguf's writer stores


class GGUFExportError(ValueError):
    """A layer or grid that a GGUF block format cannot hold exactly."""


@dataclass
class GGUFLayer:
    """One Linear layer written as a GGUF block format.

    ``max_abs_change``: largest difference between a weight of the model and its value in the file,
    where its group's scale was rounded to float16 (0 when the scales already were float16 values).
    """

    name: str
    type: str
    shape: tuple[int, int]
    max_abs_change: float


def gguf_layer_config(block_type: str, **fields) -> LayerConfig:
    """The recipe entry whose grid is GGUF's ``block_type`` ("Q4_0" or "Q8_0"): symmetric, groups of 32.

    ``fields``: other :class:`LayerConfig` fields (e.g. ``prune="nm"``); ``bits``, ``sym`` and
    ``group_size`` are fixed by the format.
    """
    as_choice(block_type, "block_type", tuple(sorted(_BITS)))
    clash = sorted({"bits", "sym", "group_size"} & set(fields))
    if clash:
        raise ValueError(f"gguf_layer_config: {clash} are fixed by {block_type}")
    return LayerConfig(bits=_BITS[block_type], sym=True, group_size=GGUF_BLOCK, **fields)


def save_gguf(model: nn.Module, report: CompressionReport, path: str | bytes | os.PathLike, *,
              architecture: str = "obc_native",
              float_type: str = "F32") -> list[GGUFLayer]:
    """Write ``model``'s state dict as a GGUF file, quantized Linear layers as Q4_0 / Q8_0 blocks.

    Args:
        model: the model after ``compress`` with ``report``; not changed (the file holds each
            quantized layer's float16-scale grid values, see the module docstring).
        report: the compression report (its per-layer grids give the scales and zero points).
        path: the ``.gguf`` file to write (str, bytes or os.PathLike; its folder must exist and be
            writable; checked first).
            Written to a temporary file renamed into place: a failed or interrupted write leaves
            a previous file at ``path`` as it was; a replaced file keeps
            its permission bits.
        architecture: the file's ``general.architecture`` value.
        float_type: "F32" or "F16", the type of every other floating-point tensor.

    Returns:
        one :class:`GGUFLayer` per layer written as Q4_0 / Q8_0.

    Raises:
        GGUFExportError: a quantized layer is not ``nn.Linear``, or its grid is not symmetric 4- or
            8-bit with groups of 32 along its inputs (recipe: ``gguf_layer_config``), or a scale
            does not fit float16, or its grid is not of the layer's shape (another model's report);
            a state-dict tensor of a type GGUF cannot hold (bool, uint8, complex); or ``path`` cannot
            be written (a directory, a missing or read-only folder, a FIFO, a NUL character, a name
            too long). Nothing is written then.
        TypeError: ``model`` is not an ``nn.Module``, ``report`` not a ``CompressionReport``, or
            ``path`` not a path.
        ImportError: the ``gguf`` package is missing.
    """
    import gguf

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, CompressionReport):
        raise TypeError(f"report: expected the CompressionReport returned by compress (its grids give the "
                        f"scales), got {type(report).__name__}")
    if float_type not in ("F32", "F16"):
        raise ValueError(f"float_type: expected 'F32' or 'F16', got {float_type!r}")
    path = path_str(path)
    problem = output_file_problem(path)  # before any layer is encoded
    if problem is not None:
        raise GGUFExportError(f"path {problem}")
    modules = dict(model.named_modules())
    state = model.state_dict()
    # gguf's writer refuses other dtypes (bool masks, uint8, complex) only deep inside, without the key
    unsupported = [(key, value.dtype) for key, value in state.items() if isinstance(value, torch.Tensor)
                   and not value.is_floating_point() and value.dtype not in _INTEGERS]
    if unsupported:
        key, dtype = unsupported[0]
        raise GGUFExportError(f"state-dict tensor {key!r} is {dtype}; GGUF holds floating-point and int8..int64 "
                              "tensors only: convert it (e.g. to torch.int8) or make it a non-persistent buffer")
    plans = {}
    for layer in report.layers:
        if layer.grid is None:
            continue
        module = modules.get(layer.name)
        plans[layer.name] = _plan(layer.name, module, layer.grid)
    # no path here: the writer opens the temporary file that write_file_atomically renames into place
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_name(type(model).__name__)
    keys = {f"{name}.weight": name for name in plans}
    snapped = {name: torch.from_numpy(_values(codes, scale16, _BITS[block_type]))
               for name, (block_type, codes, scale16) in plans.items()}
    # a weight tied to a quantized layer's (e.g. an output head sharing the embedding) is written
    # with the values that layer has in the file: the float16-scale grid values
    tied = {modules[name].weight.data_ptr(): values for name, values in snapped.items()}
    for key, tensor in state.items():
        values = tied.get(tensor.data_ptr())
        if key not in keys and values is not None and tuple(tensor.shape) == tuple(values.shape):
            tensor = values
        if key in keys:
            name = keys[key]
            block_type, codes, scale16 = plans[name]
            data = _blocks(codes, scale16, block_type)
            writer.add_tensor(key, data, raw_dtype=getattr(gguf.GGMLQuantizationType, block_type))
        else:
            array = tensor.detach().cpu()
            if array.is_floating_point():
                array = array.to(torch.float16 if float_type == "F16" else torch.float32)
            writer.add_tensor(key, array.contiguous().numpy())

    def write(temp: str) -> None:
        writer.open_output_file(Path(temp))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_file_atomically(path, write, error=GGUFExportError)
    # the model keeps its weights: the snapped values are computed apart (``snapped``), so a second
    # call with the same model and report finds them on the report's grid again
    written = []
    for name, (block_type, codes, scale16) in plans.items():
        weight = modules[name].weight
        change = float((snapped[name] - weight.detach().float().cpu()).abs().max())
        written.append(GGUFLayer(name, block_type, tuple(weight.shape), change))
    logger.info("GGUF written to %s: %d layer(s) as block formats", path, len(written))
    return written


def _plan(name: str, module: nn.Module | None, grid) -> tuple[str, np.ndarray, np.ndarray]:
    """(block type, codes ``out x in`` uint8, float16 scales ``out x in/32``) of one layer."""
    if not isinstance(module, (nn.Linear, nn.Embedding)):  # both (rows, cols), blocks along cols
        kind = "missing" if module is None else type(module).__name__
        raise GGUFExportError(f"layer {name!r} ({kind}): only nn.Linear layers and nn.Embedding tables are written "
                              "as GGUF blocks; skip it in the recipe or leave it unquantized")
    rows, cols = module.weight.shape
    block_type = {4: "Q4_0", 8: "Q8_0"}.get(grid.bits)
    if block_type is None or not grid.sym or grid.group_size != GGUF_BLOCK or cols % GGUF_BLOCK:
        raise GGUFExportError(
            f"layer {name!r}: grid of {grid.bits} bits, sym={grid.sym}, group_size={grid.group_size} on {cols} inputs "
            f"is not a GGUF block format; use gguf_layer_config('Q4_0') or ('Q8_0') (symmetric, groups of 32 along "
            "inputs that are a multiple of 32)")
    # a report of another model: caught here, not as a numpy broadcasting error below
    if np.shape(grid.scale) != (rows, cols // GGUF_BLOCK) or np.shape(grid.zero) != (rows, cols // GGUF_BLOCK):
        raise GGUFExportError(f"layer {name!r}: the report's grid has scales of shape {np.shape(grid.scale)}, but "
                              f"the layer is {rows} x {cols} (expected {(rows, cols // GGUF_BLOCK)}); pass the report "
                              "of this model's compression")
    zero = np.asarray(grid.zero)
    if not np.all(zero == 1 << (grid.bits - 1)):
        raise GGUFExportError(f"layer {name!r}: zero points other than {1 << (grid.bits - 1)} (not a symmetric grid)")
    scale = np.asarray(grid.scale, dtype=np.float32)
    with np.errstate(over="ignore"):  # checked just below
        scale16 = scale.astype(np.float16)
    if not np.all(np.isfinite(scale16)) or np.any((scale16 == 0) & (scale != 0)):
        largest = float(np.abs(scale).max())
        raise GGUFExportError(f"layer {name!r}: a scale outside float16's range ({largest:.3g} max); "
                              "GGUF blocks store float16 scales")
    stored = module.weight.detach().cpu()
    weight = stored.float().numpy()
    full_scale = np.repeat(scale, GGUF_BLOCK, axis=1)
    safe = np.where(full_scale == 0, np.float32(1), full_scale)
    codes = np.rint(weight.astype(np.float64) / safe) + (1 << (grid.bits - 1))
    if codes.min() < 0 or codes.max() > (1 << grid.bits) - 1:
        raise GGUFExportError(f"layer {name!r}: weights off the reported grid (changed after compression?)")
    codes = codes.astype(np.uint8)
    on_grid = full_scale * (codes.astype(np.float32) - np.float32(1 << (grid.bits - 1)))
    # a float16 / bfloat16 / float64 model holds the float32 grid values cast to its dtype
    # (compress casts the solver's result), so compare in that dtype
    if not torch.equal(torch.from_numpy(on_grid).to(stored.dtype), stored):
        raise GGUFExportError(f"layer {name!r}: weights off the reported grid (changed after compression?)")
    return block_type, codes, scale16


def _values(codes: np.ndarray, scale16: np.ndarray, bits: int) -> np.ndarray:
    """float32 ``float16 scale * (code - zero)``, exactly what GGUF's dequantization computes."""
    levels = codes.astype(np.int16) - (1 << (bits - 1))
    return np.repeat(scale16.astype(np.float32), GGUF_BLOCK, axis=1) * levels.astype(np.float32)


def _blocks(codes: np.ndarray, scale16: np.ndarray, block_type: str) -> np.ndarray:
    """The GGUF bytes ``(rows, in/32 * block bytes)`` uint8 of one layer."""
    rows, cols = codes.shape
    d = scale16.reshape(rows, cols // GGUF_BLOCK, 1).view(np.uint8)  # (rows, blocks, 2) little-endian float16
    blocks = codes.reshape(rows, cols // GGUF_BLOCK, GGUF_BLOCK)
    if block_type == "Q4_0":
        qs = blocks[..., : GGUF_BLOCK // 2] | (blocks[..., GGUF_BLOCK // 2 :] << np.uint8(4))
    else:
        qs = (blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)
