"""Save and load compressed models: safetensors + a JSON manifest, bit-exact round trip.

A saved model is a directory with two files:

- ``compressed.safetensors``: every entry of the model's ``state_dict`` except the weights of
  compressed layers, stored as is; for each compressed layer with weight key ``K``, some of
  ``K:mask`` (uint8, bit-packed: bit ``i`` (most significant first) says whether entry ``i`` of
  the row-major ``out x cols`` weight matrix is non-zero), ``K:values`` (the non-zero values,
  the weight's dtype), ``K:codes`` (uint8, integer codes of ``bits`` bits packed densely, most
  significant bit first, e.g. two 4-bit codes per byte; one code per non-zero entry when a mask is
  stored, else per entry), ``K:scale`` (float32 ``out x groups``) and ``K:zero`` (uint8, same shape).
- ``manifest.json``: format name and version, the SHA-256 of the tensor file, the model's
  state-dict keys, per compressed layer its geometry, storage, pattern, bits and grid layout, and
  the compression report.

The weight matrix of a layer is the ``out x cols`` matrix of ``layers.weight_matrix`` (native
column order; HF Conv1D transposed). A quantized ``nn.Embedding`` table (recipe ``embeddings``)
is stored the same way with kind ``"embedding"``: its ``num_embeddings x embedding_dim`` weight is
the matrix, groups run along the embedding dimension (files written before embeddings could be
quantized have no such entries and load as before). Dequantized values are ``scale[r, g] * (code - zero[r, g])``
in float32, where for convolutions the group ``g`` of native column ``c*K + k`` is
``(k*C + c) // group_size`` (channels-last grouping). Each layer is stored in whichever of
dense, sparse (mask + values), quantized (codes) or sparse quantized (mask + codes) is smallest;
weights that are not exactly on the layer's grid (changed after compression), or whose grid does
not have the layer's shape (the report of another model, a layer shrunk after compression), fall
back to values: what is saved is always the model's own weights, bit for bit.

Loading never unpickles: safetensors and JSON only. It reads nothing but the directory's own
two files: ``manifest.json`` and the tensor file must be regular files (a symbolic link is
followed only when it resolves inside the directory; FIFOs and devices are refused before they
are opened), and the manifest's ``tensors`` field must be exactly ``"compressed.safetensors"``
(or ``"model.safetensors"``, the name older versions wrote). The
manifest is checked against its schema (types, ranges, known storage kinds) before any of it is
used; every problem raises :class:`SerializationError`.

Saving writes each file to a new temporary file in the directory and renames it into place: a
symbolic link there is replaced (never written through), and a directory, FIFO or device in the
place of either file is refused and left alone.

Checksums: ``sha256`` is the SHA-256 of the tensor file; ``manifest_sha256`` is the SHA-256 of the
canonical JSON of the manifest without that field (``json.dumps(rest, sort_keys=True,
separators=(",", ":"))`` as UTF-8). Manifests written before ``manifest_sha256`` existed (same
format version 1) have no such field; they are still read, after the schema check, and a
warning is logged. Both checksums detect accidental corruption; they are not signatures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import stat
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import make_output_folder, output_file_problem, path_str, write_file_atomically
from .embeddings import describe_embedding, find_embeddings
from .layers import LayerInfo, channels_last_perm, describe_layer, find_layers, layer_kind, weight_matrix
from .report import CompressionReport, QuantGrid

__all__ = [
    "SerializationError",
    "save_compressed",
    "load_compressed",
    "read_manifest",
    "pack_bits",
    "unpack_bits",
    "MANIFEST_NAME",
    "TENSORS_NAME",
]

logger = logging.getLogger("obc_native.torch")

FORMAT = "obc_native.compressed"
VERSION = 1
MANIFEST_NAME = "manifest.json"
# Not "model.safetensors": next to a Hugging Face config.json (``obc-native compress --hf``) that
# name made transformers "load" the folder, silently initialising the compressed layers (stored
# under other keys) at random. Folders written with that old name still load: the manifest's
# "tensors" field names the file.
TENSORS_NAME = "compressed.safetensors"
_TENSOR_NAMES = (TENSORS_NAME, "model.safetensors")  # what a manifest's "tensors" may name
_CHUNK = 1 << 22  # codes packed at a time (a multiple of 8, so chunks stay byte aligned)


class SerializationError(ValueError):
    """A saved model that is missing, corrupted, or does not match the architecture."""


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the low ``bits`` bits of each uint8 value densely, most significant bit first.

    ``len(result) == ceil(len(values) * bits / 8)``; the last byte is zero padded.
    """
    values = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits < 8 and values.size and int(values.max()) >> bits:
        raise ValueError(f"values do not fit in {bits} bits (max {int(values.max())})")
    if bits == 8:
        return values.copy()
    pieces = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        bit_matrix = np.unpackbits(chunk[:, None], axis=1)[:, 8 - bits :]
        pieces.append(np.packbits(bit_matrix.reshape(-1)))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint8 values of ``bits`` bits each."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    expected = math.ceil(count * bits / 8)
    if packed.size != expected:
        raise SerializationError(f"packed array has {packed.size} bytes, expected {expected} for {count} x {bits} bits")
    if bits == 8:
        return packed.copy()
    out = np.empty(count, dtype=np.uint8)
    chunk_bytes = _CHUNK * bits // 8
    for index, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        chunk = packed[index * chunk_bytes : index * chunk_bytes + math.ceil(n * bits / 8)]
        bit_matrix = np.unpackbits(chunk, count=n * bits).reshape(n, bits)
        full = np.zeros((n, 8), dtype=np.uint8)
        full[:, 8 - bits :] = bit_matrix
        out[start : start + n] = np.packbits(full, axis=1).reshape(-1)
    return out


