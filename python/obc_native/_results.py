"""Result objects returned by the numpy-level API."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _arrays, _closed_form

# Names of the quantizers, indexed by QuantResult.row_methods (the core's QuantMethod codes).
QUANT_METHODS = ("obq", "gptq", "gptq-natural", "rtn")


@dataclass(frozen=True)
class PruneResult:
    """Pruned layer.

    Attributes:
        weight: (rows, cols) pruned and updated weights, dtype of the input W.
        mask: (rows, cols) bool, True where the weight is kept (False = pruned, exactly 0).
        row_losses: (rows,) float64, 1/2 dw H dw^T per row with the undamped H, which equals
            ||(W - W_hat) X||^2 / n for H = 2/n X X^T.
        damp: relative damping used; damp_absolute: lambda added to diag(H).
        precision: "float32" or "float64", the precision the greedy eliminations ran in. A
            float32 layer runs in float32 unless its elimination lost positive definiteness
            (an ill-conditioned H, e.g. with damp=0): then the whole layer is redone in float64
            with the same damping, `weight` is that result rounded to float32 and "float64" is
            reported. (The Hessian inverse itself is always float64, and structured pruning
            eliminates on that shared float64 inverse in both precisions, so it reports the
            layer's dtype and has nothing to fall back to.)
    """

    weight: np.ndarray
    mask: np.ndarray
    row_losses: np.ndarray
    damp: float
    damp_absolute: float
    precision: str = "float64"

    @property
    def loss(self) -> float:
        """Layer loss ||(W - W_hat) X||_F^2 / n (sum of row_losses)."""
        return float(self.row_losses.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights."""
        return float(1.0 - self.mask.mean())


@dataclass(frozen=True)
class QuantResult:
    """Quantized layer: weight == scale[:, g] * (codes - zero[:, g]) for input c in group g.

    Attributes:
        weight: (rows, cols) dequantized weights, dtype of W, exactly on the grid.
        codes: (rows, cols) uint8 integer codes in [0, 2**bits - 1].
        scale: (rows, groups) grid step, dtype of W; zero: (rows, groups) uint8 zero points.
        bits, sym, group_size: the grid (group_size == cols when one grid per row).
        mask: (rows, cols) bool, False where the weight was zero on input (kept exactly zero).
        row_losses, damp, damp_absolute, precision: as in PruneResult (after a float64 redo the
            weights are still exactly on the float32 grid).
        row_methods: (rows,) uint8, the quantizer that produced each row, an index into
            QUANT_METHODS ("obq", "gptq", "gptq-natural", "rtn"); see row_method_names().
        row_losses_unrefined: (rows,) float64, each row's loss before refinement (equal to
            row_losses when no refinement ran).
        refine_passes: refinement passes run (the most of any row), 0 when none ran.
    """

    weight: np.ndarray
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    sym: bool
    group_size: int
    mask: np.ndarray
    row_losses: np.ndarray
    damp: float
    damp_absolute: float
    precision: str = "float64"
    row_methods: np.ndarray | None = None
    row_losses_unrefined: np.ndarray | None = None
    refine_passes: int = 0

    @property
    def loss(self) -> float:
        """Layer loss ||(W - W_hat) X||_F^2 / n (sum of row_losses)."""
        return float(self.row_losses.sum())

    @property
    def loss_unrefined(self) -> float:
        """Layer loss before refinement (sum of row_losses_unrefined; loss when unknown)."""
        if self.row_losses_unrefined is None:
            return self.loss
        return float(self.row_losses_unrefined.sum())

    def row_method_names(self) -> np.ndarray:
        """(rows,) str: the name of the quantizer of every row (see row_methods)."""
        if self.row_methods is None:
            raise ValueError("row_methods: this result does not record its methods")
        return np.asarray(QUANT_METHODS, dtype=object)[self.row_methods].astype(str)

    def group_index(self) -> np.ndarray:
        """(cols,) index of the grid group of every input column."""
        return np.arange(self.codes.shape[1]) // self.group_size


@dataclass(frozen=True)
class Trace:
    """Complete greedy ExactOBS elimination traces of a layer (one per row).

    Attributes:
        order: (rows, steps) int32, the column (block == 1) or block index removed at each step;
            entries that were already zero (or dead inputs) come first, at zero loss.
        losses: (rows, steps) float64, loss increase of each step under the damped H.
        block: weights removed per step.
        damp, damp_absolute: damping used.
        precision: as in PruneResult (a float32 trace redone in float64 has float64 orders and
            losses; recorded weights are rounded to float32).
    """

    order: np.ndarray
    losses: np.ndarray
    block: int
    damp: float
    damp_absolute: float
    precision: str
    _W: np.ndarray = field(repr=False)
    _H: np.ndarray = field(repr=False)
    _num_threads: int = field(repr=False, default=0)
    _recorded: dict = field(repr=False, default_factory=dict)  # steps per row -> weights

    def steps_per_row(self, sparsity: float, spread: str = "global") -> np.ndarray:
        """(rows,) number of leading steps of each row's order taken for `sparsity`.

        "global": the ceil(s * rows * steps) smallest step losses of the layer (ties by row,
        then step); "uniform": ceil(s * steps) per row.
        """
        sparsity = _arrays.as_fraction(sparsity, "sparsity")
        spread = _arrays.as_choice(spread, "spread", ("global", "uniform"))
        rows, steps = self.order.shape
        if spread == "uniform":
            return np.full(rows, _arrays.count_for_sparsity(steps, sparsity), dtype=np.int64)
        total = _arrays.count_for_sparsity(rows * steps, sparsity)
        counts = np.zeros(rows, dtype=np.int64)
        if total:
            flat = self.losses.ravel()
            # lexsort: primary key loss, then flat index (row-major = row, then step)
            chosen = np.lexsort((np.arange(flat.size), flat))[:total]
            np.add.at(counts, chosen // steps, 1)
        return counts

    def pruned_mask(self, counts) -> np.ndarray:
        """(rows, cols) bool, True where pruned by the first counts[r] steps of each row.

        counts: (rows,) integers in [0, steps] (e.g. steps_per_row()); TypeError / ValueError
        otherwise (a count past the end or below 0 would silently prune all or nothing).
        """
        counts = np.asarray(counts)
        rows, steps = self.order.shape
        if counts.dtype.kind not in "iu":
            raise TypeError(f"counts: expected integers, got dtype {counts.dtype}")
        if counts.shape != (rows,):
            raise ValueError(f"counts: expected shape ({rows},), one count per row, got {counts.shape}")
        if counts.size and (counts.min() < 0 or counts.max() > steps):
            raise ValueError(f"counts: expected values in [0, {steps}] (steps per row), got "
                             f"[{counts.min()}, {counts.max()}]")
        take = np.arange(steps)[None, :] < counts[:, None]
        pruned_blocks = np.zeros((rows, steps), dtype=bool)
        r_idx = np.broadcast_to(np.arange(rows)[:, None], (rows, steps))
        pruned_blocks[r_idx[take], self.order[take]] = True
        return np.repeat(pruned_blocks, self.block, axis=1)

    def weights(self, sparsity: float, spread: str = "global") -> PruneResult:
        """Pruned weights at `sparsity`, re-solved in closed form for the trace's mask, or, for a
        uniform spread the trace recorded (see trace_unstructured's `record`), the greedy's own
        weights there (no solve)."""
        counts = self.steps_per_row(sparsity, spread)
        recorded = self._recorded.get(int(counts[0])) if spread == "uniform" else None
        if recorded is not None:
            # solve_masked's mask: the trace's, plus the zeros and dead inputs it always prunes.
            live = np.diagonal(self._H) != 0
            mask = ~self.pruned_mask(counts) & (self._W != 0) & live[None, :]
            return PruneResult(
                weight=recorded.copy(), mask=mask,
                row_losses=_closed_form.layer_loss(self._W, recorded, self._H,
                                                   num_threads=self._num_threads or None),
                damp=self.damp, damp_absolute=self.damp_absolute, precision=self.precision)
        return prune_result(_closed_form.solve_masked(
            self._W, self._H, ~self.pruned_mask(counts), self.damp, self._num_threads or None))


def prune_result(d: dict) -> PruneResult:
    """PruneResult from the core's result dict (weight, mask, row_losses, damp, damp_absolute,
    precision)."""
    return PruneResult(
        weight=d["weight"], mask=d["mask"], row_losses=d["row_losses"],
        damp=d["damp"], damp_absolute=d["damp_absolute"], precision=d["precision"],
    )
