"""Layer adapters: the weight matrix, input samples and column layout of each supported module.

Every supported layer is seen as ``groups`` independent problems ("units"), each with a weight
matrix ``W_g`` of shape ``rows x cols`` (outputs x inputs) and a Hessian ``cols x cols``:

=================  ===========================================  ==========================
module             weight matrix (native column order)          samples of x
=================  ===========================================  ==========================
nn.Linear          ``weight`` (out, in), 1 unit                   every row of ``x.reshape(-1, in)``
HF ``Conv1D``      ``weight.T`` (weight is stored in x out)       every row of ``x.reshape(-1, in)``
nn.Conv1d/Conv2d   ``weight[g*r:(g+1)*r].reshape(r, C*K)``        every unfolded patch of group g
=================  ===========================================  ==========================

For convolutions ``C = in_channels / groups`` and ``K = prod(kernel_size)``; unit ``g`` owns
output rows ``g*r .. (g+1)*r - 1`` with ``r = out_channels / groups``. The native column order is
PyTorch's ``(c_in, kh, kw)``: column ``c*K + k``. The *channels-last* order ``(kh, kw, c_in)``
puts column ``k*C + c`` at position ``k*C + c`` of the permuted matrix, so that ``m`` consecutive
columns are ``m`` input channels at one kernel position (see :func:`channels_last_perm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerInfo",
    "layer_kind",
    "describe_layer",
    "find_layers",
    "weight_matrix",
    "set_weight_matrix",
    "input_samples",
    "output_channel_sum",
    "masked_tokens",
    "channels_last_perm",
    "param_key",
]

KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")


def param_key(module_name: str, param: str) -> str:
    """The ``named_parameters`` / ``state_dict`` key of ``param`` of the module ``module_name``.

    ``param_key("fc", "weight") == "fc.weight"``; a model that is itself one layer has the
    module name ``""`` and the key is just ``"weight"`` (not ``".weight"``).
    """
    return f"{module_name}.{param}" if module_name else param


def layer_kind(module: nn.Module) -> str | None:
    """The adapter kind of ``module`` ("linear", "hf_conv1d", "conv1d", "conv2d"), or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    # Hugging Face's GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D), detected without
    # importing transformers: a linear layer whose weight is stored (in_features, out_features).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        weight = module.weight
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf:
            return "hf_conv1d"
    return None


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of one supported layer.

    Attributes:
        name: dotted module name in the model (``model.get_submodule(name)``).
        module: the module itself.
        kind: one of "linear", "hf_conv1d", "conv1d", "conv2d".
        out_features: rows of the full weight matrix (out_channels for convs).
        in_per_group: input channels per unit (C); in_features for linear layers.
        kernel: kernel size tuple (empty for linear layers); K = prod(kernel).
        groups: number of units (conv groups; 1 for linear layers).
    """

    name: str
    module: nn.Module
    kind: str
    out_features: int
    in_per_group: int
    kernel: tuple[int, ...]
    groups: int

    @property
    def kernel_numel(self) -> int:
        """K, the number of kernel positions (1 for linear layers)."""
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def rows(self) -> int:
        """Rows of one unit's weight matrix (out_features / groups)."""
        return self.out_features // self.groups

    @property
    def cols(self) -> int:
        """Columns of one unit's weight matrix (C * K)."""
        return self.in_per_group * self.kernel_numel

    @property
    def is_conv(self) -> bool:
        return self.kind in ("conv1d", "conv2d")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the module's ``weight`` parameter as stored."""
        return tuple(self.module.weight.shape)


def describe_layer(name: str, module: nn.Module) -> LayerInfo:
    """Build the :class:`LayerInfo` of a supported module; ValueError for anything else."""
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(f"layer {name!r}: {type(module).__name__} is not a supported layer type")
    if kind == "linear":
        return LayerInfo(name, module, kind, module.out_features, module.in_features, (), 1)
    if kind == "hf_conv1d":
        rows_in, rows_out = module.weight.shape
        return LayerInfo(name, module, kind, rows_out, rows_in, (), 1)
    return LayerInfo(
        name,
        module,
        kind,
        module.out_channels,
        module.in_channels // module.groups,
        tuple(module.kernel_size),
        module.groups,
    )


def find_layers(model: nn.Module) -> dict[str, LayerInfo]:
    """All supported layers of ``model`` in ``named_modules`` order, keyed by dotted name."""
    found = {}
    for name, module in model.named_modules():
        if layer_kind(module) is not None:
            found[name] = describe_layer(name, module)
    return found


def weight_matrix(info: LayerInfo) -> torch.Tensor:
    """The full weight matrix, ``out_features x cols`` in native column order (a detached copy).

    Rows ``g*rows .. (g+1)*rows - 1`` belong to unit ``g``.
    """
    weight = info.module.weight.detach()
    if info.kind == "hf_conv1d":
        return weight.t().contiguous().clone()
    return weight.reshape(info.out_features, info.cols).clone()


