"""Recipes: patterns, overrides and skips apply to exactly the named layers; bad recipes fail early."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from obc_native.torch import (
    LayerConfig,
    Override,
    Recipe,
    RecipeError,
    as_recipe,
    find_layers,
    load_recipe,
    select_layers,
)

pytestmark = pytest.mark.torch


class Blocks(nn.Module):
    """Two 'blocks' with attention-like and MLP-like layers, plus a stem conv and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attn = nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16), "out": nn.Linear(16, 16)})
            block.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
            self.blocks.append(block)
        self.head = nn.Linear(16, 10)
        self.norm = nn.LayerNorm(16)


@pytest.fixture
def layers():
    return find_layers(Blocks())


def configs(recipe, layers):
    return {name: plan.config for name, plan in recipe.resolve(layers).items()}


def test_default_applies_to_every_supported_layer(layers):
    plans = configs(Recipe(default=LayerConfig(bits=4)), layers)
    assert set(plans) == set(layers)
    assert "norm" not in plans  # LayerNorm is not a supported layer
    assert all(c == LayerConfig(bits=4) for c in plans.values())


def test_overrides_apply_in_order_and_only_to_matches(layers):
    recipe = Recipe(
        default=LayerConfig(prune="nm", n=2, m=4),
        overrides=[
            Override("blocks.*", bits=8),
            Override("blocks.*.attn.*", prune=None),
            Override("blocks.1.attn.q", bits=4),
        ],
        skip=["stem"],
    )
    plans = configs(recipe, layers)
    assert plans["stem"] is None
    assert plans["head"] == LayerConfig(prune="nm", n=2, m=4)
    assert plans["blocks.0.mlp.0"] == LayerConfig(prune="nm", n=2, m=4, bits=8)
    assert plans["blocks.0.attn.q"] == LayerConfig(prune=None, bits=8)
    assert plans["blocks.1.attn.k"] == LayerConfig(prune=None, bits=8)
    assert plans["blocks.1.attn.q"] == LayerConfig(prune=None, bits=4)
    assert plans["blocks.0.attn.out"] == LayerConfig(prune=None, bits=8)
    # a later, general override wins over an earlier specific one
    later = Recipe(default=LayerConfig(bits=4), overrides=[Override("head", bits=8), Override("*", bits=3)])
    assert configs(later, layers)["head"].bits == 3


def test_skip_wins_and_reason_is_reported(layers):
    recipe = Recipe(default=LayerConfig(bits=4), overrides=[Override("head", bits=8)], skip=["head", "blocks.0.*"],
                    strict=False)  # strict: the override of a skipped layer only is an error (next test)
    plans = recipe.resolve(layers)
    assert plans["head"].config is None and "'head'" in plans["head"].reason
    assert all(plans[n].config is None for n in layers if n.startswith("blocks.0."))
    assert all(plans[n].config is not None for n in layers if n.startswith("blocks.1."))


def test_an_override_of_skipped_layers_only_is_an_error_when_strict(layers):
    """It used to be dropped silently: the user's bits=8 for "head" never applied."""
    recipe = Recipe(default=LayerConfig(bits=4), overrides=[Override("head", bits=8), Override("blocks.0.*", bits=3)],
                    skip=["head", "blocks.0.*"])
    with pytest.raises(RecipeError) as info:
        recipe.resolve(layers)
    text = str(info.value)
    assert "override pattern 'head' matches only layers the recipe skips (layer 'head')" in text
    assert "override pattern 'blocks.0.*' matches only layers the recipe skips (layers 'blocks.0." in text
    # the layer selection of non-uniform compression applies the same rule
    with pytest.raises(RecipeError, match="recipe override pattern 'head' matches only layers the recipe skips"):
        select_layers(Blocks(), recipe=Recipe(default=LayerConfig(bits=4), overrides=[Override("head", bits=8)],
                                              skip=["head"]))
    # an override that still reaches one layer is live; strict=False accepts a dead one
    Recipe(default=LayerConfig(bits=4), overrides=[Override("blocks.*", bits=8)], skip=["blocks.0.*"]).resolve(layers)
    recipe.strict = False
    assert recipe.resolve(layers)["head"].config is None


def test_no_default_compresses_only_matched(layers):
    plans = Recipe(overrides=[Override("*.mlp.*", bits=4)]).resolve(layers)
    compressed = sorted(n for n, p in plans.items() if p.config is not None)
    assert compressed == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    assert plans["head"].reason == "no recipe rule matches"


