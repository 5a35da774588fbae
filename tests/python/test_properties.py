"""Property-based tests (hypothesis) of the numpy-level API against the contracts of
docs/python_api.md: patterns and counts, exact grids, zeros that stay zero, reported losses,
bit-identical results across thread counts / repeats / H dtypes and layouts, and clean errors.

The layers are small (rows 1..12, cols 1..40) and drawn with existing zeros, dead inputs,
rank-deficient, ill-conditioned and outlier-feature Hessians, float32/float64 and C/F/strided
layouts.  Profiles: "obc-default" (bounded, derandomized: the default run and CI) and
"obc-thorough" (many more random examples), chosen with OBC_HYPOTHESIS_PROFILE=obc-thorough.

The defects of issue 14 that this suite found or pins (weights near FLT_MAX/DBL_MAX, float32
layers with damp=0, thread counts, layer_loss's H checks, structured losses with large damping)
have their own tests or parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import obc_native

settings.register_profile(
    "obc-default", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile(
    "obc-thorough", max_examples=600, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
# Applied per test (not load_profile) so other test files are not affected.
PROFILE = settings.get_profile(os.environ.get("OBC_HYPOTHESIS_PROFILE", "obc-default"))
FEW = settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 3))

THREADS = (1, 2, 3, None)  # None: OpenMP's default count

# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A drawn layer: W and H as passed to the API (dtype, layout), and float64 copies."""

    W: np.ndarray          # (rows, cols) float32/float64, C, F or strided
    H: np.ndarray          # (cols, cols) float32/float64, C, F or strided, exactly symmetric
    H64: np.ndarray        # H widened to float64 (the exact values the core reads)
    kind: str              # how H was made
    damp: float

    @property
    def initial(self) -> np.ndarray:
        """(rows, cols) bool: existing zeros and dead inputs (pruned from the start)."""
        return (self.W == 0) | (np.diag(self.H64) == 0)[None, :]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return (f"Layer(W {self.W.dtype} {self.W.shape} {layout(self.W)}, H {self.H.dtype} "
                f"{layout(self.H)} kind={self.kind}, zeros={int((self.W == 0).sum())}, "
                f"dead={int((np.diag(self.H64) == 0).sum())}, damp={self.damp})\n"
                f"W = np.array({self.W.tolist()!r}, dtype=np.{self.W.dtype})\n"
                f"H = np.array({self.H.tolist()!r}, dtype=np.{self.H.dtype})")


def layout(a: np.ndarray) -> str:
    kind = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "strided"
    return kind if a.flags.writeable else kind + " read-only"


