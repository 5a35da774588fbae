"""Tests for obc_native.level_database: saving, loading, corrupted files, matching a model.

(File-system safety of the same files: test_level_database_files.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from level_fixtures import small_db  # noqa: F401 - a fixture
from problems import make_problem

from obc_native.budget import solve_budget
from obc_native.level_database import LevelDatabase, LevelDatabaseError, _checksum
from obc_native.level_builder import build_layer_levels
from obc_native.levels import LayerLevels, apply_level


def test_save_load_round_trip(small_db, tmp_path):
    db = LevelDatabase.from_dict(small_db.to_dict())  # a copy: the fixture stays as it is
    db["layer1"].set_model_losses({label: 0.5 * i for i, label in enumerate(db["layer1"].labels)})
    path = tmp_path / "levels.json"
    db.save(path)
    loaded = LevelDatabase.load(path, shapes=db.shapes())
    assert loaded.to_dict() == db.to_dict()
    assert loaded.names == db.names and loaded.meta == {"model": "test"}
    for a, b in zip(db, loaded):
        np.testing.assert_array_equal(a.losses(), b.losses())
        for cost in db.cost_types():
            np.testing.assert_array_equal(a.costs(cost), b.costs(cost))
    assert loaded["layer1"].level(1).model_loss == 0.5
    assert loaded["layer0"].level(1).model_loss is None
    for spec in ("flops=1.7x", "bits=8", "time=1.3x"):
        s1, s2 = solve_budget(db, spec), solve_budget(loaded, spec)
        assert s1.labels == s2.labels and s1.cost == s2.cost and s1.loss == s2.loss
    assert json.loads(path.read_text())["checksum"].startswith("sha256:")


def test_corrupted_database_files(small_db, tmp_path):
    path = tmp_path / "levels.json"
    small_db.save(path)
    data = json.loads(path.read_text())

    tampered = json.loads(json.dumps(data))
    tampered["layers"][0]["levels"][1]["loss"] *= 0.5
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    with pytest.raises(LevelDatabaseError, match="checksum mismatch"):
        LevelDatabase.load(tmp_path / "tampered.json")

    (tmp_path / "truncated.json").write_text(path.read_text()[:-40])
    with pytest.raises(LevelDatabaseError, match="invalid JSON"):
        LevelDatabase.load(tmp_path / "truncated.json")

    wrong = dict(data, format="something.else")
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(LevelDatabaseError, match="not a level database"):
        LevelDatabase.load(tmp_path / "wrong.json")

    newer = dict(data, version=99)
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(LevelDatabaseError, match="unsupported version 99"):
        LevelDatabase.load(tmp_path / "newer.json")

    # consistent checksum but malformed contents
    broken = json.loads(json.dumps(data))
    del broken["layers"][1]["levels"][0]["loss"]
    broken["checksum"] = _checksum(broken)
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(LevelDatabaseError, match=r"layers\[1\]: malformed layer \(missing field 'loss'\)"):
        LevelDatabase.load(tmp_path / "broken.json")

    nan = json.loads(json.dumps(data))
    nan["layers"][0]["levels"][0]["costs"]["params"] = -3.0
    nan["checksum"] = _checksum(nan)
    (tmp_path / "negative.json").write_text(json.dumps(nan))
    with pytest.raises(LevelDatabaseError, match="malformed layer"):
        LevelDatabase.load(tmp_path / "negative.json")

    with pytest.raises(OSError):
        LevelDatabase.load(tmp_path / "missing.json")


def test_database_model_mismatch(small_db, tmp_path):
    path = tmp_path / "levels.json"
    small_db.save(path)
    shapes = small_db.shapes()
    small_db.check_compatible(shapes)
    with pytest.raises(LevelDatabaseError, match=r"shape mismatch: layer2: database \(3, 16\), model \(3, 17\)"):
        LevelDatabase.load(path, shapes={**shapes, "layer2": (3, 17)})
    fewer = {k: v for k, v in shapes.items() if k != "layer3"}
    with pytest.raises(LevelDatabaseError, match=r"layers not in the model: \['layer3'\]"):
        small_db.check_compatible(fewer)
    with pytest.raises(LevelDatabaseError, match=r"missing from the database: \['fc'\]"):
        small_db.check_compatible({**shapes, "fc": [10, 4]})


def test_database_construction_errors(small_db):
    layer = small_db["layer0"]
    with pytest.raises(ValueError, match="already has a layer"):
        LevelDatabase([layer, layer])
    with pytest.raises(ValueError, match="duplicate levels"):
        LayerLevels("x", (1, 1), [layer.levels[0], layer.levels[0]])
    with pytest.raises(ValueError, match="no levels"):
        LayerLevels("x", (1, 1), [])
    with pytest.raises(ValueError, match="missing"):
        small_db.add_cost("latency", {"layer0": [1.0] * 5})
    with pytest.raises(ValueError, match="has 5 levels, got 2"):
        LevelDatabase([layer]).add_cost("latency", {"layer0": [1.0, 2.0]})
    with pytest.raises(ValueError, match=">= 0"):
        LevelDatabase([layer]).add_cost("latency", {"layer0": [1.0, 2.0, 3.0, -4.0, 5.0]})
    with pytest.raises(KeyError, match="no level 'q7'"):
        layer.level("q7")



def test_pruner_of_levels_round_trips_and_exactobs_levels_name_none(tmp_path):
    W, H, _ = make_problem(4, 16, seed=30)
    exact = build_layer_levels(W, H, name="exact", sparsities=(0.5,), nm=[(2, 4)], joint=[(2, 4, 4)])
    fast = build_layer_levels(W, H, name="fast", sparsities=(0.5,), nm=[(2, 4)], joint=[(2, 4, 4)],
                              prune_method="sparsegpt")
    assert all("prune_method" not in level.params for level in exact.levels)  # stored as before the choice
    path = tmp_path / "levels.json"
    LevelDatabase([exact, fast]).save(path)
    loaded = LevelDatabase.load(path)
    assert loaded["fast"].labels == fast.labels and loaded["exact"].labels == exact.labels
    for name in ("exact", "fast"):
        for level in loaded[name].levels[1:]:
            assert level.config().prune_method == name.replace("fast", "sparsegpt")
            assert apply_level(W, H, level).loss == level.loss


@pytest.mark.parametrize("level_index, value, match", [
    (1, "fast", "params 'prune_method' must be one of"),
    (1, 3, "params 'prune_method' must be one of"),
    (2, "sparsegpt", "prunes nothing"),
])
def test_database_with_a_bad_pruner_is_rejected(tmp_path, level_index, value, match):
    W, H, _ = make_problem(3, 8, seed=31)
    layer = build_layer_levels(W, H, name="l", sparsities=(0.5,), nm=(), bits=[4])
    layer.levels[level_index].params["prune_method"] = value
    path = tmp_path / "bad.json"
    LevelDatabase([layer]).save(path)
    with pytest.raises(LevelDatabaseError, match=rf"level {level_index}: .*{match}"):
        LevelDatabase.load(path)
