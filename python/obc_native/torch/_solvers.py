"""Lazy access to the numpy-level solvers of obc_native (so that this subpackage imports alone)."""

from __future__ import annotations

from types import ModuleType

__all__ = ["get_core"]


def get_core() -> ModuleType:
    """The ``obc_native`` module with the numpy-level solvers (prune_*, quantize*, layer_loss)."""
    import obc_native

    if not hasattr(obc_native, "prune_unstructured"):
        raise ImportError("obc_native's compiled solvers are not available (is the package built and installed?)")
    return obc_native
