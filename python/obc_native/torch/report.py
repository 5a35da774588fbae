"""Compression reports: one row per layer, printable as a table and serialisable as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["LayerReport", "QuantGrid", "CompressionReport"]


@dataclass
class QuantGrid:
    """Quantization grid of a layer, kept for saving (not part of the JSON report).

    Attributes:
        bits, sym: as in the recipe.
        group_size: columns per grid (cols when one grid per row).
        column_order: "channels_last" or "native": the order of the columns that groups run along.
        scale: ``out_features x groups`` float32; zero: same shape, uint8 zero points.
    """

    bits: int
    sym: bool
    group_size: int
    column_order: str
    scale: np.ndarray
    zero: np.ndarray


_LEVEL_FIELDS = ("level", "level_costs", "model_loss")


@dataclass
class LayerReport:
    """What happened to one layer.

    Attributes:
        name, kind, shape: the layer (``shape`` is the weight parameter's shape).
        mode: recipe label ("2:4", "unstructured 50%", "int4", ...) or "skipped".
        method: "obc", "magnitude"/"rtn", or "" when skipped.
        sparsity: achieved fraction of zero weights after compression (as stored).
        bits: quantization bits or None.
        loss: ||(W - W_hat) X||_F^2 / n summed over output rows (and conv groups), with the
            undamped calibration Hessian of this layer, W the weights before compression and
            W_hat the weights as the model stores them (for float16 / bfloat16 models: the
            solution rounded to that dtype).
        loss_unrounded: float16 / bfloat16 models: the same loss for the solver's float32
            solution before rounding to the model's dtype (their difference is the rounding's
            effect); None for float32 / float64 models, which store the solution exactly.
        baseline_loss: the same for the magnitude / round-to-nearest result of the same setting
            in float32, before any rounding to the model's dtype (None when not computed).
        damp: relative damping used by the solver (None for magnitude pruning alone).
        samples: calibration samples n the Hessian was averaged over.
        seconds: wall time of the solve (with bias correction), plus in sequential mode the
            calibration pass of the layer's input when this layer made it (layers sharing an
            input with an earlier one use its pass).
        bias_corrected: whether the bias was corrected against the dense model's outputs.
        skipped: reason the layer was left untouched, or "".
        level: non-uniform compression (``compress(budget=...)``): label of the level chosen for
            the layer (e.g. "sparse:0.7", "nm2:4", "q4a", "dense"); "" otherwise.
        level_costs: the chosen level's costs in the level database (params, bits, flops, bops
            and any user cost), or None.
        model_loss: the chosen level's stitched model loss, when the database has one.
        quant_rows: Hessian-aware quantization: which quantizer produced how many output rows,
            e.g. ``{"gptq": 760, "obq": 8}`` (``QuantResult.row_method_names``); None otherwise
            (no quantization, the round-to-nearest baseline, reports from older versions).
        quant_loss_unrefined, quant_loss: the quantization's own loss (``QuantResult.loss``,
            against the quantizer's input: the pruned weights for joint compression) before and
            after refinement; None when not recorded.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    mode: str
    method: str = ""
    sparsity: float = 0.0
    bits: int | None = None
    loss: float | None = None
    baseline_loss: float | None = None
    damp: float | None = None
    samples: int = 0
    seconds: float = 0.0
    bias_corrected: bool = False
    skipped: str = ""
    config: dict[str, Any] | None = None
    level: str = ""
    level_costs: dict[str, float] | None = None
    model_loss: float | None = None
    quant_rows: dict[str, int] | None = None
    quant_loss_unrefined: float | None = None
    quant_loss: float | None = None
    loss_unrounded: float | None = None
    grid: QuantGrid | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "grid"}
        data["shape"] = list(self.shape)
        if not self.level:  # recipe compression: no level fields
            for name in _LEVEL_FIELDS:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        names = {f.name for f in fields(cls)} - {"grid"}
        values = {k: v for k, v in data.items() if k in names}
        values["shape"] = tuple(values.get("shape", ()))
        return cls(**values)  # fields missing from older reports keep their defaults


