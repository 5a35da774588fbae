"""Input validation, conversions (non-contiguous, read-only), GIL release and Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import obc_native
from problems import make_problem

ROWS, COLS = 6, 16


@pytest.fixture(scope="module")
def wh():
    W, H, _ = make_problem(ROWS, COLS, seed=5)
    return W, H


# Every entry point that takes (W, H), with valid other arguments.
SOLVERS = {
    "prune_unstructured": lambda W, H, **kw: obc_native.prune_unstructured(W, H, 0.5, **kw),
    "prune_nm": lambda W, H, **kw: obc_native.prune_nm(W, H, 2, 4, **kw),
    "prune_blocked": lambda W, H, **kw: obc_native.prune_blocked(W, H, 0.5, 2, **kw),
    "prune_structured": lambda W, H, **kw: obc_native.prune_structured(W, H, 0.5, group=2, **kw),
    "quantize": lambda W, H, **kw: obc_native.quantize(W, H, 4, **kw),
    "trace_unstructured": lambda W, H, **kw: obc_native.trace_unstructured(W, H, **kw),
    "trace_blocked": lambda W, H, **kw: obc_native.trace_blocked(W, H, 4, **kw),
}
ALL_WH = dict(SOLVERS)
ALL_WH["quantize_rtn"] = lambda W, H, **kw: obc_native.quantize_rtn(W, H, 4, **kw)
ALL_WH["layer_loss"] = lambda W, H, **kw: obc_native.layer_loss(W, W, H, **kw)


def names(arg):
    """A regex matching the argument's name as a word (e.g. 'W' but not the W in 'Weights')."""
    return rf"(?<![A-Za-z_]){arg}(?![A-Za-z_])"


# ----------------------------------------------------------------------------------------------
# Shapes and values of W and H
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ALL_WH)
def test_w_not_2d(wh, fn):
    W, H = wh
    for bad in (W[0], W[None], np.float64(1.0)):
        with pytest.raises(ValueError, match=names("W")):
            ALL_WH[fn](bad, H)


@pytest.mark.parametrize("fn", ALL_WH)
def test_h_shape(wh, fn):
    W, H = wh
    for bad in (H[:, :-1], H[:-1, :-1], H[0], np.zeros((COLS, COLS, 1)), np.eye(COLS + 4)):
        with pytest.raises(ValueError, match=names("H")):
            ALL_WH[fn](W, bad)


@pytest.mark.parametrize("fn", SOLVERS)
def test_h_not_symmetric(wh, fn):
    W, H = wh
    bad = H.copy()
    bad[0, 3] += 0.1 * np.abs(H).max()
    with pytest.raises(ValueError, match=names("H")):
        SOLVERS[fn](W, bad)


@pytest.mark.parametrize("fn", ALL_WH)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite(wh, fn, value):
    W, H = wh
    Wb = W.copy()
    Wb[2, 5] = value
    with pytest.raises(ValueError, match=names("W")):
        ALL_WH[fn](Wb, H)
    Hb = H.copy()
    Hb[4, 4] = value
    with pytest.raises(ValueError, match=names("H")):
        ALL_WH[fn](W, Hb)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("where", [(599, 1), (1, 599), (300, 577), (590, 585)])
def test_large_hessian_checks_every_entry(dtype, order, where):
    # From 512 inputs the Hessian is scanned in parallel column tiles: a bad entry anywhere
    # (in the first, a middle and the last tile column, either triangle) is still found.
    rng = np.random.default_rng(3)
    cols = 600
    X = rng.standard_normal((cols, 2 * cols))
    H = np.asarray(2.0 / X.shape[1] * X @ X.T, dtype=dtype, order=order)
    W = rng.standard_normal((2, cols)).astype(dtype)
    for value, message in ((np.nan, "finite"), (np.inf, "finite"), (None, "symmetric")):
        bad = H.copy(order=order)
        bad[where] = value if value is not None else bad[where] + 0.1 * np.abs(H).max()
        for threads in (1, 2):
            with pytest.raises(ValueError, match=message):
                obc_native.prune_nm(W, bad, 2, 4, num_threads=threads)
    obc_native.prune_nm(W, H, 2, 4, num_threads=2)  # the valid one passes


@pytest.mark.parametrize("fn", ALL_WH)
@pytest.mark.parametrize(
    "dtype,exc",
    [(np.int32, TypeError), (np.int64, TypeError), (np.uint8, TypeError), (np.complex128, TypeError),
     (np.bool_, TypeError), (object, TypeError)],
)
def test_bad_dtypes(wh, fn, dtype, exc):
    W, H = wh
    with pytest.raises(exc, match=names("W")):
        ALL_WH[fn](W.astype(dtype), H)
    with pytest.raises(exc, match=names("H")):
        ALL_WH[fn](W, H.astype(dtype))


