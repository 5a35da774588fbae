"""Input conversion policy: dtypes, shapes, contiguity and finiteness of user arrays.

Lossless, unambiguous conversions are made silently (non-contiguous, read-only, other float
byte orders are copied); anything else raises ``TypeError`` (wrong kind of array) or
``ValueError`` (wrong shape, NaN/Inf, out-of-range values). Every message names the argument,
what was expected and what arrived.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _core

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _as_array(value, name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # torch tensors and other array-likes: go through numpy without importing torch here.
    try:
        return np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{name}: expected an array, got {type(value).__name__}") from exc


def _check_float_kind(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(
            f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}"
        )


def as_weight(value, name: str = "W") -> np.ndarray:
    """W as a C-contiguous float32/float64 2-D array (float16 is widened to float32).

    Shape: (rows, cols) = (outputs, inputs). Raises TypeError/ValueError on bad input.
    """
    arr = _as_array(value, name)
    _check_float_kind(arr, name)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, cols) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {arr.shape}")
    dtype = np.float64 if arr.dtype.itemsize == 8 else np.float32
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return arr


def as_hessian(value, cols: int, name: str = "H") -> np.ndarray:
    """H as a (cols, cols) float32 or float64 array, C- or Fortran-contiguous.

    H is the largest input of a solve, so it is passed on without a copy whenever possible: its
    dtype is kept (float16 is widened to float32) and only a non-contiguous view is copied. The
    core reads either type and always prepares the inverse in float64; it also checks that the
    values are finite and that H is symmetric.
    """
    arr = _as_array(value, name)
    _check_float_kind(arr, name)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{name}: expected a square (cols, cols) array, got shape {arr.shape}")
    if arr.shape[0] != cols:
        raise ValueError(
            f"{name}: expected shape ({cols}, {cols}) to match the {cols} columns of W, "
            f"got {arr.shape}"
        )
    dtype = np.float64 if arr.dtype.itemsize == 8 else np.float32
    native = arr.dtype == np.dtype(dtype)  # also false for a non-native byte order
    if native and (arr.flags.c_contiguous or arr.flags.f_contiguous):
        return arr
    return np.ascontiguousarray(arr, dtype=dtype)


def as_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer argument (bool rejected) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def as_fraction(value, name: str) -> float:
    """A float in [0, 1] (e.g. sparsity)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    return value


def as_damp(value) -> float:
    """Relative damping, a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"damp: expected a number >= 0, got {type(value).__name__}")
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"damp: expected a finite value >= 0, got {value}")
    return value


# The most threads a call may ask for; the core (obc::kMaxThreads) and the C API
# (OBC_MAX_THREADS) use the same bound. Far above any core count: a larger request is a mistake
# (OpenMP would try to start that many threads and abort the process).
MAX_THREADS = 1024


# Bounds of integer arguments that the core takes as C int / as a signed 64-bit Index. Larger
# Python ints would fail pybind11's conversion with a TypeError listing the internal signature
# instead of naming the argument.
INT_MAX = 2**31 - 1
INDEX_MAX = 2**63 - 1


def as_threads(value) -> int:
    """num_threads: None (OpenMP default) or an integer in [0, MAX_THREADS] (1024); 0 = default."""
    if value is None:
        return 0
    return as_int(value, "num_threads", low=0, high=MAX_THREADS)


def as_choice(value, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``.

    Raises TypeError when value is not a string (None, a number, bytes: a wrong type, STYLE
    rule 4) and ValueError when it is a string outside ``choices``; both messages name the
    argument and list the choices.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {value!r} "
                        f"({type(value).__name__}, not a string)")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def as_divisor(value, name: str, cols: int) -> int:
    """A positive integer dividing cols."""
    value = as_int(value, name, low=1)
    if cols % value != 0:
        raise ValueError(
            f"{name}: expected a positive divisor of cols ({cols}), got {value}"
        )
    return value


def count_for_sparsity(total: int, sparsity: float) -> int:
    """How many of ``total`` items (weights, blocks, groups, steps) ``sparsity`` prunes.

    ceil(sparsity * total), robust to binary rounding (0.07 * 100 counts 7, not 8): the core's
    own rule, so that every helper and baseline prunes exactly as many items as the solvers at
    the same nominal sparsity. Raises TypeError/ValueError unless total is an integer >= 0 and
    sparsity a number in [0, 1].
    """
    return int(_core.count_for_sparsity(as_int(total, "total", low=0),
                                        as_fraction(sparsity, "sparsity")))
