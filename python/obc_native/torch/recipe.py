"""Compression recipes: what to do with each layer, with overrides by module-name pattern.

A :class:`Recipe` has

- ``default``: the :class:`LayerConfig` for every supported layer (None: only layers matched by
  an override are compressed, starting from ``LayerConfig()``'s defaults);
- ``overrides``: a list of :class:`Override` (``pattern`` + changed fields). Every override whose
  pattern matches a layer's full dotted name is applied, **in list order**, each replacing only
  the fields it names; so a later override wins over an earlier one. Put general patterns first
  and specific ones last;
- ``skip``: patterns of layers left untouched (skips win over everything);
- ``strict``: every pattern must match at least one supported layer (catches typos).

Patterns are :func:`fnmatch.fnmatchcase` globs over dotted names: ``*`` also matches dots, so
``"features.*"`` matches ``features.0`` and ``features.0.conv``; ``"*.attn.c_attn"`` matches
that layer in every block. Only supported layers (Linear, Conv1d, Conv2d, HF Conv1D) are
considered; other modules are never touched.

A layer's work is pruning (``prune`` = "unstructured", "nm", "blocked", "structured"), then
quantization (``bits``); both together is joint compression (prune, then quantize keeping the
zeros). ``method`` is "obc" (the Hessian-aware solvers) or the baseline: "magnitude" and "rtn" are
the same baseline (magnitude pruning for the pruning part, round-to-nearest for the quantization
part, no Hessian). With ``method="obc"``, ``quant_method`` and ``refine`` choose the quantizer
(``quantize(method=, refine=)``: "auto" = per row the best of OBQ and GPTQ, refined) and
``prune_method`` the pruner ("exact" = ExactOBS or "sparsegpt"); pruning with "sparsegpt" and
quantizing with ``quant_method="auto"`` is one joint SparseGPT sweep (``prune_quantize_sparsegpt``).

Recipes load from dicts, JSON or YAML (:func:`load_recipe`)::

    default: {prune: nm, n: 2, m: 4, bits: 4, sym: false}
    overrides:
      - {pattern: "classifier", prune: null, bits: 8}
    skip: ["features.0"]
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .._files import read_regular_file
from .layers import LayerInfo

__all__ = [
    "LayerConfig",
    "Override",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "as_recipe",
    "LayerPlan",
    "check_field",
]

PRUNE_MODES = ("unstructured", "nm", "blocked", "structured")
METHODS = ("obc", "magnitude", "rtn")
QUANT_METHODS = ("auto", "obq", "gptq", "gptq-natural", "rtn")
PRUNE_METHODS = ("exact", "sparsegpt")
SPREADS = ("global", "uniform")
GRIDS = ("mse", "minmax")


class RecipeError(ValueError):
    """A recipe that is malformed or cannot be applied to the model's layers."""


