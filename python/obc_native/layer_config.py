"""What to do with one layer's weight matrix: the one description of a layer's compression.

A :class:`LayerConfig` says how one layer is compressed: pruning (``prune`` = "unstructured",
"nm", "blocked", "structured"), then quantization (``bits``), both together being joint
compression; the solvers (``method``, ``prune_method``, ``quant_method``, ``refine``) and the
damping. The same object describes a recipe's layer (``obc_native.torch.recipe``), a level of a
level database (``obc_native.levels.Level.config``) and what :func:`obc_native.layer_solve.solve`
does with a weight matrix. It needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GRIDS",
    "LayerConfig",
    "METHODS",
    "PRUNE_METHODS",
    "PRUNE_MODES",
    "QUANT_METHODS",
    "RecipeError",
    "SPREADS",
    "check_field",
]

PRUNE_MODES = ("unstructured", "nm", "blocked", "structured")
METHODS = ("obc", "magnitude", "rtn")
QUANT_METHODS = ("auto", "obq", "gptq", "gptq-natural", "rtn")
PRUNE_METHODS = ("exact", "sparsegpt")
SPREADS = ("global", "uniform")
GRIDS = ("mse", "minmax")


class RecipeError(ValueError):
    """A layer configuration or recipe that is malformed or cannot be applied to the model's layers."""


_UNSET = object()


