"""Sequential calibration without re-running finished modules: their outputs cached per batch.

Sequential mode (``compress(..., sequential=True)``) runs one pass over the calibration set per
group of layers, each through the model compressed so far. With ``cache_outputs=True`` a module
whose output can no longer change is not computed again: its output on each batch is recorded
the first time it is computed in a pass, and later passes replace its ``forward`` by a lookup.

When is an output final? The first (recording) pass notes, for every module, which layers to
compress were called before the module's call returned. Once all of them are compressed, the
output is a deterministic function of final weights and of final inputs (everything computed
before it is final), so the cached tensor is bit for bit the one recomputation would give. This
assumes what ``cache_outputs`` asks of the model (hence opt-in): forwards without side effects
or randomness in eval mode, and the same batches in the same order every pass (checked: each
batch's fingerprint is compared with the first pass's).

Only modules called exactly once per batch in the recording pass are cached (a module called
twice may see other inputs the second time), and only the outermost of the final ones (e.g.
BERT's ``embeddings``, then ``encoder.layer.0`` once its six Linear layers are done, replacing
the entries of its ``attention`` submodule, which are still looked up in the pass that records
the block's outputs). The model root is never cached.

Memory: one output per cached module per batch (for a BERT encoder, about one hidden state of
the whole calibration set per finished block), held until the compression ends; the entries of
a module are dropped when its parent becomes cached.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._hook_set import HookSet
from .hessian import CalibrationError

__all__ = ["ModuleTrace", "OutputCache"]

logger = logging.getLogger("obc_native.torch")


def batch_fingerprint(batch: Any) -> str:
    """A digest of every tensor (shape, dtype, bytes) and plain value of a calibration batch."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, Mapping):
            for key in value:
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (tuple, list)):
            digest.update(f"{type(value).__name__}[{len(value)}]".encode())
            for item in value:
                visit(item)
        else:
            digest.update(repr(value).encode())

    visit(batch)
    return digest.hexdigest()


class _Unclonable(Exception):
    """An output holding an object the cache cannot copy: the module is not cached."""


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _clone(value: Any) -> Any:
    """A copy of a module's output whose tensors are fresh (detached clones), so that neither
    the cache nor its readers see each other's in-place changes. Tensors, plain values, tuples
    (named too), lists, dicts and Mapping types built from keyword arguments (e.g. Hugging
    Face's ModelOutput) are copied; anything else raises _Unclonable."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        items = [_clone(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list) and type(value) is list:
        return [_clone(item) for item in value]
    if isinstance(value, dict):
        items = {key: _clone(item) for key, item in value.items()}
        if type(value) is dict:
            return items
        try:
            copy = type(value)(**items)
        except Exception as err:
            raise _Unclonable(type(value).__name__) from err
        if list(copy.keys()) != list(items.keys()):
            raise _Unclonable(type(value).__name__)
        return copy
    raise _Unclonable(type(value).__name__)


def _parents(name: str) -> Iterator[str]:
    """The names of the modules enclosing module ``name`` (``a.b.c``: ``a.b``, ``a``)."""
    while "." in name:
        name = name.rsplit(".", 1)[0]
        yield name


class ModuleTrace(HookSet):
    """Context manager for the recording pass: hooks on every module but the root, noting how
    often each is called per batch and which layers to compress ran before its call returned.

    Args:
        model: the model.
        layers: the layers to compress, by name (module names as in ``model.named_modules()``).

    Call :meth:`begin_batch` before each batch. After the pass: ``calls[name]`` is the set of
    per-batch call counts seen, ``needs[name]`` the layers called before the module's (last)
    call returned in any batch, ``fingerprints`` the batches' digests.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, Any]):
        self.model = model
        self.layers = set(layers)
        self.modules = {name: module for name, module in model.named_modules() if name}
        self.calls: dict[str, set[int]] = {}
        self.needs: dict[str, set[str]] = {name: set() for name in self.modules}
        self.fingerprints: list[str] = []
        self._batch_calls: dict[str, int] = {}
        self._called: set[str] = set()  # layers called so far in the current batch

    def begin_batch(self, index: int, batch: Any) -> None:
        self._end_batch()
        self.fingerprints.append(batch_fingerprint(batch))

    def _end_batch(self) -> None:
        if self.fingerprints:
            for name in self.modules:
                self.calls.setdefault(name, set()).add(self._batch_calls.get(name, 0))
        self._batch_calls = {}
        self._called = set()

    def install(self) -> None:
        for name, module in self.modules.items():
            if name in self.layers:
                self.add(module.register_forward_pre_hook(self._make_layer_hook(name)))
            self.add(module.register_forward_hook(self._make_post_hook(name)))

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
        self._end_batch()

    def _make_layer_hook(self, name: str):
        def hook(module, args):
            self._called.add(name)

        return hook

    def _make_post_hook(self, name: str):
        def hook(module, args, output):
            self._batch_calls[name] = self._batch_calls.get(name, 0) + 1
            self.needs[name] |= self._called

        return hook


