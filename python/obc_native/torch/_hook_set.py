"""Module hooks owned by a context manager: installed on enter, removed on exit."""

from __future__ import annotations

from typing import Any


class HookSet:
    """Base of the context managers that hook modules (``LayerHooks``, ``ModuleTrace``, the
    database's application counter): ``install()`` registers hooks through ``add``; on exit, or
    when installing fails part way, every hook registered so far is removed."""

    def install(self) -> None:
        """Register the hooks (each handle through :meth:`add`)."""
        raise NotImplementedError

    def add(self, handle: Any) -> None:
        """Keep a hook handle (``torch.utils.hooks.RemovableHandle``) for removal."""
        self.__dict__.setdefault("_handles", []).append(handle)

    def remove_hooks(self) -> None:
        """Remove every hook registered so far (latest first)."""
        handles = self.__dict__.get("_handles", [])
        while handles:
            handles.pop().remove()

    def __enter__(self):
        try:
            self.install()
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
