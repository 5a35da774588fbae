"""Level database files: every layer's levels, saved and loaded as checksummed JSON.

A :class:`LevelDatabase` holds the :class:`~obc_native.levels.LayerLevels` of every layer of a
model, in layer order. Files are JSON (no pickle): ``{"format": "obc_native.level_database",
"version": 1, "checksum": "sha256:...", "meta": {...}, "layers": [...]}``; the checksum is the
SHA-256 of the canonical JSON (sorted keys, no spaces) of everything but the checksum. Each
level is stored as ``{"kind", "params", "loss", "model_loss", "costs"}`` (see
``obc_native.levels``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Iterable, Mapping

from ._files import as_path, output_file_problem, read_regular_file, write_file_atomically
from .costs import BUILTIN_COSTS
from .layer_config import PRUNE_METHODS
from .levels import (
    DEFAULT_PRUNE_METHOD,
    LEGACY_QUANT_METHOD,
    LEVEL_KINDS,
    QUANT_LEVEL_METHODS,
    LayerLevels,
    Level,
    _finite,
    _ordered_costs,
)

__all__ = ["DATABASE_FORMAT", "DATABASE_VERSION", "LevelDatabase", "LevelDatabaseError"]

DATABASE_FORMAT = "obc_native.level_database"


DATABASE_VERSION = 1


class LevelDatabaseError(ValueError):
    """A level database file that is corrupted, malformed, or does not match a model."""


def _check_pruner(params: Mapping, j: int) -> None:
    """ValueError unless a pruning level's optional ``prune_method`` is a pruner's name (a file
    written before SparseGPT levels has none: ExactOBS)."""
    method = params.get("prune_method", DEFAULT_PRUNE_METHOD)
    if not isinstance(method, str) or method not in PRUNE_METHODS:
        raise ValueError(f"level {j}: params 'prune_method' must be one of {PRUNE_METHODS}, got {method!r}")


def _check_quantizer(params: Mapping, j: int) -> None:
    """ValueError unless a quant / joint level's optional ``method`` and ``refine`` are valid."""
    method = params.get("method", LEGACY_QUANT_METHOD)
    if not isinstance(method, str) or method not in QUANT_LEVEL_METHODS:
        raise ValueError(f"level {j}: params 'method' must be one of {QUANT_LEVEL_METHODS}, "
                         f"got {method!r}")
    if not isinstance(params.get("refine", False), bool):
        raise ValueError(f"level {j}: params 'refine' must be true or false, got "
                         f"{params['refine']!r}")


