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

Padding tokens (``token_mask``). A padded, tokenized batch ``{"input_ids": (B, T),
"attention_mask": (B, T)}`` runs every position through the layers, the padding ones too, whose
activations are pad embeddings, not text. By default (``token_mask="auto"``) a Mapping batch with
an ``"attention_mask"`` key is masked: a layer input (or output) whose leading dimensions are
exactly ``(B, T)``, e.g. the ``(B, T, C)`` input of a Linear or Hugging Face Conv1D layer,
contributes only the positions where the mask is 1, and the sample count ``n`` counts only those.
Inputs of any other shape are taken whole, masked or not: a convolution's input, a Linear layer
applied to a flattened ``(B*T, C)`` or a transposed ``(T, B, C)`` tensor (with ``B == T`` a
``(T, B, C)`` input would be read as ``(B, T, C)``: pass ``token_mask=None`` for such a model).
A batch has one mask: in an encoder-decoder model the decoder's ``(B, T_dec, C)`` inputs are
masked by it too when ``T_dec == T`` (pass a callable, or None, if they should not be).
The same rule applies to every statistic read from calibration: Hessians, input means (bias
correction), dense output means (sequential bias correction), activation-quantization ranges
and the mean squared error of stitched model losses. The options:

- ``"auto"`` (default): ``batch["attention_mask"]`` when the batch is a Mapping holding that key,
  else no mask;
- a key (str): ``batch[key]``; every batch must be a Mapping holding it;
- a callable ``token_mask(batch) -> (B, T) tensor or None``, given the batch as it was given
  (e.g. ``lambda batch: batch[1]`` for ``(input_ids, attention_mask)`` tuples);
- ``None`` or ``False``: no mask, every position counts (the behaviour before masking existed).

A mask must be a 2-D tensor of 0/1 values (bool, integer or floating point), of the shape of
``batch["input_ids"]`` (of the first two dimensions of ``batch["inputs_embeds"]``) when the batch
has one, with at least one 1 per batch; anything else is a
:class:`CalibrationError` naming the batch. The FLOPs of a level database
(:func:`~obc_native.torch.level_calibration.flops_per_weight`) are not masked: they measure the
compute of the model on its batches, padding included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

from .hessian import CalibrationError, LayerHessian, LayerHooks, _StopForward
from .layers import find_layers

__all__ = [
    "as_batches",
    "model_device",
    "run_batch",
    "run_calibration",
    "collect_hessians",
    "Forward",
    "TokenMask",
    "as_token_mask",
    "batch_token_mask",
]

Forward = Callable[[nn.Module, Any], Any]
"""A custom forward: ``forward(model, batch)`` with the batch on the model's device."""

TokenMask = Union[str, Callable[[Any], Any], None, bool]
"""Where a batch's padding mask is: "auto", a Mapping key, a callable, or None / False (off)."""

# The key of the padding mask in Hugging Face batches (tokenizers and data collators).
_AUTO_KEY = "attention_mask"


def as_token_mask(token_mask: Any) -> TokenMask:
    """The checked ``token_mask`` option (see the module docstring): "auto", a non-empty key, a
    callable, or None (``False`` becomes None). TypeError / ValueError naming ``token_mask``."""
    if token_mask is None or token_mask is False:
        return None
    if isinstance(token_mask, str):
        if not token_mask:
            raise ValueError("token_mask: expected 'auto', a batch key, a callable or None, got ''")
        return token_mask
    if callable(token_mask) and not isinstance(token_mask, (bool, torch.Tensor)):
        return token_mask
    raise TypeError(
        "token_mask: expected 'auto', the key of the mask in dict batches (str), a callable "
        f"token_mask(batch) -> (B, T) tensor, or None, got {type(token_mask).__name__}"
    )