@pytest.mark.parametrize("fn", ALL_WH)
def test_empty_arrays(wh, fn):
    W, H = wh
    for bad in (np.zeros((0, COLS)), np.zeros((ROWS, 0)), np.zeros((0, 0))):
        with pytest.raises((ValueError, TypeError), match=names("W")):
            ALL_WH[fn](bad, H if bad.shape[1] == COLS else np.zeros((0, 0)))
    with pytest.raises((ValueError, TypeError), match=names("H")):
        ALL_WH[fn](W, np.zeros((0, 0)))
    with pytest.raises((ValueError, TypeError), match=names("W")):
        ALL_WH[fn](np.array([], dtype=np.int64).reshape(0, COLS), H)


def test_w_hat_shape_for_layer_loss(wh):
    W, H = wh
    with pytest.raises(ValueError, match=names("W_hat")):
        obc_native.layer_loss(W, W[:, :-1], H)


# ----------------------------------------------------------------------------------------------
# Scalar arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [-0.1, 1.0 + 1e-6, 2.0, np.nan, np.inf])
def test_sparsity_range(wh, s):
    W, H = wh
    for call in (
        lambda: obc_native.prune_unstructured(W, H, s),
        lambda: obc_native.prune_unstructured(W, H, s, spread="uniform"),
        lambda: obc_native.prune_blocked(W, H, s, 2),
        lambda: obc_native.prune_structured(W, H, s),
        lambda: obc_native.prune_magnitude(W, s),
        lambda: obc_native.trace_unstructured(W, H).weights(s),
    ):
        with pytest.raises(ValueError, match=names("sparsity")):
            call()


def test_spread_value(wh):
    W, H = wh
    with pytest.raises(ValueError, match=names("spread")):
        obc_native.prune_unstructured(W, H, 0.5, spread="rows")
    with pytest.raises(ValueError, match=names("spread")):
        obc_native.prune_blocked(W, H, 0.5, 2, spread="")


@pytest.mark.parametrize(
    "n,m,arg",
    [(4, 4, "n"), (5, 4, "n"), (0, 4, "n"), (-1, 4, "n"), (1, 1, "m"), (2, 3, "m"), (2, 5, "m"), (3, 32, "m")],
)
def test_nm_arguments(wh, n, m, arg):
    W, H = wh
    with pytest.raises(ValueError, match=names(arg)):
        obc_native.prune_nm(W, H, n, m)


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16])
def test_bits_range(wh, bits):
    W, H = wh
    with pytest.raises(ValueError, match=names("bits")):
        obc_native.quantize(W, H, bits)
    with pytest.raises(ValueError, match=names("bits")):
        obc_native.quantize_rtn(W, H, bits)


def test_non_integer_scalars(wh):
    W, H = wh
    with pytest.raises(TypeError, match=names("bits")):
        obc_native.quantize(W, H, 4.0)
    with pytest.raises(TypeError, match=names("n")):
        obc_native.prune_nm(W, H, 2.5, 4)
    with pytest.raises(TypeError, match=names("block")):
        obc_native.prune_blocked(W, H, 0.5, 2.0)


@pytest.mark.parametrize("size", [0, -2, 3, 5, 7, 32])
def test_group_sizes_must_divide_cols(wh, size):
    W, H = wh
    with pytest.raises(ValueError, match=names("group_size")):
        obc_native.quantize(W, H, 4, group_size=size)
    with pytest.raises(ValueError, match=names("group_size")):
        obc_native.quantize_rtn(W, H, 4, group_size=size)
    with pytest.raises(ValueError, match=names("block")):
        obc_native.prune_blocked(W, H, 0.5, size)
    with pytest.raises(ValueError, match=names("block")):
        obc_native.trace_blocked(W, H, size)
    with pytest.raises(ValueError, match=names("group")):
        obc_native.prune_structured(W, H, 0.5, group=size)


def test_grid_and_damp_values(wh):
    W, H = wh
    with pytest.raises(ValueError, match=names("grid")):
        obc_native.quantize(W, H, 4, grid="l2")
    for damp in (-0.01, np.nan, np.inf):
        with pytest.raises(ValueError, match=names("damp")):
            obc_native.prune_unstructured(W, H, 0.5, damp=damp)
    with pytest.raises(ValueError, match=names("num_threads")):
        obc_native.prune_unstructured(W, H, 0.5, num_threads=-1)


