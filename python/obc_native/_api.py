"""Numpy-level ExactOBS / OBQ solvers: validation in Python, solving in the C++ core."""

from __future__ import annotations

import collections.abc

import numpy as np

from . import _arrays, _closed_form, _core
from ._closed_form import kernels as _kernels
from ._closed_form import layer_loss
from ._results import QUANT_METHODS, PruneResult, QuantResult, Trace
from ._results import prune_result as _prune_result

_SPREADS = ("global", "uniform")
_METHODS = ("exact", "sparsegpt")
_DEFAULT_LAZY_BLOCK = 128  # the SparseGPT paper's B


def _method(method, lazy_block, mode: str, available: tuple[str, ...] = _METHODS):
    """Validated (method, lazy_block): lazy_block is SparseGPT's only, None = 128."""
    method = _arrays.as_choice(method, "method", _METHODS)
    if method not in available:
        raise ValueError(f"method: {method!r} is not available for {mode}; expected one of "
                         f"{available}")
    if method != "sparsegpt":
        if lazy_block is not None:
            raise ValueError(f"lazy_block: only used by method='sparsegpt', got lazy_block="
                             f"{lazy_block!r} with method={method!r}")
        return method, 0
    lazy = _DEFAULT_LAZY_BLOCK if lazy_block is None else _arrays.as_int(
        lazy_block, "lazy_block", low=1, high=_arrays.INDEX_MAX)
    return method, lazy


# quantize(method=...): a single quantizer, or "auto" = the core's candidates for the layer's
# width (auto_quant_methods), best per row.
AUTO_OBQ_MAX_COLS = _core.AUTO_OBQ_MAX_COLS
_METHOD_CHOICES = ("auto",) + QUANT_METHODS


def _quant_result(d: dict, bits: int, sym: bool) -> QuantResult:
    return QuantResult(
        weight=d["weight"], codes=d["codes"], scale=d["scale"], zero=d["zero"], bits=bits,
        sym=sym, group_size=int(d["group_size"]), mask=d["mask"], row_losses=d["row_losses"],
        damp=d["damp"], damp_absolute=d["damp_absolute"], precision=d["precision"],
        row_methods=d["row_method"], row_losses_unrefined=d["row_losses_unrefined"],
        refine_passes=int(d["refine_passes"]),
    )


def _layer(W, H):
    W = _arrays.as_weight(W, "W")
    return W, _arrays.as_hessian(H, W.shape[1], "H")


def prune_unstructured(W, H, sparsity, *, damp=0.01, spread="global", method="exact",
                       lazy_block=None, num_threads=None):
    """Unstructured ExactOBS pruning of a layer.

    Args:
        W: (rows, cols) weights (outputs x inputs), float32 or float64.
        H: (cols, cols) Hessian 2/n X X^T of the layer inputs X (cols x n).
        sparsity: fraction of weights to prune, in [0, 1]; ceil(sparsity * rows * cols) in all
            ("global") or ceil(sparsity * cols) per row ("uniform"). Existing zeros count.
        damp: relative damping; lambda = damp * mean(diag H) is added to diag(H).
        spread: "global" (the paper: smallest greedy step losses across the layer) or "uniform".
        num_threads: threads over rows (None or 0 = OpenMP default, at most 1024). Results do not
            depend on it.
        method: "exact" (default): ExactOBS, the greedy with a private inverse per row, about
            rows * cols^3 flops; "sparsegpt": SparseGPT (Frantar & Alistarh 2023), one sweep over
            the columns with the Cholesky factor of H^-1 shared by all rows and masks chosen per
            lazy block, about cols^3 / 3 + rows * cols^2 flops, for wide layers; its loss is
            higher. See docs/python_api.md for its counting rule and when it is worth it.
        lazy_block: SparseGPT's columns per lazy block (None = 128); only with "sparsegpt".
    Returns:
        PruneResult.
    """
    W, H = _layer(W, H)
    sparsity = _arrays.as_fraction(sparsity, "sparsity")
    spread = _arrays.as_choice(spread, "spread", _SPREADS)
    method, lazy = _method(method, lazy_block, "unstructured pruning")
    if method == "sparsegpt":
        return _prune_result(_kernels(W).prune_sparsegpt(
            W, H, "unstructured", sparsity, spread, 1, 0, 0, lazy, _arrays.as_damp(damp),
            _arrays.as_threads(num_threads)))
    return _prune_result(_kernels(W).prune_unstructured(
        W, H, sparsity, spread, _arrays.as_damp(damp), _arrays.as_threads(num_threads)))