@dataclass(frozen=True)
class LayerConfig:
    """What to do with one layer.

    Attributes:
        prune: None, "unstructured", "nm", "blocked" or "structured".
        sparsity: fraction of weights (unstructured), blocks (blocked) or input channels
            (structured) to prune, in [0, 1]; the count is rounded up.
        n, m: N:M pattern, n zeros in every m consecutive inputs (0 < n < m).
        block: blocked pruning, consecutive inputs per block.
        spread: "global" (the paper's, rows get different sparsities) or "uniform" (every row
            the same) for unstructured and blocked pruning.
        bits: quantization bits (2..8), or None for no quantization.
        sym: symmetric grid (zero point 2^(bits-1)) or asymmetric.
        group_size: None for one grid per output row, else one grid per ``group_size``
            consecutive inputs (channels-last order for convolutions).
        grid: "mse" or "minmax" grid search.
        method: "obc" (the Hessian-aware solvers below) or a baseline that ignores the Hessian,
            "magnitude" / "rtn" (synonyms: magnitude pruning, round-to-nearest quantization).
        quant_method: the quantizer of ``method="obc"``, as ``obc_native.quantize(method=)``:
            "auto" (per row the best of "obq" and "gptq"), "obq", "gptq", "gptq-natural" or
            "rtn" (round to nearest, as a candidate of the refinement).
        refine: coordinate-descent refinement of the quantized codes (``quantize(refine=)``).
        prune_method: the pruner of ``method="obc"``: "exact" (ExactOBS) or "sparsegpt"
            (SparseGPT, for wide layers; not for structured pruning). With quantization and
            ``quant_method="auto"``, "sparsegpt" prunes and quantizes in one joint sweep
            (``prune_quantize_sparsegpt``, no refinement); with another ``quant_method`` it
            prunes, then quantizes with that quantizer.
        damp: relative damping of the Hessian diagonal (lambda = damp * mean(diag H)).

    Convolutions: N:M groups, blocks and quantization groups run along input channels at one
    kernel position (channels-last column order), so ``m`` and ``block`` must divide the input
    channels per conv group; structured pruning removes whole input channels (all kh*kw columns
    of a channel). Linear layers: along the input features.
    """

    prune: str | None = None
    sparsity: float | None = None
    n: int = 2
    m: int = 4
    block: int = 4
    spread: str = "global"
    bits: int | None = None
    sym: bool = True
    group_size: int | None = None
    grid: str = "mse"
    method: str = "obc"
    damp: float = 0.01
    quant_method: str = "auto"
    refine: bool = True
    prune_method: str = "exact"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def is_baseline(self) -> bool:
        return self.method in ("magnitude", "rtn")

    @property
    def label(self) -> str:
        """Short description, e.g. "2:4", "unstructured 50%", "int4", "2:4+int4 g128"."""
        parts = []
        if self.prune == "nm":
            parts.append(f"{self.n}:{self.m}")
        elif self.prune == "blocked":
            parts.append(f"blocked{self.block} {self.sparsity:.0%}")
        elif self.prune is not None:
            parts.append(f"{self.prune} {self.sparsity:.0%}")
        if self.bits is not None:
            quant = f"int{self.bits}" + ("" if self.sym else " asym")
            if self.group_size is not None:
                quant += f" g{self.group_size}"
            parts.append(quant)
        return "+".join(parts)

    def check(self) -> None:
        """RecipeError for invalid or inconsistent field values (independent of any layer)."""
        for name in self.field_names():
            check_field(name, getattr(self, name))
        if self.prune in ("unstructured", "blocked", "structured") and self.sparsity is None:
            raise RecipeError(f"prune={self.prune!r} needs sparsity in [0, 1], got None")
        if self.prune == "nm" and not self.n < self.m:
            raise RecipeError(f"N:M pruning needs integers 0 < n < m, got n={self.n!r}, m={self.m!r}")
        if self.prune is None and self.bits is None:
            raise RecipeError("the configuration does nothing (prune and bits are both None); use skip instead")
        if self.prune == "structured" and self.prune_method == "sparsegpt" and not self.is_baseline:
            raise RecipeError("prune_method='sparsegpt' has no structured mode; use prune_method='exact' "
                              "for prune='structured'")
        if self.is_baseline and (self.quant_method, self.prune_method) != ("auto", "exact"):
            raise RecipeError(f"quant_method and prune_method choose the solvers of method='obc'; "
                              f"method={self.method!r} is the magnitude / round-to-nearest baseline "
                              f"(got quant_method={self.quant_method!r}, prune_method={self.prune_method!r})")

    def layer_problems(self, info: LayerInfo) -> list[str]:
        """Why this configuration cannot be applied to ``info`` (empty list: it can)."""
        problems = []
        cols, channels = info.cols, info.in_per_group
        # N:M groups and blocks run over input channels at one kernel position for convolutions.
        span, span_name = (channels, "input channels per group") if info.is_conv else (cols, "columns")
        if self.prune == "nm" and span % self.m:
            problems.append(f"N:M with m={self.m} needs {span_name} ({span}) divisible by m")
        if self.prune == "blocked" and span % self.block:
            problems.append(f"blocked pruning with block={self.block} needs {span_name} ({span}) divisible by block")
        if self.group_size is not None and self.bits is not None and cols % self.group_size:
            problems.append(f"group_size={self.group_size} must divide the columns ({cols})")
        return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite real number that is not a bool (YAML's ``.inf``, ``.nan``, dates and strings are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _choice(choices: tuple[str, ...], *, optional: bool = False) -> tuple[Any, str]:
    accepted = (None, *choices) if optional else choices
    return (lambda v: v in accepted and (v is None or isinstance(v, str))), (
        f"{'None or ' if optional else ''}one of {choices}"
    )


# Field -> (test of one value, what the test accepts). Cross-field rules (prune needs sparsity,
# n < m, nothing to do) are in LayerConfig.check.
_FIELD_RULES: dict[str, tuple[Any, str]] = {
    "prune": _choice(PRUNE_MODES, optional=True),
    "sparsity": (lambda v: v is None or (_is_real(v) and 0.0 <= v <= 1.0), "None or a number in [0, 1]"),
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "m": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "block": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "spread": _choice(SPREADS),
    "bits": (lambda v: v is None or (_is_int(v) and 2 <= v <= 8), "None or an integer in 2..8"),
    "sym": (lambda v: isinstance(v, bool), "true or false"),
    "group_size": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
    "grid": _choice(GRIDS),
    "method": _choice(METHODS),
    "damp": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "quant_method": _choice(QUANT_METHODS),
    "refine": (lambda v: isinstance(v, bool), "true or false"),
    "prune_method": _choice(PRUNE_METHODS),
}


def check_field(name: str, value: Any) -> None:
    """RecipeError naming ``name`` unless ``value`` is a valid value of that LayerConfig field.

    Numbers must be real numbers (not bools, strings, dates, NaN or infinities) in range.
    """
    if name not in _FIELD_RULES:
        raise RecipeError(f"unknown field {name!r}; valid: {list(LayerConfig.field_names())}")
    test, expected = _FIELD_RULES[name]
    try:
        valid = bool(test(value))
    except (TypeError, ValueError):  # e.g. an array compared with a choice
        valid = False
    if not valid:
        raise RecipeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


class Override:
    """Fields of :class:`LayerConfig` to change for layers whose name matches ``pattern``.

    ``Override("classifier", prune=None, bits=8)``.
    """

    __slots__ = ("pattern", "changes")

    def __init__(self, pattern: str, **changes: Any):
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"override pattern must be a non-empty string, got {pattern!r}")
        unknown = sorted(set(changes) - set(LayerConfig.field_names()))
        if unknown:
            raise RecipeError(
                f"override {pattern!r}: unknown field(s) {unknown}; valid: {list(LayerConfig.field_names())}"
            )
        for name, value in changes.items():
            try:
                check_field(name, value)
            except RecipeError as err:
                raise RecipeError(f"override {pattern!r}: {err}") from None
        self.pattern = pattern
        self.changes = dict(changes)

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Override) and (self.pattern, self.changes) == (other.pattern, other.changes)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.changes.items())
        return f"Override({self.pattern!r}{', ' if args else ''}{args})"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, **self.changes}


