"""Helpers of the loader-hardening and file-fuzz tests (both suites)."""

from __future__ import annotations

import contextlib
import copy
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


def json_paths(value, path=()):
    """Every path (tuple of keys / indices) into parsed JSON, the root first; lists: first 3 items."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from json_paths(item, path + (index,))


def edited_json(data, rng, cases: int, wrong_values, skip_top=()):
    """``cases`` deep copies of ``data`` with one field replaced by a wrong value (or, one time in
    five when it sits in an object, deleted), each with a label saying what was edited. Top-level
    fields named in ``skip_top`` are left alone (e.g. a checksum that the caller recomputes)."""
    paths = [p for p in json_paths(data) if p and p[0] not in skip_top]
    for _ in range(cases):
        edited = copy.deepcopy(data)
        path = rng.choice(paths)
        target = edited
        for part in path[:-1]:
            target = target[part]
        if rng.random() < 0.2 and isinstance(target, dict):
            del target[path[-1]]
            yield edited, f"deleted {path}"
        else:
            value = rng.choice(wrong_values)
            target[path[-1]] = value
            yield edited, f"{path} = {value!r}"