def prune_nm(W, H, n, m, *, damp=0.01, method="exact", lazy_block=None, num_threads=None):
    """N:M ExactOBS pruning: at least n zeros in every group of m consecutive inputs of a row.

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian.
        n, m: 0 < n < m, cols % m == 0 (e.g. 2, 4 for 2:4).
        method: "exact" (default): ExactOBS, the greedy with a private inverse per row, about
            rows * cols^3 flops; "sparsegpt": SparseGPT (Frantar & Alistarh 2023), one sweep over
            the columns with the Cholesky factor of H^-1 shared by all rows and masks chosen per
            lazy block, about cols^3 / 3 + rows * cols^2 flops, for wide layers; its loss is
            higher. See docs/python_api.md for its counting rule and when it is worth it.
        lazy_block: SparseGPT's columns per lazy block (None = 128); only with "sparsegpt".
    Returns:
        PruneResult (exactly n zeros per group unless a group already had more).
    """
    W, H = _layer(W, H)
    m = _arrays.as_int(m, "m", low=2)
    n = _arrays.as_int(n, "n")
    if not 0 < n < m:
        raise ValueError(f"n: expected 0 < n < m = {m}, got n = {n}")
    if W.shape[1] % m:
        raise ValueError(f"m: expected a divisor of cols ({W.shape[1]}), got m = {m}")
    method, lazy = _method(method, lazy_block, "N:M pruning")
    if method == "sparsegpt":
        return _prune_result(_kernels(W).prune_sparsegpt(
            W, H, "nm", 0.0, "global", 1, n, m, lazy, _arrays.as_damp(damp),
            _arrays.as_threads(num_threads)))
    return _prune_result(_kernels(W).prune_nm(
        W, H, n, m, _arrays.as_damp(damp), _arrays.as_threads(num_threads)))


def prune_blocked(W, H, sparsity, block, *, damp=0.01, spread="global", method="exact",
                  lazy_block=None, num_threads=None):
    """Blocked ExactOBS pruning: blocks of `block` consecutive weights of a row removed together.

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian.
        sparsity: fraction of blocks to prune, in [0, 1] (spread as in prune_unstructured).
        block: block length, a divisor of cols.
        method: "exact" (default): ExactOBS, the greedy with a private inverse per row, about
            rows * cols^3 flops; "sparsegpt": SparseGPT (Frantar & Alistarh 2023), one sweep over
            the columns with the Cholesky factor of H^-1 shared by all rows and masks chosen per
            lazy block, about cols^3 / 3 + rows * cols^2 flops, for wide layers; its loss is
            higher. See docs/python_api.md for its counting rule and when it is worth it.
        lazy_block: SparseGPT's columns per lazy block (None = 128); only with "sparsegpt".
            With "sparsegpt" a block is scored by the sum of its weights' w^2 / U_jj^2, and
            lazy_block is rounded down to a multiple of block (at least one block).
    Returns:
        PruneResult.
    """
    W, H = _layer(W, H)
    sparsity = _arrays.as_fraction(sparsity, "sparsity")
    block = _arrays.as_divisor(block, "block", W.shape[1])
    spread = _arrays.as_choice(spread, "spread", _SPREADS)
    method, lazy = _method(method, lazy_block, "blocked pruning")
    if method == "sparsegpt":
        return _prune_result(_kernels(W).prune_sparsegpt(
            W, H, "blocked", sparsity, spread, block, 0, 0, lazy, _arrays.as_damp(damp),
            _arrays.as_threads(num_threads)))
    return _prune_result(_kernels(W).prune_blocked(
        W, H, sparsity, block, spread, _arrays.as_damp(damp), _arrays.as_threads(num_threads)))


def prune_structured(W, H, sparsity, *, group=1, damp=0.01, method="exact", num_threads=None):
    """Structured ExactOBS pruning: whole groups of `group` input columns removed from all rows.

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian.
        sparsity: fraction of column groups removed: ceil(sparsity * cols / group).
        group: consecutive columns per group (e.g. kh*kw for one conv input channel).
        method: "exact" only (SparseGPT has no structured mode); anything else raises ValueError.
    Returns:
        PruneResult.
    """
    _method(method, None, "structured pruning", ("exact",))
    W, H = _layer(W, H)
    sparsity = _arrays.as_fraction(sparsity, "sparsity")
    group = _arrays.as_divisor(group, "group", W.shape[1])
    return _prune_result(_kernels(W).prune_structured(
        W, H, sparsity, group, _arrays.as_damp(damp), _arrays.as_threads(num_threads)))


