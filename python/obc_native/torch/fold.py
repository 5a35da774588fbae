"""Fold inference-mode BatchNorm into the convolution that feeds it.

``conv -> BatchNorm`` computes, per output channel ``c``, ``(conv(x)_c - mean_c) * s_c + beta_c``
with ``s_c = gamma_c / sqrt(var_c + eps)``: the same as a conv with weights ``W_c * s_c`` and bias
``(b_c - mean_c) * s_c + beta_c``. :func:`fold_batchnorm` rewrites such pairs in place and puts an
``nn.Identity`` where the BatchNorm was, so every runtime runs one layer instead of two (PyTorch
eager runs BatchNorm as a separate kernel; ``torch.onnx.export`` in eval mode folds it by itself).
The folded model computes what the model computes in eval mode, up to float rounding; it no
longer trains its BatchNorm statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["fold_batchnorm"]

logger = logging.getLogger("obc_native.torch")

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def fold_batchnorm(model: nn.Module, *, concrete_args: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm that directly follows a convolution into it, in place.

    A pair is folded when ``torch.fx`` tracing shows the BatchNorm's input is the conv's output and
    nothing else reads that output, each module is called once, and the BatchNorm has running
    statistics (``track_running_stats``); the conv gains a bias if it had none. Every BatchNorm to
    fold must be in eval mode: in training mode it normalizes with the batch's statistics, which
    the folded conv (running statistics) would no longer do.

    Args:
        model: an ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace.
        concrete_args: passed to ``torch.fx.symbolic_trace``.
    Returns:
        ``[(conv name, batchnorm name), ...]`` of the folded pairs (empty: nothing to fold).
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model cannot be traced (the message says why), or a BatchNorm to fold is in
            training mode (call ``model.eval()`` first); nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    pairs = foldable_pairs(model, concrete_args)
    modules = dict(model.named_modules())
    for conv_name, norm_name in pairs:
        _fold(modules[conv_name], modules[norm_name])
        _set_module(model, norm_name, nn.Identity())
    logger.info("fold_batchnorm: %d BatchNorm layer(s) folded", len(pairs))
    return pairs


def foldable_pairs(model: nn.Module, concrete_args: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """``[(conv name, batchnorm name), ...]``: the pairs :func:`fold_batchnorm` would fold, found
    without changing anything. ValueError when ``model`` cannot be traced or one of those
    BatchNorm layers is in training mode."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model, concrete_args=concrete_args).graph
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... on dynamic code
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"fold_batchnorm: torch.fx cannot trace {type(model).__name__} "
                         f"({type(err).__name__}: {first_line})") from err
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":  # a module's tensors read directly: leave it as it is
            owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
            calls[owner] = calls.get(owner, 0) + 2
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1:
            continue
        conv, norm = modules[source.target], modules[node.target]
        if not any(type(conv) is c and type(norm) is n for c, n in _PAIRS):
            continue
        if calls[source.target] > 1 or calls[node.target] > 1 or not norm.track_running_stats:
            continue
        if norm.running_mean is None or conv.out_channels != norm.num_features:
            continue
        pairs.append((source.target, node.target))
    training = [norm for _, norm in pairs if modules[norm].training]
    if training:
        raise ValueError(f"fold_batchnorm: BatchNorm {', '.join(map(repr, training))} in training mode, where it "
                         "normalizes with each batch's statistics; folding its running statistics would change "
                         "what the model computes: call model.eval() first")
    return pairs


def _fold(conv: nn.Module, norm: nn.Module) -> None:
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _set_module(model: nn.Module, name: str, value: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, value)
