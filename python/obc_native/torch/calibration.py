"""Calibration batches: normalising the user's iterable and running the model over it.

A calibration set is any iterable of batches; a batch is passed to the model as

- a ``torch.Tensor``: ``model(batch)``;
- a tuple or list: ``model(*batch)``;
- a dict (or any Mapping): ``model(**batch)``.

Tensors inside a batch are moved to the model's device. A single tensor (or dict) given as the
whole calibration set is one batch; any other iterable is a collection of batches. Sequential
calibration needs several passes, so a one-shot iterator (e.g. a generator) is materialised into
a list first; re-iterable collections (lists, DataLoaders) are iterated again for every pass.

For anything else (a DataLoader yielding ``(inputs, labels)``, a model needing extra arguments)
pass ``forward=lambda model, batch: model(batch[0])``: it receives the batch already moved to the
model's device and replaces the default call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .hessian import CalibrationError, LayerHessian, LayerHooks, _StopForward
from .layers import find_layers

__all__ = ["as_batches", "model_device", "run_batch", "run_calibration", "collect_hessians", "Forward"]

Forward = Callable[[nn.Module, Any], Any]
"""A custom forward: ``forward(model, batch)`` with the batch on the model's device."""


def as_batches(calibration: Any) -> Iterable[Any]:
    """A re-iterable, non-empty collection of batches; CalibrationError when empty, TypeError when
    not iterable."""
    if isinstance(calibration, torch.Tensor):
        batches: Iterable[Any] = [calibration]
    elif isinstance(calibration, Mapping):
        batches = [calibration]
    elif isinstance(calibration, Iterator):
        batches = list(calibration)
    elif isinstance(calibration, Iterable):
        batches = calibration
    else:
        raise TypeError(
            f"calibration must be an iterable of batches (tensors, tuples or dicts), got {type(calibration).__name__}"
        )
    try:
        empty = len(batches) == 0
    except TypeError:  # a re-iterable without a length (e.g. a DataLoader over an IterableDataset)
        empty = next(iter(batches), None) is None
    if empty:
        raise CalibrationError("calibration set is empty: at least one batch is needed")
    return batches


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without either)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _floating_dtypes(value: Any) -> set[torch.dtype]:
    if isinstance(value, torch.Tensor):
        return {value.dtype} if value.is_floating_point() else set()
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return set().union(*(_floating_dtypes(v) for v in value)) if value else set()
    return set()


def _dtype_hint(model: nn.Module, batch: Any) -> str:
    """A hint when the batch's floating-point tensors differ in dtype from the model's first
    floating-point parameter (a float16 model fed float32 data): calibration does not cast."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    found = _floating_dtypes(batch)
    if param is None or not found or found == {param.dtype}:
        return ""
    listed = ", ".join(sorted(str(d).replace("torch.", "") for d in found))
    wanted = str(param.dtype).replace("torch.", "")
    return f"; the batch holds {listed} tensors and the model's parameters are {wanted}: cast the batches to {wanted}"


def run_batch(model: nn.Module, batch: Any, device: torch.device, forward: Forward | None = None) -> Any:
    """Call the model on one batch (see the module docstring for how batches are passed)."""
    batch = _to_device(batch, device)
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise CalibrationError(f"unsupported calibration batch type {type(batch).__name__}: use a tensor, tuple or dict")


def run_calibration(
    model: nn.Module,
    batches: Iterable[Any],
    hooks: LayerHooks | None = None,
    *,
    device: torch.device | None = None,
    forward: Forward | None = None,
    begin_batch: Callable[[int, Any], None] | None = None,
) -> int:
    """Forward every batch through ``model`` under ``torch.no_grad()``; returns the batch count.

    ``begin_batch(index, batch)``, when given, is called before each batch (after the hooks'
    ``begin_batch``), e.g. by the output cache of sequential calibration (``output_cache.py``).
    A pass that the hooks stop early counts as done. Errors raised by the model (wrong shape or
    dtype of a batch) are re-raised as :class:`CalibrationError` naming the batch.
    """
    device = device or model_device(model)
    count = 0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            if hooks is not None:
                hooks.begin_batch()
            if begin_batch is not None:
                begin_batch(index, batch)
            try:
                run_batch(model, batch, device, forward)
            except _StopForward:
                pass
            except CalibrationError as err:
                raise CalibrationError(f"calibration batch {index} ({_describe(batch)}): {err}") from None
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                # torch says "dtype", "scalar type" or "Input type (float) and bias type (c10::Half)"
                hint = _dtype_hint(model, batch) if "type" in str(err).lower() else ""
                if forward is None and isinstance(batch, (tuple, list)) and isinstance(err, TypeError):
                    # the usual cause: a DataLoader yielding (inputs, labels)
                    hint = (
                        f"; a {type(batch).__name__} batch is passed as model(*batch): for (inputs, labels) "
                        "pass forward=lambda model, batch: model(batch[0])"
                    )
                raise CalibrationError(
                    f"calibration batch {index} ({_describe(batch)}) failed in the model's forward: {err}{hint}"
                ) from err
            count += 1
    if count == 0:
        raise CalibrationError("calibration set is empty: at least one batch is needed")
    return count


def collect_hessians(
    model: nn.Module,
    calibration: Any,
    layers: Iterable[str] | None = None,
    *,
    forward: Forward | None = None,
) -> dict[str, LayerHessian]:
    """Hessians of ``layers`` (names; default all supported layers) from one dense pass.

    Returns ``{name: LayerHessian}``; ``acc.hessians()`` gives one float64
    ``cols x cols`` array per unit (conv group), ``acc.n`` the sample count.
    """
    found = find_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"not supported layers of the model: {unknown}")
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with LayerHooks({n: found[n] for n in names}) as hooks:
            run_calibration(model, as_batches(calibration), hooks, device=model_device(model), forward=forward)
    finally:
        for module, flag in training.items():
            module.train(flag)
    return hooks.hessians