def test_unmatched_pattern_is_an_error_when_strict(layers):
    recipe = Recipe(default=LayerConfig(bits=4), overrides=[Override("blocks.*.atn.*", bits=8)], skip=["stemm"])
    with pytest.raises(RecipeError) as info:
        recipe.resolve(layers)
    assert "'blocks.*.atn.*'" in str(info.value) and "'stemm'" in str(info.value)
    recipe.strict = False
    recipe.resolve(layers)


def test_impossible_patterns_name_every_layer(layers):
    # stem: 3 input channels cannot take 2:4 (channels-last groups); head: 16 columns can
    recipe = Recipe(
        default=LayerConfig(prune="nm", n=2, m=4), overrides=[Override("blocks.*.mlp.2", prune="nm", n=3, m=5)]
    )
    with pytest.raises(RecipeError) as info:
        recipe.resolve(layers)
    text = str(info.value)
    assert "layer 'stem'" in text and "input channels" in text
    assert "layer 'blocks.0.mlp.2'" in text and "layer 'blocks.1.mlp.2'" in text
    assert "head" not in text
    with pytest.raises(RecipeError, match="group_size=5 must divide"):
        Recipe(default=LayerConfig(bits=4, group_size=5), skip=["stem"]).resolve(layers)
    with pytest.raises(RecipeError, match="block=3"):
        Recipe(default=LayerConfig(prune="blocked", sparsity=0.5, block=3), skip=["stem"]).resolve(layers)


@pytest.mark.parametrize(
    "config, message",
    [
        (LayerConfig(), "does nothing"),
        (LayerConfig(prune="unstructured"), "sparsity"),
        (LayerConfig(prune="unstructured", sparsity=1.5), "sparsity"),
        (LayerConfig(prune="nm", n=4, m=4), "0 < n < m"),
        (LayerConfig(prune="sparse", sparsity=0.5), "prune must be"),
        (LayerConfig(bits=1), "bits"),
        (LayerConfig(bits=4, method="gptq"), "method"),
        (LayerConfig(bits=4, grid="max"), "grid"),
        (LayerConfig(bits=4, damp=-1.0), "damp"),
        (LayerConfig(prune="blocked", sparsity=0.5, spread="rows"), "spread"),
    ],
)
def test_invalid_configs(layers, config, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(default=config).resolve(layers)


def test_unknown_override_field():
    with pytest.raises(RecipeError, match="unknown field"):
        Override("head", bitz=4)


def test_json_and_yaml_files(tmp_path, layers):
    data = {
        "default": {"prune": "nm", "n": 2, "m": 4, "bits": 4, "sym": False},
        "overrides": [{"pattern": "head", "prune": None, "bits": 8}],
        "skip": ["stem"],
    }
    expected = Recipe(
        default=LayerConfig(prune="nm", n=2, m=4, bits=4, sym=False),
        overrides=[Override("head", prune=None, bits=8)],
        skip=["stem"],
    )
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(data))
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(
        "default: {prune: nm, n: 2, m: 4, bits: 4, sym: false}\n"
        "overrides:\n  - {pattern: head, prune: null, bits: 8}\n"
        "skip: [stem]\n"
    )
    assert load_recipe(json_path) == expected
    assert load_recipe(yaml_path) == expected
    assert as_recipe(str(yaml_path)) == expected
    assert Recipe.from_dict(expected.to_dict()) == expected
    assert configs(expected, layers)["head"] == LayerConfig(prune=None, n=2, m=4, bits=8, sym=False)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: [unclosed\n")
    with pytest.raises(RecipeError, match="could not parse"):
        load_recipe(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"defaults": {"bits": 4}}))
    with pytest.raises(RecipeError, match="unknown recipe key"):
        load_recipe(unknown)
    field = tmp_path / "field.json"
    field.write_text(json.dumps({"default": {"bit": 4}}))
    with pytest.raises(RecipeError, match="unknown field"):
        load_recipe(field)


def test_labels():
    assert LayerConfig(prune="nm", n=2, m=4, bits=4).label == "2:4+int4"
    assert LayerConfig(prune="unstructured", sparsity=0.5).label == "unstructured 50%"
    assert LayerConfig(bits=3, sym=False, group_size=64).label == "int3 asym g64"