def batch_token_mask(
    batch: Any, token_mask: TokenMask, index: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """The ``(B, T)`` bool mask of calibration batch number ``index`` under ``token_mask`` (the
    batch as given, before it is moved), on ``device`` (default: where it is); None: no mask.

    Raises CalibrationError naming the batch for a mask that is not a 2-D tensor of 0/1 values,
    whose shape differs from ``batch["input_ids"]`` (``batch["inputs_embeds"]``'s first two
    dimensions), or that masks every token."""
    if token_mask is None:
        return None
    where = f"calibration batch {index}"
    if callable(token_mask):
        mask = token_mask(batch)
        if mask is None:
            return None
        source = "token_mask(batch)"
    elif isinstance(batch, Mapping) and token_mask in batch:
        mask = batch[token_mask]
        source = f"{token_mask!r}"
    elif token_mask == "auto":
        # a collator may leave the key at None: no mask, as without the key
        if not isinstance(batch, Mapping) or batch.get(_AUTO_KEY) is None:
            return None
        mask = batch[_AUTO_KEY]
        source = f"{_AUTO_KEY!r}"
    else:
        have = f"keys {list(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
        raise CalibrationError(
            f"{where}: token_mask={token_mask!r} names a key of dict batches, and the batch is {have}; "
            "pass the right key, a callable token_mask(batch), or token_mask=None"
        )
    if not isinstance(mask, torch.Tensor):
        raise CalibrationError(f"{where}: the token mask {source} must be a tensor, got {type(mask).__name__}")
    off = "; pass token_mask=None to count every position"
    if mask.dim() != 2:
        raise CalibrationError(
            f"{where}: the token mask {source} must be (batch, tokens), got shape {tuple(mask.shape)}{off}"
        )
    for key, dims in (("input_ids", 2), ("inputs_embeds", 3)):  # the tokens the mask is about
        tokens = batch.get(key) if isinstance(batch, Mapping) else None
        if isinstance(tokens, torch.Tensor) and (tokens.dim() != dims or tokens.shape[:2] != mask.shape):
            raise CalibrationError(
                f"{where}: the token mask {source} has shape {tuple(mask.shape)}, and {key!r} "
                f"{tuple(tokens.shape)}"
            )
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise CalibrationError(
                f"{where}: the token mask {source} must hold only 0 and 1 (1: a real token, 0: padding){off}"
            )
        mask = mask != 0
    if not bool(mask.any()):
        raise CalibrationError(f"{where}: the token mask {source} masks every token: nothing to calibrate on")
    return mask if device is None else mask.to(device)


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
    token_mask: TokenMask = "auto",
    first_batch: int = 0,
) -> int:
    """Forward every batch through ``model`` under ``torch.no_grad()``; returns the batch count.

    ``hooks``: any object with ``begin_batch(token_mask=...)`` (e.g. :class:`LayerHooks`), called
    before each batch with the batch's ``(B, T)`` bool padding mask under ``token_mask`` (see the
    module docstring; on ``device``), or None. ``begin_batch(index, batch)``, when given, is
    called before each batch (after the hooks' ``begin_batch``), e.g. by the output cache of
    sequential calibration (``output_cache.py``). ``first_batch``: the number of the first of
    ``batches`` in the whole calibration set (a calibration shard's), for error messages.
    A pass that the hooks stop early counts as done. Errors raised by the model (wrong shape or
    dtype of a batch) are re-raised as :class:`CalibrationError` naming the batch.
    """
    device = device or model_device(model)
    token_mask = as_token_mask(token_mask)
    count = 0
    with torch.no_grad():
        for index, batch in enumerate(batches, start=first_batch):
            if hooks is not None:
                hooks.begin_batch(token_mask=batch_token_mask(batch, token_mask, index, device))
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
    token_mask: TokenMask = "auto",
) -> dict[str, LayerHessian]:
    """Hessians of ``layers`` (names; default all supported layers) from one dense pass.

    Returns ``{name: LayerHessian}``; ``acc.hessians()`` gives one float64
    ``cols x cols`` array per unit (conv group), ``acc.n`` the sample count. ``token_mask``:
    which positions of padded batches count (default: a dict batch's ``"attention_mask"``; see
    the module docstring).
    """
    token_mask = as_token_mask(token_mask)
    found = find_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"not supported layers of the model: {unknown}")
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with LayerHooks({n: found[n] for n in names}) as hooks:
            run_calibration(
                model, as_batches(calibration), hooks, device=model_device(model), forward=forward,
                token_mask=token_mask,
            )
    finally:
        for module, flag in training.items():
            module.train(flag)
    return hooks.hessians
