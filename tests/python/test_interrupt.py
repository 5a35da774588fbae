"""Interrupting long calls: a signal handler's exception stops the core within about a second and
comes out of the call as itself (KeyboardInterrupt under the default SIGINT handler).

Each problem takes several seconds uninterrupted on one thread; the signal arrives after 0.2 s,
so a call that only polls between rows (or not at all) fails the time bound.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

import obc_native

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SIGNAL_AFTER_S = 0.2
STOP_WITHIN_S = 1.5  # documented: about a second; generous for a loaded machine


class Deadline(Exception):
    """What a SIGALRM handler raises: must come out of the call unchanged."""


def _diagonally_dominant_hessian(cols: int, seed: int = 0) -> np.ndarray:
    """A symmetric positive definite (cols, cols) H built in O(cols^2) (Gershgorin)."""
    rng = np.random.default_rng(seed)
    R = rng.uniform(-1.0, 1.0, (cols, cols))
    H = R + R.T
    H[np.diag_indices(cols)] = 2.0 * cols + 1.0
    return H


def _stopped_by_alarm(call) -> float:
    """Runs call() with a SIGALRM handler raising Deadline after SIGNAL_AFTER_S; returns the
    seconds between the signal and the exception leaving the call."""

    def on_alarm(signum, frame):
        raise Deadline()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, SIGNAL_AFTER_S)
        start = time.perf_counter()
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - a KeyboardInterrupt here is the bug
            raised = error
        else:
            pytest.fail("the call finished before the signal: make the problem bigger")
        waited = time.perf_counter() - start - SIGNAL_AFTER_S
        assert type(raised) is Deadline, f"the handler's exception became {type(raised)!r}"
        return waited
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_alarm_stops_the_hessian_inverse():
    H = _diagonally_dominant_hessian(4096)  # the inverse alone takes seconds
    W = np.ones((1, 4096))
    waited = _stopped_by_alarm(lambda: obc_native.prune_nm(W, H, 2, 4, num_threads=1))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop inside the inverse"


@pytest.mark.slow
def test_alarm_stops_accumulator_add_and_leaves_it_unchanged():
    cols = 3072
    rng = np.random.default_rng(1)
    acc = obc_native.HessianAccumulator(cols, num_threads=1)
    first = rng.standard_normal((100, cols)).astype(np.float32)
    acc.add(first)
    before = acc.sum()
    X = rng.random((6144, cols), dtype=np.float32)  # seconds of Gram products
    waited = _stopped_by_alarm(lambda: acc.add(X))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop inside add"
    # The interrupted batch is rolled back exactly.
    assert acc.count == 100
    np.testing.assert_array_equal(acc.sum(), before)
    # And the accumulator still works: the same batch then gives the same sum as a fresh one.
    acc.add(X[:300])
    fresh = obc_native.HessianAccumulator(cols, num_threads=1)
    fresh.add(first)
    fresh.add(X[:300])
    np.testing.assert_array_equal(acc.sum(), fresh.sum())


def test_alarm_stops_a_long_prune_with_its_own_exception():
    rng = np.random.default_rng(2)
    cols = 512
    H = _diagonally_dominant_hessian(cols, seed=3)
    W = rng.standard_normal((3000, cols))  # many seconds of row traces on one thread
    waited = _stopped_by_alarm(
        lambda: obc_native.prune_unstructured(W, H, 0.5, num_threads=1))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop the prune"


def test_alarm_stops_layer_loss():
    cols = 4096
    H = _diagonally_dominant_hessian(cols, seed=7).astype(np.float32)
    W = np.random.default_rng(8).random((2048, cols), dtype=np.float32)  # seconds of products
    waited = _stopped_by_alarm(lambda: obc_native.layer_loss(W, 0.5 * W, H, num_threads=1))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop layer_loss"


def test_default_sigint_handler_raises_keyboard_interrupt_from_the_inverse():
    H = _diagonally_dominant_hessian(4096, seed=4)
    W = np.ones((1, 4096))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(SIGNAL_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
    try:
        start = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            obc_native.prune_nm(W, H, 2, 4, num_threads=1)
        waited = time.perf_counter() - start - SIGNAL_AFTER_S
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop inside the inverse"



@pytest.mark.slow
def test_alarm_stops_hessian_file_save_and_load(tmp_path, monkeypatch):
    """Saving and loading a 200 MB Hessian file are interruptible between 1 MiB chunks (and run
    without the GIL): a stopped save leaves the previous file and no temporary behind."""
    monkeypatch.setattr(sys.modules[__name__], "SIGNAL_AFTER_S", 0.05)  # each call takes > 0.3 s
    cols = 5000
    acc = obc_native.HessianAccumulator._from_state(_diagonally_dominant_hessian(cols, seed=9), 10)
    path = tmp_path / "h.obch"
    small = obc_native.HessianAccumulator(3)
    small.save(path)
    before = path.read_bytes()
    waited = _stopped_by_alarm(lambda: acc.save(path))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop the save"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["h.obch"]
    acc.save(path)
    waited = _stopped_by_alarm(lambda: obc_native.HessianAccumulator.load(path))
    assert waited < STOP_WITHIN_S, f"took {waited:.2f} s to stop the load"


def test_alarm_stops_gptq():
    # 6000 inputs, one thread: GPTQ's factor (cols^3 / 3 = 72 GFLOP, several seconds) polls
    # between its panels, the sweep between row chunks.
    cols = 6000
    H = _diagonally_dominant_hessian(cols, seed=3)
    W = np.random.default_rng(3).standard_normal((256, cols)).astype(np.float32)
    waited = _stopped_by_alarm(lambda: obc_native.quantize(W, H, 4, grid="minmax", method="gptq",
                                                           refine=False, num_threads=1))
    assert waited < STOP_WITHIN_S, f"stopped {waited:.2f} s after the signal"


def test_alarm_stops_the_refinement():
    # RTN (min-max grid: milliseconds) leaves the refinement most of the work: 4096 x 2048, one
    # thread, ~4 s; it polls between chunks of 64 rows (~0.06 s each here).
    cols = 2048
    H = _diagonally_dominant_hessian(cols, seed=6)
    W = np.random.default_rng(6).standard_normal((4096, cols)).astype(np.float32)
    waited = _stopped_by_alarm(lambda: obc_native.quantize(W, H, 4, grid="minmax", method="rtn",
                                                           refit_rounds=0, num_threads=1))
    assert waited < STOP_WITHIN_S, f"stopped {waited:.2f} s after the signal"


def test_alarm_stops_the_mse_grid_fit():
    # quantize(method="rtn") on a tall, narrow float64 layer is nearly all grid fit: float64 rows
    # take the exact MSE search (80 shrink factors summed with std::pow, early exits only),
    # ~2.5 s for 8192 x 256 on one thread (the rest, O(rows cols^2), ~0.1 s); the fit polls
    # between batches of 16 rows.
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8192, 256))
    H = np.eye(256)
    waited = _stopped_by_alarm(lambda: obc_native.quantize(W, H, 4, grid="mse", method="rtn",
                                                           num_threads=1))
    assert waited < STOP_WITHIN_S, f"stopped {waited:.2f} s after the signal"


def test_alarm_stops_the_float32_grid_fit_plain_scan():
    # the private make_grid binding by the plain scan (every shrink factor summed in full,
    # ~9 ms per 4096-column row): its hook reaches the same row-batch polling
    from obc_native import _core

    rng = np.random.default_rng(5)
    W = np.ascontiguousarray(rng.standard_normal((512, 4096)), dtype=np.float32)
    waited = _stopped_by_alarm(lambda: _core.f32._make_grid(W, 4, True, 0, "mse", 1, True))
    assert waited < STOP_WITHIN_S, f"stopped {waited:.2f} s after the signal"