@dataclass(frozen=True)
class LayerPlan:
    """The resolved recipe for one layer: ``config`` None means skipped for ``reason``."""

    info: LayerInfo
    config: LayerConfig | None
    reason: str = ""


@dataclass
class Recipe:
    """Per-layer compression settings; see the module docstring for the matching rules."""

    default: LayerConfig | None = None
    overrides: list[Override] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    strict: bool = True
    source: str | None = field(default=None, compare=False)  # the file it was read from, for messages

    def __post_init__(self) -> None:
        if self.default is not None and not isinstance(self.default, LayerConfig):
            raise RecipeError(f"default must be a LayerConfig or None, got {type(self.default).__name__}")
        self.overrides = list(self.overrides)
        self.skip = list(self.skip)
        for item in self.overrides:
            if not isinstance(item, Override):
                raise RecipeError(f"overrides must be Override objects, got {item!r}")
        for pattern in self.skip:
            if not isinstance(pattern, str) or not pattern:
                raise RecipeError(f"skip patterns must be non-empty strings, got {pattern!r}")

    def config_for(self, name: str) -> tuple[LayerConfig | None, str]:
        """The configuration of the layer called ``name`` and, when None, why it is skipped."""
        for pattern in self.skip:
            if fnmatchcase(name, pattern):
                return None, f"skipped by recipe pattern {pattern!r}"
        config = self.default
        for item in self.overrides:
            if item.matches(name):
                config = dataclasses.replace(config or LayerConfig(), **item.changes)
        if config is None:
            return None, "no recipe rule matches"
        return config, ""

    def resolve(self, layers: Mapping[str, LayerInfo]) -> dict[str, LayerPlan]:
        """Plan every layer and validate the whole recipe against all of them.

        Raises RecipeError listing every problem (unmatched patterns when ``strict``, invalid
        configurations, patterns a layer's shape cannot take), before anything is modified.
        """
        problems = []
        if self.strict:
            patterns = [("skip", p) for p in self.skip] + [("override", o.pattern) for o in self.overrides]
            for what, pattern in patterns:
                if not any(fnmatchcase(name, pattern) for name in layers):
                    problems.append(f"{what} pattern {pattern!r} matches no supported layer")
        plans = {}
        invalid: dict[str, list[str]] = {}  # configuration error -> the layers it applies to
        for name, info in layers.items():
            try:
                config, reason = self.config_for(name)
                if config is not None:
                    config.check()
                    problems += [f"layer {name!r} ({_shape_text(info)}): {p}" for p in config.layer_problems(info)]
            except RecipeError as err:
                invalid.setdefault(str(err), []).append(name)
                continue
            plans[name] = LayerPlan(info, config, reason)
        # the same invalid configuration (e.g. the default's) is reported once, not once per layer
        problems += [f"{_layers_text(names, len(layers))}: {err}" for err, names in invalid.items()]
        if problems:
            where = "recipe" if self.source is None else f"recipe file {self.source!r}"
            raise RecipeError(f"{where} cannot be applied:\n  " + "\n  ".join(problems))
        return plans

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": None if self.default is None else dataclasses.asdict(self.default),
            "overrides": [o.to_dict() for o in self.overrides],
            "skip": list(self.skip),
            "strict": self.strict,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build a recipe from ``{"default": {...}, "overrides": [{"pattern": ..., ...}], "skip": [...]}``."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"default", "overrides", "skip", "strict"})
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; valid: default, overrides, skip, strict")
        default = data.get("default")
        if default is not None:
            if not isinstance(default, Mapping):
                raise RecipeError(f"recipe 'default' must be a mapping, got {default!r}")
            bad = sorted(set(default) - set(LayerConfig.field_names()))
            if bad:
                raise RecipeError(f"recipe 'default': unknown field(s) {bad}; valid: {list(LayerConfig.field_names())}")
            for name, value in default.items():
                try:
                    check_field(name, value)
                except RecipeError as err:
                    raise RecipeError(f"recipe 'default': {err}") from None
            default = LayerConfig(**default)
        overrides = []
        items = data.get("overrides") or []
        if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
            raise RecipeError(f"recipe 'overrides' must be a list of mappings with a 'pattern', got {items!r}")
        for item in items:
            if not isinstance(item, Mapping) or "pattern" not in item:
                raise RecipeError(f"each override must be a mapping with a 'pattern', got {item!r}")
            changes = dict(item)
            overrides.append(Override(changes.pop("pattern"), **changes))
        skip = data.get("skip") or []
        if isinstance(skip, str) or not isinstance(skip, Sequence):
            raise RecipeError(f"recipe 'skip' must be a list of patterns, got {skip!r}")
        strict = data.get("strict", True)
        if not isinstance(strict, bool):
            raise RecipeError(f"recipe 'strict' must be true or false, got {strict!r}")
        return cls(default=default, overrides=overrides, skip=list(skip), strict=strict)


