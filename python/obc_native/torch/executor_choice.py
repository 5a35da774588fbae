"""Choosing an executor: ``"local"``, ``"ray"`` or an Executor object (see ``executors.py``).

Kept apart from ``executors.py`` so that the Ray executor (which builds on ``executors``) is
imported only from here, and only when asked for.
"""

from __future__ import annotations

from .executors import Executor, LocalExecutor

__all__ = ["EXECUTORS", "as_executor"]

EXECUTORS = ("local", "ray")


def as_executor(executor: str | Executor | None) -> Executor:
    """An Executor from ``"local"`` (or None), ``"ray"`` (a local Ray cluster, or the one
    ``ray.init`` already connected to) or an Executor object (e.g. ``RayExecutor(address=...)``).
    Ray is imported only for ``"ray"``."""
    if executor is None or (isinstance(executor, str) and executor == "local"):
        return LocalExecutor()
    if isinstance(executor, str) and executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor()
    if isinstance(executor, Executor):
        return executor
    if isinstance(executor, str):
        raise ValueError(f"executor: expected one of {EXECUTORS} or an Executor object, got {executor!r}")
    raise TypeError(f"executor: expected one of {EXECUTORS} or an Executor object, got {type(executor).__name__}")