@dataclass(frozen=True)
class LayerConfig:
    """What to do with one layer.

    Attributes:
        prune: None, "unstructured", "nm", "blocked" or "structured".
        sparsity: fraction of weights (unstructured), blocks (blocked) or input channels
            (structured; of channel groups when ``structured_group`` > 1) to prune, in [0, 1];
            the count is rounded up.
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
            "auto" (per row the best of "obq" and "gptq"; "gptq" alone above 1024 inputs,
            see auto_quant_methods), "obq", "gptq", "gptq-natural" or
            "rtn" (round to nearest, as a candidate of the refinement).
        refine: coordinate-descent refinement of the quantized codes (``quantize(refine=)``).
        prune_method: the pruner of ``method="obc"``: "exact" (ExactOBS) or "sparsegpt"
            (SparseGPT, for wide layers; not for structured pruning). With quantization and
            ``quant_method="auto"``, "sparsegpt" prunes and quantizes in one joint sweep
            (``prune_quantize_sparsegpt``, no refinement); with another ``quant_method`` it
            prunes, then quantizes with that quantizer.
        damp: relative damping of the Hessian diagonal (lambda = damp * mean(diag H)).
        structured_group: structured pruning removes groups of this many consecutive input
            channels together (1: channel by channel). E.g. the head size of an attention output
            projection, so that whole heads go (see ``obc_native.torch.shrink_attention_heads``).
            Must divide the input channels (per conv group).
        channel_multiple: structured pruning keeps a multiple of this many input channels (of
            channel groups when ``structured_group`` > 1): the kept count that ``sparsity``
            leaves is rounded down to a multiple, so at least the requested fraction is pruned,
            never less. 1 (the default): no rounding. A hardware-aware width, e.g. 8 or 16 for
            onnxruntime's NCHWc convolutions (block 8 with AVX2, 16 with AVX-512). A layer whose
            rounded count would be 0 (or that has fewer channels than the multiple) is refused.

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
    structured_group: int = 1
    channel_multiple: int = 1

    # Fields added after checkpoints and saved reports existed; shown only when set, so that the
    # repr of every configuration that does not use them (and the checkpoint fingerprints hashed
    # from it) stays what earlier versions wrote.
    _LATER_FIELDS = {"structured_group": 1, "channel_multiple": 1}

    def __repr__(self) -> str:
        shown = (f for f in dataclasses.fields(self)
                 if self._LATER_FIELDS.get(f.name, _UNSET) != getattr(self, f.name))
        return "LayerConfig(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in shown) + ")"

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
            if self.prune == "structured" and self.structured_group > 1:
                parts[-1] += f" by {self.structured_group}"
            if self.prune == "structured" and self.channel_multiple > 1:
                parts[-1] += f" x{self.channel_multiple}"
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
        if self.channel_multiple != 1 and self.prune != "structured":
            raise RecipeError(f"channel_multiple={self.channel_multiple} rounds the kept channels of "
                              f"prune='structured' only, got prune={self.prune!r}")
        if self.prune == "structured" and self.prune_method == "sparsegpt" and not self.is_baseline:
            raise RecipeError("prune_method='sparsegpt' has no structured mode; use prune_method='exact' "
                              "for prune='structured'")
        if self.is_baseline and (self.quant_method, self.prune_method) != ("auto", "exact"):
            raise RecipeError(f"quant_method and prune_method choose the solvers of method='obc'; "
                              f"method={self.method!r} is the magnitude / round-to-nearest baseline "
                              f"(got quant_method={self.quant_method!r}, prune_method={self.prune_method!r})")

    def layer_problems(self, info: Any) -> list[str]:
        """Why this configuration cannot be applied to ``info`` (empty list: it can): a
        ``obc_native.torch.LayerInfo``, or anything with its ``cols``, ``in_per_group`` and
        ``is_conv``."""
        problems = []
        cols, channels = info.cols, info.in_per_group
        # N:M groups and blocks run over input channels at one kernel position for convolutions.
        span, span_name = (channels, "input channels per group") if info.is_conv else (cols, "columns")
        if self.prune == "nm" and span % self.m:
            problems.append(f"N:M with m={self.m} needs {span_name} ({span}) divisible by m")
        if self.prune == "blocked" and span % self.block:
            problems.append(f"blocked pruning with block={self.block} needs {span_name} ({span}) divisible by block")
        if self.prune == "structured" and channels % self.structured_group:
            what = "input channels per group" if info.is_conv else "columns"
            problems.append(f"structured_group={self.structured_group} needs {what} ({channels}) divisible by it")
        elif self.prune == "structured" and self.channel_multiple > 1:
            units = channels // self.structured_group
            unit = ("input channels" if self.structured_group == 1 else
                    f"groups of {self.structured_group} input channels")
            if self.channel_multiple > units:
                problems.append(f"channel_multiple={self.channel_multiple} is larger than the layer's {units} {unit}")
            elif kept_structured_units(units, self.sparsity, self.channel_multiple) == 0:
                problems.append(f"channel_multiple={self.channel_multiple} at sparsity {self.sparsity} would keep none "
                                f"of the layer's {units} {unit} (a multiple of {self.channel_multiple} that prunes at "
                                f"least {self.sparsity:.0%}); use a smaller channel_multiple or sparsity, or skip the layer")
        if self.group_size is not None and self.bits is not None and cols % self.group_size:
            problems.append(f"group_size={self.group_size} must divide the columns ({cols})")
        return problems


def kept_structured_units(units: int, sparsity: float, channel_multiple: int = 1) -> int:
    """How many of ``units`` input channels (or channel groups) structured pruning keeps.

    ``sparsity`` prunes ``ceil(sparsity * units)`` (the solvers' count); the rest is rounded down
    to a multiple of ``channel_multiple``, so the pruned fraction is at least ``sparsity``. 0 when
    no positive multiple fits (the caller refuses that layer).
    """
    from ._arrays import count_for_sparsity  # numpy-level helper; keeps this module import-light

    kept = units - count_for_sparsity(units, sparsity)
    return kept - kept % channel_multiple


def structured_sparsity(units: int, sparsity: float, channel_multiple: int = 1) -> float:
    """The sparsity to hand the solvers so that they keep ``kept_structured_units(...)`` of
    ``units``: ``sparsity`` itself when ``channel_multiple`` is 1, else pruned / units (the
    solvers' count rounds it back to exactly that many)."""
    if channel_multiple == 1:
        return sparsity
    return (units - kept_structured_units(units, sparsity, channel_multiple)) / units


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
    "structured_group": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "channel_multiple": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
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