def test_as_recipe_types():
    assert as_recipe(LayerConfig(bits=4)) == Recipe(default=LayerConfig(bits=4))
    with pytest.raises(TypeError):
        as_recipe(torch.zeros(1))


NUMERIC_FIELDS = {"sparsity": 0.5, "n": 2, "m": 4, "block": 4, "bits": 4, "group_size": 8, "damp": 0.01}


@pytest.mark.parametrize("field", sorted(NUMERIC_FIELDS))
@pytest.mark.parametrize(
    "text, shown",
    [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan"), ("true", "True"), ("2024-01-01", "datetime.date"),
     ("'0.5'", "'0.5'"), ("[1, 2]", "[1, 2]"), ("{a: 1}", "{'a': 1}")],
)
@pytest.mark.parametrize("where", ["default", "override"])
def test_numeric_fields_reject_non_numbers(tmp_path, field, text, shown, where):
    """NaN, infinities, bools, dates, strings, lists and mappings: a RecipeError naming field and file."""
    path = tmp_path / "r.yaml"
    fields = {"prune": "unstructured", "sparsity": 0.5, "bits": 4, field: "VALUE"}
    body = "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"
    if where == "default":
        path.write_text(f"default: {body}\n".replace("VALUE", text))
    else:
        path.write_text(f"overrides:\n  - {{pattern: head, {body[1:]}\n".replace("VALUE", text))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and f"{field} must be" in message and shown in message


@pytest.mark.parametrize("field, value", [("damp", float("inf")), ("sparsity", float("nan")), ("bits", True),
                                          ("n", 2.0), ("group_size", "8"), ("damp", -1.0)])
def test_numeric_fields_checked_in_python_recipes(layers, field, value):
    with pytest.raises(RecipeError, match=f"override 'head': {field} must be"):
        Override("head", **{field: value})
    config = LayerConfig(**{"prune": "unstructured", "sparsity": 0.5, field: value})
    with pytest.raises(RecipeError, match=f"{field} must be"):
        Recipe(default=config).resolve(layers)


def test_numeric_fields_accept_numbers(layers):
    import numpy as np

    config = LayerConfig(prune="blocked", sparsity=np.float64(0.25), block=np.int64(4), bits=4, damp=0)
    Recipe(default=config, skip=["stem"]).resolve(layers)
    Override("head", sparsity=1, damp=0.0, group_size=None, bits=None)


def test_an_invalid_configuration_is_reported_once(tmp_path, layers):
    path = tmp_path / "r.yaml"
    path.write_text("default: {prune: unstructured}\noverrides:\n  - {pattern: 'blocks.*', sparsity: 0.5}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path).resolve(layers)
    message = str(info.value)
    assert message.count("needs sparsity") == 1, message
    assert f"recipe file {str(path)!r}" in message and "layers 'stem', 'head'" in message
    path.write_text("default: {prune: unstructured}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path).resolve(layers)
    assert str(info.value).count("needs sparsity") == 1 and f"all {len(layers)} layers" in str(info.value)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("default: {bits: 4}  # d\xe9faut\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=f"{path}.*not UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["overrides: {pattern: head, bits: 8}", "overrides: head", "skip: stem",
                                  "default: {bits: 4}\nstrict: 1", "default: {bits: 4}\nskip: [1]"])
def test_recipe_structure_errors_name_the_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text + "\n")
    with pytest.raises(RecipeError, match=f"recipe file {str(path)!r}: recipe '(overrides|skip|strict)'|"
                                          f"recipe file {str(path)!r}: skip patterns"):
        load_recipe(path)


def test_repr_of_configs_without_later_fields_is_unchanged():
    # Checkpoint fingerprints hash repr(recipe): a configuration that does not use a field added
    # later (structured_group) must print as earlier versions printed it, or every checkpoint
    # directory written before would be refused on resume as another run's.
    before = ("LayerConfig(prune='structured', sparsity=0.5, n=2, m=4, block=4, spread='global', bits=4, "
              "sym=True, group_size=None, grid='mse', method='obc', damp=0.01, quant_method='auto', "
              "refine=True, prune_method='exact')")
    assert repr(LayerConfig(prune="structured", sparsity=0.5, bits=4)) == before
    grouped = LayerConfig(prune="structured", sparsity=0.5, bits=4, structured_group=4)
    assert repr(grouped) == before[:-1] + ", structured_group=4)"
    assert eval(repr(grouped)) == grouped