def _group_index(info: LayerInfo, group_size: int, column_order: str) -> np.ndarray:
    """Quantization group of each native column, ``(cols,)``."""
    position = np.arange(info.cols)
    if column_order == "channels_last":
        perm = channels_last_perm(info)
        if perm is not None:
            position = np.empty(info.cols, dtype=np.int64)
            position[perm] = np.arange(info.cols)
    return position // group_size


def _dequantize(
    info: LayerInfo, codes: np.ndarray, grid: dict[str, Any], scale: np.ndarray, zero: np.ndarray
) -> np.ndarray:
    """``out x cols`` float32 from codes (same shape) and the grid."""
    groups = _group_index(info, grid["group_size"], grid["column_order"])
    levels = codes.astype(np.float32) - zero[:, groups].astype(np.float32)
    return scale[:, groups].astype(np.float32) * levels


def _quantize_exact(
    info: LayerInfo, matrix: np.ndarray, grid: QuantGrid, stored: torch.Tensor | None = None
) -> np.ndarray | None:
    """Codes of ``matrix`` (float32 ``out x cols``) on ``grid``, or None if it is not on it.

    ``stored``: the weight matrix in the module's own dtype when that is not float32 (``matrix``
    is then its float32 copy). A float16 / bfloat16 / float64 model holds the grid values cast
    to its dtype (``set_weight_matrix`` casts the solver's float32 result), so the codes are
    exact when the float32 dequantized values, cast the way :func:`_decode_layer` casts them,
    give ``stored`` bit for bit.
    """
    scale = np.asarray(grid.scale, dtype=np.float32)
    zero = np.asarray(grid.zero, dtype=np.uint8)
    groups = _group_index(info, grid.group_size, grid.column_order)
    if scale.shape != zero.shape or scale.shape[0] != matrix.shape[0] or scale.shape[1] <= int(groups.max()):
        return None
    full_scale = scale[:, groups]
    safe = np.where(full_scale == 0, np.float32(1), full_scale)
    levels = np.rint(matrix.astype(np.float64) / safe.astype(np.float64))
    codes = levels + zero[:, groups]
    if codes.min() < 0 or codes.max() > (1 << grid.bits) - 1:
        return None
    codes = codes.astype(np.uint8)
    info_grid = {"group_size": grid.group_size, "column_order": grid.column_order}
    dequantized = _dequantize(info, codes, info_grid, scale, zero)
    if stored is None or stored.dtype == torch.float32:
        if not np.array_equal(dequantized.view(np.uint32), matrix.view(np.uint32)):
            return None
    else:
        decoded = torch.from_numpy(np.ascontiguousarray(dequantized, dtype=np.float32)).to(stored.dtype)
        if not torch.equal(_bits(decoded), _bits(stored.cpu())):
            return None
    return codes


