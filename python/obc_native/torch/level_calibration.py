"""The dense calibration pass of a level database: Hessians, call order, and how often each
weight is applied per sample (``flops_per_weight``).

``flops_per_weight`` of a layer is how often each of its weights is applied per calibration
sample (the leading dimension of a batch), measured on the calibration pass: the output positions
``H_out * W_out`` of a convolution, the tokens per sample of a linear layer on ``(B, T, C)``
inputs (1 on ``(B, C)``), summed over the calls of a layer that runs several times per forward
pass, and averaged over the calibration batches. Padding positions count (``token_mask`` does
not apply): the FLOPs are those the model spends on its batches, and every linear layer of a
token model sees the same positions, so the ratios a budget such as "flops=2x" compares do not
depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._hook_set import HookSet
from .calibration import Forward, TokenMask, as_batches, model_device, run_calibration
from .executor_choice import as_executor
from .hessian import CalibrationError, LayerHessian
from .layers import LayerInfo, find_layers

__all__ = ["flops_per_weight"]


def _positions(info: LayerInfo, output: torch.Tensor) -> int:
    """Applications of each weight per sample in one call: output positions (conv), tokens (linear)."""
    if info.is_conv:
        spatial = len(info.kernel)
        shape = output.shape[1:] if output.dim() == spatial + 1 else output.shape[2:]
        return math.prod(shape)
    return math.prod(output.shape[1:-1]) if output.dim() > 2 else 1


class _Applications(HookSet):
    """Context manager: forward hooks summing, over all calls, each layer's applications per sample."""

    def __init__(self, infos: Mapping[str, LayerInfo]):
        self.infos = dict(infos)
        self.totals = {name: 0 for name in self.infos}

    def install(self) -> None:
        for name, info in self.infos.items():
            self.add(info.module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        info = self.infos[name]

        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.totals[name] += _positions(info, output)

        return hook

    def per_sample(self, batches: int) -> dict[str, float]:
        return {name: total / batches for name, total in self.totals.items()}


def _calibrate(
    model: nn.Module, infos: Mapping[str, LayerInfo], batches: Iterable[Any], forward: Forward | None,
    executor: Any = None,
    token_mask: TokenMask = "auto",
) -> tuple[dict[str, LayerHessian], dict[str, float], list[str], int]:
    """One dense pass (by ``executor``, default here): Hessians (without the padding positions
    of ``token_mask``), flops_per_weight (with them), the call order and the batch count."""
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        done = as_executor(executor).calibrate(
            model, infos, batches, device=model_device(model), forward=forward, counter=_Applications,
            token_mask=token_mask,
        )
    finally:
        for module, flag in training.items():
            module.train(flag)
    count = done.batches
    never = [name for name in infos if done.hessians[name].n == 0]
    if never:
        raise CalibrationError(
            f"layer(s) {never} were never called during the calibration pass; they cannot be "
            "calibrated (leave them out)"
        )
    return done.hessians, {name: total / count for name, total in done.applications.items()}, done.order, count


def flops_per_weight(
    model: nn.Module, calibration: Any, *, layers: Iterable[str] | None = None, forward: Forward | None = None
) -> dict[str, float]:
    """How often each weight of each supported layer (or of ``layers``, by name) is applied per
    calibration sample (see the module docstring), from one forward pass over ``calibration``."""
    found = find_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"layers: not supported layers of the model: {unknown}")
    infos = {n: found[n] for n in names}
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with _Applications(infos) as applications:
            count = run_calibration(model, as_batches(calibration), device=model_device(model), forward=forward)
    finally:
        for module, flag in training.items():
            module.train(flag)
    return applications.per_sample(count)

