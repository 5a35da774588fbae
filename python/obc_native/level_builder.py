"""Compute the compression levels of one layer: their exact losses and costs.

:func:`build_layer_levels` turns one weight matrix and its Hessian into a
:class:`~obc_native.levels.LayerLevels`: the dense level, sparsity levels from one ExactOBS trace,
and N:M, quantization and joint levels each by :func:`obc_native.levels.solve_level` (the solve
that :func:`~obc_native.levels.apply_level` repeats).
"""

from __future__ import annotations

import numpy as np

from . import _api, _arrays
from .costs import level_costs
from .layer_config import PRUNE_METHODS, LayerConfig
from .levels import QUANT_LEVEL_METHODS, LayerLevels, Level, _finite, solve_level

__all__ = ["DEFAULT_SPARSITIES", "build_layer_levels"]

#: Sparsity levels of :func:`build_layer_levels` when none are given.
DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


_RECORD_BYTES = 256 << 20  # most memory a trace may spend recording levels' weights at once


def _pairs(values, name: str, size: int) -> list:
    out = []
    for item in values:
        item = tuple(item)
        if len(item) != size:
            raise ValueError(f"{name}: expected tuples of {size} integers, got {item!r}")
        out.append(tuple(_arrays.as_int(v, name, low=1) for v in item))
    return out


def _check_quant_level(cols: int, group_size) -> str | None:
    if group_size is not None and cols % group_size:
        return f"group_size {group_size} does not divide cols {cols}"
    return None