def _quant_args(W, bits, sym, group_size, grid):
    bits = _arrays.as_int(bits, "bits", low=2, high=8)
    if not isinstance(sym, (bool, np.bool_)):
        raise TypeError(f"sym: expected a bool, got {type(sym).__name__}")
    group = 0 if group_size is None else _arrays.as_divisor(group_size, "group_size", W.shape[1])
    grid = _arrays.as_choice(grid, "grid", ("mse", "minmax"))
    return bits, bool(sym), group, grid


def auto_quant_methods(cols: int) -> list[str]:
    """The candidates of quantize(method="auto") for a layer of `cols` inputs (cols >= 0).

    "obq" and "gptq" up to AUTO_OBQ_MAX_COLS (1024) inputs, "gptq" alone above: greedy OBQ costs
    O(rows * cols^3) (about 30 min for a 4096 x 4096 layer on two cores) and wins few rows of
    wide layers, where refined GPTQ is within a fraction of a percent of the pair's loss.
    """
    return list(_core.auto_quant_methods(_arrays.as_int(cols, "cols", low=0,
                                                        high=_arrays.INDEX_MAX)))


def _methods(method, cols: int) -> list:
    """quantize()'s `method` as the list of candidate quantizers for a layer of `cols` inputs."""
    if isinstance(method, str):
        method = _arrays.as_choice(method, "method", _METHOD_CHOICES)
        return auto_quant_methods(cols) if method == "auto" else [method]
    if isinstance(method, (bytes, bytearray)) or not np.iterable(method):
        raise TypeError(f"method: expected a string or a sequence of strings, got "
                        f"{type(method).__name__}")
    if isinstance(method, collections.abc.Set):
        # A set's iteration order follows string hashing, which varies between processes
        # (PYTHONHASHSEED): the candidates' order breaks ties, so results would too.
        raise TypeError(f"method: expected a string or a list or tuple of strings (their order "
                        f"breaks ties), got a {type(method).__name__}, whose order is arbitrary")
    names = list(method)
    if not names:
        raise ValueError(f"method: expected at least one of {QUANT_METHODS}, got an empty sequence")
    for name in names:
        _arrays.as_choice(name, "method", QUANT_METHODS)
    if len(set(names)) != len(names):
        raise ValueError(f"method: expected distinct quantizers, got {tuple(names)}")
    return names


def _refine_args(refine, refine_passes, refine_tol) -> tuple[int, float]:
    if not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"refine: expected a bool, got {type(refine).__name__}")
    passes = _arrays.as_int(refine_passes, "refine_passes", low=0, high=_arrays.INT_MAX)
    if isinstance(refine_tol, bool) or not isinstance(refine_tol, (int, float, np.floating,
                                                                   np.integer)):
        raise TypeError(f"refine_tol: expected a number >= 0, got {type(refine_tol).__name__}")
    tol = float(refine_tol)
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"refine_tol: expected a finite value >= 0, got {tol}")
    return (passes if refine else 0), tol


# quantize()'s refit rounds with refinement on. On realistic 256 x 1024 layers (4 and 3 bits,
# groups of 128) default / GPTQ act-order went 0.91 -> 0.76 (1 round) -> 0.71 (2) -> 0.67 (4);
# each round costs about one more refinement of every row.
_DEFAULT_REFIT_ROUNDS = 2