class OutputCache:
    """The outputs of finished modules, per calibration batch, for sequential calibration.

    Args:
        trace: the recording pass (:class:`ModuleTrace`, exited).
        order: the layers to compress in the order they are compressed; a pass of
            :meth:`pass_with` is told how many of them are done (a prefix of ``order``).

    ``lookups`` counts the forward calls replaced by a lookup; ``recorded`` the outputs stored.
    """

    def __init__(self, trace: ModuleTrace, order: list[str]):
        self.modules = trace.modules
        self.fingerprints = list(trace.fingerprints)
        position = {name: index for index, name in enumerate(order)}
        # how many layers of ``order`` must be done before a module's output is final
        self.ready_at: dict[str, int] = {}
        for name in self.modules:
            if trace.calls.get(name) != {1}:
                continue  # called never, several times, or not in every batch: not cached
            needs = trace.needs[name]
            if any(layer not in position for layer in needs):
                continue
            self.ready_at[name] = 1 + max((position[layer] for layer in needs), default=-1)
        self.entries: dict[str, dict[int, Any]] = {}
        self.lookups = 0
        self.recorded = 0

    def _frontier(self, done: int) -> list[str]:
        """The outermost modules whose output is final once ``done`` layers are."""
        final = {name for name, ready in self.ready_at.items() if ready <= done}
        return [name for name in final if not any(parent in final for parent in _parents(name))]

    @contextmanager
    def pass_with(self, done: int) -> Iterator[Any]:
        """For one pass with the first ``done`` layers of ``order`` compressed: the outermost
        final modules' forwards replaced by lookups (outputs computed and recorded for batches
        not yet cached). Yields the ``begin_batch(index, batch)`` callback for
        :func:`~obc_native.torch.calibration.run_calibration`."""
        frontier = self._frontier(done)
        # modules cached before whose parent is cached from this pass on: still looked up while
        # the parent's outputs are recorded, dropped after
        inner = [n for n in self.entries if n not in frontier and n in self.ready_at]
        for name in [n for n in self.entries if n not in frontier and n not in inner]:
            del self.entries[name]  # refused
        state = {"batch": -1}
        calls: dict[str, int] = {}

        def begin_batch(index: int, batch: Any) -> None:
            if index >= len(self.fingerprints) or batch_fingerprint(batch) != self.fingerprints[index]:
                raise CalibrationError(
                    f"calibration batch {index} is not the batch the first pass saw at that position; "
                    "cache_outputs needs the same batches in the same order in every pass "
                    "(e.g. a DataLoader with shuffle=False), or pass cache_outputs=False"
                )
            state["batch"] = index
            calls.clear()

        def make_forward(name: str, original: Any):
            entries = self.entries.setdefault(name, {})

            def forward(*args: Any, **kwargs: Any) -> Any:
                batch = state["batch"]
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:  # not what the recording pass saw: compute, stop caching it
                    self.ready_at.pop(name, None)
                    return original(*args, **kwargs)
                if batch in entries:
                    self.lookups += 1
                    return _clone(entries[batch])
                output = original(*args, **kwargs)
                try:
                    entries[batch] = _clone(output)
                    self.recorded += 1
                except _Unclonable as err:
                    logger.debug("output cache: %s returns a %s, not cached", name, err)
                    self.ready_at.pop(name, None)
                return output

            return forward

        swapped: list[tuple[nn.Module, bool, Any]] = []
        try:
            for name in frontier + inner:
                module = self.modules[name]
                own = "forward" in module.__dict__
                previous = module.__dict__.get("forward")
                module.forward = make_forward(name, module.forward)
                swapped.append((module, own, previous))
            yield begin_batch
        finally:
            for module, own, previous in reversed(swapped):
                if own:
                    module.forward = previous
                else:
                    del module.__dict__["forward"]
            for name in inner:
                self.entries.pop(name, None)
