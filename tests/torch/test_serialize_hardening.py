"""The compressed-model loader reads only its own directory's files and rejects malformed ones
with SerializationError (never another exception type, never a hang)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import struct

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP, write_manifest

from obc_native.torch import LayerConfig, Override, Recipe, SerializationError, compress, load_compressed, save_compressed
from obc_native.torch.serialize import MANIFEST_NAME, TENSORS_NAME
from file_safety import deadline, edited_json

pytestmark = pytest.mark.torch




RECIPE = Recipe(
    default=LayerConfig(prune="nm", n=2, m=4, bits=4, sym=False),
    overrides=[Override("layers.1", prune=None, bits=3, sym=True, group_size=8)],
)


@pytest.fixture
def saved(mlp, mlp_batches, tmp_path):
    report = compress(mlp, mlp_batches, RECIPE, baseline=False, quiet=True)
    directory = tmp_path / "model"
    save_compressed(mlp, directory, report)
    return directory


def _manifest(directory) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def _load(directory):
    with deadline(20):
        return load_compressed(MLP(), directory)


def test_saved_manifest_has_a_checksum_and_loads(saved):
    manifest = _manifest(saved)
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    _load(saved)


def test_edited_manifest_is_rejected_and_legacy_manifest_still_loads(saved, caplog):
    manifest = _manifest(saved)
    edited = copy.deepcopy(manifest)
    edited["metadata"] = {"note": "edited"}
    (saved / MANIFEST_NAME).write_text(json.dumps(edited))
    with pytest.raises(SerializationError, match="manifest checksum mismatch"):
        _load(saved)
    legacy = {k: v for k, v in manifest.items() if k != "manifest_sha256"}  # version 1 before the field
    (saved / MANIFEST_NAME).write_text(json.dumps(legacy))
    _load(saved)
    assert "no manifest_sha256" in caplog.text


@pytest.mark.parametrize("where", ["absolute", "parent", "other_name"])
def test_tensors_field_cannot_leave_the_directory(saved, tmp_path, where):
    # A valid tensor file (matching checksum) outside the directory: it must not be read.
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(saved / TENSORS_NAME, outside)
    value = {
        "absolute": str(outside),
        "parent": os.path.join("..", "outside.safetensors"),
        "other_name": "outside.safetensors",
    }[where]
    if where == "other_name":
        shutil.copyfile(outside, saved / value)
    manifest = _manifest(saved)
    manifest["tensors"] = value
    write_manifest(saved, manifest)
    (saved / TENSORS_NAME).unlink()
    with pytest.raises(SerializationError, match="'tensors' must be one of"):
        _load(saved)


def test_symlinks_are_followed_only_inside_the_directory(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / TENSORS_NAME, outside)
    os.symlink(outside, saved / TENSORS_NAME)
    with pytest.raises(SerializationError, match="outside the model directory"):
        _load(saved)
    (saved / TENSORS_NAME).unlink()
    shutil.move(outside, saved / "real.safetensors")
    os.symlink("real.safetensors", saved / TENSORS_NAME)
    _load(saved)  # a link inside the directory is fine
    manifest_outside = tmp_path / "manifest.json"
    shutil.move(saved / MANIFEST_NAME, manifest_outside)
    os.symlink(manifest_outside, saved / MANIFEST_NAME)
    with pytest.raises(SerializationError, match="outside the model directory"):
        _load(saved)


@pytest.mark.parametrize("name", [TENSORS_NAME, MANIFEST_NAME])
def test_fifo_and_directory_are_refused_without_blocking(saved, name):
    os.unlink(saved / name)
    os.mkfifo(saved / name)
    with pytest.raises(SerializationError, match="not a regular file"):
        _load(saved)
    os.unlink(saved / name)
    os.mkdir(saved / name)
    with pytest.raises(SerializationError, match="not a regular file"):
        _load(saved)


def _set(path: tuple, value):
    def edit(manifest):
        target = manifest
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return edit


def _delete(path: tuple):
    def edit(manifest):
        target = manifest
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return edit


LAYER = ("layers", "layers.0")
MALFORMED = {
    "storage null": _set(LAYER + ("storage",), None),
    "storage 5": _set(LAYER + ("storage",), 5),
    "storage unknown": _set(LAYER + ("storage",), "zip"),
    "group_size 5": _set(("layers", "layers.1", "group_size"), 5),
    "group_size 4.0": _set(("layers", "layers.1", "group_size"), 4.0),
    "group_size 0": _set(("layers", "layers.1", "group_size"), 0),
    "group_size true": _set(("layers", "layers.1", "group_size"), True),
    "layers list": _set(("layers",), []),
    "layers null": _set(("layers",), None),
    "layer entry list": _set(LAYER, [1, 2]),
    "missing weight_shape": _delete(LAYER + ("weight_shape",)),
    "missing storage": _delete(LAYER + ("storage",)),
    "missing bits": _delete(LAYER + ("bits",)),
    "missing weight_key": _delete(LAYER + ("weight_key",)),
    "missing matrix_shape": _delete(LAYER + ("matrix_shape",)),
    "weight_key other layer": _set(LAYER + ("weight_key",), "layers.1.weight"),
    "weight_key unknown": _set(LAYER + ("weight_key",), "nope"),
    "weight_shape str": _set(LAYER + ("weight_shape",), "32x16"),
    "weight_shape huge": _set(LAYER + ("weight_shape",), [10**15, 10**15]),
    "matrix_shape huge": _set(LAYER + ("matrix_shape",), [10**15, 10**15]),
    "matrix_shape floats": _set(LAYER + ("matrix_shape",), [32.0, 16.0]),
    "nonzeros str": _set(LAYER + ("nonzeros",), "many"),
    "nonzeros negative": _set(LAYER + ("nonzeros",), -1),
    "nonzeros huge": _set(LAYER + ("nonzeros",), 10**15),
    "bits 9": _set(LAYER + ("bits",), 9),
    "bits str": _set(LAYER + ("bits",), "4"),
    "sym int": _set(LAYER + ("sym",), 1),
    "column_order": _set(LAYER + ("column_order",), "diagonal"),
    "dtype unknown": _set(LAYER + ("dtype",), "float128"),
    "dtype not a dtype": _set(LAYER + ("dtype",), "Tensor"),
    "dtype int": _set(LAYER + ("dtype",), 7),
    "groups 0": _set(LAYER + ("groups",), 0),
    "kernel str": _set(LAYER + ("kernel",), "3"),
    "kind int": _set(LAYER + ("kind",), 3),
    "kind wrong": _set(LAYER + ("kind",), "conv2d"),
    "state_dict_keys dict": _set(("state_dict_keys",), {}),
    "state_dict_keys ints": _set(("state_dict_keys",), [1, 2]),
    "state_dict_keys dup": lambda m: m["state_dict_keys"].append(m["state_dict_keys"][0]),
    "sha256 int": _set(("sha256",), 5),
    "sha256 short": _set(("sha256",), "abc"),
    "report list": _set(("report",), []),
    "metadata str": _set(("metadata",), "x"),
    "missing layers": _delete(("layers",)),
    "missing sha256": _delete(("sha256",)),
    "missing tensors": _delete(("tensors",)),
    "tensors null": _set(("tensors",), None),
    "unknown layer": _set(("layers", "nope"), {}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_gives_serialization_error(saved, case):
    manifest = _manifest(saved)
    MALFORMED[case](manifest)
    write_manifest(saved, manifest)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError), deadline(20):
        load_compressed(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _resign_tensors(directory) -> None:
    """Make the manifest's tensor checksum match the (edited) tensor file."""
    manifest = _manifest(directory)
    manifest["sha256"] = hashlib.sha256((directory / TENSORS_NAME).read_bytes()).hexdigest()
    write_manifest(directory, manifest)