# Every string-choice argument of the numpy API: a non-string is a wrong type (TypeError, STYLE
# rule 4), an unknown string a wrong value (ValueError); both name the argument.
CHOICE_ARGS = {
    "prune_unstructured method": lambda W, H, v: obc_native.prune_unstructured(W, H, 0.5, method=v),
    "prune_unstructured spread": lambda W, H, v: obc_native.prune_unstructured(W, H, 0.5, spread=v),
    "prune_nm method": lambda W, H, v: obc_native.prune_nm(W, H, 2, 4, method=v),
    "prune_blocked spread": lambda W, H, v: obc_native.prune_blocked(W, H, 0.5, 2, spread=v),
    "prune_structured method": lambda W, H, v: obc_native.prune_structured(W, H, 0.5, method=v),
    "trace_unstructured method": lambda W, H, v: obc_native.trace_unstructured(W, H, method=v),
    "quantize method": lambda W, H, v: obc_native.quantize(W, H, 4, method=v),
    "quantize method-list": lambda W, H, v: obc_native.quantize(W, H, 4, method=["gptq", v]),
    "quantize grid": lambda W, H, v: obc_native.quantize(W, H, 4, grid=v),
    "quantize_rtn grid": lambda W, H, v: obc_native.quantize_rtn(W, H, 4, grid=v),
    "trace.weights spread": lambda W, H, v: obc_native.trace_unstructured(W, H).weights(0.5, v),
    "build_layer_levels spread": lambda W, H, v: obc_native.build_layer_levels(
        W, H, spread=v, nm=(), bits=()),
    "build_layer_levels grid": lambda W, H, v: obc_native.build_layer_levels(
        W, H, grid=v, nm=(), bits=()),
    "build_layer_levels quant_method": lambda W, H, v: obc_native.build_layer_levels(
        W, H, quant_method=v, nm=(), bits=()),
    "build_layer_levels prune_method": lambda W, H, v: obc_native.build_layer_levels(
        W, H, prune_method=v, nm=(), bits=()),
    "level_label kind": lambda W, H, v: obc_native.levels.level_label(v, {}),
}


@pytest.mark.parametrize("case", CHOICE_ARGS)
def test_choice_arguments_wrong_type_and_value(wh, case):
    W, H = wh
    arg = case.split()[1].split("-")[0]
    for bad in (None, 3, 1.5, b"exact", True):
        with pytest.raises(TypeError, match=names(arg)) as info:
            CHOICE_ARGS[case](W, H, bad)
        assert not isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=names(arg) + ": expected one of"):
        CHOICE_ARGS[case](W, H, "no-such-choice")


# ----------------------------------------------------------------------------------------------
# Singular Hessians
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", SOLVERS)
def test_singular_hessian_without_damping(fn):
    # 3 samples for 16 inputs: rank 3, every diagonal entry positive (no dead inputs).
    W, H, _ = make_problem(ROWS, COLS, seed=9, n_samples=3)
    assert np.all(np.diag(H) > 0)
    with pytest.raises(obc_native.HessianError, match="(?i)damp") as info:
        SOLVERS[fn](W, H, damp=0.0)
    assert isinstance(info.value, ValueError)
    # Damping makes the same problem solvable.
    SOLVERS[fn](W, H, damp=0.01)


def test_hessian_error_is_value_error():
    assert issubclass(obc_native.HessianError, ValueError)


# ----------------------------------------------------------------------------------------------
# Conversions: non-contiguous, read-only, other byte orders, lists
# ----------------------------------------------------------------------------------------------


def _same(a, b):
    for name in ("weight", "mask", "row_losses", "codes", "scale", "zero", "order", "losses"):
        if hasattr(a, name):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    if isinstance(a, np.ndarray):
        assert np.array_equal(a, b)


def _variants(W, H):
    big_w = np.zeros((W.shape[0] * 2, W.shape[1] * 3))
    big_w[::2, ::3] = W
    big_h = np.zeros((H.shape[0] * 2, H.shape[1] * 2))
    big_h[::2, ::2] = H
    ro_w, ro_h = W.copy(), H.copy()
    ro_w.setflags(write=False)
    ro_h.setflags(write=False)
    return {
        "strided": (big_w[::2, ::3], big_h[::2, ::2]),
        "fortran": (np.asfortranarray(W), np.asfortranarray(H)),
        "transposed-view": (np.ascontiguousarray(W.T).T, np.ascontiguousarray(H.T).T),
        "read-only": (ro_w, ro_h),
        "big-endian": (W.astype(">f8"), H.astype(">f8")),
        "lists": (W.tolist(), H.tolist()),
    }


