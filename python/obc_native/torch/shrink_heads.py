"""Attention heads removed physically: the heads whose output-projection columns pruning zeroed.

Multi-head attention computes, per head ``h``, ``softmax(q_h k_h^T * scale) v_h`` from its own
``head_size`` rows of the query, key and value projections, concatenates the heads, and applies
the output projection. Head ``h`` reaches the output only through the output projection's
columns ``h*head_size .. (h+1)*head_size - 1``. Structured pruning of the output projection in
groups of ``head_size`` columns (``LayerConfig(prune="structured", structured_group=head_size)``)
zeroes whole heads; :func:`shrink_attention_heads` then removes them: the heads' rows of query,
key and value (weights and biases), the projection's columns, and the head count of the attention
module. Exact: a removed head was read only by zero columns (the softmax of each head is its own).

Which modules: Hugging Face BERT-like self-attention (BERT, RoBERTa, ELECTRA, ... under
transformers 5), found by :func:`hf_attention_heads`: an attention module with ``query``,
``key``, ``value`` (``nn.Linear``), ``attention_head_size`` and ``num_attention_heads``, whose
forward splits the projections into heads of ``attention_head_size`` (transformers 5 views them as
``(..., -1, attention_head_size)``; older versions used ``num_attention_heads`` and
``all_head_size``, which are updated too). The intermediate width of the feed-forward blocks is
:func:`obc_native.torch.shrink_structured`'s (with ``hf_ffn_chains``); the two are independent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .shrink import ShrinkError, _parameter_count, _replace, _shared_parameter_owners

__all__ = ["hf_attention_heads", "shrink_attention_heads", "HeadShrinkReport", "ShrunkHeads"]

logger = logging.getLogger("obc_native.torch")

_PROJECTIONS = ("query", "key", "value")


@dataclass
class ShrunkHeads:
    """One attention module and the heads it kept.

    ``attention``: the module holding query / key / value; ``output``: its output projection.
    ``heads``: heads before; ``kept``: heads after; ``head_size``: columns (features) per head.
    """

    attention: str
    output: str
    heads: int
    kept: int
    head_size: int

    @property
    def removed(self) -> int:
        return self.heads - self.kept


@dataclass
class HeadShrinkReport:
    """What :func:`shrink_attention_heads` did.

    ``attentions``: the attention modules handled (including those with no head removed).
    ``skipped``: ``{attention name: reason}`` for modules left as they were (tied weights).
    ``parameters_before`` / ``parameters_after``: parameter counts of the model.
    """

    attentions: list[ShrunkHeads] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "attentions": [dict(vars(a), removed=a.removed) for a in self.attentions],
            "skipped": dict(self.skipped),
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
        }

    def table(self) -> str:
        """One line per attention module and per skipped one, then the parameter counts."""
        width = max([40] + [len(a.attention) for a in self.attentions])  # aligned columns
        lines = [f"{'attention':<{width}} {'heads':>6} {'kept':>5} {'head size':>9}"]
        for a in self.attentions:
            lines.append(f"{a.attention:<{width}} {a.heads:>6} {a.kept:>5} {a.head_size:>9}")
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        lines.append(f"parameters: {self.parameters_before} -> {self.parameters_after}")
        return "\n".join(lines)


def hf_attention_heads(model: nn.Module) -> list[tuple[str, str]]:
    """``(attention.self, attention.output.dense)`` of every BERT-like attention block in ``model``.

    Hugging Face BERT, RoBERTa, ELECTRA, ... attention blocks hold ``self`` (query, key, value
    Linear layers split into heads) and ``output.dense`` (Linear, heads -> hidden); cross-attention
    blocks of decoders have the same form. Prune ``output.dense`` with
    ``structured_group = attention_head_size`` (e.g. ``Override("*.attention.output.dense",
    prune="structured", sparsity=0.5, structured_group=64)``), then pass the result to
    :func:`shrink_attention_heads`.
    """
    pairs = []
    for name, module in model.named_modules():
        attention = getattr(module, "self", None)
        output = getattr(getattr(module, "output", None), "dense", None)
        if (isinstance(attention, nn.Module) and isinstance(output, nn.Linear)
                and all(isinstance(getattr(attention, p, None), nn.Linear) for p in _PROJECTIONS)):
            prefix = f"{name}." if name else ""
            pairs.append((f"{prefix}self", f"{prefix}output.dense"))
    return pairs


def shrink_attention_heads(model: nn.Module, attentions: Sequence[Sequence[str]] | None = None) -> HeadShrinkReport:
    """Remove the attention heads whose output-projection columns are all zero, in place.

    Args:
        model: a model whose attention output projections were pruned in whole heads
            (``LayerConfig(prune="structured", structured_group=head_size)``).
        attentions: ``(attention module, output projection)`` name pairs; None for
            :func:`hf_attention_heads` of the model. The attention module needs ``query``,
            ``key``, ``value`` (``nn.Linear``, ``heads * head_size`` outputs each),
            ``attention_head_size`` and ``num_attention_heads``; the output projection is an
            ``nn.Linear`` with ``heads * head_size`` inputs.

    Returns:
        a :class:`HeadShrinkReport`. At least one head per module is always kept (a zero-width
        layer is not portable); modules with tied weights are listed in ``report.skipped``.

    Raises:
        ShrinkError: a name that is missing, a module of the wrong form (not BERT-like, shared
            key/value heads, widths that disagree), or an output projection with a head that is
            only partly zero (pruned without ``structured_group`` = the head size); the message
            names the layer. Nothing is changed when it raises.
        TypeError: ``model`` is not an ``nn.Module``.

    The model's outputs equal the masked model's up to float rounding. Its config (e.g.
    ``config.num_attention_heads``) is left as it was: each module holds its own head count.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    pairs = hf_attention_heads(model) if attentions is None else [tuple(pair) for pair in attentions]
    report = HeadShrinkReport(parameters_before=_parameter_count(model))
    # every pair is checked (and its heads found) before anything changes
    plans = [_plan(pair, modules, index) for index, pair in enumerate(pairs)]
    seen = [name for pair in pairs for name in pair]
    repeated = sorted({name for name in seen if seen.count(name) > 1})
    if repeated:
        raise ShrinkError(f"attentions: {', '.join(repeated)} in more than one pair")
    shared = _shared_parameter_owners(model)
    with torch.no_grad():
        for (attention_name, output_name), keep in plans:
            attention, output = modules[attention_name], modules[output_name]
            names = [f"{attention_name}.{p}" for p in _PROJECTIONS] + [output_name]
            tied = [name for name in names if name in shared]
            if tied:
                report.skipped[attention_name] = f"{tied[0]} shares a parameter with another module (tied weights)"
                continue
            heads, head_size = attention.num_attention_heads, attention.attention_head_size
            if len(keep) < heads:
                _remove_heads(attention, output, keep, head_size)
            report.attentions.append(ShrunkHeads(attention_name, output_name, heads, len(keep), head_size))
    report.parameters_after = _parameter_count(model)
    logger.info("shrink_attention_heads: %d head(s) removed in %d module(s); %d -> %d parameters",
                sum(a.removed for a in report.attentions), len(report.attentions), report.parameters_before,
                report.parameters_after)
    return report