def _grid_fits(info: LayerInfo, grid: QuantGrid) -> bool:
    """Whether ``grid`` has the shape that :func:`load_compressed` reads back for ``info``'s
    weight: ``group_size`` divides the columns, and scales and zero points are ``out x groups``.
    A shrunk layer's grid may still cover its weights (``_quantize_exact`` accepts spare groups)
    but not in that shape: the saved folder would not load."""
    size, cols = grid.group_size, info.cols
    if not isinstance(size, (int, np.integer)) or size < 1 or cols % size:
        return False
    expected = (info.out_features, cols // size)
    return np.shape(grid.scale) == expected and np.shape(grid.zero) == expected


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating-point tensor (so -0.0 differs from 0.0, NaN equals itself)."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(as_int)


def _nonzero_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Entries whose bit pattern is not all zeros (so -0.0 counts as a value to keep)."""
    if not tensor.is_floating_point():
        return tensor != 0
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(as_int) != 0


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``manifest`` without its ``manifest_sha256`` field."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _own_file(directory: str, file_name: str) -> str:
    """Path of ``file_name`` in ``directory``, checked to be a regular file that lies inside it.

    A symbolic link is accepted only when it resolves inside ``directory``; anything that is
    not a regular file (directory, FIFO, device, socket) is refused without being opened.
    """
    path = os.path.join(directory, file_name)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise SerializationError(
            f"{path}: no such file; not a model saved by obc_native.torch.save_compressed"
        ) from None
    except OSError as err:
        raise SerializationError(f"{path}: cannot be read ({err})") from err
    if stat.S_ISLNK(info.st_mode):
        real = os.path.realpath(path)
        root = os.path.realpath(directory)
        try:
            inside = os.path.commonpath([real, root]) == root
        except ValueError:  # e.g. another drive on Windows
            inside = False
        if not inside:
            raise SerializationError(f"{path}: symbolic link to {real!r}, outside the model directory; refused")
        try:
            info = os.stat(real)
        except OSError as err:
            raise SerializationError(f"{path}: dangling or unreadable symbolic link ({err})") from err
        path = real
    if not stat.S_ISREG(info.st_mode):
        raise SerializationError(f"{path}: not a regular file; refused")
    return path


@contextlib.contextmanager
def _open_regular(path: str):
    """``open(path, "rb")`` for a regular file only: opened non-blocking (a FIFO swapped in after
    :func:`_own_file` checked the path cannot block) and checked again on the descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise SerializationError(f"{path}: cannot be opened ({err})") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SerializationError(f"{path}: not a regular file; refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        yield handle


def _encode_layer(info: LayerInfo, grid: QuantGrid | None, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest entry and tensors of one layer's weight, in its smallest exact storage."""
    tensor = weight_matrix(info)
    dtype = tensor.dtype
    total = tensor.numel()
    nonzero = _nonzero_bits(tensor).cpu().numpy()
    nnz = int(nonzero.sum())
    entry: dict[str, Any] = {
        "kind": info.kind,
        "weight_key": key,
        "weight_shape": list(info.weight_shape),
        "matrix_shape": [info.out_features, info.cols],
        "groups": info.groups,
        "kernel": list(info.kernel),
        "dtype": str(dtype).replace("torch.", ""),
        "nonzeros": nnz,
    }
    mask_bytes = math.ceil(total / 8)
    element = tensor.element_size()
    options = {"dense": total * element, "sparse": mask_bytes + nnz * element}
    codes = None
    why_values = "values take fewer bytes than codes on its grid"  # a quantized layer stored as values
    if grid is not None:
        matrix32 = tensor.to(torch.float32).cpu().numpy()
        fits = _grid_fits(info, grid)
        if tensor.is_floating_point() and fits:
            codes = _quantize_exact(info, matrix32, grid, tensor)
        if not fits:
            # another model's report, or a layer shrink_structured cut after compression: the values
            # stored are still the layer's own, exactly (load_compressed restores them bit for bit)
            why_values = (f"the report's grid (scales {tuple(np.shape(grid.scale))}, groups of {grid.group_size}) "
                          f"does not fit the {info.out_features} x {info.cols} weight (the report of another "
                          "model, or a shrunk layer)")
            logger.warning("layer %r: %s; stored as values", info.name, why_values)
        elif codes is None:
            why_values = "weights are not on its quantization grid"
            logger.warning("layer %r: %s; stored as values", info.name, why_values)
        else:
            grid_bytes = grid.scale.size * 5
            options["quantized"] = math.ceil(total * grid.bits / 8) + grid_bytes
            options["sparse_quantized"] = mask_bytes + math.ceil(nnz * grid.bits / 8) + grid_bytes
    storage = min(options, key=options.get)
    entry["storage"] = storage
    if grid is not None and storage in ("dense", "sparse"):
        # the entry keeps the report's mode and config (what compression did); this says that the
        # file holds no codes for it, so that a reader (obc-native report) does not claim them
        entry["stored_as_values"] = why_values
    tensors: dict[str, torch.Tensor] = {}
    if storage == "dense":
        tensors[key] = info.module.weight.detach().cpu().contiguous().clone()
        return entry, tensors
    flat_mask = nonzero.reshape(-1)
    if storage.startswith("sparse"):
        tensors[f"{key}:mask"] = torch.from_numpy(np.packbits(flat_mask))
    if storage == "sparse":
        tensors[f"{key}:values"] = tensor.reshape(-1)[torch.from_numpy(flat_mask)].cpu().contiguous().clone()
        return entry, tensors
    selected = codes.reshape(-1)[flat_mask] if storage == "sparse_quantized" else codes.reshape(-1)
    entry.update(bits=grid.bits, sym=grid.sym, group_size=grid.group_size, column_order=grid.column_order)
    tensors[f"{key}:codes"] = torch.from_numpy(pack_bits(selected, grid.bits))
    tensors[f"{key}:scale"] = torch.from_numpy(np.ascontiguousarray(grid.scale, dtype=np.float32))
    tensors[f"{key}:zero"] = torch.from_numpy(np.ascontiguousarray(grid.zero, dtype=np.uint8))
    return entry, tensors


def save_compressed(
    model: nn.Module,
    directory: str | bytes | os.PathLike,
    report: CompressionReport | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``model`` (compressed by :func:`compress`) to ``directory`` (str, bytes or
    os.PathLike); returns the manifest.

    ``report`` (the return value of ``compress``) supplies the quantization grids and the
    per-layer description; without it, sparse layers are still stored compactly but quantized
    layers are stored as values. So are the layers whose weights the report's grids do not hold
    (the report of another model, weights changed or shrunk after compression), with a warning
    naming the layer; the manifest entry keeps the report's mode and config (what compression
    did) and says why the file holds values, not codes (``stored_as_values``). ``metadata``:
    JSON-serialisable extras kept in the manifest (e.g. how to rebuild the architecture).

    ``metadata`` that ``json`` cannot write (objects, NaN, inf, tuple keys) raises
    ``TypeError`` before any work.

    ``directory`` is created if missing; :class:`SerializationError` before any work when it is
    a file or cannot be created or written, or holds a FIFO, device or folder under one of the two
    file names. Each file is written to a temporary file renamed into place (a failed save leaves
    a previous file whole; a replaced file keeps its permission bits).
    """
    from safetensors.torch import save_file

    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict of JSON values or None, got {type(metadata).__name__}")
    try:  # now: once the tensor file is replaced, a failing manifest would leave it unmatched
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise TypeError(f"metadata: expected JSON values (str, number, bool, None, lists, dicts; "
                        f"no NaN or inf), {err}") from None
    directory = path_str(directory, "directory")
    problem = make_output_folder(directory)  # before the layers are encoded
    for name in (TENSORS_NAME, MANIFEST_NAME):  # a FIFO or folder there: refused now, not after the encoding
        problem = problem or output_file_problem(os.path.join(directory, name))
    if problem is not None:
        raise SerializationError(problem)
    layers = find_layers(model)
    state = model.state_dict()
    compressed = {} if report is None else {layer.name: layer for layer in report.compressed}
    # quantized embedding tables (recipe "embeddings"): only those the report names
    layers.update({name: info for name, info in find_embeddings(model).items() if name in compressed})
    missing = sorted(set(compressed) - set(layers))
    if missing:
        raise SerializationError(f"report names layer(s) {missing} that the model does not have")
    names = list(compressed) if report is not None else list(layers)

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name in names:
        info = layers[name]
        key = f"{name}.weight" if name else "weight"
        if key not in state:
            continue  # e.g. a tied weight that state_dict lists under another name
        layer_report = compressed.get(name)
        entry, layer_tensors = _encode_layer(info, layer_report.grid if layer_report else None, key)
        if entry["storage"] == "dense" and layer_report is None:
            continue
        if layer_report is not None:
            entry.update(mode=layer_report.mode, method=layer_report.method, config=layer_report.config)
            if layer_report.level:
                entry["level"] = layer_report.level
        entries[name] = entry
        tensors.update(layer_tensors)
    encoded = {entry["weight_key"] for entry in entries.values() if entry["storage"] != "dense"}
    for key, value in state.items():
        if key in encoded or key in tensors:
            continue
        if not isinstance(value, torch.Tensor):
            raise SerializationError(f"state_dict entry {key!r} is not a tensor ({type(value).__name__})")
        tensors[key] = value.detach().cpu().contiguous().clone()

    tensor_path = os.path.join(directory, TENSORS_NAME)
    _write_atomically(tensor_path, lambda temp: save_file(tensors, temp, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tensors": TENSORS_NAME,
        "sha256": _sha256(tensor_path),
        "state_dict_keys": list(state),
        "layers": entries,
        "report": None if report is None else report.to_dict(),
        "metadata": dict(metadata or {}),
    }
    # Digest of the manifest as a reader will parse it (tuples become lists, and so on).
    manifest["manifest_sha256"] = _manifest_digest(json.loads(json.dumps(manifest)))
    text = json.dumps(manifest, indent=1)

    def write_manifest(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _write_atomically(os.path.join(directory, MANIFEST_NAME), write_manifest)
    return manifest


def _write_atomically(path: str, write) -> None:
    """``write(temp)`` a new temporary file next to ``path``, then rename it onto ``path``
    (``write_file_atomically``: a replaced file keeps its mode; a symbolic link at ``path`` is
    replaced, never written through; a directory, FIFO or device there is refused)."""
    write_file_atomically(path, write, error=SerializationError)


def read_manifest(directory: str | bytes | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a saved model: format, version, checksum and schema checked.

    Raises :class:`SerializationError` for a missing, unreadable, corrupted or malformed manifest.
    """
    directory = path_str(directory, "directory")
    path = _own_file(directory, MANIFEST_NAME)
    try:
        with _open_regular(path) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise SerializationError(f"{path}: unreadable or corrupted manifest ({type(err).__name__}: {err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SerializationError(f"{path}: not an obc_native manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise SerializationError(f"{path}: manifest version {manifest.get('version')!r}; this version reads {VERSION}")
    if "manifest_sha256" in manifest:
        try:
            digest = _manifest_digest(manifest)
        except (TypeError, ValueError, RecursionError) as err:
            raise SerializationError(f"{path}: corrupted manifest ({err})") from err
        if manifest["manifest_sha256"] != digest:
            raise SerializationError(f"{path}: manifest checksum mismatch; the manifest is corrupted or was edited")
    else:
        logger.warning("%s: manifest has no manifest_sha256 (saved by an older obc_native); not verified", path)
    _check_manifest(manifest, path)
    return manifest


_STORAGES = ("dense", "sparse", "quantized", "sparse_quantized")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest(manifest: dict[str, Any], path: str) -> None:
    """Raise SerializationError unless every field the loader uses has the expected type and range."""

    def fail(message: str) -> None:
        raise SerializationError(f"{path}: malformed manifest: {message}")

    for field_name in ("tensors", "sha256", "state_dict_keys", "layers"):
        if field_name not in manifest:
            fail(f"lacks {field_name!r}")
    if manifest["tensors"] not in _TENSOR_NAMES:
        fail(f"'tensors' must be one of {_TENSOR_NAMES} (a file next to the manifest), got {manifest['tensors']!r}")
    digest = manifest["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        fail(f"'sha256' must be 64 lowercase hex digits, got {digest!r}")
    keys = manifest["state_dict_keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        fail("'state_dict_keys' must be a list of strings")
    if len(set(keys)) != len(keys):
        fail("'state_dict_keys' has duplicates")
    for field_name in ("report", "metadata"):
        if manifest.get(field_name) is not None and not isinstance(manifest[field_name], dict):
            fail(f"{field_name!r} must be an object or null, got {type(manifest[field_name]).__name__}")
    layers = manifest["layers"]
    if not isinstance(layers, dict):
        fail(f"'layers' must be an object (layer name -> entry), got {type(layers).__name__}")
    for name, entry in layers.items():
        _check_layer_entry(name, entry, fail)


def _check_layer_entry(name: str, entry: Any, fail) -> None:
    where = f"layer {name!r}"
    if not isinstance(entry, dict):
        fail(f"{where}: entry must be an object, got {type(entry).__name__}")

    def need(field_name: str, check, expected: str) -> Any:
        if field_name not in entry:
            fail(f"{where}: lacks {field_name!r}")
        value = entry[field_name]
        if not check(value):
            fail(f"{where}: {field_name!r} must be {expected}, got {value!r}")
        return value

    def int_list(value: Any, length: int | None = None) -> bool:
        return (
            isinstance(value, list)
            and (length is None or len(value) == length)
            and all(_is_int(v) and v >= 1 for v in value)
        )

    need("kind", lambda v: isinstance(v, str), "a string")
    need("weight_key", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    need("weight_shape", lambda v: int_list(v) and 2 <= len(v) <= 5, "a list of 2 to 5 positive integers")
    rows, cols = need("matrix_shape", lambda v: int_list(v, 2), "a list of two positive integers")
    need("groups", lambda v: _is_int(v) and v >= 1, "a positive integer")
    need("kernel", lambda v: isinstance(v, list) and all(_is_int(k) and k >= 1 for k in v), "a list of positive integers")
    dtype = need("dtype", lambda v: isinstance(v, str), "a string")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        fail(f"{where}: unknown dtype {dtype!r}")
    need("nonzeros", lambda v: _is_int(v) and 0 <= v <= rows * cols, f"an integer in 0..{rows * cols}")
    storage = need("storage", lambda v: v in _STORAGES, f"one of {_STORAGES}")
    if storage in ("quantized", "sparse_quantized"):
        need("bits", lambda v: _is_int(v) and 1 <= v <= 8, "an integer in 1..8")
        need("sym", lambda v: isinstance(v, bool), "true or false")
        need(
            "group_size",
            lambda v: _is_int(v) and 1 <= v <= cols and cols % v == 0,
            f"a positive integer dividing the columns ({cols})",
        )
        need("column_order", lambda v: v in ("native", "channels_last"), "'native' or 'channels_last'")


def _decode_layer(
    name: str, info: LayerInfo, entry: dict[str, Any], tensors: dict[str, torch.Tensor],
    target: torch.dtype | None = None,
) -> torch.Tensor:
    """The module weight (as stored in the module) from its manifest entry and tensors.

    ``target``: a wider dtype to decode quantized storage into (from the float32 grid values,
    not through the saved dtype); other storages keep the saved dtype (widened by the caller).
    """
    key = entry["weight_key"]
    storage = entry["storage"]
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise SerializationError(f"layer {name!r}: unknown dtype {entry['dtype']!r}")
    if entry["matrix_shape"] != [info.out_features, info.cols]:
        raise SerializationError(
            f"layer {name!r}: manifest matrix_shape {entry['matrix_shape']} does not match the layer's "
            f"{[info.out_features, info.cols]}"
        )

    def get(suffix: str) -> torch.Tensor:
        full = f"{key}:{suffix}" if suffix else key
        if full not in tensors:
            raise SerializationError(f"layer {name!r}: tensor {full!r} is missing from the file")
        return tensors[full]

    def get_array(suffix: str, expected: np.dtype) -> np.ndarray:
        tensor = get(suffix)
        expected_torch = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}[np.dtype(expected)]
        if tensor.dtype != expected_torch:
            raise SerializationError(f"layer {name!r}: tensor '{key}:{suffix}' is {tensor.dtype}, expected {expected_torch}")
        return tensor.contiguous().numpy()

    if storage == "dense":
        return get("")
    rows, cols = info.out_features, info.cols
    total = rows * cols
    mask = None
    if storage.startswith("sparse"):
        packed = get_array("mask", np.uint8)
        if packed.dtype != np.uint8 or packed.size != math.ceil(total / 8):
            raise SerializationError(f"layer {name!r}: mask has {packed.size} bytes, expected {math.ceil(total / 8)}")
        mask = np.unpackbits(packed, count=total).astype(bool)
        if int(mask.sum()) != entry["nonzeros"]:
            raise SerializationError(
                f"layer {name!r}: mask has {int(mask.sum())} entries, manifest says {entry['nonzeros']}"
            )
    if storage == "sparse":
        values = get("values")
        if values.dtype != dtype or values.numel() != entry["nonzeros"]:
            raise SerializationError(
                f"layer {name!r}: values tensor does not match the mask ({values.numel()} {values.dtype})"
            )
        matrix = torch.zeros(total, dtype=dtype)
        matrix[torch.from_numpy(mask)] = values
    elif storage in ("quantized", "sparse_quantized"):
        bits = entry["bits"]
        scale, zero = get_array("scale", np.float32), get_array("zero", np.uint8)
        groups = cols // entry["group_size"] if entry["group_size"] else 0
        if scale.shape != (rows, groups) or zero.shape != (rows, groups) or zero.dtype != np.uint8:
            raise SerializationError(f"layer {name!r}: scale/zero of shape {scale.shape}, expected {(rows, groups)}")
        count = total if mask is None else int(mask.sum())
        codes = unpack_bits(get_array("codes", np.uint8), bits, count)
        if bits < 8 and codes.size and int(codes.max()) >> bits:
            raise SerializationError(f"layer {name!r}: codes do not fit in {bits} bits")
        if mask is not None:
            full = np.zeros(total, dtype=np.uint8)
            full[mask] = codes
            codes = full
        matrix32 = _dequantize(info, codes.reshape(rows, cols), entry, scale, zero)
        if mask is not None:
            # Not an in-place write through reshape(-1): _dequantize's result may be Fortran
            # ordered (numpy picks the layout of the fancy-indexed scale), and then reshape
            # returns a copy and the pruned entries would silently keep their dequantized value.
            matrix32 = np.where(mask.reshape(rows, cols), matrix32, np.float32(0.0))
        matrix = torch.from_numpy(np.ascontiguousarray(matrix32, dtype=np.float32)).reshape(-1).to(target or dtype)
    else:
        raise SerializationError(f"layer {name!r}: unknown storage {storage!r}")
    matrix = matrix.reshape(rows, cols)
    if info.kind == "hf_conv1d":
        return matrix.t().contiguous()
    return matrix.reshape(info.weight_shape)


def _module_kind(module: nn.Module) -> str | None:
    """The manifest kind of ``module``: a layer kind, "embedding" for ``nn.Embedding``, or None."""
    return "embedding" if isinstance(module, nn.Embedding) else layer_kind(module)


# Lossless float conversions: every value of the first dtype is exactly a value of the second.
_WIDENINGS = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    return target in _WIDENINGS.get(source, ())


def load_compressed(model: nn.Module, directory: str | bytes | os.PathLike, *, widen: bool = False) -> dict[str, Any]:
    """Load a model saved by :func:`save_compressed` into ``model`` (same architecture).

    Checks the manifest, the tensor file's SHA-256, that every compressed layer exists with
    the same kind and shape, and that the state-dict keys, shapes and dtypes match exactly;
    raises :class:`SerializationError` otherwise (the model is unchanged then). Returns the
    manifest.

    ``widen=True`` also accepts a model whose floating-point tensors are wider than the saved
    ones (a float16 / bfloat16 save into a float32 or float64 model, float32 into float64):
    every value is converted exactly, and quantized layers take their grid values
    ``scale * (code - zero)`` (float32) directly, not their float16 rounding. This is how a
    half-precision compressed model is exported to ONNX, which needs float32 grid values.
    ``widen`` must be a bool (TypeError otherwise).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(widen, bool):  # widen="no" would widen
        raise TypeError(f"widen: expected True or False, got {widen!r}")
    directory = path_str(directory, "directory")
    manifest = read_manifest(directory)
    tensor_path = _own_file(directory, manifest["tensors"])  # read_manifest checked it is one of our names
    before = os.stat(tensor_path)
    if _sha256(tensor_path) != manifest["sha256"]:
        raise SerializationError(f"{tensor_path}: checksum mismatch; the file is corrupted or not the one saved")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as err:
        raise SerializationError(f"{tensor_path}: cannot read tensors ({type(err).__name__}: {err})") from err
    after = os.stat(tensor_path)
    if (before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns) != (
        after.st_ino, after.st_dev, after.st_size, after.st_mtime_ns,
    ):
        raise SerializationError(f"{tensor_path}: the file changed while it was read")

    current = model.state_dict()
    saved_keys = list(manifest["state_dict_keys"])
    missing = [k for k in saved_keys if k not in current]
    saved_set = set(saved_keys)
    unexpected = [k for k in current if k not in saved_set]
    if missing or unexpected:
        raise SerializationError(
            "architecture mismatch: the saved model has state-dict keys the model lacks "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} and the model has keys the file lacks "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    new_state: dict[str, torch.Tensor] = {}
    for name, entry in manifest["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SerializationError(f"architecture mismatch: the model has no layer {name!r}") from None
        if _module_kind(module) != entry["kind"]:
            raise SerializationError(
                f"architecture mismatch: layer {name!r} is {type(module).__name__}, saved as {entry.get('kind')!r}"
            )
        expected_key = f"{name}.weight" if name else "weight"
        if entry["weight_key"] != expected_key or expected_key not in saved_keys:
            raise SerializationError(
                f"layer {name!r}: weight_key {entry['weight_key']!r} is not the layer's state-dict key {expected_key!r}"
            )
        info = describe_embedding(name, module) if entry["kind"] == "embedding" else describe_layer(name, module)
        if list(info.weight_shape) != entry["weight_shape"] or info.groups != entry["groups"]:
            raise SerializationError(
                f"architecture mismatch: layer {name!r} has weight {list(info.weight_shape)} groups={info.groups}, "
                f"saved {entry['weight_shape']} groups={entry['groups']}"
            )
        saved_dtype = getattr(torch, str(entry.get("dtype")), None)
        wanted = current[expected_key].dtype
        target = wanted if widen and isinstance(saved_dtype, torch.dtype) and _widens(saved_dtype, wanted) else None
        try:
            new_state[entry["weight_key"]] = _decode_layer(name, info, entry, tensors, target)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as err:
            if isinstance(err, SerializationError):
                raise
            raise SerializationError(f"layer {name!r}: corrupted entry ({err})") from err
    for key in saved_keys:
        if key in new_state:
            continue
        if key not in tensors:
            raise SerializationError(f"{tensor_path}: tensor {key!r} is missing")
        new_state[key] = tensors[key]
    for key, value in new_state.items():
        if widen and _widens(value.dtype, current[key].dtype):
            value = new_state[key] = value.to(current[key].dtype)
        if tuple(value.shape) != tuple(current[key].shape) or value.dtype != current[key].dtype:
            raise SerializationError(
                f"architecture mismatch: {key!r} is {tuple(current[key].shape)} {current[key].dtype} in the model, "
                f"{tuple(value.shape)} {value.dtype} in the file"
            )
    model.load_state_dict(new_state, strict=True)
    return manifest
