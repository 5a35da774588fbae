"""Layer Hessians from calibration activations, and Hessian files (docs/hessian_format.md).

``HessianAccumulator`` keeps the float64 sum S = sum_x x x^T and the sample count n; the layer
Hessian is H = 2/n S. Shards accumulated in different processes (or loaded from files) merge
exactly, because S and n simply add.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _core
from ._files import as_path

# The widest accumulator: the Hessian file format's limit on cols (docs/hessian_format.md). Far
# beyond any memory (8 * cols**2 bytes); a larger request is a mistake, refused before allocating.
MAX_COLS = 2**28


def _as_path(path, name: str = "path") -> str:
    # a NUL used to be cut there by the C++ side: save("a\0b") wrote a file named "a"
    return as_path(path, name)


def _as_activations(value, cols: int) -> np.ndarray:
    """X as a C-contiguous float32/float64 (n, cols) array (float16 is widened to float32)."""
    arr = _arrays._as_array(value, "X")
    _arrays._check_float_kind(arr, "X")
    if arr.ndim != 2:
        raise ValueError(
            f"X: expected a 2-D (n, cols) array of n input rows, got shape {arr.shape}; "
            "unfold convolution patches (and flatten batch and positions) into rows first"
        )
    if arr.shape[1] != cols:
        raise ValueError(
            f"X: expected {cols} columns (the accumulator's input width), got shape {arr.shape}"
        )
    dtype = np.float64 if arr.dtype.itemsize == 8 else np.float32
    return np.ascontiguousarray(arr, dtype=dtype)


class HessianAccumulator:
    """Accumulates the layer Hessian H = 2/n * sum_x x x^T from batches of activations.

    Args:
        cols: input width of the layer (W has shape (rows, cols)), 1..2**28 (the Hessian file
            format's limit; the float64 sum takes 8 * cols**2 bytes).
        num_threads: threads for the Gram products (None = OpenMP default); the result is
            bit-identical for every thread count.

    Each batch is summed in float64 in a fixed order (chunks of rows in input order), so the
    same sequence of batches always gives the same bits. Methods release the GIL and are safe
    to call from several threads (calls on one accumulator are serialized). Accumulators
    pickle (for multiprocessing) through their exact state.
    """

    __slots__ = ("_impl",)

    def __init__(self, cols: int, *, num_threads: int | None = None):
        cols = _arrays.as_int(cols, "cols", low=1, high=MAX_COLS)
        self._impl = _core.HessianAccumulator(cols, _arrays.as_threads(num_threads))

    @classmethod
    def _wrap(cls, impl) -> HessianAccumulator:
        obj = cls.__new__(cls)
        obj._impl = impl
        return obj

    @property
    def cols(self) -> int:
        """Input width."""
        return int(self._impl.cols)

    @property
    def count(self) -> int:
        """Number of activation rows (samples) added so far."""
        return int(self._impl.count)

    @property
    def num_threads(self) -> int:
        """Threads for the Gram products (0 = OpenMP default)."""
        return int(self._impl.num_threads)

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        self._impl.num_threads = _arrays.as_threads(value)

    def add(self, X) -> None:
        """Adds the n rows of X, shape (n, cols), float32 or float64 (float16 is widened).

        For a linear layer the rows are input vectors; for a convolution, unfolded patches
        (batch * positions rows of in_channels * kh * kw). Raises TypeError for non-float input,
        ValueError for a wrong shape, NaN/Inf, or values so large that the float64 sum would
        overflow (every entry of S is kept <= DBL_MAX / 4, so hessian() is always finite); the
        accumulator is then unchanged.
        """
        self._impl.add(_as_activations(X, self.cols))

    def merge(self, other: HessianAccumulator) -> None:
        """Adds the samples of `other` (same cols): sums and counts add, exactly."""
        if not isinstance(other, HessianAccumulator):
            raise TypeError(
                f"other: expected a HessianAccumulator, got {type(other).__name__}"
            )
        if other.cols != self.cols:
            raise ValueError(
                f"other: expected an accumulator of {self.cols} columns, got {other.cols}"
            )
        self._impl.merge(other._impl)

    def reset(self) -> None:
        """Forgets all samples."""
        self._impl.reset()

    def hessian(self) -> np.ndarray:
        """H = 2/n * S, (cols, cols) float64, exactly symmetric. ValueError when count == 0."""
        return self._impl.hessian()

    def sum(self) -> np.ndarray:
        """S = sum_x x x^T, (cols, cols) float64, exactly symmetric."""
        return self._impl.sum()

    def copy(self) -> HessianAccumulator:
        """An independent accumulator with the same state."""
        return HessianAccumulator._from_state(self.sum(), self.count, self.num_threads)

    def save(self, path) -> None:
        """Writes a Hessian file, replacing `path` atomically (temporary file + rename).

        Replaces only a missing path, an empty file or an existing Hessian file; OSError for a
        directory, FIFO, device or any other file (left untouched), or when writing fails.
        Runs without the GIL; Ctrl-C stops it between 1 MiB chunks (KeyboardInterrupt), leaving
        `path` as it was.
        """
        self._impl.save(_as_path(path))

    @classmethod
    def load(cls, path, *, num_threads: int | None = None) -> HessianAccumulator:
        """Reads a Hessian file. OSError when unreadable or not a regular file (FIFOs and
        devices are refused without being opened); ValueError when it is not a valid Hessian
        file (magic, version, size, checksum or contents), naming the problem. Runs without
        the GIL; Ctrl-C stops it between 1 MiB chunks (KeyboardInterrupt)."""
        threads = _arrays.as_threads(num_threads)
        return cls._wrap(_core.HessianAccumulator.load(_as_path(path), threads))

    @classmethod
    def _from_state(cls, sum_xxt, count, num_threads=0) -> HessianAccumulator:
        return cls._wrap(_core.HessianAccumulator.from_state(
            np.ascontiguousarray(sum_xxt, dtype=np.float64), int(count), int(num_threads)))

    def __reduce__(self):
        return (HessianAccumulator._from_state, (self.sum(), self.count, self.num_threads))

    def __repr__(self) -> str:
        return f"HessianAccumulator(cols={self.cols}, count={self.count})"


def save_hessian(accumulator: HessianAccumulator, path) -> None:
    """Writes `accumulator` to a Hessian file at `path` (see HessianAccumulator.save)."""
    if not isinstance(accumulator, HessianAccumulator):
        raise TypeError(
            f"accumulator: expected a HessianAccumulator, got {type(accumulator).__name__}"
        )
    accumulator.save(path)


def load_hessian(path, *, num_threads: int | None = None) -> HessianAccumulator:
    """Reads a Hessian file into a new HessianAccumulator (see HessianAccumulator.load)."""
    return HessianAccumulator.load(path, num_threads=num_threads)


def read_hessian_info(path) -> dict:
    """Header of a Hessian file without reading the payload: version, cols, count, file_bytes."""
    return dict(_core.read_hessian_info(_as_path(path)))