def _check_solvable(level: Level, damp, j: int) -> None:
    """ValueError unless ``level`` describes a valid solve with relative damping ``damp``: a level
    missing a param (or with a bad value) loaded and then failed in apply() with a KeyError or
    RecipeError."""
    try:
        config = level.config(damp)
        if config is not None:
            config.check()
    except KeyError as exc:
        raise ValueError(f"level {j}: params lack {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"level {j}: {exc}") from None


class LevelDatabase:
    """Levels of every layer of a model, in layer order; save/load as checksummed JSON.

    ``db[name]`` is a LayerLevels; iteration yields LayerLevels in insertion order.
    """

    def __init__(self, layers: Iterable[LayerLevels] = (), *, meta: Mapping | None = None):
        self._layers: dict = {}
        self.meta = dict(meta or {})
        for layer in layers:
            self.add(layer)

    def add(self, layer: LayerLevels) -> None:
        if not isinstance(layer, LayerLevels):
            raise TypeError(f"layer: expected a LayerLevels, got {type(layer).__name__}")
        if layer.name in self._layers:
            raise ValueError(f"layer: the database already has a layer named {layer.name!r}")
        self._layers[layer.name] = layer

    def __getitem__(self, name: str) -> LayerLevels:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"layer {name!r} is not in the database") from None

    def __contains__(self, name) -> bool:
        return name in self._layers

    def __iter__(self):
        return iter(self._layers.values())

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        levels = sum(len(layer.levels) for layer in self)
        return f"LevelDatabase({len(self)} layers, {levels} levels, costs {list(self.cost_types())})"

    @property
    def names(self) -> list:
        return list(self._layers)

    def shapes(self) -> dict:
        return {layer.name: layer.shape for layer in self}

    def total_weights(self) -> int:
        return sum(layer.num_weights for layer in self)

    def cost_types(self) -> tuple:
        """Cost types that every level of every layer has."""
        if not self._layers:
            return ()
        common = set(BUILTIN_COSTS) | {c for layer in self for lv in layer.levels for c in lv.costs}
        for layer in self:
            common &= set(layer.cost_types())
        return _ordered_costs(common)

    def _check_cost(self, cost: str) -> str:
        if not self._layers:
            raise ValueError("db: the database has no layers")
        if not isinstance(cost, str) or cost not in self.cost_types():
            raise ValueError(f"cost: unknown cost type {cost!r}; this database has "
                             f"{list(self.cost_types())}")
        return cost

    def dense_cost(self, cost: str) -> float:
        """Summed cost of the "dense" level of every layer (the reference of "Nx" budgets)."""
        cost = self._check_cost(cost)
        total = 0.0
        for layer in self:
            if "dense" not in layer.labels:
                raise ValueError(f"layer {layer.name!r} has no 'dense' level, so a reduction "
                                 "factor has no reference; give an absolute budget")
            total += layer.level("dense").costs[cost]
        return total

    def min_cost(self, cost: str) -> float:
        """Smallest achievable cost: every layer at its cheapest level (summed in layer order)."""
        cost = self._check_cost(cost)
        total = 0.0
        for layer in self:
            total += float(layer.costs(cost).min())
        return total

    def add_cost(self, cost: str, table: Mapping) -> None:
        """Attach a user cost (e.g. "time") to every layer: ``{layer name: values}`` with values
        as in :meth:`LayerLevels.add_cost`; every layer must be given."""
        self._check_table(table, cost)
        for name, values in table.items():
            self[name].add_cost(cost, values)

    def set_model_losses(self, table: Mapping) -> None:
        """Attach model-level losses, ``{layer name: values}`` (a subset of layers is allowed)."""
        unknown = [n for n in table if n not in self._layers]
        if unknown:
            raise ValueError(f"model_loss: unknown layers {unknown}")
        for name, values in table.items():
            self[name].set_model_losses(values)

    def _check_table(self, table: Mapping, what: str) -> None:
        if not isinstance(table, Mapping):
            raise TypeError(f"{what}: expected a mapping layer name -> values, got "
                            f"{type(table).__name__}")
        missing = [n for n in self._layers if n not in table]
        unknown = [n for n in table if n not in self._layers]
        if missing or unknown:
            raise ValueError(f"{what}: expected values for every layer; missing {missing}, "
                             f"unknown {unknown}")

    def check_compatible(self, shapes: Mapping) -> None:
        """Raise LevelDatabaseError unless the database has exactly the layers ``shapes``
        names (``{name: (rows, cols)}``) with those weight-matrix shapes."""
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes: expected a mapping name -> (rows, cols), got "
                            f"{type(shapes).__name__}")
        want = {str(n): tuple(int(s) for s in shape) for n, shape in shapes.items()}
        missing = [n for n in want if n not in self._layers]
        extra = [n for n in self._layers if n not in want]
        differ = [f"{n}: database {self[n].shape}, model {want[n]}"
                  for n in want if n in self._layers and self[n].shape != want[n]]
        if missing or extra or differ:
            parts = []
            if missing:
                parts.append(f"layers missing from the database: {missing}")
            if extra:
                parts.append(f"layers not in the model: {extra}")
            if differ:
                parts.append("shape mismatch: " + "; ".join(differ))
            raise LevelDatabaseError("level database does not match the model: " + ", ".join(parts))

    # --- serialization -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        body = {"format": DATABASE_FORMAT, "version": DATABASE_VERSION, "meta": self.meta,
                "layers": [layer.to_dict() for layer in self]}
        body["checksum"] = _checksum(body)
        return body

    @classmethod
    def from_dict(cls, data, *, source: str = "database") -> LevelDatabase:
        """Validate and rebuild a database from :meth:`to_dict` output (checksum included)."""
        return _from_dict(data, source)

    def save(self, path) -> None:
        """Write the database as JSON (atomically: a temporary file, then a rename).

        Raises ValueError for a loss that ``load`` would reject or a path with a NUL character;
        OSError naming ``path`` when it cannot be written (a missing folder, a directory or FIFO
        there, a name too long for the file system, a read-only folder).
        """
        # Never write a file that load() would reject: layer losses are sums of squares.
        for layer in self:
            for j, lv in enumerate(layer.levels):
                if not (isinstance(lv.loss, numbers.Real) and math.isfinite(lv.loss) and lv.loss >= 0):
                    raise ValueError(f"layer {layer.name!r} level {j} ({lv.label}): loss must be a finite "
                                     f"value >= 0 to be saved, got {lv.loss!r}")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        path = as_path(path)
        # a FIFO, device or directory at path is refused; a link there is replaced, never written through;
        # checked first for a message that names path, not the temporary file
        problem = output_file_problem(path)
        if problem is not None:
            raise OSError(f"path {problem}")
        write_file_atomically(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path, *, shapes: Mapping | None = None) -> LevelDatabase:
        """Read a database saved by :meth:`save`; with ``shapes``, also check_compatible.

        Raises LevelDatabaseError for invalid JSON, a wrong format or version, a checksum
        mismatch, malformed contents, or a mismatch with ``shapes``; OSError if unreadable.
        """
        path = as_path(path)
        data = _read_json(path)
        db = _from_dict(data, path)
        if shapes is not None:
            db.check_compatible(shapes)
        return db


