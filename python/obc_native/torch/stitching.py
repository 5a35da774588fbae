"""Stitched model losses of a level database: the model's loss with one layer at one level.

For every level of every layer, that one layer's weights are replaced by the level's weights in
the otherwise dense model and the model is run on the calibration batches; the layer's weights
are restored afterwards. The level's ``model_loss`` is

- without ``loss_fn``: the mean squared error of the model outputs against the dense model's
  outputs, over every output element of the calibration set (0 for the dense level);
- with ``loss_fn(output, batch) -> scalar``: the task loss, averaged over the calibration
  batches, minus the dense model's (so the dense level has 0, and a level may be negative).

The squared error leaves out the padding positions of a padded token batch (``token_mask``, as
for the Hessians: an output whose leading dimensions are the mask's ``(B, T)``, e.g. logits
``(B, T, vocab)``; see ``calibration.py``); a ``loss_fn`` receives the batch, mask included,
and masks itself. Outputs that are not tensors: a mapping's ``"logits"`` (Hugging Face
outputs) or the first tensor of a tuple or list is used for the squared error; anything else
needs a ``loss_fn``. The dense outputs of all calibration batches are held in memory while
stitching. Cost: ``levels x batches`` forward passes per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..levels import LayerLevels
from .calibration import as_token_mask, batch_token_mask, run_batch
from .hessian import CalibrationError
from .layers import LayerInfo, masked_tokens, set_weight_matrix, weight_matrix

__all__: list[str] = []


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise CalibrationError(
        f"stitch: the model returned a {type(output).__name__}, not a tensor; pass loss_fn(output, batch) "
        "to score it"
    )


class _Stitcher:
    """Model-level loss of replacing one layer's weights, against the dense model."""

    def __init__(self, model, batches, device, forward, loss_fn, token_mask="auto"):
        self.model, self.batches, self.device, self.forward, self.loss_fn = model, batches, device, forward, loss_fn
        self.reference: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.dense_value = 0.0
        with torch.no_grad():
            if loss_fn is None:
                token_mask = as_token_mask(token_mask)
                self.masks = [batch_token_mask(batch, token_mask, index) for index, batch in enumerate(batches)]
                self.reference = [
                    masked_tokens(_output_tensor(self._run(batch)).detach(), mask).double()
                    for batch, mask in zip(batches, self.masks)
                ]
            else:
                self.dense_value = self._task_loss()

    def _run(self, batch):
        return run_batch(self.model, batch, self.device, self.forward)

    def _task_loss(self) -> float:
        values = []
        for batch in self.batches:
            value = self.loss_fn(self._run(batch), batch)
            values.append(float(value))
        return sum(values) / len(values)

    def score(self) -> float:
        with torch.no_grad():
            if self.loss_fn is not None:
                return self._task_loss() - self.dense_value
            total, count = 0.0, 0
            for batch, reference, mask in zip(self.batches, self.reference, self.masks):
                output = masked_tokens(_output_tensor(self._run(batch)), mask).double()
                if output.shape != reference.shape:
                    raise CalibrationError(
                        f"stitch: output shape {tuple(output.shape)} differs from the dense {tuple(reference.shape)}"
                    )
                total += float(torch.sum((output - reference) ** 2))
                count += reference.numel()
        return total / max(count, 1)

    def losses(self, info: LayerInfo, layer: LayerLevels) -> list[float]:
        original = weight_matrix(info)
        values = []
        try:
            for level in layer.levels:
                if level.is_dense:
                    values.append(0.0)
                    continue
                set_weight_matrix(info, torch.from_numpy(np.ascontiguousarray(level.weight)))
                value = self.score()
                if not math.isfinite(value):
                    raise CalibrationError(f"stitch: layer {info.name!r} level {level.label}: model loss {value}")
                values.append(value)
        finally:
            set_weight_matrix(info, original)
        return values