def build_layer_levels(W, H, *, name: str = "layer", sparsities=DEFAULT_SPARSITIES, block=None,
                       nm=((2, 4),), bits=(), joint=(), sym: bool = True, group_size=None,
                       grid: str = "mse", damp: float = 0.01, spread: str = "uniform",
                       flops_per_weight: float = 1.0, act_bits=None, dense_bits: int = 32,
                       keep_weights: bool = False, num_threads=None, quant_method: str = "auto",
                       refine: bool = True, prune_method: str = "exact") -> LayerLevels:
    """Compute the levels of one layer: exact losses and costs.

    Levels, in this order: "dense" (always, loss 0); one per sparsity, unstructured
    (``block=None``) or blocks of ``block`` consecutive weights, all from ONE ExactOBS trace
    (``trace_unstructured`` / ``trace_blocked``): with the uniform spread its greedy's own
    weights recorded at each sparsity (``record=``; re-solved instead when holding all levels
    would take over 256 MiB and they are not kept), with the global spread re-solved in closed
    form (``Trace.weights``), which gives the weights and losses of separate
    ``prune_unstructured`` / ``prune_blocked`` solves with the same ``spread``; one per
    ``(n, m)`` in ``nm`` (``prune_nm``); one per bit width in ``bits`` (``quantize``); one per
    ``(n, m, bits)`` in ``joint`` (``prune_nm`` then ``quantize`` of the pruned weights, loss
    measured against the original W). With ``prune_method="sparsegpt"`` every pruning level is a
    separate SparseGPT solve instead (no trace: SparseGPT has no elimination order), and joint
    levels with ``quant_method="auto"`` are one joint SparseGPT sweep
    (``prune_quantize_sparsegpt``), as ``obc_native.solve`` does for that LayerConfig.

    Args:
        W: (rows, cols) weights; H: (cols, cols) Hessian, as for the solvers.
        name: the layer's name in the database.
        sparsities: fractions in [0, 1] (of weights, or of blocks when ``block`` is set).
        block: None for unstructured levels, else the block length (a divisor of cols).
        nm: ``(n, m)`` pairs; bits: bit widths 2..8; joint: ``(n, m, bits)`` triples.
        sym, group_size, grid: the quantization grid of quant and joint levels.
        quant_method, refine: the quantizer of quant and joint levels, as ``quantize(method=,
            refine=)`` ("auto", "obq", "gptq", "gptq-natural" or "rtn"); recorded in each
            level's params as ``method`` and ``refine``.
        damp: relative damping of every solve.
        spread: how a sparsity is spread over rows: "uniform" (default for databases: every row
            gets ceil(s * cols), so each level's cost is independent of the data) or "global"
            (the paper's). The final compression must use the same spread; it is recorded in
            each level's params and honoured by :func:`apply_level`.
        flops_per_weight: applications of each weight per sample (conv: output positions).
        act_bits: activation bits for "bops": None (32-bit floats), an int, or "same" (the
            level's weight bits).
        dense_bits: bits of an unquantized stored weight (32 = float32).
        prune_method: the pruner of the sparsity, N:M and joint levels: "exact" (ExactOBS) or
            "sparsegpt" (for wide layers: faster, higher loss); recorded in those levels' params
            as ``prune_method`` (only when not "exact", so ExactOBS levels are stored as before).
        keep_weights: keep each level's compressed weights in ``Level.weight`` (memory!).
        num_threads: threads of the solvers.
    Levels that do not fit the shape (N:M with ``cols % m``, a block or group size that does not
    divide cols) are left out and listed in ``LayerLevels.skipped``.
    Returns:
        LayerLevels.
    """
    W = _arrays.as_weight(W, "W")
    H = _arrays.as_hessian(H, W.shape[1], "H")
    rows, cols = W.shape
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    spread = _arrays.as_choice(spread, "spread", ("global", "uniform"))
    grid = _arrays.as_choice(grid, "grid", ("mse", "minmax"))
    quant_method = _arrays.as_choice(quant_method, "quant_method", QUANT_LEVEL_METHODS)
    if not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"refine: expected a bool, got {type(refine).__name__}")
    refine = bool(refine)
    prune_method = _arrays.as_choice(prune_method, "prune_method", PRUNE_METHODS)
    damp = _arrays.as_damp(damp)
    if not isinstance(sym, (bool, np.bool_)):
        raise TypeError(f"sym: expected a bool, got {type(sym).__name__}")
    sym = bool(sym)
    group_size = None if group_size is None else _arrays.as_int(group_size, "group_size", low=1)
    flops_per_weight = _finite(flops_per_weight, "flops_per_weight", nonneg=True)
    if act_bits is not None and act_bits != "same":
        act_bits = _arrays.as_int(act_bits, "act_bits", low=1, high=64)
    dense_bits = _arrays.as_int(dense_bits, "dense_bits", low=1, high=64)
    sparsities = [_arrays.as_fraction(s, "sparsities") for s in sparsities]
    if len(set(sparsities)) != len(sparsities):
        raise ValueError(f"sparsities: expected distinct values, got {sparsities}")
    block = None if block is None else _arrays.as_int(block, "block", low=1)
    nm = _pairs(nm, "nm", 2)
    joint = _pairs(joint, "joint", 3)
    bits = [_arrays.as_int(b, "bits", low=2, high=8) for b in bits]
    for n, m, b in joint:
        _arrays.as_int(b, "joint bits", low=2, high=8)
    for n, m, *_ in nm + joint:
        if not 0 < n < m:
            raise ValueError(f"nm: expected 0 < n < m, got {n}:{m}")
    threads = num_threads

    cost_args = dict(flops_per_weight=flops_per_weight, act_bits=act_bits, dense_bits=dense_bits)
    levels: list = []
    skipped: list = []

    def add(config, weight, loss):
        quantized = config is not None and config.bits is not None
        costs = level_costs(W.shape, int(np.count_nonzero(weight)),
                            bits=config.bits if quantized else None,
                            group_size=config.group_size if quantized else None, **cost_args)
        # The loss is a quadratic form in a PSD H: >= 0 exactly, but float64 rounding can give
        # -tiny; store 0 so that a saved database passes the loader's loss >= 0 check.
        levels.append(Level.of(config, loss=max(0.0, float(loss)), costs=costs,
                               weight=weight if keep_weights else None))

    def skip(config, reason):
        skipped.append((Level.of(config, 0.0, {}).label, reason))

    def solved(config):
        result = solve_level(W, H, config, num_threads=threads)
        add(config, result.weight, result.loss)

    add(None, W.copy() if keep_weights else W, 0.0)

    if sparsities:
        prune = "unstructured" if block is None else "blocked"
        configs = [LayerConfig(prune=prune, sparsity=s, block=block or 1, spread=spread, damp=damp,
                               prune_method=prune_method)
                   for s in sparsities]
        if block is not None and cols % block:
            for config in configs:
                skip(config, f"block {block} does not divide cols {cols}")
        elif prune_method != "exact":
            for config in configs:
                solved(config)
        else:
            # A uniform spread's levels come straight from the greedy (no per-row re-solve) when
            # holding them all at once is cheap, or they are kept anyway.
            record = (sparsities if spread == "uniform" and
                      (keep_weights or len(sparsities) * W.nbytes <= _RECORD_BYTES) else ())
            trace = (_api.trace_unstructured(W, H, damp=damp, num_threads=threads, record=record)
                     if block is None else
                     _api.trace_blocked(W, H, block, damp=damp, num_threads=threads,
                                        record=record))
            for config in configs:
                result = trace.weights(config.sparsity, spread)
                add(config, result.weight, result.loss)

    for n, m in nm:
        config = LayerConfig(prune="nm", n=n, m=m, damp=damp, prune_method=prune_method)
        if cols % m:
            skip(config, f"m {m} does not divide cols {cols}")
            continue
        solved(config)

    quant = dict(sym=sym, group_size=group_size, grid=grid, quant_method=quant_method, refine=refine,
                 damp=damp)
    for b in bits:
        config = LayerConfig(bits=b, **quant)
        reason = _check_quant_level(cols, group_size)
        if reason:
            skip(config, reason)
            continue
        solved(config)

    for n, m, b in joint:
        config = LayerConfig(prune="nm", n=n, m=m, bits=b, prune_method=prune_method, **quant)
        reason = (f"m {m} does not divide cols {cols}" if cols % m
                  else _check_quant_level(cols, group_size))
        if reason:
            skip(config, reason)
            continue
        solved(config)

    reference = float(_api.layer_loss(W, np.zeros_like(W), H, num_threads=threads).sum())
    settings = {"damp": damp, "spread": spread, "grid": grid, "flops_per_weight": flops_per_weight,
                "act_bits": act_bits, "dense_bits": dense_bits}
    return LayerLevels(name=name, shape=(rows, cols), levels=levels, reference_loss=reference,
                       settings=settings, skipped=skipped)