def _read_json(path: str):
    """Parse the JSON file at ``path``; only a regular file is opened (a FIFO or device is refused
    without blocking). LevelDatabaseError for bad UTF-8, bad JSON or nesting too deep to parse;
    OSError when the file cannot be read."""
    try:
        raw = read_regular_file(path)
    except ValueError as exc:
        raise LevelDatabaseError(f"{path}: not a level database ({exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LevelDatabaseError(f"{path}: not a level database (not UTF-8 text: {exc})") from None
    except json.JSONDecodeError as exc:
        raise LevelDatabaseError(f"{path}: not a level database (invalid JSON: {exc})") from None
    except RecursionError:
        raise LevelDatabaseError(f"{path}: not a level database (JSON nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer literal past Python's int_max_str_digits
        raise LevelDatabaseError(f"{path}: not a level database ({exc})") from None


def _checksum(body: Mapping) -> str:
    payload = {k: v for k, v in body.items() if k != "checksum"}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _from_dict(data, source: str) -> LevelDatabase:
    def fail(message):
        raise LevelDatabaseError(f"{source}: {message}")

    if not isinstance(data, dict):
        fail("not a level database (expected a JSON object)")
    if data.get("format") != DATABASE_FORMAT:
        fail(f"not a level database (format {data.get('format')!r}, expected {DATABASE_FORMAT!r})")
    if data.get("version") != DATABASE_VERSION:
        fail(f"unsupported version {data.get('version')!r} (this obc_native reads "
             f"{DATABASE_VERSION})")
    if "checksum" not in data:
        fail("no checksum")
    try:
        expected = _checksum(data)
    except (TypeError, ValueError, RecursionError) as exc:
        fail(f"malformed contents ({exc})")
    if data["checksum"] != expected:
        fail("checksum mismatch: the file was modified or corrupted")
    meta = data.get("meta", {})
    layers = data.get("layers")
    if not isinstance(meta, dict) or not isinstance(layers, list):
        fail("malformed contents ('meta' must be an object and 'layers' a list)")
    db = LevelDatabase(meta=meta)
    for i, entry in enumerate(layers):
        where = f"layers[{i}]"
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected an object")
            levels = []
            damp = dict(entry.get("settings", {})).get("damp", 0.01)  # what apply() will use
            for j, lv in enumerate(entry["levels"]):
                if lv["kind"] not in LEVEL_KINDS:
                    raise ValueError(f"level {j}: unknown kind {lv['kind']!r}")
                if not isinstance(lv["params"], dict) or not isinstance(lv["costs"], dict):
                    raise ValueError(f"level {j}: params and costs must be objects")
                level = Level(kind=lv["kind"], params=dict(lv["params"]),
                              loss=_finite(lv["loss"], f"level {j} loss", nonneg=True),
                              costs={str(k): _finite(v, f"level {j} cost {k!r}", nonneg=True)
                                     for k, v in lv["costs"].items()},
                              model_loss=None if lv.get("model_loss") is None
                              else _finite(lv["model_loss"], f"level {j} model_loss"))
                level.label  # noqa: B018 - params must name the level
                if level.kind in ("quant", "joint"):
                    _check_quantizer(level.params, j)
                if level.kind in ("unstructured", "blocked", "nm", "joint"):
                    _check_pruner(level.params, j)
                elif "prune_method" in level.params:
                    raise ValueError(f"level {j}: a {level.kind} level prunes nothing; it has no 'prune_method'")
                _check_solvable(level, damp, j)
                levels.append(level)
            layer = LayerLevels(
                name=entry["name"], shape=tuple(entry["shape"]), levels=levels,
                reference_loss=_finite(entry.get("reference_loss", 0.0), "reference_loss",
                                       nonneg=True),
                settings=dict(entry.get("settings", {})),
                skipped=[tuple(s) for s in entry.get("skipped", [])])
            db.add(layer)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                RecursionError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            fail(f"{where}: malformed layer ({what})")
    return db

