"""Costs of a compressed weight matrix: parameters, storage bits, FLOPs and bit operations.

Cost types (all per layer weight matrix, ``rows x cols``; ``nnz`` = non-zero weights after
compression, ``total = rows * cols``; ``b`` = the level's weight bits):

- ``"params"``: ``nnz``.
- ``"flops"``: ``2 * nnz * flops_per_weight`` (a multiply and an add per non-zero weight
  application; ``flops_per_weight`` is how often each weight is applied per sample: 1 for a
  linear layer per token, ``H_out * W_out`` for a convolution per image).
- ``"bops"``: ``nnz * flops_per_weight * b_w * b_a`` (bit operations of the multiply-accumulates):
  ``b_w = b`` for quantized levels and ``dense_bits`` otherwise; ``b_a = act_bits`` (``None``:
  32-bit float activations; ``"same"``: equal to ``b_w``).
- ``"bits"``: storage bits of the weight matrix in the ``obc_native.compressed`` format (version
  1, ``obc_native.torch.serialize``), which stores each layer in the smallest of::

      dense             total * dense_bits
      sparse            8 * ceil(total / 8) + nnz * dense_bits        (bitmask + values)
      quantized         8 * ceil(total * b / 8) + grid
      sparse quantized  8 * ceil(total / 8) + 8 * ceil(nnz * b / 8) + grid

  where ``grid = rows * groups * 40`` (a float32 scale and a uint8 zero point per row and
  group, stored for symmetric grids too) and ``groups = cols / group_size`` (1 per row when
  ``group_size`` is None). N:M masks are stored as the same 1 bit per weight bitmask (not as
  ``log2 C(m, n)`` bits per group). ``dense_bits = 32`` is float32 storage.
- any user-supplied table, e.g. measured ``"time"``: ``LayerLevels.add_cost``.
"""

from __future__ import annotations

import math
import numbers

from ._arrays import as_int

__all__ = ["BUILTIN_COSTS", "GRID_BITS", "level_costs"]

BUILTIN_COSTS = ("params", "bits", "flops", "bops")
#: Bits of one quantization grid in the serialize format v1: a float32 scale and a uint8 zero
#: point per row and group (``obc_native.torch.serialize`` writes them; this module needs no torch).
GRID_BITS = 40


def level_costs(shape, nnz: int, *, bits: int | None = None, group_size: int | None = None,
                flops_per_weight: float = 1.0, act_bits=None, dense_bits: int = 32) -> dict:
    """The built-in costs of a ``shape = (rows, cols)`` weight matrix with ``nnz`` non-zeros,
    quantized to ``bits`` (None: not quantized) with ``group_size`` inputs per grid (None: one
    grid per row). See the module docstring for the definitions.

    Raises TypeError / ValueError naming the argument for a shape that is not two integers >= 0,
    ``nnz`` outside ``[0, rows * cols]``, ``bits`` / ``dense_bits`` / an integer ``act_bits``
    outside 1..64, a ``group_size`` that does not divide ``cols``, or a ``flops_per_weight`` that
    is negative or not finite (each used to give a cost silently: e.g. a group larger than the row
    counted no grid at all, ``bits=4.5`` mixed 4.5 and 4 bits).
    """
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise TypeError(f"shape: expected (rows, cols), got {shape!r}")
    rows, cols = (as_int(size, "shape", low=0) for size in shape)
    total = rows * cols
    nnz = as_int(nnz, "nnz", low=0, high=total)
    if bits is not None:
        bits = as_int(bits, "bits", low=1, high=64)
    dense_bits = as_int(dense_bits, "dense_bits", low=1, high=64)
    if group_size is not None:
        group_size = as_int(group_size, "group_size", low=1)
        if cols % group_size:
            raise ValueError(f"group_size: expected a divisor of the {cols} columns, got {group_size}")
    if isinstance(flops_per_weight, bool) or not isinstance(flops_per_weight, numbers.Real) or not (
            math.isfinite(flops_per_weight) and flops_per_weight >= 0):
        raise ValueError(f"flops_per_weight: expected a finite number >= 0, got {flops_per_weight!r}")
    if act_bits is not None and act_bits != "same":
        act_bits = as_int(act_bits, "act_bits", low=1, high=64)
    mask_bits = 8 * math.ceil(total / 8)
    storage = [total * dense_bits, mask_bits + nnz * dense_bits]
    if bits is not None:
        groups = 1 if not group_size else cols // int(group_size)
        grid = rows * groups * GRID_BITS
        storage.append(8 * math.ceil(total * bits / 8) + grid)
        storage.append(mask_bits + 8 * math.ceil(nnz * bits / 8) + grid)
    weight_bits = dense_bits if bits is None else int(bits)
    if act_bits is None:
        act = 32
    elif act_bits == "same":
        act = weight_bits
    else:
        act = int(act_bits)
    macs = nnz * float(flops_per_weight)
    return {"params": float(nnz), "bits": float(min(storage)), "flops": 2.0 * macs,
            "bops": macs * weight_bits * act}