def _layers_text(names: list[str], total: int) -> str:
    """"layer 'a'", "layers 'a', 'b'", "all 12 layers", "layers 'a', 'b', 'c' and 4 more"."""
    if len(names) == 1:
        return f"layer {names[0]!r}"
    if len(names) == total:
        return f"all {total} layers"
    shown = ", ".join(repr(n) for n in names[:3])
    return f"layers {shown}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _shape_text(info: LayerInfo) -> str:
    text = f"{info.kind} {tuple(info.weight_shape)}"
    return text + (f" groups={info.groups}" if info.groups > 1 else "")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe from a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = os.fspath(path)
    try:
        raw = read_regular_file(path)
    except ValueError as err:
        raise RecipeError(f"recipe file {path!r} is {err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe file {path!r} is not UTF-8 text ({err})") from err
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # any parser error becomes a RecipeError naming the file
        raise RecipeError(f"could not parse recipe file {path!r}: {err}") from err
    try:
        recipe = Recipe.from_dict(data)
    except (RecipeError, TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as err:
        raise RecipeError(f"recipe file {path!r}: {err}") from err
    recipe.source = path
    return recipe


def as_recipe(recipe: Recipe | LayerConfig | Mapping[str, Any] | str | os.PathLike) -> Recipe:
    """Accept a Recipe, a LayerConfig (applied to all layers), a dict, or a JSON/YAML path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, LayerConfig):
        return Recipe(default=recipe)
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise TypeError(f"recipe must be a Recipe, LayerConfig, dict or file path, got {type(recipe).__name__}")