def _safetensors_bytes(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + payload


@pytest.mark.parametrize(
    "case", ["1e15 elements", "offsets past the end", "header length 2^63", "wrong dtype codes", "float codes"]
)
def test_hostile_tensor_headers(saved, case):
    from safetensors.numpy import load_file as np_load, save_file as np_save

    path = saved / TENSORS_NAME
    tensors = np_load(str(path))
    key = "layers.0.weight:codes"
    if case == "1e15 elements":
        data = _safetensors_bytes({key: {"dtype": "U8", "shape": [10**15], "data_offsets": [0, 10**15]}}, b"\0" * 64)
    elif case == "offsets past the end":
        data = _safetensors_bytes({key: {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 4)
    elif case == "header length 2^63":
        data = struct.pack("<Q", 1 << 63) + b"{}"
    else:
        dtype = np.int8 if case == "wrong dtype codes" else np.float32
        tensors[key] = tensors[key].astype(dtype)
        np_save(tensors, str(path))
        data = None
    if data is not None:
        path.write_bytes(data)
    _resign_tensors(saved)
    with pytest.raises(SerializationError):
        _load(saved)


def _mutations(data: bytes, rng: random.Random, cases: int):
    """Truncations at many offsets, flipped bytes, and random byte runs, each as (label, bytes)."""
    size = len(data)
    offsets = sorted({0, 1, 7, 8, 9, size // 2, size - 1} | {rng.randrange(size) for _ in range(cases)})
    for offset in offsets:
        yield f"truncated at {offset}", data[:offset]
    for _ in range(cases):
        at = rng.randrange(size)
        flipped = bytearray(data)
        flipped[at] ^= 1 << rng.randrange(8)
        yield f"bit flipped at {at}", bytes(flipped)
    for _ in range(cases // 2):
        at = rng.randrange(size)
        run = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        yield f"bytes {run.hex()} at {at}", data[:at] + run + data[at + len(run) :]


def _fuzz_file(directory, name: str, cases: int, seed: int, resign: bool):
    path = directory / name
    original = path.read_bytes()
    manifest_original = (directory / MANIFEST_NAME).read_bytes()
    rng = random.Random(seed)
    for label, data in _mutations(original, rng, cases):
        path.write_bytes(data)
        if resign:
            _resign_tensors(directory)
        try:
            _load(directory)
        except SerializationError:
            pass
        except Exception as err:  # noqa: BLE001 - the point: nothing but SerializationError
            pytest.fail(f"{name} {label}: {type(err).__name__}: {err}")
        finally:
            path.write_bytes(original)
            (directory / MANIFEST_NAME).write_bytes(manifest_original)


@pytest.mark.parametrize("resign", [False, True])
def test_fuzz_tensor_file(saved, resign):
    """With resign, the checksum is recomputed so the safetensors parser and decoder see the damage."""
    _fuzz_file(saved, TENSORS_NAME, cases=40, seed=1 + resign, resign=resign)


def test_fuzz_manifest_bytes(saved):
    _fuzz_file(saved, MANIFEST_NAME, cases=60, seed=3, resign=False)


WRONG_VALUES = [None, True, 0, -1, 5, 4.0, 1e308, 10**15, "", "x", "model.safetensors", [], [1], {}, {"a": 1}]




def _fuzz_manifest_values(directory, cases: int, seed: int):
    manifest = _manifest(directory)
    rng = random.Random(seed)
    skip = ("report", "metadata", "manifest_sha256")
    for edited, label in edited_json(manifest, rng, cases, WRONG_VALUES, skip_top=skip):
        write_manifest(directory, edited)
        try:
            _load(directory)
        except SerializationError:
            pass
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"manifest {label}: {type(err).__name__}: {err}")
    write_manifest(directory, manifest)


def test_fuzz_manifest_values(saved):
    _fuzz_manifest_values(saved, cases=150, seed=4)


@pytest.mark.slow
def test_fuzz_sweep_slow(saved):
    for seed in range(5):
        _fuzz_file(saved, TENSORS_NAME, cases=150, seed=10 + seed, resign=True)
        _fuzz_file(saved, MANIFEST_NAME, cases=150, seed=20 + seed, resign=False)
        _fuzz_manifest_values(saved, cases=500, seed=30 + seed)


def test_save_never_writes_through_links_or_replaces_special_files(mlp, mlp_batches, tmp_path):
    report = compress(mlp, mlp_batches, RECIPE, baseline=False, quiet=True)
    directory = tmp_path / "model"
    directory.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, directory / TENSORS_NAME)
    os.symlink(victim, directory / MANIFEST_NAME)
    save_compressed(mlp, directory, report)
    assert victim.read_text() == "keep me"  # the links were replaced, their target untouched
    assert not os.path.islink(directory / TENSORS_NAME) and not os.path.islink(directory / MANIFEST_NAME)
    _load(directory)
    os.unlink(directory / MANIFEST_NAME)
    os.mkfifo(directory / MANIFEST_NAME)
    with pytest.raises(SerializationError, match="not a regular file"), deadline(20):
        save_compressed(mlp, directory, report)
    assert stat_is_fifo(directory / MANIFEST_NAME)
    assert sorted(os.listdir(directory)) == sorted([MANIFEST_NAME, TENSORS_NAME])  # no temporary left


def stat_is_fifo(path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("report", [{"layers": [5]}, {"layers": "x"}, {"layers": [{"name": "a"}]}])
def test_cli_report_of_a_malformed_report_is_an_error_not_a_traceback(saved, report, capsys):
    from obc_native.cli import main

    manifest = _manifest(saved)
    manifest["report"] = report
    write_manifest(saved, manifest)
    assert main(["report", str(saved)]) == 1
    assert "malformed" in capsys.readouterr().err
