"""Compression recipes: what to do with each layer, with overrides by module-name pattern.

A :class:`Recipe` has

- ``default``: the :class:`LayerConfig` for every supported layer (None: only layers matched by
  an override are compressed, starting from ``LayerConfig()``'s defaults);
- ``overrides``: a list of :class:`Override` (``pattern`` + changed fields). Every override whose
  pattern matches a layer's full dotted name is applied, **in list order**, each replacing only
  the fields it names; so a later override wins over an earlier one. Put general patterns first
  and specific ones last;
- ``skip``: patterns of layers left untouched (skips win over everything);
- ``strict``: every pattern must match at least one supported layer (catches typos), and every
  override at least one layer that no skip pattern matches (an override of skipped layers only
  changes nothing);
- ``embeddings``: ``nn.Embedding`` tables to quantize, by name (:class:`EmbeddingRule`: pattern,
  bits, sym, group_size, grid; see ``embeddings.py``). Only this list selects embeddings: the
  default and overrides never apply to them. Every pattern must match an ``nn.Embedding``.

Patterns are :func:`fnmatch.fnmatchcase` globs over dotted names: ``*`` also matches dots, so
``"features.*"`` matches ``features.0`` and ``features.0.conv``; ``"*.attn.c_attn"`` matches
that layer in every block. Only supported layers (Linear, Conv1d, Conv2d, HF Conv1D) are
considered; other modules are never touched.

A layer's work is pruning (``prune`` = "unstructured", "nm", "blocked", "structured"), then
quantization (``bits``); both together is joint compression (prune, then quantize keeping the
zeros). ``method`` is "obc" (the Hessian-aware solvers) or the baseline: "magnitude" and "rtn" are
the same baseline (magnitude pruning for the pruning part, round-to-nearest for the quantization
part, no Hessian). With ``method="obc"``, ``quant_method`` and ``refine`` choose the quantizer
(``quantize(method=, refine=)``: "auto" = per row the best of OBQ and GPTQ, refined; GPTQ
alone above 1024 inputs) and ``prune_method`` the pruner ("exact" = ExactOBS or "sparsegpt");
pruning with "sparsegpt" and quantizing with ``quant_method="auto"`` is one joint SparseGPT
sweep (``prune_quantize_sparsegpt``).

Recipes load from dicts, JSON or YAML (:func:`load_recipe`)::

    default: {prune: nm, n: 2, m: 4, bits: 4, sym: false}
    overrides:
      - {pattern: "classifier", prune: null, bits: 8}
    skip: ["features.0"]
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .._files import read_regular_file
from ..layer_config import (  # noqa: F401 - re-exported: the recipe's names, defined without torch
    GRIDS,
    METHODS,
    PRUNE_METHODS,
    PRUNE_MODES,
    QUANT_METHODS,
    SPREADS,
    LayerConfig,
    RecipeError,
    check_field,
)
from .embeddings import EmbeddingRule, check_rules
from .layers import LayerInfo

__all__ = [
    "EmbeddingRule",
    "LayerConfig",
    "Override",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "as_recipe",
    "LayerPlan",
    "check_field",
    "is_plan",
    "resolve_plan",
]

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
    # not in repr: a checkpoint's fingerprint holds repr(recipe), unchanged for recipes without embeddings
    embeddings: list[EmbeddingRule] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.embeddings = check_rules(self.embeddings)
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

    def pattern_problems(self, names: Iterable[str], prefix: str = "") -> list[str]:
        """Why the recipe's patterns are dead for the supported layers called ``names``: a skip
        or override pattern that matches none of them, and an override whose every match is
        skipped by :attr:`skip` (skips win, so it would change nothing). One line each, starting
        with ``prefix`` (e.g. "recipe "); empty when every pattern is live. ``strict`` recipes
        raise RecipeError with these lines; the check itself ignores ``strict``."""
        names = list(names)
        problems = [f"{prefix}skip pattern {p!r} matches no supported layer"
                    for p in self.skip if not any(fnmatchcase(name, p) for name in names)]
        for item in self.overrides:
            matched = [name for name in names if item.matches(name)]
            if not matched:
                problems.append(f"{prefix}override pattern {item.pattern!r} matches no supported layer")
            elif all(any(fnmatchcase(name, p) for p in self.skip) for name in matched):
                problems.append(f"{prefix}override pattern {item.pattern!r} matches only layers the recipe skips "
                                f"({_layers_text(matched, len(names))}); it changes nothing: remove it or the skip "
                                "pattern")
        return problems

    def resolve(self, layers: Mapping[str, LayerInfo]) -> dict[str, LayerPlan]:
        """Plan every layer and validate the whole recipe against all of them.

        Raises RecipeError listing every problem (dead patterns when ``strict``: see
        :meth:`pattern_problems`; invalid
        configurations, patterns a layer's shape cannot take), before anything is modified.
        """
        problems = self.pattern_problems(layers) if self.strict else []
        where = "recipe" if self.source is None else f"recipe file {self.source!r}"
        return _checked_plans(layers, self.config_for, where, problems)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "default": None if self.default is None else dataclasses.asdict(self.default),
            "overrides": [o.to_dict() for o in self.overrides],
            "skip": list(self.skip),
            "strict": self.strict,
        }
        if self.embeddings:  # only when used: older recipes keep their dict (and checkpoint fingerprint)
            data["embeddings"] = [rule.to_dict() for rule in self.embeddings]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build a recipe from ``{"default": {...}, "overrides": [{"pattern": ..., ...}], "skip": [...]}``."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"default", "overrides", "skip", "strict", "embeddings"})
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; valid: default, overrides, skip, strict, embeddings")
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
        embeddings = check_rules(data.get("embeddings"))
        return cls(default=default, overrides=overrides, skip=list(skip), strict=strict, embeddings=embeddings)


def _checked_plans(
    layers: Mapping[str, LayerInfo],
    config_for: Callable[[str], tuple[LayerConfig | None, str]],
    where: str,
    problems: list[str],
) -> dict[str, LayerPlan]:
    """Every layer's LayerPlan from ``config_for(name)`` -> (config or None, why None), each
    configuration checked against the layer's shape. Raises RecipeError listing ``problems``
    and every problem found, introduced by ``where`` ("recipe", "plan", ...)."""
    plans = {}
    invalid: dict[str, list[str]] = {}  # configuration error -> the layers it applies to
    for name, info in layers.items():
        try:
            config, reason = config_for(name)
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
        raise RecipeError(f"{where} cannot be applied:\n  " + "\n  ".join(problems))
    return plans


def is_plan(value: Any) -> bool:
    """Whether ``value`` is a plan ``{layer name: LayerConfig or None}`` (a non-empty mapping whose
    values are all LayerConfig or None) rather than a recipe dict (whose values are dicts/lists)."""
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, LayerConfig) or v is None for v in value.values())
        and any(isinstance(v, LayerConfig) for v in value.values())
    )


def resolve_plan(plan: Mapping[str, LayerConfig | None], layers: Mapping[str, LayerInfo]) -> dict[str, LayerPlan]:
    """Check a plan ``{layer name: LayerConfig or None}`` against the model's ``layers`` and give
    every layer its LayerPlan: the plan's configuration; a layer the plan leaves out or maps to
    None is skipped. Raises RecipeError for names that are not supported layers of the model and
    for configurations the layer cannot take (all problems listed at once)."""
    unknown = [name for name in plan if name not in layers]
    problems = [f"layer {name!r} is not a supported layer of the model" for name in unknown]

    def config_for(name: str) -> tuple[LayerConfig | None, str]:
        if plan.get(name) is None:
            return None, "dense in the plan" if name in plan else "not in the plan"
        return plan[name], ""

    return _checked_plans(layers, config_for, "plan", problems)


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
