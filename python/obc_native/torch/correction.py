"""Statistics correction after compression: BatchNorm re-estimation and bias correction."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .calibration import Forward, as_batches, run_calibration

__all__ = ["batchnorm_layers", "recalibrate_batchnorm", "corrected_bias"]


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """BatchNorm modules that track running statistics, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and module.track_running_stats
    }


def recalibrate_batchnorm(
    model: nn.Module, calibration: Any, *, device: torch.device | None = None, forward: Forward | None = None
) -> int:
    """Re-estimate every BatchNorm's running mean and variance on the calibration data.

    The statistics are reset and recomputed as the exact average over all calibration batches
    (momentum None), with every other module in eval mode (dropout off). Training flags and
    momenta are restored afterwards. Returns the number of BatchNorm layers updated.
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    batches = as_batches(calibration)
    training = {module: module.training for module in model.modules()}
    momenta = {module: module.momentum for module in norms.values()}
    try:
        model.eval()
        for module in norms.values():
            module.reset_running_stats()
            module.momentum = None
            module.train()
        run_calibration(model, batches, device=device, forward=forward)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        for module, flag in training.items():
            module.train(flag)
    return len(norms)


def corrected_bias(
    bias: np.ndarray,
    dense_weight: np.ndarray,
    new_weight: np.ndarray,
    input_mean: np.ndarray,
    dense_output_mean: np.ndarray | None = None,
) -> np.ndarray:
    """The bias that restores the dense layer's mean output per channel.

    Args:
        bias: ``(out,)`` current bias.
        dense_weight, new_weight: ``(out, cols)`` weights before / after compression (native order).
        input_mean: ``(groups, cols)`` mean sample seen by the compressed layer; unit ``g`` owns
            output rows ``g*out/groups ..``.
        dense_output_mean: ``(out,)`` mean output of the layer in the dense model (sequential
            calibration, where inputs differ from the dense model's); None: the inputs are the
            dense model's, and the target mean is ``dense_weight @ input_mean + bias``.

    Returns ``(out,)`` float64: ``target - new_weight @ input_mean``, i.e. the bias plus the mean
    output error ``(W - W_hat) x_mean`` in the dense case.
    """
    groups = input_mean.shape[0]
    rows = new_weight.shape[0] // groups
    new_mean = np.concatenate(
        [new_weight[g * rows : (g + 1) * rows].astype(np.float64) @ input_mean[g] for g in range(groups)]
    )
    if dense_output_mean is None:
        dense_mean = np.concatenate(
            [dense_weight[g * rows : (g + 1) * rows].astype(np.float64) @ input_mean[g] for g in range(groups)]
        )
        return bias.astype(np.float64) + (dense_mean - new_mean)
    return dense_output_mean.astype(np.float64) - new_mean