def _plan(pair: tuple, modules: dict[str, nn.Module], index: int) -> tuple[tuple[str, str], torch.Tensor]:
    """A checked ``(attention, output)`` pair and the indices of the heads to keep."""
    if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
        raise ShrinkError(f"attentions[{index}]: expected (attention module, output projection) names, got {pair!r}")
    attention_name, output_name = pair
    for name in pair:
        if name not in modules:
            raise ShrinkError(f"attentions[{index}]: the model has no module {name!r}")
    attention, output = modules[attention_name], modules[output_name]
    heads = getattr(attention, "num_attention_heads", None)
    head_size = getattr(attention, "attention_head_size", None)
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(attention, p, None), nn.Linear)]
    if missing or not all(isinstance(v, int) and v >= 1 for v in (heads, head_size)):
        raise ShrinkError(
            f"attention {attention_name!r} ({type(attention).__name__}) cannot be shrunk: expected a BERT-like "
            "self-attention with query, key, value (nn.Linear) and integer num_attention_heads, "
            "attention_head_size" + (f"; no Linear {missing}" if missing else ""))
    # grouped-query attention shares key/value heads between query heads: not one head per column group
    if getattr(attention, "num_key_value_groups", 1) != 1 or getattr(attention, "num_key_value_heads", heads) != heads:
        raise ShrinkError(f"attention {attention_name!r} shares key/value heads between query heads; "
                          "only one key/value head per query head can be removed")
    width = heads * head_size
    widths = {p: getattr(attention, p).out_features for p in _PROJECTIONS}
    if getattr(attention, "all_head_size", width) != width or any(w != width for w in widths.values()):
        raise ShrinkError(f"attention {attention_name!r}: {heads} heads x {head_size} = {width} features, but "
                          f"query/key/value have {widths} outputs and all_head_size is "
                          f"{getattr(attention, 'all_head_size', None)}")
    if not isinstance(output, nn.Linear):
        raise ShrinkError(f"output projection {output_name!r} is a {type(output).__name__}; expected nn.Linear")
    if output.in_features != width:
        raise ShrinkError(f"output projection {output_name!r} has {output.in_features} inputs; attention "
                          f"{attention_name!r} has {heads} heads x {head_size} = {width} features")
    zero_columns = (output.weight.detach() == 0).all(dim=0).view(heads, head_size).sum(dim=1)
    partial = torch.nonzero((zero_columns > 0) & (zero_columns < head_size)).flatten().tolist()
    if partial:
        h = partial[0]
        raise ShrinkError(
            f"output projection {output_name!r}: head {h} has {int(zero_columns[h])} of its {head_size} input "
            f"columns zero ({len(partial)} head(s) partly zero); heads are removed whole: prune it with "
            f"structured_group={head_size} (the head size)")
    remove = zero_columns == head_size
    if bool(remove.all()):  # keep a head: zero-width layers are not portable
        remove[0] = False
    return (attention_name, output_name), torch.nonzero(~remove).flatten()


def _remove_heads(attention: nn.Module, output: nn.Linear, keep: torch.Tensor, head_size: int) -> None:
    """Keep heads ``keep`` (indices) of ``attention``: rows of query/key/value, columns of ``output``."""
    features = (keep[:, None] * head_size + torch.arange(head_size, device=keep.device)).flatten()
    for name in _PROJECTIONS:
        projection = getattr(attention, name)
        _replace(projection, "weight", projection.weight.index_select(0, features))
        if projection.bias is not None:
            _replace(projection, "bias", projection.bias.index_select(0, features))
        projection.out_features = len(features)
    _replace(output, "weight", output.weight.index_select(1, features))
    output.in_features = len(features)
    attention.num_attention_heads = len(keep)
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(features)
