"""Level database files: every malformed file gives LevelDatabaseError (never UnicodeDecodeError,
RecursionError, ...), no hang on a FIFO, loss >= 0, and loading is linear in the level count."""

from __future__ import annotations

import json
import os
import random

import pytest

from obc_native import budget as B
from file_safety import deadline, edited_json




def _layer(name: str, count: int, shape=(4, 8)) -> B.LayerLevels:
    levels = [B.Level("dense", {}, 0.0, {"params": 32.0, "bits": 1024.0})]
    for i in range(1, count):
        sparsity = i / count
        levels.append(B.Level("unstructured", {"sparsity": sparsity, "spread": "global"}, float(i),
                              {"params": 32.0 * (1 - sparsity), "bits": 1024.0 * (1 - sparsity)}))
    return B.LayerLevels(name=name, shape=shape, levels=levels, reference_loss=10.0)


def _database(levels_per_layer: int = 4) -> B.LevelDatabase:
    return B.LevelDatabase([_layer("a", levels_per_layer), _layer("b", levels_per_layer, (3, 5))],
                           meta={"model": "test"})


def _write(path, data: dict, *, resign: bool = True) -> None:
    if resign:
        data["checksum"] = B._checksum(data)
    path.write_text(json.dumps(data))


def _load(path):
    with deadline(20):
        return B.LevelDatabase.load(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "levels.json"
    path.write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(B.LevelDatabaseError, match="not UTF-8"):
        _load(path)


def test_deeply_nested_json(tmp_path):
    path = tmp_path / "levels.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(B.LevelDatabaseError, match="nested too deeply"):
        _load(path)
    deep = {"format": B.DATABASE_FORMAT, "version": B.DATABASE_VERSION, "layers": [], "meta": {}}
    inner = deep["meta"]
    for _ in range(900):  # parses, but too deep for the canonical checksum or the checks
        inner["x"] = {}
        inner = inner["x"]
    deep["checksum"] = "sha256:0"
    path.write_text(json.dumps(deep))
    with pytest.raises(B.LevelDatabaseError):
        _load(path)


def test_negative_loss_is_rejected(tmp_path):
    path = tmp_path / "levels.json"
    data = _database().to_dict()
    data["layers"][0]["levels"][1]["loss"] = -1.0
    _write(path, data)
    with pytest.raises(B.LevelDatabaseError, match="loss: expected a finite value >= 0"):
        _load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_directory_are_refused(tmp_path):
    fifo = tmp_path / "levels.json"
    os.mkfifo(fifo)
    with pytest.raises(B.LevelDatabaseError, match="not a regular file"):
        _load(fifo)
    with pytest.raises(B.LevelDatabaseError, match="not a regular file"):
        _load(tmp_path)
    with pytest.raises(OSError):
        _load(tmp_path / "missing.json")


def test_duplicate_check_is_linear():
    """100k levels: the duplicate-label check was quadratic (minutes); now a set, well under a second."""
    with deadline(15):
        layer = _layer("big", 100_000)
    assert len(layer.levels) == 100_000
    with pytest.raises(ValueError, match="duplicate levels"):
        B.LayerLevels(name="dup", shape=(2, 2), levels=layer.levels[:3] + layer.levels[1:2])


@pytest.mark.slow
def test_100k_levels_round_trip_in_seconds(tmp_path):
    path = tmp_path / "levels.json"
    B.LevelDatabase([_layer("big", 100_000)]).save(path)
    with deadline(30):
        db = B.LevelDatabase.load(path)
    assert len(db["big"].levels) == 100_000


WRONG_VALUES = [None, True, 0, -1, 2.5, -1e308, 1e308, 10**400, "", "x", "dense", [], [1, 2], {}, {"a": 1}]




def _expect_clean(path, label):
    try:
        _load(path)
    except B.LevelDatabaseError:
        pass
    except Exception as err:  # noqa: BLE001 - anything else is the bug
        pytest.fail(f"{label}: {type(err).__name__}: {err}")


def _fuzz(tmp_path, cases: int, seed: int):
    rng = random.Random(seed)
    good = tmp_path / "good.json"
    _database().save(good)
    original = good.read_bytes()
    data = json.loads(original)
    bad = tmp_path / "bad.json"
    size = len(original)
    for offset in sorted({0, 1, size // 2, size - 1} | {rng.randrange(size) for _ in range(cases)}):
        bad.write_bytes(original[:offset])
        _expect_clean(bad, f"truncated at {offset}")
    for _ in range(cases):
        flipped = bytearray(original)
        at = rng.randrange(size)
        flipped[at] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(flipped))
        _expect_clean(bad, f"bit flipped at {at}")
    for edited, label in edited_json(data, rng, cases, WRONG_VALUES, skip_top=("checksum",)):
        try:
            edited["checksum"] = B._checksum(edited)  # reach the checks behind the checksum
        except (TypeError, ValueError):
            pass
        bad.write_text(json.dumps(edited))
        _expect_clean(bad, label)


def test_fuzz_level_database_files(tmp_path):
    _fuzz(tmp_path, cases=80, seed=1)


@pytest.mark.slow
def test_fuzz_level_database_files_sweep(tmp_path):
    for seed in range(2, 10):
        _fuzz(tmp_path, cases=400, seed=seed)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_save_refuses_to_replace_special_files(tmp_path):
    fifo = tmp_path / "levels.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        _database().save(fifo)
    assert os.path.exists(fifo) and sorted(os.listdir(tmp_path)) == ["levels.json"]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.json"
    os.symlink(victim, link)
    _database().save(link)
    assert victim.read_text() == "keep me"
    assert len(_load(link)) == 2


def test_save_refuses_what_load_would_reject(tmp_path):
    db = _database()
    db["a"].levels[1].loss = -0.5
    path = tmp_path / "levels.json"
    with pytest.raises(ValueError, match="loss must be a finite value >= 0"):
        db.save(path)
    assert not path.exists() and os.listdir(tmp_path) == []