def quantize(W, H, bits, *, sym=True, group_size=None, grid="mse", damp=0.01, method="auto",
             refine=True, refine_passes=20, refine_tol=1e-6, refine_damped=False,
             refine_block_size=128, gptq_block_size=128, refit_rounds=None, num_threads=None):
    """Quantization of a layer onto per-row (or per-group) grids, minimizing the layer loss
    1/2 (w - q) H (w - q)^T per row (joint with pruning when W has zeros).

    The grids are fitted on W itself before anything else (for groups: on the original column
    order, GPTQ's "static groups"), so every method below quantizes onto the same grids and rows
    are independent; each row keeps the candidate with the lowest loss. Before the choice
    (refit_rounds) each candidate's row scales are refitted to its codes where that lowers the
    row's loss, so the result's grids can differ from the fitted ones row by row.

    Args:
        W: (rows, cols) weights; zeros stay exactly zero. H: (cols, cols) Hessian.
        bits: 2..8. sym: symmetric grid (zero point 2**(bits-1)) or asymmetric.
        group_size: None for one grid per row, else inputs per grid (divides cols).
        grid: "mse" (range shrink search minimizing sum |q(w) - w|^2.4) or "minmax".
        damp: relative damping; lambda = damp * mean(diag H) is added to diag(H).
        method: "auto" (default: the candidates "obq" and "gptq", best per row; "gptq" alone
            for layers of more than AUTO_OBQ_MAX_COLS = 1024 inputs, see auto_quant_methods;
            pass ("obq", "gptq") to run OBQ at any width), or one of
            "obq" (the paper's greedy OBQ: the weight whose rounding costs least goes first),
            "gptq" (fixed order by descending diag(H), "act-order", lazy block updates),
            "gptq-natural" (fixed order 0, 1, ...), "rtn" (round to nearest); or a sequence of
            these names as the candidates (ties go to the one listed first; a set is refused,
            its order varies between processes). With zeros in W,
            "gptq" sets the pruned weights to 0 in turn and propagates their error (SparseGPT's
            joint mode); "obq" removes them before it starts.
        refine: after each candidate, passes of exact descent over the codes until a pass gains
            less than refine_tol relative, or refine_passes passes. A pass re-quantizes every
            block of refine_block_size inputs of a row as a whole (GPTQ inside the block, from
            the block's optimum given the other codes; kept only where the loss drops), then
            moves one code at a time to its best value given the others. The objective is the
            reported loss 1/2 dw H dw^T (undamped H), which therefore never increases; pruned
            weights and dead inputs are not touched.
        refine_passes: at most this many passes (>= 0; 0 = no refinement).
        refine_tol: relative gain per pass below which a row stops (>= 0).
        refine_block_size: inputs per block move (0 = single-code moves only; >= 0).
        refine_damped: refine on H + lambda I (the damped objective the quantizers minimize, a
            regularized target) instead of H; the reported loss may then rise slightly.
        gptq_block_size: columns per lazy block update of the GPTQ candidates (>= 1; speed only).
        refit_rounds: rounds of scale refit of each candidate, before the choice (>= 0; 0 = keep the fitted grids;
            None = 2 with refine, 0 without, so refine=False keeps each quantizer's own result).
            A round solves, per row, the scales (one per group) that minimize the row's loss
            given its codes (exact least squares in float64), then refines the codes on them
            (when refine); a row keeps the round only where its loss drops. The result's scale
            then differs from quantize_rtn's row by row; zero points and codes stay on the same
            conventions (sym/asym, per row/group). Rows with more than 256 groups keep theirs.
        num_threads: threads over rows (None = OpenMP default). Results do not depend on it.
    Returns:
        QuantResult: row_methods says which candidate each row kept, row_losses_unrefined its
        loss before refinement and refit. method="obq", refine=False, refit_rounds=0 is the
        earlier quantize(), bit for bit.
    Raises:
        ValueError: unknown or repeated method, negative refine_passes or refine_tol, and the
            checks of W, H, bits, group_size, grid, damp. TypeError: wrong argument types.
    """
    W, H = _layer(W, H)
    bits, sym, group, grid = _quant_args(W, bits, sym, group_size, grid)
    methods = _methods(method, W.shape[1])
    passes, tol = _refine_args(refine, refine_passes, refine_tol)
    if not isinstance(refine_damped, (bool, np.bool_)):
        raise TypeError(f"refine_damped: expected a bool, got {type(refine_damped).__name__}")
    block = _arrays.as_int(gptq_block_size, "gptq_block_size", low=1, high=_arrays.INDEX_MAX)
    refine_block = _arrays.as_int(refine_block_size, "refine_block_size", low=0,
                                  high=_arrays.INDEX_MAX)
    rounds = (_DEFAULT_REFIT_ROUNDS if passes > 0 else 0) if refit_rounds is None else \
        _arrays.as_int(refit_rounds, "refit_rounds", low=0, high=_arrays.INT_MAX)
    return _quant_result(_kernels(W).quantize_select(
        W, H, bits, sym, group, grid, _arrays.as_damp(damp), _arrays.as_threads(num_threads),
        methods, passes, tol, bool(refine_damped), block, refine_block, rounds), bits, sym)