@dataclass
class CompressionReport:
    """Result of :func:`obc_native.torch.compress`: the per-layer rows plus run settings.

    Attributes:
        layers: one :class:`LayerReport` per supported layer, compressed ones in the order they
            were compressed, then skipped ones.
        calibration: "dense" or "sequential".
        correction: statistics correction applied: "batchnorm", "bias" or None.
        batches: calibration batches per pass; passes: forward passes over the calibration set.
        seconds: total wall time; where it went (parts of it, the rest is planning, checks and
            writing the report):
        pass_seconds: forward passes over the calibration set (the model's own compute,
            Hessian accumulation excluded);
        hessian_seconds: accumulating the layer Hessians in the passes' hooks;
        solve_seconds: the layer solves (with their loss and baseline, and writing the weights
            back);
        correction_seconds: bias correction and BatchNorm re-estimation (its pass included);
        database_seconds: building a level database (non-uniform compression; its stitching
            passes included) and the budget's DP solve.
        budget: non-uniform compression only: ``spec`` (e.g. "flops=2x"), ``cost_type``,
            ``budget`` (absolute), ``cost`` (the chosen levels' total cost in the database),
            ``dense_cost``, ``min_cost`` (smallest achievable), ``objective`` and ``loss`` (what
            the solver minimized), ``layer_loss`` (summed layer losses) and ``achieved`` (the
            built-in costs measured on the compressed weights); None otherwise.
        database: the level database used (not serialized; save it with ``.save(path)``).
    """

    layers: list[LayerReport] = field(default_factory=list)
    calibration: str = "dense"
    correction: str | None = None
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    pass_seconds: float = 0.0
    hessian_seconds: float = 0.0
    solve_seconds: float = 0.0
    correction_seconds: float = 0.0
    database_seconds: float = 0.0
    budget: dict[str, Any] | None = None
    database: Any = field(default=None, repr=False, compare=False)

    @property
    def compressed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.skipped]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped]

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def total_loss(self) -> float:
        return float(sum(layer.loss or 0.0 for layer in self.compressed))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "layers":
                data["layers"] = [layer.to_dict() for layer in self.layers]
            elif f.name == "budget":
                if self.budget is not None:  # non-uniform compression only
                    data["budget"] = json.loads(json.dumps(self.budget))
            elif f.name != "database":
                data[f.name] = getattr(self, f.name)
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        values.pop("database", None)
        values["layers"] = [LayerReport.from_dict(layer) for layer in data.get("layers", [])]
        return cls(**values)

    def table(self) -> str:
        """A fixed-width text table, one line per layer, then a summary line."""
        header = (
            "layer", "kind", "shape", "mode", "method", "sparsity", "bits", "loss", "baseline", "damp", "s", "note"
        )
        rows = []
        for layer in self.layers:
            if layer.skipped:
                rows.append((_display_name(layer.name), layer.kind, _shape(layer.shape), "skipped", *[""] * 7,
                             layer.skipped))
                continue
            rows.append(
                (
                    _display_name(layer.name),
                    layer.kind,
                    _shape(layer.shape),
                    layer.mode,
                    layer.method,
                    f"{layer.sparsity:.1%}",
                    "" if layer.bits is None else str(layer.bits),
                    _num(layer.loss),
                    _num(layer.baseline_loss),
                    _num(layer.damp),
                    f"{layer.seconds:.2f}",
                    "bias corrected" if layer.bias_corrected else "",
                )
            )
        if any(layer.quant_rows for layer in self.layers):
            # which quantizer won how many rows, and the refinement's gain
            header = (*header[:-1], "quantizers", "refined", header[-1])
            for i, layer in enumerate(self.layers):
                rows[i] = (*rows[i][:-1], _quantizers(layer.quant_rows), _refined(layer), rows[i][-1])
        if any(layer.level for layer in self.layers):
            # non-uniform compression: the chosen level and its cost of the budget's type
            cost = (self.budget or {}).get("cost_type", "")
            header = (*header[:4], "level", f"level {cost}".strip(), *header[4:])
            for i, layer in enumerate(self.layers):
                value = (layer.level_costs or {}).get(cost)
                rows[i] = (*rows[i][:4], layer.level, "" if value is None else f"{value:.4g}", *rows[i][4:])
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.append(
            f"{len(self.compressed)} layer(s) compressed, {len(self.skipped)} skipped; calibration={self.calibration}, "
            f"correction={self.correction}, passes={self.passes}, {self.seconds:.2f} s"
        )
        lines.append(self.time_line())
        if self.budget:
            lines.append(_budget_line(self.budget))
        return "\n".join(lines)

    def time_line(self) -> str:
        """Where the time went, e.g. "time: passes 3.1 s, Hessians 1.2 s, solves 20.4 s,
        correction 0.1 s, other 0.3 s (of 25.1 s)"."""
        parts = [("passes", self.pass_seconds), ("Hessians", self.hessian_seconds)]
        if self.database_seconds:
            parts.append(("database", self.database_seconds))
        parts += [("solves", self.solve_seconds), ("correction", self.correction_seconds)]
        other = self.seconds - sum(seconds for _, seconds in parts)
        parts.append(("other", max(other, 0.0)))
        text = ", ".join(f"{what} {seconds:.2f} s" for what, seconds in parts)
        return f"time: {text} (of {self.seconds:.2f} s)"

    def __str__(self) -> str:
        return self.table()


def _budget_line(budget: dict[str, Any]) -> str:
    cost = budget.get("cost_type", "")
    text = f"budget {budget.get('spec')}: {cost} {_num(budget.get('cost'))} of {_num(budget.get('budget'))}"
    dense = budget.get("dense_cost")
    if dense and budget.get("cost"):
        text += f" ({dense / budget['cost']:.2f}x fewer than dense {_num(dense)})"
    achieved = (budget.get("achieved") or {}).get(cost)
    if achieved is not None:
        text += f"; measured on the weights {_num(achieved)}"
    return text + f"; objective {budget.get('objective')}"



def _quantizers(counts: dict[str, int] | None) -> str:
    """"gptq 760, obq 8" (most rows first), or "" when unknown."""
    if not counts:
        return ""
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(), key=lambda item: -item[1]))


def _refined(layer: LayerReport) -> str:
    """The quantization loss before -> after refinement, e.g. "1.234 -> 1.1 (-10.9%)"."""
    before, after = layer.quant_loss_unrefined, layer.quant_loss
    if before is None or after is None:
        return ""
    gain = f" ({(after - before) / before:+.1%})" if before > 0 else ""
    return f"{_num(before)} -> {_num(after)}{gain}"


def _display_name(name: str) -> str:
    """A layer's name in tables: a model that is itself one layer has the name "" (shown "(model)")."""
    return name or "(model)"

def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