def set_weight_matrix(info: LayerInfo, matrix: torch.Tensor) -> None:
    """Write a ``out_features x cols`` matrix (native order) back into the module's weight."""
    weight = info.module.weight
    expected = (info.out_features, info.cols)
    if tuple(matrix.shape) != expected:
        raise ValueError(f"layer {info.name!r}: weight matrix must be {expected}, got {tuple(matrix.shape)}")
    matrix = matrix.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if info.kind == "hf_conv1d":
            weight.copy_(matrix.t())
        else:
            weight.copy_(matrix.reshape(weight.shape))


def _conv_padding(module: nn.Module, kernel: tuple[int, ...]) -> list[int]:
    """Per spatial dim (left, right) padding amounts, in F.pad order (last dim first)."""
    dilation = tuple(module.dilation)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pairs = [(0, 0)] * len(kernel)
        else:  # "same": the extra element of an odd total goes to the right, as in PyTorch
            pairs = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in module.padding]
    flat = []
    for left, right in reversed(pairs):
        flat += [left, right]
    return flat


def masked_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The positions of ``x`` that count under a ``(B, T)`` bool padding mask: ``x[token_mask]``,
    ``(real tokens, *x.shape[2:])`` in row-major order, when ``x`` has at least 3 dimensions and
    its leading two are exactly ``(B, T)``; otherwise ``x`` whole (no mask, or a tensor of
    another layout, which is then taken unmasked; see ``calibration.py``)."""
    if token_mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(token_mask.shape):
        return x
    return x[token_mask.to(x.device)]


def input_samples(info: LayerInfo, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The samples the layer sees in input ``x``: ``(groups, n, cols)`` in native column order.

    Linear / HF Conv1D: ``x`` is ``(..., in_features)``; each leading index is one sample, except
    the padding positions of ``token_mask`` (a ``(B, T)`` bool mask, applied when ``x`` is
    ``(B, T, ..., in_features)``; see :func:`masked_tokens`).
    Conv1d: ``x`` is ``(B, C_in, L)`` or ``(C_in, L)``; Conv2d: ``(B, C_in, H, W)`` or
    ``(C_in, H, W)``. Every output position is one sample: the unfolded patch of kernel size,
    stride, padding (any padding_mode) and dilation (``token_mask`` does not apply).
    """
    if not info.is_conv:
        if x.shape[-1] != info.in_per_group:
            raise ValueError(
                f"layer {info.name!r}: expected inputs with last dimension {info.in_per_group}, "
                f"got shape {tuple(x.shape)}"
            )
        return masked_tokens(x, token_mask).reshape(1, -1, info.in_per_group)

    module = info.module
    spatial = len(info.kernel)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    if x.dim() != spatial + 2 or x.shape[1] != info.in_per_group * info.groups:
        raise ValueError(
            f"layer {info.name!r}: expected inputs (B, {info.in_per_group * info.groups}, ...) with "
            f"{spatial} spatial dimension(s), got shape {tuple(x.shape)}"
        )
    padding = _conv_padding(module, info.kernel)
    if any(padding):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, padding, mode=mode)
    kernel, stride, dilation = info.kernel, tuple(module.stride), tuple(module.dilation)
    if spatial == 1:  # treat (B, C, L) as a (B, C, 1, L) image
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1,) + kernel, (1,) + stride, (1,) + dilation
    patches = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)  # (B, C*K, L)
    batch, _, positions = patches.shape
    # rows of `patches` are c*K + k over all C_in channels; unit g owns channels g*C .. (g+1)*C-1
    patches = patches.reshape(batch, info.groups, info.cols, positions)
    return patches.permute(1, 0, 3, 2).reshape(info.groups, batch * positions, info.cols)


def output_channel_sum(
    info: LayerInfo, y: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum over samples of the layer output per output channel, and the sample count.

    Returns ``(sum (out_features,) float64, n)``; convs: channel dim 1 (or 0 unbatched).
    Linear layers: the padding positions of ``token_mask`` left out (see :func:`input_samples`).
    """
    if info.is_conv:
        if y.dim() == len(info.kernel) + 1:
            y = y.unsqueeze(0)
        y = y.transpose(0, 1).reshape(info.out_features, -1)
        return y.sum(dim=1, dtype=torch.float64), y.shape[1]
    y = masked_tokens(y, token_mask).reshape(-1, info.out_features)
    # summed in float64 without a float64 copy (the same values in the same order as y.double())
    return y.sum(dim=0, dtype=torch.float64), y.shape[0]


def channels_last_perm(info: LayerInfo) -> np.ndarray | None:
    """Column permutation from native ``(c_in, k)`` to channels-last ``(k, c_in)`` order.

    ``W_cl = W[:, perm]`` and ``H_cl = H[np.ix_(perm, perm)]``; undo with ``W[:, perm] = W_cl``.
    None for linear layers and for convs whose order would not change (K == 1 or C == 1).
    """
    if not info.is_conv or info.kernel_numel == 1 or info.in_per_group == 1:
        return None
    native = np.arange(info.cols).reshape(info.in_per_group, info.kernel_numel)
    return np.ascontiguousarray(native.T.reshape(-1))