def quantize_rtn(W, H, bits, *, sym=True, group_size=None, grid="mse", num_threads=None):
    """Round-to-nearest baseline on the same grid as quantize(); H only measures the loss."""
    W, H = _layer(W, H)
    bits, sym, group, grid = _quant_args(W, bits, sym, group_size, grid)
    return _quant_result(_kernels(W).quantize_rtn(
        W, H, bits, sym, group, grid, _arrays.as_threads(num_threads)), bits, sym)


def prune_quantize_sparsegpt(W, H, bits, *, sparsity=None, n=None, m=None, block=1,
                             spread="global", sym=True, group_size=None, grid="mse", damp=0.01,
                             lazy_block=None, num_threads=None) -> QuantResult:
    """Joint SparseGPT pruning + quantization in one sweep over the columns.

    Pruned weights become exactly 0 and kept weights their value on the grid, each column's
    error fed forward to the later columns (the SparseGPT paper's joint mode). The grids are
    quantize()'s (computed from W as given, before the sweep); 0 is on every grid.

    Args:
        W: (rows, cols) weights; zeros stay exactly zero. H: (cols, cols) Hessian.
        bits, sym, group_size, grid: the grid, as in quantize().
        sparsity: fraction of weights (block == 1) or of blocks of `block` weights to prune,
            counted as in prune_unstructured(method="sparsegpt"); or else
        n, m: N:M pruning as in prune_nm(method="sparsegpt"). Give sparsity or (n, m); with
            (n, m), block must stay 1 (ValueError otherwise).
        spread: "global" or "uniform" (sparsity only).
        damp, lazy_block, num_threads: as prune_unstructured(method="sparsegpt").
    Returns:
        QuantResult: .mask is False at the pruned weights (which have the zero point's code);
        a kept weight may still round to 0.
    """
    W, H = _layer(W, H)
    bits, sym, group, grid = _quant_args(W, bits, sym, group_size, grid)
    _, lazy = _method("sparsegpt", lazy_block, "joint pruning + quantization")
    spread = _arrays.as_choice(spread, "spread", _SPREADS)
    if (n is None) != (m is None):
        raise ValueError(f"n, m: expected both or neither, got n = {n!r}, m = {m!r}")
    if (sparsity is None) == (n is None):
        raise ValueError("sparsity, n, m: expected either sparsity or n and m, got "
                         f"sparsity = {sparsity!r}, n = {n!r}, m = {m!r}")
    if n is not None:
        m = _arrays.as_int(m, "m", low=2)
        n = _arrays.as_int(n, "n")
        if not 0 < n < m:
            raise ValueError(f"n: expected 0 < n < m = {m}, got n = {n}")
        if W.shape[1] % m:
            raise ValueError(f"m: expected a divisor of cols ({W.shape[1]}), got m = {m}")
        if _arrays.as_int(block, "block", low=1) != 1:  # N:M groups are single weights, not blocks
            raise ValueError(f"block: only used with sparsity; expected 1 with n and m, got {block!r}")
        pattern, sparsity, block = "nm", 0.0, 1
    else:
        sparsity = _arrays.as_fraction(sparsity, "sparsity")
        block = _arrays.as_divisor(block, "block", W.shape[1])
        pattern, n, m = ("unstructured" if block == 1 else "blocked"), 0, 0
    return _quant_result(_kernels(W).quantize_sparsegpt(
        W, H, pattern, sparsity, spread, block, n, m, lazy, bits, sym, group, grid,
        _arrays.as_damp(damp), _arrays.as_threads(num_threads)), bits, sym)


