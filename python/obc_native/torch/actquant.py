"""Static activation quantization (per tensor) for weight x activation experiments, e.g. W4A4.

:func:`quantize_activations` wraps chosen layers in :class:`ActQuantWrapper`, which fake-quantizes
the layer's input on a fixed grid calibrated once (min-max or MSE) on calibration data:

    q(x) = scale * (clamp(round(x / scale) + zero, 0, 2^bits - 1) - zero)

(round half to even). Asymmetric: ``scale = (max - min) / (2^bits - 1)``, ``zero = round(-min /
scale)`` with the range widened to contain 0; symmetric: ``zero = 2^(bits-1)``,
``scale = max|x| / (2^(bits-1) - 1)``. The MSE grid shrinks the range by ``p = 1 - i/100``,
i < 80, and keeps the ``p`` with the smallest mean squared error on a sample of the inputs.

The ranges are observed on the positions that count (``token_mask``, as for the Hessians: the
padding positions of a padded token batch do not set the scales; see ``calibration.py``).

Wrapping renames the layer's parameters (``name.weight`` becomes ``name.module.weight``), so
save a compressed model before adding activation quantization; :func:`remove_activation_quantization`
undoes the wrapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from .calibration import Forward, TokenMask, as_batches, as_token_mask, model_device, run_calibration
from .layers import find_layers, masked_tokens

__all__ = ["ActQuantWrapper", "fake_quantize", "quantize_activations", "remove_activation_quantization"]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale * (clamp(round(x / scale) + zero, 0, 2^bits - 1) - zero)``, in x's dtype."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1)
    return (scale * (codes - zero)).to(x.dtype)


def _grid(low: float, high: float, bits: int, sym: bool) -> tuple[float, float]:
    """(scale, zero) for the range [low, high] (widened to contain 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if sym:
        half = (1 << (bits - 1)) - 1
        scale = max(abs(low), abs(high)) / half
        zero = float(1 << (bits - 1))
    else:
        scale = (high - low) / ((1 << bits) - 1)
        zero = float(round(-low / scale)) if scale > 0 else 0.0
    if scale <= 0:
        scale = 1.0  # an all-zero input: any grid represents it exactly
    return scale, zero


class ActQuantWrapper(nn.Module):
    """A layer whose input is fake-quantized per tensor on a static grid.

    Buffers ``scale`` and ``zero`` (0-d float32) hold the grid; ``module`` is the wrapped layer.
    """

    def __init__(self, module: nn.Module, bits: int = 8, sym: bool = False):
        super().__init__()
        if not (isinstance(bits, int) and 2 <= bits <= 16):
            raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
        self.module = module
        self.bits = bits
        self.sym = sym
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))

    def set_range(self, low: float, high: float) -> None:
        scale, zero = _grid(low, high, self.bits, self.sym)
        self.scale.fill_(scale)
        self.zero.fill_(zero)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(fake_quantize(x, self.scale, self.zero, self.bits), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym={self.sym}, scale={float(self.scale):.4g}, zero={float(self.zero):g}"


class _RangeObserver:
    """Exact min/max of a layer's inputs plus a bounded random sample of their values."""

    def __init__(self, max_samples: int, generator: torch.Generator):
        self.low = float("inf")
        self.high = float("-inf")
        self.max_samples = max_samples
        self.generator = generator
        self.sample = torch.empty(0)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() == 0:
            return
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("activation calibration input contains NaN or Inf")
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))
        merged = torch.cat([self.sample, flat])
        if merged.numel() > self.max_samples:
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.max_samples]
            merged = merged[keep]
        self.sample = merged

    def best_range(self, bits: int, sym: bool, method: str) -> tuple[float, float]:
        if method == "minmax":
            return self.low, self.high
        best, best_error = (self.low, self.high), float("inf")
        for i in range(80):
            p = 1.0 - i / 100.0
            low, high = p * self.low, p * self.high
            scale, zero = _grid(low, high, bits, sym)
            restored = fake_quantize(self.sample, torch.tensor(scale), torch.tensor(zero), bits)
            error = float(torch.mean((restored - self.sample) ** 2))
            if error < best_error:
                best, best_error = (low, high), error
        return best


class _BatchMask:
    """The current calibration batch's padding mask, for :func:`run_calibration`'s ``hooks``."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None

    def begin_batch(self, token_mask: torch.Tensor | None = None) -> None:
        self.token_mask = token_mask


def quantize_activations(
    model: nn.Module,
    calibration: Any,
    *,
    bits: int = 8,
    sym: bool = False,
    method: str = "minmax",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    max_samples: int = 1 << 18,
    seed: int = 0,
    forward: Forward | None = None,
    token_mask: TokenMask = "auto",
) -> dict[str, ActQuantWrapper]:
    """Wrap matching layers in :class:`ActQuantWrapper`, calibrated on ``calibration``.

    Args:
        model: modified in place (layers replaced by wrappers).
        calibration: iterable of batches, as for :func:`compress`.
        bits: activation bits; sym: symmetric grid; method: "minmax" or "mse".
        include / exclude: fnmatch patterns over supported layer names.
        max_samples: values kept per layer for the MSE search.
        forward: optional ``forward(model, batch)``, as for :func:`compress`.
        token_mask: which positions of padded token batches are observed, as for
            :func:`compress` (default: a dict batch's ``"attention_mask"``).
    Returns the wrappers by layer name.
    """
    token_mask = as_token_mask(token_mask)
    if method not in ("minmax", "mse"):
        raise ValueError(f"method must be 'minmax' or 'mse', got {method!r}")
    layers = {
        name: info
        for name, info in find_layers(model).items()
        if any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)
    }
    if not layers:
        raise ValueError(f"no supported layer matches include={list(include)} exclude={list(exclude)}")
    if "" in layers:
        raise ValueError("the model itself is a single layer; wrap it in a container to quantize its input")
    generator = torch.Generator().manual_seed(seed)
    observers = {name: _RangeObserver(max_samples, generator) for name in layers}
    handles = []
    training = {module: module.training for module in model.modules()}
    current = _BatchMask()

    def make_hook(name: str):
        masked = not layers[name].is_conv  # a convolution's (B, C, ...) input is not (B, T, ...)

        def hook(module, args):
            try:
                observers[name].add(masked_tokens(args[0], current.token_mask) if masked else args[0])
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None

        return hook

    try:
        model.eval()
        for name, info in layers.items():
            handles.append(info.module.register_forward_pre_hook(make_hook(name)))
        run_calibration(
            model, as_batches(calibration), current, device=model_device(model), forward=forward,
            token_mask=token_mask,
        )
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)

    wrappers = {}
    for name, info in layers.items():
        wrapper = ActQuantWrapper(info.module, bits=bits, sym=sym).to(model_device(model))
        wrapper.set_range(*observers[name].best_range(bits, sym, method))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def remove_activation_quantization(model: nn.Module) -> int:
    """Replace every :class:`ActQuantWrapper` by the layer it wraps; returns how many."""
    names = [name for name, module in model.named_modules() if isinstance(module, ActQuantWrapper)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).module)
    return len(names)
