"""Weight-only quantization of ``nn.Embedding`` tables, opt-in by name in the recipe.

A recipe's ``embeddings`` list names the embeddings to quantize (nothing else selects them: a
recipe's ``default`` and ``overrides`` apply to Linear / Conv layers only, so existing recipes
never touch an embedding)::

    default: {bits: 4, group_size: 128}
    embeddings:
      - {pattern: "*.word_embeddings", bits: 4, sym: false, group_size: 64, grid: mse}

Why per-row round-to-nearest: an embedding's output for token ``t`` is row ``t`` of the table, so
the layer loss ``||(W - W_hat) X||^2 / n`` over one-hot inputs ``X`` is
``sum_t (count_t / n) ||w_t - w_hat_t||^2``: the Hessian is diagonal with the token counts, the
same value for every column of a row. Within a row nothing couples the columns, and the weight
``count_t`` scales a row's whole error, so the best codes of a row on a given grid are its
round-to-nearest codes, whatever the counts. Each row (or group of ``group_size`` columns) gets
its own grid fitted to its own values ("mse" or "minmax" as for layers), so rows never seen in
calibration get the same kind of grid as frequent ones; no calibration data is used.

The table is ``num_embeddings x embedding_dim``: rows are tokens, groups run along the embedding
dimension (the layout :mod:`~obc_native.torch.serialize` stores and onnxruntime's
``GatherBlockQuantized`` reads).

Special embeddings:

- ``padding_idx``: quantized like any row; a padding row of zeros (PyTorch's initialisation)
  stays exactly zero (0 is on every grid).
- ``max_norm``: refused. Such an embedding renormalises the looked-up rows *in place* at every
  forward call, which would move quantized rows off their grid.
- a weight shared with another parameter (e.g. a language-model head tied to the input
  embeddings): refused, since quantizing it would also change the other module, and untying it
  silently would break the tie the model relies on. Untie it first (``module.weight =
  nn.Parameter(module.weight.detach().clone())``) if both should be separate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layer_config import RecipeError, check_field
from .layers import LayerInfo
from .report import LayerReport, QuantGrid

__all__ = [
    "EmbeddingRule",
    "describe_embedding",
    "find_embeddings",
    "resolve_embeddings",
    "quantize_embedding",
]

_RULE_FIELDS = ("bits", "sym", "group_size", "grid")


@dataclass(frozen=True)
class EmbeddingRule:
    """Quantize the ``nn.Embedding`` modules whose dotted name matches ``pattern``.

    Attributes:
        pattern: an :func:`fnmatch.fnmatchcase` glob over module names (``*`` also matches dots).
        bits: 2..8 bits per entry.
        sym: symmetric grid (zero point ``2^(bits-1)``) or asymmetric.
        group_size: None for one grid per row (token), else one grid per ``group_size``
            consecutive entries of a row; must divide ``embedding_dim``.
        grid: "mse" (range search minimizing the rounding error) or "minmax".
    """

    pattern: str
    bits: int = 4
    sym: bool = True
    group_size: int | None = None
    grid: str = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"embedding pattern must be a non-empty string, got {self.pattern!r}")
        for name in _RULE_FIELDS:
            value = getattr(self, name)
            if name == "bits" and value is None:
                raise RecipeError(f"embedding {self.pattern!r}: bits must be an integer in 2..8, got None")
            try:
                check_field(name, value)
            except RecipeError as err:
                raise RecipeError(f"embedding {self.pattern!r}: {err}") from None

    @property
    def label(self) -> str:
        """E.g. "int4 asym g64", as :attr:`LayerConfig.label`."""
        text = f"int{self.bits}" + ("" if self.sym else " asym")
        return text + ("" if self.group_size is None else f" g{self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> EmbeddingRule:
        """From ``{"pattern": ..., "bits": ..., "sym": ..., "group_size": ..., "grid": ...}``."""
        if not isinstance(data, Mapping) or "pattern" not in data:
            raise RecipeError(f"each embeddings entry must be a mapping with a 'pattern', got {data!r}")
        unknown = sorted(set(data) - {"pattern", *_RULE_FIELDS})
        if unknown:
            raise RecipeError(
                f"embedding {data['pattern']!r}: unknown field(s) {unknown}; valid: pattern, {', '.join(_RULE_FIELDS)}"
            )
        return cls(**dict(data))


def describe_embedding(name: str, module: nn.Module) -> LayerInfo:
    """The :class:`LayerInfo` of an ``nn.Embedding``: kind "embedding", ``out_features`` =
    ``num_embeddings`` rows, ``cols`` = ``embedding_dim``; ValueError for anything else."""
    if not isinstance(module, nn.Embedding):
        raise ValueError(f"module {name!r}: {type(module).__name__} is not an nn.Embedding")
    rows, cols = module.weight.shape
    return LayerInfo(name, module, "embedding", rows, cols, (), 1)


def find_embeddings(model: nn.Module) -> dict[str, LayerInfo]:
    """Every ``nn.Embedding`` of ``model`` in ``named_modules`` order, keyed by dotted name."""
    return {name: describe_embedding(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def resolve_embeddings(model: nn.Module, rules: list[EmbeddingRule]) -> dict[str, tuple[LayerInfo, EmbeddingRule]]:
    """The embeddings to quantize and their rule (the last matching rule wins), checked.

    Raises RecipeError listing every problem before anything is modified: a pattern matching no
    ``nn.Embedding``, a group size not dividing ``embedding_dim``, ``max_norm``, a non-float32
    table, a weight shared with another parameter (tied).
    """
    if not rules:
        return {}
    found = find_embeddings(model)
    problems = []
    for rule in rules:
        if not any(fnmatchcase(name, rule.pattern) for name in found):
            listing = ", ".join(repr(n) for n in found) or "none"
            problems.append(f"embedding pattern {rule.pattern!r} matches no nn.Embedding (the model has: {listing})")
    owners: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(key)
    chosen = {}
    for name, info in found.items():
        matching = [rule for rule in rules if fnmatchcase(name, rule.pattern)]
        if not matching:
            continue
        rule, module = matching[-1], info.module
        where = f"embedding {name!r} ({info.out_features} x {info.cols})"
        if rule.group_size is not None and info.cols % rule.group_size:
            problems.append(f"{where}: group_size={rule.group_size} must divide embedding_dim ({info.cols})")
        if module.max_norm is not None:
            problems.append(
                f"{where}: max_norm={module.max_norm} renormalises looked-up rows in place at every call, which "
                "would move quantized rows off their grid; set max_norm=None or leave it out of 'embeddings'"
            )
        if module.weight.dtype != torch.float32:
            problems.append(f"{where}: weights are {module.weight.dtype}; quantize a float32 model (model.float())")
        own = f"{name}.weight" if name else "weight"
        others = [key for key in owners.get(id(module.weight), []) if key != own]
        if others:
            problems.append(
                f"{where}: its weight is shared with {', '.join(others)} (tied); quantizing it would change those "
                "too. Leave it out of 'embeddings', or untie the weights first"
            )
        chosen[name] = (info, rule)
    if problems:
        raise RecipeError("recipe embeddings cannot be applied:\n  " + "\n  ".join(problems))
    return chosen


def quantize_embedding(
    info: LayerInfo, rule: EmbeddingRule, *, num_threads: int | None = None
) -> tuple[np.ndarray, LayerReport]:
    """Per-row round-to-nearest of the table on per-row (or per-group) grids.

    Returns ``(table, row)``: the quantized ``num_embeddings x embedding_dim`` float32 table (the
    caller writes it into the module) and its report row, whose ``grid`` holds the scales and
    zero points (``num_embeddings x groups``). ``quant_loss`` is ``sum ||w_t - w_hat_t||^2 / 2``
    over all rows (unweighted: no token counts); ``loss`` is None (it would need the counts).
    """
    from .. import quantize_rtn

    table = info.module.weight.detach().cpu().numpy().astype(np.float32, copy=False)
    cols = info.cols
    # identity Hessian: rows are independent and every column counts the same (module docstring)
    result = quantize_rtn(
        table, np.eye(cols), rule.bits, sym=rule.sym, group_size=rule.group_size, grid=rule.grid,
        num_threads=num_threads,
    )
    new = np.ascontiguousarray(result.weight, dtype=np.float32)
    new[new == 0] = 0.0  # no negative zeros (as for layers: masks on disk are "bits != 0")
    grid = QuantGrid(
        bits=rule.bits,
        sym=rule.sym,
        group_size=rule.group_size or cols,
        column_order="native",
        scale=np.ascontiguousarray(result.scale, dtype=np.float32),
        zero=np.ascontiguousarray(result.zero, dtype=np.uint8),
    )
    row = LayerReport(
        name=info.name,
        kind="embedding",
        shape=info.weight_shape,
        mode=rule.label,
        method="rtn",
        sparsity=float(np.mean(new == 0)),
        bits=rule.bits,
        loss=None,
        config={"embedding": rule.to_dict()},
        quant_loss=float(result.loss),
        grid=grid,
    )
    return new, row


def check_rules(value: Any) -> list[EmbeddingRule]:
    """A recipe's ``embeddings`` value as a list of rules (EmbeddingRule objects or mappings)."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        raise RecipeError(f"recipe 'embeddings' must be a list of mappings with a 'pattern', got {value!r}")
    return [item if isinstance(item, EmbeddingRule) else EmbeddingRule.from_dict(item) for item in value]