@pytest.mark.parametrize("fn", ALL_WH)
@pytest.mark.parametrize("variant", ["strided", "fortran", "transposed-view", "read-only", "big-endian", "lists"])
def test_noncontiguous_and_readonly_inputs(wh, fn, variant):
    W, H = wh
    Wv, Hv = _variants(W, H)[variant]
    if variant != "lists":
        assert not (Wv.flags.c_contiguous and Wv.flags.writeable and Wv.dtype.isnative)
    expected = ALL_WH[fn](np.ascontiguousarray(W), np.ascontiguousarray(H))
    got = ALL_WH[fn](Wv, Hv)
    _same(got, expected)
    if hasattr(got, "weight"):
        assert got.weight.dtype == np.float64


def test_float32_noncontiguous(wh):
    W, H = wh
    W32 = W.astype(np.float32)
    a = obc_native.quantize(np.asfortranarray(W32), H, 3)
    b = obc_native.quantize(W32, H, 3)
    _same(a, b)
    assert a.weight.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# GIL release and interruption
# ----------------------------------------------------------------------------------------------


def _long_problem(target_s):
    """A trace_unstructured problem that takes about target_s seconds on one thread."""
    cols = 384
    W, H, _ = make_problem(16, cols, seed=77)
    t0 = time.perf_counter()
    obc_native.trace_unstructured(W, H, num_threads=1)
    per_row = max((time.perf_counter() - t0) / 16, 1e-5)
    rows = int(min(max(target_s / per_row, 16), 20000))
    rng = np.random.default_rng(1)
    return rng.standard_normal((rows, cols)), H


def test_gil_released_during_solve():
    """While one thread solves, another Python thread keeps running (no long GIL gaps)."""
    W, H = _long_problem(1.0)
    started = threading.Event()
    result = {}

    def work():
        started.set()
        t0 = time.perf_counter()
        result["trace"] = obc_native.trace_unstructured(W, H, num_threads=1)
        result["seconds"] = time.perf_counter() - t0

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    ticks = []
    while worker.is_alive():
        ticks.append(time.perf_counter())
        sum(range(200))  # pure-Python work: needs the GIL
    worker.join()
    assert "trace" in result
    seconds = result["seconds"]
    assert seconds > 0.3, f"solve too short to be meaningful: {seconds:.3f} s"
    gaps = np.diff(ticks)
    assert len(ticks) > 1000, f"only {len(ticks)} ticks during a {seconds:.2f} s solve"
    assert gaps.max() < 0.25 * seconds, f"GIL held: a {gaps.max():.3f} s gap during a {seconds:.2f} s solve"


def test_concurrent_calls_from_threads():
    """Solves running in several Python threads at once give the same results as serial ones."""
    problems = [make_problem(32, 64, seed=200 + i) for i in range(4)]
    calls = [
        lambda W, H: obc_native.prune_unstructured(W, H, 0.5),
        lambda W, H: obc_native.quantize(W, H, 3),
        lambda W, H: obc_native.prune_nm(W, H, 2, 4),
        lambda W, H: obc_native.prune_structured(W, H, 0.5, group=4),
    ]
    serial = [calls[i](W, H) for i, (W, H, _) in enumerate(problems)]
    out = [None] * 4
    errors = []

    def run(i):
        try:
            for _ in range(3):
                out[i] = calls[i](problems[i][0], problems[i][1])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(out, serial):
        _same(a, b)


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    import numpy as np
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import obc_native
    rng = np.random.default_rng(0)
    cols = 512
    X = rng.standard_normal((cols, 2 * cols))
    H = 2 / X.shape[1] * X @ X.T
    H = 0.5 * (H + H.T)
    W = rng.standard_normal((8, cols))
    t0 = time.perf_counter()
    obc_native.trace_unstructured(W, H)
    per_row = (time.perf_counter() - t0) / 8
    rows = int(min(max(60.0 / per_row, 64), 200000))  # about a minute of work
    W = rng.standard_normal((rows, cols))
    print("ready", flush=True)
    try:
        obc_native.trace_unstructured(W, H)
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter(), flush=True)
        sys.exit(42)
    print("finished", flush=True)
    sys.exit(0)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_interrupts_long_solve():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with proc:
        try:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"child did not start: {line!r} {out!r} {err!r}")
            time.sleep(1.0)
            assert proc.poll() is None, "the long solve finished before the signal"
            sent = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:
                pytest.fail("no exit within 5 s of SIGINT: the solve is not interruptible")
            waited = time.perf_counter() - sent
            assert proc.returncode == 42, (proc.returncode, out, err)
            assert "interrupted" in out
            assert waited < 3.0, f"took {waited:.2f} s to stop"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
