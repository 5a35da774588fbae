"""Recipe files: malformed files give RecipeError only (no UnicodeDecodeError, no hang on a FIFO)."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest

from obc_native.torch import RecipeError, load_recipe
from file_safety import deadline

pytestmark = pytest.mark.torch

RECIPE = {
    "default": {"prune": "nm", "n": 2, "m": 4, "bits": 4, "sym": False, "group_size": 8},
    "overrides": [{"pattern": "fc*", "prune": None, "bits": 8}],
    "skip": ["conv1"],
    "strict": True,
}




def _load(path):
    with deadline(10):
        return load_recipe(path)


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_bytes(b'{"skip": ["\xff"]}')
    with pytest.raises(RecipeError, match="not UTF-8"):
        _load(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_recipe_is_refused(tmp_path):
    path = tmp_path / "recipe.json"
    os.mkfifo(path)
    with pytest.raises(RecipeError, match="not a regular file"):
        _load(path)


def _fuzz(tmp_path, cases: int, seed: int):
    rng = random.Random(seed)
    text = json.dumps(RECIPE).encode("utf-8")
    path = tmp_path / "recipe.json"
    attempts = [(f"truncated at {n}", text[:n]) for n in range(0, len(text), 3)]
    for _ in range(cases):
        flipped = bytearray(text)
        at = rng.randrange(len(text))
        flipped[at] ^= 1 << rng.randrange(8)
        attempts.append((f"bit flipped at {at}", bytes(flipped)))
    values = [None, True, 0, -1, 2.5, 1e308, "", "x", [], [1], {}, {"a": 1}]
    for _ in range(cases):
        edited = copy.deepcopy(RECIPE)
        section = rng.choice(["default", "overrides", "skip", "strict", "top"])
        value = rng.choice(values)
        if section == "default":
            edited["default"][rng.choice(list(edited["default"]) + ["grid", "spread"])] = value
        elif section == "overrides":
            edited["overrides"][0][rng.choice(["pattern", "bits", "prune", "n"])] = value
        elif section == "top":
            edited[rng.choice(["default", "overrides", "unknown"])] = value
        else:
            edited[section] = value
        attempts.append((f"{section} = {value!r}", json.dumps(edited).encode("utf-8")))
    for label, data in attempts:
        path.write_bytes(data)
        try:
            _load(path)
        except RecipeError:
            pass
        except Exception as err:  # noqa: BLE001 - anything but RecipeError is the bug
            pytest.fail(f"{label}: {type(err).__name__}: {err}")


def test_fuzz_recipe_files(tmp_path):
    _fuzz(tmp_path, cases=60, seed=1)


@pytest.mark.slow
def test_fuzz_recipe_files_sweep(tmp_path):
    for seed in range(2, 8):
        _fuzz(tmp_path, cases=300, seed=seed)


@pytest.mark.parametrize("name", ["recipe.YAML", "recipe.Yml", "recipe.yaml"])
def test_yaml_extension_is_case_insensitive(tmp_path, name):
    path = tmp_path / name
    path.write_text("default: {prune: nm, n: 2, m: 4}\n")  # YAML, not JSON
    recipe = _load(path)
    assert recipe.default.prune == "nm" and (recipe.default.n, recipe.default.m) == (2, 4)
