"""Helpers of the loader-hardening and file-fuzz tests (both suites)."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError instead of hanging: the handler raises between bytecodes, which
    also interrupts a blocked open() or read() (a loader that must refuse a FIFO before opening
    it is checked in a forked child where the alarm cannot help)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
