"""Which layers of a model non-uniform compression covers, and why the others are left out."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from .layers import LayerInfo, find_layers, param_key
from .recipe import LayerConfig, Recipe, RecipeError, as_recipe

__all__ = ["select_layers", "left_out_layers"]

logger = logging.getLogger("obc_native.torch")


def left_out_layers(model: nn.Module, infos: Mapping[str, LayerInfo]) -> dict[str, str]:
    """Layers of ``infos`` that cannot be compressed however the recipe reads -> why.

    - a weight reachable under another name too (tied, e.g. GPT-2's ``lm_head`` and ``wte``):
      compressing it for one use would change the other;
    - the ``out_proj`` of an ``nn.MultiheadAttention`` (also inside ``nn.Transformer*`` layers):
      its forward passes ``out_proj.weight`` to ``F.multi_head_attention_forward`` and never
      calls the module, so no hook sees its inputs and it has no Hessian;
    - a weight that is computed, not stored (``torch.nn.utils.parametrize``, e.g.
      ``parametrizations.weight_norm`` / ``spectral_norm``, or the older hook-based
      ``nn.utils.weight_norm``): writing it changes a temporary, or is undone by the next
      forward, so the layer would be reported compressed while it stays dense.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    attention_outputs = {
        param_key(name, "out_proj")
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    reasons = {}
    for name, info in infos.items():
        others = [n for n in owners.get(id(info.module.weight), []) if n != param_key(name, "weight")]
        if others:
            reasons[name] = f"weight is shared with {', '.join(others)} (tied); not compressed"
        elif not isinstance(info.module._parameters.get("weight"), nn.Parameter):
            reasons[name] = (
                "weight is computed from other parameters (a parametrization such as weight_norm); not "
                "compressed (remove it first: torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'), "
                "or nn.utils.remove_weight_norm)"
            )
        elif name in attention_outputs:
            reasons[name] = (
                "out_proj of nn.MultiheadAttention, whose forward reads the weight without calling the "
                "module (no inputs to calibrate on); not compressed"
            )
    return reasons


def select_layers(
    model: nn.Module,
    *,
    recipe: Recipe | LayerConfig | Mapping[str, Any] | str | None = None,
    layers: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> tuple[dict[str, LayerInfo], dict[str, str]]:
    """The supported layers to compress non-uniformly, and why the others are left out.

    Args:
        recipe: layers for which the recipe has no configuration (skip patterns, no matching
            rule) are left out; the configurations themselves are not used.
        layers: names or :func:`fnmatch.fnmatchcase` patterns of the layers to include (default
            all supported layers); skip: patterns of layers to leave out.
    Every pattern must match a supported layer (RecipeError otherwise, catching typos; a
    recipe's patterns only when it is ``strict``). Layers with tied weights and the ``out_proj`` of
    ``nn.MultiheadAttention`` are left out (see :func:`left_out_layers`).
    Returns ``(selected, left_out)``: ``{name: LayerInfo}`` in module order and ``{name: reason}``.
    """
    found = find_layers(model)
    if not found:
        raise RecipeError("the model has no supported layers (nn.Linear, nn.Conv1d, nn.Conv2d, HF Conv1D)")
    recipe = None if recipe is None else as_recipe(recipe)
    include = None if layers is None else _patterns(layers, "layers")
    excluded = _patterns(skip, "skip")
    checks = [("layers", p) for p in include or []] + [("skip", p) for p in excluded]
    problems = [f"{what} pattern {pattern!r} matches no supported layer" for what, pattern in checks
                if not any(fnmatchcase(name, pattern) for name in found)]
    if recipe is not None and recipe.strict:
        problems += recipe.pattern_problems(found, "recipe ")
    if problems:
        raise RecipeError("layer selection cannot be applied:\n  " + "\n  ".join(problems))
    selected: dict[str, LayerInfo] = {}
    left_out: dict[str, str] = {}
    for name, info in found.items():
        if include is not None and not any(fnmatchcase(name, p) for p in include):
            left_out[name] = "not selected (layers=)"
            continue
        hit = next((p for p in excluded if fnmatchcase(name, p)), None)
        if hit is not None:
            left_out[name] = f"skipped by pattern {hit!r}"
            continue
        if recipe is not None:
            config, reason = recipe.config_for(name)
            if config is None:
                left_out[name] = reason
                continue
        selected[name] = info
    for name, reason in left_out_layers(model, selected).items():
        logger.warning("layer %r: %s", name, reason)
        del selected[name]
        left_out[name] = reason
    if not selected:
        listing = "; ".join(f"{n}: {r}" for n, r in left_out.items())
        raise RecipeError(f"no layer selected, nothing to compress ({listing})")
    return selected, left_out


def _patterns(values: Iterable[str], name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a list of layer names or patterns, got {type(values).__name__}")
    values = list(values)
    for pattern in values:
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"{name}: patterns must be non-empty strings, got {pattern!r}")
    return values