def place(a: np.ndarray, how: str) -> np.ndarray:
    """The same values in C order, Fortran order, read-only, or as a non-contiguous view."""
    if how == "readonly":
        a = np.array(a)
        a.setflags(write=False)
        return a
    if how == "F":
        return np.asfortranarray(a)
    if how == "strided":
        big = np.zeros((a.shape[0], 2 * a.shape[1]), dtype=a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    return np.ascontiguousarray(a)


def make_hessian(rng, cols: int, kind: str, dead: int) -> np.ndarray:
    """H = 2/n X X^T (float64, exactly symmetric) of inputs X (cols x n) of the given kind."""
    if kind == "lowrank":          # fewer samples than inputs: singular H
        n = int(rng.integers(1, max(2, cols)))
        X = rng.standard_normal((cols, n))
    elif kind == "illcond":        # decaying spectrum, cond(H) ~ 1e8
        n = 2 * cols + 1
        U, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
        X = U @ (np.logspace(0, -4, cols)[:, None] * rng.standard_normal((cols, n)))
    elif kind == "outlier":        # a few features 100-1000x larger than the rest
        n = 3 * cols
        X = rng.standard_normal((cols, n))
        big = rng.choice(cols, size=max(1, cols // 8), replace=False)
        X[big] *= rng.choice([100.0, 1000.0])
    else:                          # "random": correlated, well conditioned
        n = 4 * cols
        mix = np.eye(cols) + 0.4 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
        X = mix @ rng.standard_normal((cols, n)) + 0.3 * rng.standard_normal((cols, 1))
    if dead:
        X[rng.choice(cols, size=dead, replace=False)] = 0.0
    H = 2.0 / n * (X @ X.T)
    return 0.5 * (H + H.T)


@st.composite
def layers(draw, multiple: int | st.SearchStrategy = 1, max_rows=12, max_cols=40, zeros=True,
           damps=(1e-3, 0.01, 0.1, 1.0)):
    """A Layer whose cols are a multiple of `multiple` (an int, or drawn by the caller)."""
    rows = draw(st.integers(1, max_rows))
    cols = multiple * draw(st.integers(1, max(1, max_cols // multiple)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    h_dtype = draw(st.sampled_from([np.float32, np.float64]))
    kind = draw(st.sampled_from(["random", "lowrank", "illcond", "outlier"]))
    dead = draw(st.integers(0, cols // 3))
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6])) if zeros else 0.0
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    H = make_hessian(rng, cols, kind, dead)
    W = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-2, 2)
    if zero_frac:
        W[rng.random(W.shape) < zero_frac] = 0.0
    H = H.astype(h_dtype)
    layouts = st.sampled_from(["C", "F", "strided", "readonly"])
    layer = Layer(W=place(W.astype(dtype), draw(layouts)), H=place(H, draw(layouts)),
                  H64=H.astype(np.float64), kind=kind, damp=draw(st.sampled_from(damps)))
    return layer


def count(s: float, n: int) -> int:
    """ceil(s * n) as documented (binary rounding of s * n tolerated, 0.3 * 10 = 3)."""
    return int(min(n, math.ceil(s * n - 1e-9 * max(1.0, s * n))))


sparsities = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------
# Checks shared by every entry point
# ----------------------------------------------------------------------------------------------


def fields(res) -> dict:
    """The array and scalar outputs of a result (what must be bit-identical)."""
    out = {}
    for name in ("weight", "mask", "row_losses", "codes", "scale", "zero", "order", "losses",
                 "damp", "damp_absolute", "group_size"):
        if hasattr(res, name):
            out[name] = getattr(res, name)
    if isinstance(res, np.ndarray):
        out["array"] = res
    return out


def assert_identical(a, b, what: str) -> None:
    fa, fb = fields(a), fields(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {k} dtype/shape differ"
        assert np.array_equal(x, y), f"{what}: {k} differs ({int(np.sum(x != y))} entries)"


def assert_deterministic(call, layer: Layer, threaded=True, threads=THREADS) -> object:
    """call(W, H, **kw) leaves W and H as they were and is bit-identical for 1/2/3/default
    threads (or `threads`), repeated calls, a float32 H and its float64 widening, and any layout
    of W and H. Returns the 1-thread result."""
    W0, H0 = layer.W.copy(), layer.H.copy()
    base = call(layer.W, layer.H, num_threads=1) if threaded else call(layer.W, layer.H)
    assert np.array_equal(layer.W, W0) and np.array_equal(layer.H, H0), "inputs were modified"
    kw = [{"num_threads": t} for t in threads if t != 1] if threaded else []
    for k in kw + ([{"num_threads": 1}] if threaded else [{}]):
        assert_identical(base, call(layer.W, layer.H, **k), f"repeat/threads {k}")
    k1 = {"num_threads": 1} if threaded else {}
    if layer.H.dtype == np.float32:
        assert_identical(base, call(layer.W, layer.H64, **k1), "float32 H vs float64 widening")
    assert_identical(base, call(np.ascontiguousarray(layer.W), np.asfortranarray(layer.H), **k1),
                     "layout of W / H")
    return base


def quad_form(D: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1/2 d H d^T per row, 1/2 |d| |H| |d|^T per row) in float64: the value and the scale its
    rounding error is relative to (cancellation on ill-conditioned H)."""
    D = np.asarray(D, np.float64)
    return 0.5 * np.einsum("ij,jk,ik->i", D, H, D), 0.5 * np.einsum(
        "ij,jk,ik->i", np.abs(D), np.abs(H), np.abs(D))


def loss_rtol(dtype) -> float:
    return 1e-10 if dtype == np.float64 else 2e-5


def assert_loss(res, layer: Layer, rtol=None, extra=0.0) -> None:
    """row_losses == 1/2 dw H dw^T per row with the undamped H (docs: loss convention).

    Tolerance: rtol of the rounding scale 1/2 |dw| |H| |dw|, plus the effect of rounding the
    returned weights to W's dtype (|dw| |H| |w_hat| eps): a solver may report the loss of its
    unrounded weights. `extra`: (rows,) further scale the solver's rounding is relative to,
    times 4 eps of W's dtype."""
    rtol = loss_rtol(layer.W.dtype) if rtol is None else rtol
    assert res.row_losses.dtype == np.float64 and res.row_losses.shape == (layer.W.shape[0],)
    assert np.all(np.isfinite(res.row_losses))
    D = layer.W.astype(np.float64) - res.weight
    exact, scale = quad_form(D, layer.H64)
    rounding = np.einsum("ij,jk,ik->i", np.abs(D), np.abs(layer.H64),
                         np.abs(res.weight.astype(np.float64)))
    err = np.abs(res.row_losses - exact)
    eps = np.finfo(layer.W.dtype).eps
    tol = rtol * (scale + np.abs(exact)) + 4 * eps * (rounding + extra) + 1e-300
    assert np.all(err <= tol), (
        f"row_losses != 1/2 dw H dw^T: got {res.row_losses}, exact {exact}, worst "
        f"{np.max(err / tol)} x tolerance")
    assert res.loss == pytest.approx(float(res.row_losses.sum()), rel=1e-12, abs=1e-300)


def assert_prune_basics(res, layer: Layer) -> None:
    W = layer.W
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
    assert res.mask.dtype == np.bool_ and res.mask.shape == W.shape
    assert np.all(np.isfinite(res.weight))
    assert np.all(res.weight[~res.mask] == 0), "pruned weights are not exactly 0"
    assert not np.any(res.mask & layer.initial), "an existing zero / dead input is kept"
    assert np.all(res.weight[layer.initial] == 0)
    assert res.damp == layer.damp
    # lambda = damp * mean(diag H) over the live inputs (dead ones are not part of the problem;
    # the docstrings say mean(diag H)).
    live = np.diag(layer.H64)[np.diag(layer.H64) != 0]
    if live.size:
        assert res.damp_absolute == pytest.approx(layer.damp * float(np.mean(live)),
                                                  rel=1e-12, abs=0.0)
    assert res.sparsity == pytest.approx(1.0 - res.mask.mean())


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------


@PROFILE
@given(layer=layers(), s=sparsities, spread=st.sampled_from(["global", "uniform"]))
def test_prune_unstructured(layer, s, spread):
    call = lambda W, H, **kw: obc_native.prune_unstructured(W, H, s, damp=layer.damp,  # noqa: E731
                                                           spread=spread, **kw)
    res = assert_deterministic(call, layer)
    assert_prune_basics(res, layer)
    rows, cols = layer.W.shape
    pruned, initial = ~res.mask, layer.initial
    if spread == "global":
        assert pruned.sum() == max(count(s, rows * cols), initial.sum())
    else:
        assert np.array_equal(pruned.sum(axis=1), np.maximum(count(s, cols), initial.sum(axis=1)))
    assert_loss(res, layer)


@PROFILE
@given(data=st.data())
def test_prune_nm(data):
    m = data.draw(st.integers(2, 8), label="m")
    n = data.draw(st.integers(1, m - 1), label="n")
    layer = data.draw(layers(multiple=m), label="layer")
    call = lambda W, H, **kw: obc_native.prune_nm(W, H, n, m, damp=layer.damp, **kw)  # noqa: E731
    res = assert_deterministic(call, layer)
    assert_prune_basics(res, layer)
    rows = layer.W.shape[0]
    zeros = (~res.mask).reshape(rows, -1, m).sum(axis=2)
    before = layer.initial.reshape(rows, -1, m).sum(axis=2)
    assert np.array_equal(zeros, np.maximum(before, n)), "N:M group counts"
    assert_loss(res, layer)


def assert_whole_blocks(res, layer: Layer, block: int, s: float, spread: str) -> None:
    """Blocks are pruned whole; other zeros of the mask are exactly the existing ones."""
    rows, cols = layer.W.shape
    nb = cols // block
    pruned = (~res.mask).reshape(rows, nb, block).all(axis=2)            # (rows, nb)
    expanded = np.repeat(pruned, block, axis=1)
    assert np.array_equal(~res.mask, expanded | layer.initial), "partially pruned block"
    before = layer.initial.reshape(rows, nb, block).all(axis=2)
    if spread == "global":
        assert pruned.sum() == max(count(s, rows * nb), before.sum())
    else:
        assert np.array_equal(pruned.sum(axis=1), np.maximum(count(s, nb), before.sum(axis=1)))


@PROFILE
@given(data=st.data())
def test_prune_blocked(data):
    block = data.draw(st.sampled_from([1, 2, 3, 4, 8]), label="block")
    layer = data.draw(layers(multiple=block), label="layer")
    s = data.draw(sparsities, label="s")
    spread = data.draw(st.sampled_from(["global", "uniform"]), label="spread")
    call = lambda W, H, **kw: obc_native.prune_blocked(  # noqa: E731
        W, H, s, block, damp=layer.damp, spread=spread, **kw)
    res = assert_deterministic(call, layer)
    assert_prune_basics(res, layer)
    assert_whole_blocks(res, layer, block, s, spread)
    assert_loss(res, layer)


def check_structured(layer: Layer, group: int, s: float, threads=THREADS) -> None:
    call = lambda W, H, **kw: obc_native.prune_structured(  # noqa: E731
        W, H, s, group=group, damp=layer.damp, **kw)
    res = assert_deterministic(call, layer, threads=threads)
    assert_prune_basics(res, layer)
    rows, cols = layer.W.shape
    ng = cols // group
    removed = (~res.mask).all(axis=0).reshape(ng, group).all(axis=1)      # (ng,)
    cols_removed = np.repeat(removed, group)
    assert np.array_equal(~res.mask, cols_removed[None, :] | layer.initial), \
        "structured: pruned columns differ between rows or groups are partial"
    # Pruned from the start: groups of dead inputs and of columns that are zero in every row.
    gone_groups = layer.initial.all(axis=0).reshape(ng, group).all(axis=1)
    assert removed.sum() == max(count(s, ng), gone_groups.sum())
    # Docs: its own greedy's losses (damped loss minus 1/2 lambda ||dw||^2), the same value up to
    # rounding; in float32 that subtraction's rounding is relative to 1/2 lambda ||dw||^2, which
    # dominates with large damping on outlier features (see test_structured_float32_loss_*).
    assert_loss(res, layer, rtol=1e-9 if layer.W.dtype == np.float64 else 1e-5,
                extra=0.5 * res.damp_absolute * np.sum(
                    (layer.W.astype(np.float64) - res.weight) ** 2, axis=1))


@PROFILE
@given(data=st.data())
def test_prune_structured(data):
    group = data.draw(st.sampled_from([1, 2, 3, 4]), label="group")
    layer = data.draw(layers(multiple=group), label="layer")
    check_structured(layer, group, data.draw(sparsities, label="s"))


@st.composite
def medium_structured_layers(draw):
    """Layers big enough for the structured kernel's parallel row chunks ((rows+1) * cols >= 2e4
    runs multi-threaded), with one or two rows that have zeros of their own and groups > 1."""
    group = draw(st.sampled_from([2, 3, 4]), label="group")
    rows = draw(st.integers(80, 100), label="rows")
    cols = group * draw(st.integers(252 // group, 264 // group), label="cols/group")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    H = make_hessian(rng, cols, draw(st.sampled_from(["random", "outlier", "lowrank"])),
                     draw(st.integers(0, 3)))
    W = rng.standard_normal((rows, cols))
    own = rng.choice(rows, size=draw(st.integers(1, 2), label="own-zero rows"), replace=False)
    for r in own:
        W[r, rng.choice(cols, size=int(rng.integers(1, 8)), replace=False)] = 0.0
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    H = H.astype(dtype)
    return group, Layer(W=W.astype(dtype), H=H, H64=H.astype(np.float64), kind="medium",
                        damp=0.01)


@pytest.mark.slow
@settings(PROFILE, max_examples=max(4, PROFILE.max_examples // 8))
@given(case=medium_structured_layers(), s=st.sampled_from([0.25, 0.5, 0.8]))
def test_prune_structured_parallel_rows_with_own_zeros(case, s):
    """Structured pruning, groups > 1 and rows with zeros of their own, on the parallel path:
    bit-identical for 1/2/default threads and repeated calls, same pattern and loss checks.
    (Few examples: with own-zero rows every greedy step opens parallel regions, which on a
    loaded machine costs a scheduler time slice each.)"""
    group, layer = case
    check_structured(layer, group, s, threads=(1, 2, None))




@pytest.mark.parametrize("group", [1, 2])
def test_structured_float32_loss_with_large_damping_and_outlier_feature(group):
    """Reproducer found by test_prune_structured: one feature 1e6 times larger than the others,
    damp=1 (lambda ~ 2e5), one dead input. float64 agrees with layer_loss to 1e-12, float32
    reports 6.8063 against 6.8305 (group 2)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((8, 24))
    X[0] *= 1000.0
    X[3] = 0.0
    H = (2 / 24 * X @ X.T).astype(np.float32)
    H = 0.5 * (H + H.T)
    W = np.array([[-0.726, 4.214, -3.289, -1.502, -1.212, 1.504, -1.701, -1.573]], np.float32)
    res = obc_native.prune_structured(W, H, 0.3, group=group, damp=1.0)
    direct = obc_native.layer_loss(W.astype(np.float64), res.weight.astype(np.float64),
                                   H.astype(np.float64))
    np.testing.assert_allclose(res.row_losses, direct, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


def dequant(res, dtype) -> np.ndarray:
    """scale[:, g] * (codes - zero[:, g]) in the weight dtype (uint8 arithmetic would wrap)."""
    g = res.group_index()
    return res.scale[:, g] * (res.codes.astype(dtype) - res.zero[:, g].astype(dtype))


def assert_grid(res, layer: Layer, bits: int, sym: bool, group_size, grid: str) -> None:
    W = layer.W
    rows, cols = W.shape
    gs = cols if group_size is None else group_size
    assert res.bits == bits and res.sym == sym and res.group_size == gs
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
    assert res.scale.dtype == W.dtype and res.scale.shape == (rows, cols // gs)
    assert res.codes.dtype == np.uint8 and res.codes.shape == W.shape
    assert res.zero.dtype == np.uint8 and res.zero.shape == (rows, cols // gs)
    assert np.all(np.isfinite(res.weight)) and np.all(np.isfinite(res.scale))
    assert np.all(res.scale > 0)
    assert int(res.codes.max()) <= 2**bits - 1 and int(res.zero.max()) <= 2**bits - 1
    if sym:
        assert np.all(res.zero == 2 ** (bits - 1))
    assert np.array_equal(res.weight, dequant(res, W.dtype)), "weight != scale * (codes - zero)"
    assert np.all(res.weight[W == 0] == 0), "an existing zero moved"
    if grid == "minmax":
        # Documented grid, from W's own range per row and group (range always contains 0).
        Wg = W.astype(np.float64).reshape(rows, cols // gs, gs)
        lo, hi = np.minimum(Wg.min(axis=2), 0), np.maximum(Wg.max(axis=2), 0)
        live = hi > lo
        if sym:
            want = np.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
        else:
            want = (hi - lo) / (2**bits - 1)
            zero = np.round(-lo[live] / res.scale.astype(np.float64)[live])
            assert np.array_equal(res.zero[live], zero.astype(np.uint8)), "asymmetric zero point"
        np.testing.assert_allclose(res.scale[live], want[live],
                                   rtol=1e-6 if W.dtype == np.float32 else 1e-14)


quant_args = dict(bits=st.integers(2, 8), sym=st.booleans(),
                  grid=st.sampled_from(["mse", "minmax"]))


@PROFILE
@given(data=st.data(), **quant_args)
def test_quantize(data, bits, sym, grid):
    gsize = data.draw(st.sampled_from([None, 1, 2, 4, 8]), label="group_size")
    layer = data.draw(layers(multiple=gsize or 1), label="layer")
    call = lambda W, H, **kw: obc_native.quantize(  # noqa: E731
        W, H, bits, sym=sym, group_size=gsize, grid=grid, damp=layer.damp, **kw)
    res = assert_deterministic(call, layer)
    # the default refits the scales to the codes (refit_rounds): the documented grid is the one
    # before that, which refit_rounds=0 keeps
    fitted = call(layer.W, layer.H, refit_rounds=0)
    for r in (res, fitted):
        assert np.array_equal(r.mask, ~layer.initial), "quantize: mask != non-zero live inputs"
        assert np.all(r.weight[layer.initial] == 0)
        assert r.damp == layer.damp
        assert_loss(r, layer)
    assert_grid(fitted, layer, bits, sym, gsize, grid)
    assert_grid(res, layer, bits, sym, gsize, "refitted")  # shapes, > 0, weights on the grid
    assert np.all(res.row_losses <= fitted.row_losses), "the refit raised a row's loss"
    # Same grid as round-to-nearest (the grid comes from W, not from the greedy's updates);
    # the refit changes scales only.
    rtn = obc_native.quantize_rtn(layer.W, layer.H, bits, sym=sym, group_size=gsize, grid=grid)
    assert np.array_equal(fitted.scale, rtn.scale) and np.array_equal(fitted.zero, rtn.zero)
    assert np.array_equal(res.zero, rtn.zero)


@PROFILE
@given(data=st.data(), **quant_args)
def test_quantize_rtn(data, bits, sym, grid):
    gsize = data.draw(st.sampled_from([None, 1, 3, 4]), label="group_size")
    layer = data.draw(layers(multiple=gsize or 1), label="layer")
    call = lambda W, H, **kw: obc_native.quantize_rtn(  # noqa: E731
        W, H, bits, sym=sym, group_size=gsize, grid=grid, **kw)
    res = assert_deterministic(call, layer)
    assert_grid(res, layer, bits, sym, gsize, grid)
    # Round to nearest, half to even, clamped to the codes, in W's dtype.
    g = res.group_index()
    W = np.ascontiguousarray(layer.W)
    q = np.rint(W / res.scale[:, g]) + res.zero[:, g].astype(W.dtype)
    codes = np.clip(q, 0, 2**bits - 1).astype(np.uint8)
    assert np.array_equal(res.codes, codes), "RTN codes != round-half-even(w / scale) + zero"
    assert np.array_equal(res.mask, layer.W != 0), "RTN mask != weights non-zero on input"
    assert_loss(res, layer)


@PROFILE
@given(data=st.data(), bits=st.integers(2, 8), sym=st.booleans())
def test_joint_prune_then_quantize_keeps_zeros(data, bits, sym):
    prune = data.draw(st.sampled_from(["unstructured", "nm", "blocked", "structured"]),
                      label="prune")
    layer = data.draw(layers(multiple=4, zeros=(prune != "structured")), label="layer")
    W, H, d = layer.W, layer.H, layer.damp
    p = {
        "unstructured": lambda: obc_native.prune_unstructured(W, H, 0.5, damp=d),
        "nm": lambda: obc_native.prune_nm(W, H, 2, 4, damp=d),
        "blocked": lambda: obc_native.prune_blocked(W, H, 0.5, 2, damp=d),
        "structured": lambda: obc_native.prune_structured(W, H, 0.5, group=2, damp=d),
    }[prune]()
    gsize = data.draw(st.sampled_from([None, 4]), label="group_size")
    q = obc_native.quantize(p.weight, H, bits, sym=sym, group_size=gsize, damp=d)
    assert np.array_equal(q.mask, p.mask), "joint: quantize changed the pruning mask"
    assert np.all(q.weight[~p.mask] == 0)
    assert np.all(q.codes[~p.mask] == q.zero[:, q.group_index()][~p.mask])
    assert np.array_equal(q.weight, dequant(q, W.dtype))
    # The joint level's loss against the original W: layer_loss of the final weights.
    exact, scale = quad_form(W.astype(np.float64) - q.weight, layer.H64)
    got = obc_native.layer_loss(W, q.weight, H)
    assert np.all(np.abs(got - exact) <= loss_rtol(W.dtype) * (scale + np.abs(exact)) + 1e-300)


@PROFILE
@given(layer=layers(), s=sparsities, spread=st.sampled_from(["global", "uniform"]))
def test_prune_magnitude(layer, s, spread):
    """Baseline: zeros the ceil(s * N) smallest |w| (ties to the lower flat index), no update."""
    W = layer.W
    out = obc_native.prune_magnitude(W, s, spread=spread)
    assert out.dtype == W.dtype and out.shape == W.shape
    kept = out != 0
    assert np.array_equal(out[kept], W[kept]), "magnitude pruning changed a kept weight"
    flat = np.abs(np.ascontiguousarray(W)).ravel()
    if spread == "global":
        k = count(s, W.size)
        want = np.zeros(W.size, bool)
        want[np.argsort(flat, kind="stable")[:k]] = True
        assert np.array_equal(out.ravel() == 0, want | (flat == 0))
    else:
        k = count(s, W.shape[1])
        idx = np.argsort(np.abs(W), axis=1, kind="stable")[:, :k]
        want = np.zeros(W.shape, bool)
        np.put_along_axis(want, idx, True, axis=1)
        assert np.array_equal(out == 0, want | (W == 0))


# ----------------------------------------------------------------------------------------------
# Traces, masked solves, layer_loss
# ----------------------------------------------------------------------------------------------


@PROFILE
@given(data=st.data())
def test_trace(data):
    block = data.draw(st.sampled_from([1, 1, 2, 4]), label="block")
    layer = data.draw(layers(multiple=block), label="layer")
    s = data.draw(sparsities, label="s")
    rows, cols = layer.W.shape
    steps = cols // block
    k = count(s, steps)

    def call(W, H, **kw):
        if block == 1:
            return obc_native.trace_unstructured(W, H, damp=layer.damp, record=(s,), **kw)
        return obc_native.trace_blocked(W, H, block, damp=layer.damp, record=(s,), **kw)

    tr = assert_deterministic(call, layer)
    assert tr.order.dtype == np.int32 and tr.order.shape == (rows, steps)
    assert tr.losses.dtype == np.float64 and tr.losses.shape == (rows, steps)
    assert np.all(np.isfinite(tr.losses)) and np.all(tr.losses >= 0)
    assert tr.block == block and tr.damp == layer.damp
    for r in range(rows):
        assert sorted(tr.order[r].tolist()) == list(range(steps)), "order is not a permutation"
    # Already pruned blocks first, at zero loss.
    pre = layer.initial.reshape(rows, steps, block).all(axis=2)
    for r in range(rows):
        npre = int(pre[r].sum())
        assert np.all(pre[r, tr.order[r, :npre]]), "already pruned entries do not come first"
        assert np.all(tr.losses[r, :npre] == 0)

    for spread in ("global", "uniform"):
        w = tr.weights(s, spread)
        assert_prune_basics(w, layer)
        same = (obc_native.prune_unstructured(layer.W, layer.H, s, damp=layer.damp, spread=spread)
                if block == 1 else
                obc_native.prune_blocked(layer.W, layer.H, s, block, damp=layer.damp,
                                         spread=spread))
        # Docs (level databases): one trace per layer, re-solved per sparsity (global) or its
        # recorded weights (uniform), is identical to separate prune_* solves.
        assert_identical(w, same, f"trace.weights({s}, {spread!r}) vs prune_*")
        assert_loss(w, layer)

    # Uniform masks are nested prefixes of each row's order, and each result is the optimum for
    # its mask under the damped H, so the damped objective cannot decrease with the sparsity.
    Hd = layer.H64 + tr.damp_absolute * np.diag((np.diag(layer.H64) != 0).astype(np.float64))
    prev = None
    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        w = tr.weights(level, "uniform")
        obj, scale = quad_form(layer.W.astype(np.float64) - w.weight, Hd)
        if prev is not None:
            slack = (1e-9 if layer.W.dtype == np.float64 else 1e-4) * (scale + prev[1])
            assert np.all(obj >= prev[0] - slack), f"damped loss decreased at sparsity {level}"
        prev = (obj, scale)

    # Recorded weights: the greedy's own at k steps per row; the sum of the first k step losses
    # is 1/2 dw (H + lambda I) dw^T (docs: step loss = half the OBS score under the damped H).
    rec = tr.weights(s, "uniform")
    Hd = layer.H64 + tr.damp_absolute * np.diag((np.diag(layer.H64) != 0).astype(np.float64))
    exact, scale = quad_form(layer.W.astype(np.float64) - rec.weight, Hd)
    got = tr.losses[:, :k].sum(axis=1)
    # Each step loss is w_q^2 / [Hd^-1]_qq from the kernels' inverse (float32 for float32
    # layers), so its relative rounding grows with the condition number of the live Hd.
    live = np.diag(layer.H64) != 0
    cond = np.linalg.cond(Hd[np.ix_(live, live)]) if live.any() else 1.0
    rtol = max(1e-8 if layer.W.dtype == np.float64 else 1e-4,
               4 * cond * np.finfo(layer.W.dtype).eps)
    assert np.all(np.abs(got - exact) <= rtol * (scale + np.abs(exact)) + 1e-300), (
        f"trace step losses {got} != 1/2 dw H_damped dw^T {exact}")


@PROFILE
@given(layer=layers(), data=st.data())
def test_solve_masked(layer, data):
    keep_frac = data.draw(st.sampled_from([0.0, 0.3, 0.6, 1.0]), label="keep")
    seed = data.draw(st.integers(0, 2**32 - 1), label="mask_seed")
    mask = np.random.default_rng(seed).random(layer.W.shape) < keep_frac
    call = lambda W, H, **kw: obc_native.solve_masked(  # noqa: E731
        W, H, mask, damp=layer.damp, **kw)
    res = assert_deterministic(call, layer)
    assert_prune_basics(res, layer)
    assert np.array_equal(res.mask, mask & ~layer.initial)
    assert_loss(res, layer)
    # Optimality (KKT) on the kept coordinates: [(H + lambda I) (w_hat - w)]_kept == 0.
    live = (np.diag(layer.H64) != 0).astype(np.float64)
    Hd = layer.H64 + res.damp_absolute * np.diag(live)
    D = res.weight.astype(np.float64) - layer.W.astype(np.float64)
    grad = D @ Hd
    scale = (np.abs(D) + np.abs(res.weight)) @ np.abs(Hd)
    tol = (1e-9 if layer.W.dtype == np.float64 else 1e-4) * scale
    if layer.kind == "illcond":
        tol = tol * 1e3
    bad = res.mask & (np.abs(grad) > tol + 1e-300)
    assert not bad.any(), f"masked solve not optimal at {np.argwhere(bad)[:5].tolist()}"


@PROFILE
@given(layer=layers(damps=(0.0,)), data=st.data())
def test_layer_loss(layer, data):
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    W_hat = (layer.W + np.random.default_rng(seed).standard_normal(layer.W.shape)
             .astype(layer.W.dtype))
    got = assert_deterministic(lambda W, H, **kw: obc_native.layer_loss(W, W_hat, H, **kw), layer)
    assert got.dtype == np.float64 and got.shape == (layer.W.shape[0],)
    exact, scale = quad_form(layer.W.astype(np.float64) - W_hat, layer.H64)
    assert np.all(np.abs(got - exact) <= loss_rtol(layer.W.dtype) * (scale + np.abs(exact)))
    assert np.all(obc_native.layer_loss(layer.W, layer.W, layer.H) == 0)


# ----------------------------------------------------------------------------------------------
# HessianAccumulator
# ----------------------------------------------------------------------------------------------


@st.composite
def activation_batches(draw):
    """(cols, [X_1, X_2, ...]): a few batches (n_i, cols) of float32/float64 activations, some
    with dead inputs, outlier features or a single row."""
    cols = draw(st.integers(1, 40), label="cols")
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    dead = rng.random(cols) < draw(st.sampled_from([0.0, 0.3]))
    scale = np.where(rng.random(cols) < 0.1, 1e3, 1.0)
    batches = []
    for n in draw(st.lists(st.integers(1, 70), min_size=1, max_size=4), label="batch rows"):
        X = rng.standard_normal((n, cols)) * scale + 0.5
        X[:, dead] = 0.0
        batches.append(X.astype(dtype))
    return cols, batches


@PROFILE
@given(case=activation_batches(), split=st.integers(1, 3))
def test_hessian_accumulator(case, split):
    """H = 2/n sum x x^T, exactly symmetric, bit-identical for any thread count and for the same
    sequence of batches; merge adds sums and counts exactly; pickling and files are exact; a
    batch with NaN raises ValueError and leaves the accumulator unchanged."""
    cols, batches = case
    accs = []
    for threads in THREADS:
        acc = obc_native.HessianAccumulator(cols, num_threads=threads)
        for X in batches:
            acc.add(X)
        accs.append(acc)
    H = accs[0].hessian()
    for acc in accs[1:]:
        assert np.array_equal(acc.sum(), accs[0].sum()), "sum depends on the thread count"
    n = sum(X.shape[0] for X in batches)
    assert accs[0].count == n
    assert H.dtype == np.float64 and H.shape == (cols, cols) and np.array_equal(H, H.T)
    X = np.concatenate([b.astype(np.float64) for b in batches])
    np.testing.assert_allclose(H, 2.0 / n * (X.T @ X),
                               atol=1e-13 * 2.0 / n * float(np.max(np.abs(X).T @ np.abs(X))))
    assert np.all(np.diag(H)[~np.any(X != 0, axis=0)] == 0), "dead inputs must give zero rows"
    # Merge: the first `split` batches in one accumulator, the rest in another.
    a, b = obc_native.HessianAccumulator(cols), obc_native.HessianAccumulator(cols)
    for X_ in batches[:split]:
        a.add(X_)
    for X_ in batches[split:]:
        b.add(X_)
    expected_sum = a.sum() + b.sum()
    a.merge(b)
    assert a.count == n and np.array_equal(a.sum(), expected_sum), "merge is not exact"
    # Pickle and file round trips.
    back = pickle.loads(pickle.dumps(accs[0]))
    assert back.count == n and np.array_equal(back.sum(), accs[0].sum())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.bin")
        obc_native.save_hessian(accs[0], path)
        loaded = obc_native.load_hessian(path)
        assert loaded.count == n and np.array_equal(loaded.sum(), accs[0].sum())
    # Bad batch: unchanged.
    bad = np.array(batches[0])
    bad[0, 0] = np.nan
    before = accs[0].sum()
    with pytest.raises(ValueError):
        accs[0].add(bad)
    assert accs[0].count == n and np.array_equal(accs[0].sum(), before)


# ----------------------------------------------------------------------------------------------
# Scale equivariance: W -> 2^a W, H -> 2^b H is exact in binary floating point
# ----------------------------------------------------------------------------------------------

SCALED_MODES = ["unstructured", "uniform", "nm", "blocked", "structured", "quantize",
                "quantize_asym", "quantize_minmax", "rtn", "trace", "solve_masked"]


def run_scaled_mode(mode, W, H, damp):
    if mode == "unstructured":
        return obc_native.prune_unstructured(W, H, 0.5, damp=damp)
    if mode == "uniform":
        return obc_native.prune_unstructured(W, H, 0.4, spread="uniform", damp=damp)
    if mode == "nm":
        return obc_native.prune_nm(W, H, 2, 4, damp=damp)
    if mode == "blocked":
        return obc_native.prune_blocked(W, H, 0.5, 2, damp=damp)
    if mode == "structured":
        return obc_native.prune_structured(W, H, 0.5, group=2, damp=damp)
    if mode == "quantize":
        return obc_native.quantize(W, H, 3, damp=damp)
    if mode == "quantize_asym":
        return obc_native.quantize(W, H, 4, sym=False, group_size=4, damp=damp)
    if mode == "quantize_minmax":
        return obc_native.quantize(W, H, 2, grid="minmax", damp=damp)
    if mode == "rtn":
        return obc_native.quantize_rtn(W, H, 3, sym=False)
    if mode == "trace":
        return obc_native.trace_unstructured(W, H, damp=damp)
    if mode == "solve_masked":
        return obc_native.solve_masked(W, H, np.abs(W) >= np.median(np.abs(W)), damp=damp)
    raise ValueError(mode)


@PROFILE
@given(data=st.data(), mode=st.sampled_from(SCALED_MODES))
def test_scale_equivariance(data, mode):
    """Scaling W by 2^a and H by 2^b (b even, a a multiple of 5 so that the MSE grid's
    |error|^2.4 scales by a power of two too) scales weights by 2^a, grid steps by 2^a, losses by
    2^(2a+b) and changes nothing else, bit for bit: no absolute thresholds, no overflow."""
    layer = data.draw(layers(multiple=4, zeros=(mode != "structured")), label="layer")
    lim = 4 if layer.W.dtype == np.float32 or layer.H.dtype == np.float32 else 40
    a = 5 * data.draw(st.integers(-lim, lim), label="a/5")
    b = 2 * data.draw(st.integers(-lim * 2, lim * 2), label="b/2")
    assume(a or b)
    base = run_scaled_mode(mode, layer.W, layer.H, layer.damp)
    W2 = layer.W * layer.W.dtype.type(2.0) ** a
    H2 = layer.H * layer.H.dtype.type(2.0) ** b
    assert np.array_equal(W2 / layer.W.dtype.type(2.0) ** a, layer.W)  # the scaling is exact
    got = run_scaled_mode(mode, W2, H2, layer.damp)
    fa, fb = fields(base), fields(got)
    pa, pl = np.float64(2.0) ** a, np.float64(2.0) ** (2 * a + b)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        if k == "scale":
            # A group whose weights are all zero has no range; its placeholder step is free.
            gs = base.group_size
            live = (layer.W != 0).reshape(x.shape[0], -1, gs).any(axis=2)
            x, y = x[live] * x.dtype.type(pa), y[live]
        elif k == "weight":
            x = x * x.dtype.type(pa)
        elif k in ("row_losses", "losses"):
            x = x * pl
        elif k == "damp_absolute":
            x = x * np.float64(2.0) ** b
        assert x.dtype == y.dtype and np.array_equal(x, y), (
            f"{k} not equivariant under W*2^{a}, H*2^{b}: {int(np.sum(x != y))} entries differ")


# ----------------------------------------------------------------------------------------------
# damp = 0
# ----------------------------------------------------------------------------------------------


@PROFILE
@given(layer=layers(damps=(0.0,), zeros=True).filter(lambda lay: lay.kind in ("random", "outlier")
                                                      and lay.W.dtype == np.float64),
       s=sparsities)
def test_damp0_float64_full_rank(layer, s):
    """damp=0 on a full-rank (live part of) H: a result, finite, with its exact loss."""
    res = obc_native.prune_unstructured(layer.W, layer.H, s, damp=0.0)
    assert_prune_basics(res, layer)
    assert res.damp_absolute == 0.0
    assert_loss(res, layer)


@FEW
@given(layer=layers(damps=(0.0,)).filter(lambda lay: lay.kind in ("illcond", "lowrank")),
       mode=st.sampled_from(["unstructured", "quantize"]))
def test_damp0_singular_float32_layers(layer, mode):
    """damp=0 with a singular / ill-conditioned H: either HessianError (naming the damping) or a
    finite result whose loss is right; float32 layers must agree with their float64 twin on which
    of the two (float32 is not allowed to lose definiteness the float64 inverse keeps)."""
    def run(W):
        try:
            if mode == "unstructured":
                return obc_native.prune_unstructured(W, layer.H, 0.5, damp=0.0)
            return obc_native.quantize(W, layer.H, 4, damp=0.0)
        except obc_native.HessianError as exc:
            assert "damp" in str(exc)
            return None
    r64 = run(layer.W.astype(np.float64))
    r32 = run(layer.W.astype(np.float32))
    assert (r64 is None) == (r32 is None), "float32 and float64 disagree on definiteness"
    if r32 is not None:
        assert np.all(np.isfinite(r32.weight)) and np.all(np.isfinite(r32.row_losses))


# ----------------------------------------------------------------------------------------------
# Bad input: always TypeError / ValueError, never a crash
# ----------------------------------------------------------------------------------------------

ENTRY_POINTS = {
    "prune_unstructured": lambda W, H: obc_native.prune_unstructured(W, H, 0.5),
    "prune_nm": lambda W, H: obc_native.prune_nm(W, H, 1, 2),
    "prune_blocked": lambda W, H: obc_native.prune_blocked(W, H, 0.5, 1),
    "prune_structured": lambda W, H: obc_native.prune_structured(W, H, 0.5),
    "quantize": lambda W, H: obc_native.quantize(W, H, 4),
    "quantize_rtn": lambda W, H: obc_native.quantize_rtn(W, H, 4),
    "trace_unstructured": lambda W, H: obc_native.trace_unstructured(W, H),
    "trace_blocked": lambda W, H: obc_native.trace_blocked(W, H, 1),
    "solve_masked": lambda W, H: obc_native.solve_masked(W, H, np.ones(np.shape(W), bool)),
    "layer_loss": lambda W, H: obc_native.layer_loss(W, W, H),
}


BAD_INPUT_EXAMPLES = settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 10))


@pytest.mark.parametrize("fn", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("where", ["W", "H", "H-sym"])
@BAD_INPUT_EXAMPLES
@given(layer=layers(multiple=2, max_cols=16), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       data=st.data())
def test_non_finite_input_raises(fn, where, layer, value, data):
    W = np.array(layer.W)
    H = np.array(layer.H)
    i = data.draw(st.integers(0, W.shape[0] - 1), label="i")
    j = data.draw(st.integers(0, W.shape[1] - 1), label="j")
    k = data.draw(st.integers(0, W.shape[1] - 1), label="k")
    if where == "W":
        W[i, j] = value
    elif where == "H":
        H[j, k] = value
    else:
        H[j, k] = H[k, j] = value
    with pytest.raises(ValueError, match="W" if where == "W" else "H"):
        ENTRY_POINTS[fn](W, H)


BAD_CASES = ["H rows", "H cols", "H 1-D", "W 1-D", "W 3-D", "H asym", "H int", "W int",
             "W complex", "H negative diag", "H indefinite"]


def bad_case_params():
    for fn in sorted(ENTRY_POINTS):
        for bad in BAD_CASES:
            yield pytest.param(fn, bad, id=f"{fn}-{bad.replace(' ', '_')}")


@pytest.mark.parametrize("fn,bad", list(bad_case_params()))
@BAD_INPUT_EXAMPLES
@given(layer=layers(multiple=2, max_cols=16))
def test_bad_shapes_and_types_raise(fn, bad, layer):
    W, H = np.array(layer.W), np.array(layer.H)
    cols = W.shape[1]
    expected = ValueError
    if bad == "H rows":
        H = np.zeros((cols + 1, cols), H.dtype)
    elif bad == "H cols":
        H = np.eye(cols + 2, dtype=H.dtype)
    elif bad == "H 1-D":
        H = np.diag(H).copy()
    elif bad == "W 1-D":
        W = W[0].copy()
    elif bad == "W 3-D":
        W = W[None]
    elif bad == "H asym":
        # (The core allows rounding-level asymmetry relative to max|H|.)
        H = H + np.triu(np.ones_like(H), 1) * (0.01 * float(np.abs(H).max()) + 1.0)
    elif bad == "H int":
        H, expected = H.astype(np.int64), TypeError
    elif bad == "W int":
        W, expected = W.astype(np.int32), TypeError
    elif bad == "W complex":
        W, expected = W.astype(np.complex128), TypeError
    elif bad == "H negative diag":
        H[0, 0] = -1.0
    elif bad == "H indefinite":
        # Non-negative diagonal, symmetric, but not positive semi-definite: the solvers factor
        # it and must raise HessianError (a ValueError) naming the damping; RTN and layer_loss
        # never factor H (docs: H only measures the loss).
        if fn in ("quantize_rtn", "layer_loss"):
            return
        expected = obc_native.HessianError
        H = np.eye(cols, dtype=H.dtype)
        H[0, 1] = H[1, 0] = 2.0  # eigenvalues 3 and -1 (the damping adds 0.01)
    with pytest.raises(expected) as info:
        ENTRY_POINTS[fn](W, H)
    if expected is obc_native.HessianError:
        assert "damp" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Extreme magnitudes (in a subprocess: an overflow could crash the interpreter)
# ----------------------------------------------------------------------------------------------

def run_child(script: str, *args: str) -> dict:
    """Runs `script` in a fresh interpreter that imports this obc_native; returns the dict it
    prints after "RESULT ", or fails naming the call it was in when it died (e.g. SIGSEGV)."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(obc_native.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, *args],
                          capture_output=True, text=True, timeout=120, env=env)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        last = [ln for ln in lines if ln.startswith("running")][-1:] or ["(before the first call)"]
        pytest.fail(f"child exited with {proc.returncode} while {last[0]}\n{proc.stderr[-2000:]}")
    return json.loads([ln for ln in lines if ln.startswith("RESULT ")][-1][len("RESULT "):])


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import obc_native as o
    dtype, mag, what = np.dtype(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    calls = {
        "prune_unstructured": lambda W, H: o.prune_unstructured(W, H, 0.5),
        "prune_unstructured_uniform":
            lambda W, H: o.prune_unstructured(W, H, 0.5, spread="uniform"),
        "prune_nm": lambda W, H: o.prune_nm(W, H, 2, 4),
        "prune_blocked": lambda W, H: o.prune_blocked(W, H, 0.5, 2),
        "prune_structured": lambda W, H: o.prune_structured(W, H, 0.5, group=2),
        "quantize": lambda W, H: o.quantize(W, H, 4),
        "quantize_asym_g4": lambda W, H: o.quantize(W, H, 3, sym=False, group_size=4),
        "quantize_rtn": lambda W, H: o.quantize_rtn(W, H, 4),
        "trace_weights": lambda W, H: o.trace_unstructured(W, H).weights(0.5),
        "trace_blocked_weights": lambda W, H: o.trace_blocked(W, H, 2).weights(0.5, "uniform"),
        "solve_masked": lambda W, H: o.solve_masked(W, H, np.abs(W) > np.median(np.abs(W))),
        "layer_loss": lambda W, H: o.layer_loss(W, np.zeros_like(W), H),
    }
    out = {}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((16, 40))
        H = 2 / 40 * X @ X.T
        H = 0.5 * (H + H.T)
        W = rng.standard_normal((5, 16))
        if what == "W":
            W = W / np.abs(W).max() * mag
        else:
            H = H / np.abs(H).max() * mag
        W = W.astype(dtype)
        H = H.astype(dtype)
        for name, call in calls.items():
            key = f"{name}[seed {seed}]"
            print("running", key, flush=True)
            try:
                r = call(W, H)
                w_hat = np.zeros_like(W) if isinstance(r, np.ndarray) else r.weight
                losses = r if isinstance(r, np.ndarray) else r.row_losses
                # 1/2 dw H dw^T in float64 without spurious overflow: inf only where it is.
                D = W.astype(np.float64) - w_hat
                s = 2.0 ** np.floor(np.log2(max(np.abs(D).max(), 1e-300)))
                Ds = D / s
                with np.errstate(over="ignore"):
                    want = 0.5 * np.einsum("ij,jk,ik->i", Ds, H.astype(np.float64), Ds) * s * s
                if not np.isfinite(w_hat).all():
                    out[key] = "non-finite weights"
                elif not np.array_equal(np.isinf(want), np.isinf(losses)) or np.isnan(losses).any():
                    out[key] = f"row_losses {losses.tolist()} but 1/2 dw H dw^T = {want.tolist()}"
                elif not np.allclose(losses[np.isfinite(want)], want[np.isfinite(want)],
                                     rtol=1e-3, atol=0):
                    out[key] = f"row_losses {losses.tolist()} but 1/2 dw H dw^T = {want.tolist()}"
                else:
                    out[key] = "finite"
            except ValueError as exc:
                out[key] = "ValueError"
            except Exception as exc:
                out[key] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(out), flush=True)
""")


EXTREMES = [
    pytest.param("float32", 3.0e38, "W", id="f32-W-3e38"),
    pytest.param("float32", 1.0e30, "W", id="f32-W-1e30"),
    pytest.param("float32", 1.0e-30, "W", id="f32-W-1e-30"),
    pytest.param("float32", 1.0e-36, "W", id="f32-W-1e-36"),
    pytest.param("float32", 1.0e30, "H", id="f32-H-1e30"),
    pytest.param("float32", 1.0e-30, "H", id="f32-H-1e-30"),
    pytest.param("float64", 1.0e150, "W", id="f64-W-1e150"),
    pytest.param("float64", 1.0e300, "W", id="f64-W-1e300"),
    pytest.param("float64", 1.0e-300, "W", id="f64-W-1e-300"),
    pytest.param("float64", 1.0e250, "H", id="f64-H-1e250"),
]


@pytest.mark.parametrize("dtype,mag,what", EXTREMES)
def test_extreme_magnitudes_finite_or_valueerror(dtype, mag, what):
    """Weights / Hessians of extreme magnitude: every entry point returns finite weights and
    the right losses (+inf only where 1/2 dw H dw^T overflows float64) or raises ValueError, and
    never crashes the interpreter."""
    result = run_child(_CHILD, dtype, repr(mag), what)
    bad = {k: v for k, v in result.items() if v not in ("finite", "ValueError")}
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# Thread counts beyond the machine (in a subprocess with a 6 GiB address-space cap, so that a
# runaway allocation fails there instead of exhausting the machine)
# ----------------------------------------------------------------------------------------------

_THREADS_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    import obc_native as o
    threads = int(sys.argv[1])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((48, 200))
    H = 2 / 200 * X @ X.T
    H = 0.5 * (H + H.T)
    W64 = rng.standard_normal((20, 48))
    W64[rng.random(W64.shape) < 0.1] = 0.0
    calls = {
        "prune_unstructured": lambda W, t: o.prune_unstructured(W, H, 0.5, num_threads=t),
        "prune_nm": lambda W, t: o.prune_nm(W, H, 2, 4, num_threads=t),
        "prune_blocked": lambda W, t: o.prune_blocked(W, H, 0.5, 4, num_threads=t),
        "prune_structured": lambda W, t: o.prune_structured(W, H, 0.5, group=2, num_threads=t),
        "quantize": lambda W, t: o.quantize(W, H, 4, group_size=16, num_threads=t),
        "quantize_rtn": lambda W, t: o.quantize_rtn(W, H, 4, num_threads=t),
        "trace_unstructured": lambda W, t: o.trace_unstructured(W, H, num_threads=t).weights(0.5),
        "solve_masked": lambda W, t: o.solve_masked(W, H, np.abs(W) > 0.5, num_threads=t),
        "layer_loss": lambda W, t: o.layer_loss(W, 0 * W, H, num_threads=t),
    }
    out = {}
    for dtype in (np.float64, np.float32):
        W = W64.astype(dtype)
        for name, call in calls.items():
            key = f"{name}[{np.dtype(dtype).name}]"
            print("running", key, flush=True)
            ref = call(W, 1)
            try:
                got = call(W, threads)
            except ValueError:
                out[key] = "ValueError"
                continue
            except Exception as exc:
                out[key] = f"{type(exc).__name__}: {exc}"
                continue
            if isinstance(ref, np.ndarray):
                same = np.array_equal(ref, got)
            else:
                same = all(np.array_equal(getattr(ref, f), getattr(got, f))
                           for f in ("weight", "mask", "row_losses"))
            out[key] = "identical" if same else "differs from num_threads=1"
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.mark.parametrize("threads", [
    pytest.param(7, id="7"),
    pytest.param(64, id="64"),
    pytest.param(100_000, id="1e5"),
    pytest.param(2**31 - 1, id="INT_MAX"),
])
def test_thread_counts_beyond_the_machine(threads):
    """Any positive num_threads gives the 1-thread result bit for bit (or a ValueError naming
    it): never an allocation per requested thread, never a crash."""
    result = run_child(_THREADS_CHILD, str(threads))
    bad = {k: v for k, v in result.items() if v not in ("identical", "ValueError")}
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# The checkers themselves reject wrong results (a property that cannot fail finds nothing)
# ----------------------------------------------------------------------------------------------


def test_checkers_reject_wrong_results():
    rng = np.random.default_rng(3)
    H = make_hessian(rng, 8, "random", 1)
    layer = Layer(W=rng.standard_normal((3, 8)), H=H, H64=H, kind="random", damp=0.01)
    res = obc_native.prune_unstructured(layer.W, layer.H, 0.5)
    assert_loss(res, layer)
    for factor in (1 + 1e-8, 1 - 1e-8):
        bad = dataclasses.replace(res, row_losses=res.row_losses * factor)
        with pytest.raises(AssertionError):
            assert_loss(bad, layer)
    nudged = res.weight.copy()
    nudged[res.mask] = np.nextafter(nudged[res.mask], np.inf)
    with pytest.raises(AssertionError):
        assert_identical(res, dataclasses.replace(res, weight=nudged), "nudge")
    with pytest.raises(AssertionError):
        assert_deterministic(lambda W, H, **kw: dataclasses.replace(
            res, weight=res.weight + (kw.get("num_threads") == 2)), layer)
    q = obc_native.quantize(layer.W, layer.H, 3, grid="minmax", refit_rounds=0)
    assert_grid(q, layer, 3, True, None, "minmax")
    off = q.weight.copy()
    off[0, 1] = np.nextafter(off[0, 1], np.inf)
    with pytest.raises(AssertionError):
        assert_grid(dataclasses.replace(q, weight=off), layer, 3, True, None, "minmax")
    wide = dataclasses.replace(q, scale=q.scale * 1.001)
    wide = dataclasses.replace(wide, weight=dequant(wide, np.float64))
    with pytest.raises(AssertionError):  # on its own grid, but not the documented min-max one
        assert_grid(wide, layer, 3, True, None, "minmax")