def _trace(W, H, block, damp, num_threads, record, method) -> Trace:
    _method(method, None, "traces (SparseGPT has no elimination order)", ("exact",))
    W, H = _layer(W, H)
    block = _arrays.as_divisor(block, "block", W.shape[1])
    threads = _arrays.as_threads(num_threads)
    if isinstance(record, (str, bytes)) or not np.iterable(record):
        raise TypeError(f"record: expected a sequence of sparsities, got {type(record).__name__}")
    steps = W.shape[1] // block
    record_steps = sorted({_arrays.count_for_sparsity(steps, _arrays.as_fraction(s, "record"))
                           for s in record})
    d = _kernels(W).trace(W, H, block, _arrays.as_damp(damp), threads, 0, record_steps)
    # The Trace re-solves from W and H later (weights()): keep copies, because as_weight /
    # as_hessian pass the caller's arrays through when they already fit, and a caller changing
    # them after the call changed every later Trace.weights().
    return Trace(order=d["order"], losses=d["losses"], block=block, damp=d["damp"],
                 damp_absolute=d["damp_absolute"], precision=d["precision"], _W=W.copy(),
                 _H=H.copy(order="K"),
                 _num_threads=threads,
                 _recorded=dict(zip(record_steps, d["recorded"])))


def trace_unstructured(W, H, *, damp=0.01, num_threads=None, record=(), method="exact") -> Trace:
    """Complete unstructured ExactOBS trace of every row (order and step losses).

    Memory: O(rows * cols) for the trace, plus the Trace's own copies of W and H (so that
    changing them after the call does not change it); weights at any sparsity are rebuilt with
    Trace.weights(sparsity, spread) in closed form, never stored per step.

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian; damp, num_threads: as prune_unstructured.
        method: "exact" only (a trace is ExactOBS's greedy order); anything else raises ValueError.
        record: sparsities whose weights the greedy keeps as every row passes ceil(s * steps)
            steps (one (rows, cols) array each, in W's dtype). Trace.weights(s,
            spread="uniform") then returns them instead of re-solving each row (a float64
            Cholesky per row: at 50% a third to two thirds of the trace's own time). The greedy's
            updates are exact, so they are the same optimum for the same mask, computed in the
            kernels' precision.
    """
    return _trace(W, H, 1, damp, num_threads, record, method)


def trace_blocked(W, H, block, *, damp=0.01, num_threads=None, record=(),
                  method="exact") -> Trace:
    """Complete blocked ExactOBS trace of every row; order holds block indices.

    Args:
        W, H, damp, num_threads: as trace_unstructured; block: weights per block (divides cols).
        method: "exact" only (a trace is ExactOBS's greedy order); anything else raises ValueError.
        record: sparsities whose weights the greedy keeps as every row passes ceil(s * steps)
            block steps (one (rows, cols) array each, in W's dtype). Trace.weights(s,
            spread="uniform") then returns them instead of re-solving each row (a float64
            Cholesky per row: at 50% a third to two thirds of the trace's own time). The greedy's
            updates are exact, so they are the same optimum for the same mask, computed in the
            kernels' precision.
    """
    return _trace(W, H, block, damp, num_threads, record, method)




def solve_masked(W, H, mask, *, damp=0.01, num_threads=None) -> PruneResult:
    """Optimal weights for a given mask (True = kept), in closed form per row.

    Existing zeros and dead inputs are pruned too. Returns PruneResult.
    """
    W, H = _layer(W, H)
    return _prune_result(_closed_form.solve_masked(W, H, mask, damp, num_threads))


def prune_magnitude(W, sparsity, *, spread="global") -> np.ndarray:
    """Magnitude pruning baseline: zero the smallest |w| (no update). Returns the new W.

    "global" prunes ceil(s * rows * cols) weights over the layer, "uniform" ceil(s * cols) per
    row; ties go to the lower flat index.
    """
    W = _arrays.as_weight(W, "W")
    sparsity = _arrays.as_fraction(sparsity, "sparsity")
    spread = _arrays.as_choice(spread, "spread", _SPREADS)
    out = W.copy()
    if spread == "global":
        k = _arrays.count_for_sparsity(W.size, sparsity)
        idx = np.argsort(np.abs(W).ravel(), kind="stable")[:k]
        np.put(out, idx, 0)  # flat C-order indices, written in place whatever the layout
    else:
        k = _arrays.count_for_sparsity(W.shape[1], sparsity)
        idx = np.argsort(np.abs(W), axis=1, kind="stable")[:, :k]
        np.put_along_axis(out, idx, 0, axis=1)
    return out


def build_info() -> dict:
    """What the compiled core contains: version, openmp, max_threads, eigen_version, cuda,
    simd, kernel_isa (row kernels picked at run time), avx512_kernels (kernels with an
    AVX-512 copy use it), grid_screen_isa (the MSE grid fit's screening: "avx512",
    "avx2+fma" or "generic"), compiler."""
    return dict(_core.build_info())
