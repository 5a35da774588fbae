"""A compression plan is ``{layer name: LayerConfig}`` (torch/compress.py, issue 16): recipes and
budgets both turn into one, it can be read before running (recipe_plan, budget_plan) and
compress() runs a given plan with the results of the recipe / budget it came from, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from obc_torch_helpers import MLP, TinyCNN

from obc_native.torch import (
    LayerConfig,
    LevelSpec,
    Override,
    Recipe,
    RecipeError,
    budget_plan,
    build_database,
    compress,
    compress_to_budget,
    recipe_plan,
)
from obc_native.torch.layers import find_layers, weight_matrix

pytestmark = pytest.mark.torch


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    layers_b = find_layers(b)
    for name, info in find_layers(a).items():
        assert torch.equal(weight_matrix(info), weight_matrix(layers_b[name])), name
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_recipe_plan_is_layer_configs_and_runs_as_the_recipe():
    torch.manual_seed(0)
    dense = TinyCNN().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    recipe = Recipe(default=LayerConfig(prune="nm", n=2, m=4, bits=4),
                    overrides=[Override("fc", prune=None, bits=3)], skip=["conv1"])
    plan = recipe_plan(dense, recipe)
    assert list(plan) == ["conv2", "fc"]
    assert all(type(config) is LayerConfig for config in plan.values())
    assert plan["fc"] == LayerConfig(bits=3)

    by_recipe, by_plan = copy.deepcopy(dense), copy.deepcopy(dense)
    expected = compress(by_recipe, batches, recipe, quiet=True)
    report = compress(by_plan, batches, plan, quiet=True)
    _same_weights(by_recipe, by_plan)
    for row in expected.compressed:
        other = report.layer(row.name)
        assert (row.loss, row.baseline_loss, row.mode, row.config, row.samples) == (
            other.loss, other.baseline_loss, other.mode, other.config, other.samples)
    assert [row.name for row in report.skipped] == ["conv1"]
    assert report.layer("conv1").skipped == "not in the plan"


def test_plan_entries_mapped_to_none_are_left_alone():
    torch.manual_seed(1)
    model = MLP()
    before = copy.deepcopy(model)
    batches = [torch.randn(8, 16) for _ in range(2)]
    report = compress(model, batches, {"layers.1": LayerConfig(bits=4), "layers.2": None}, quiet=True)
    assert [row.name for row in report.compressed] == ["layers.1"]
    assert report.layer("layers.2").skipped == "dense in the plan"
    for name in ("layers.0", "layers.2"):
        assert torch.equal(weight_matrix(find_layers(model)[name]), weight_matrix(find_layers(before)[name]))


def test_a_bad_plan_is_refused_before_any_work():
    model = MLP()
    before = copy.deepcopy(model)
    batches = [torch.randn(8, 16)]
    with pytest.raises(RecipeError, match="'layers.9' is not a supported layer"):
        compress(model, batches, {"layers.9": LayerConfig(bits=4)}, quiet=True)
    with pytest.raises(RecipeError, match="(?s)plan cannot be applied.*layers.0"):
        compress(model, batches, {"layers.0": LayerConfig(prune="nm", n=2, m=3)}, quiet=True)  # 16 cols
    _same_weights(model, before)


@pytest.mark.parametrize("budget", ["flops=2.5x", "bits=5"])
def test_budget_plan_is_the_plan_compress_to_budget_runs(budget):
    torch.manual_seed(0)
    dense = TinyCNN().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    levels = LevelSpec(sparsities=(0.4, 0.8), nm=[(2, 4)], bits=(3, 6), sym=False)
    db = build_database(copy.deepcopy(dense), batches, levels, quiet=True)
    plan = budget_plan(dense, db, budget)
    assert list(plan) == db.names
    assert all(config is None or type(config) is LayerConfig for config in plan.values())
    assert any(config is not None for config in plan.values())

    by_budget, by_plan = copy.deepcopy(dense), copy.deepcopy(dense)
    report = compress_to_budget(by_budget, batches, budget, database=db, quiet=True)
    for row in report.compressed:  # the plan holds the chosen levels' configurations
        assert plan[row.name] == db[row.name].level(row.level).config(db[row.name].settings["damp"])
    compress(by_plan, batches, plan, quiet=True)
    _same_weights(by_budget, by_plan)


def test_budget_plan_checks_its_arguments():
    model = MLP()
    with pytest.raises(TypeError, match="database: expected a LevelDatabase or a path"):
        budget_plan(model, object(), "params=2x")
    with pytest.raises(ValueError, match="objective"):
        budget_plan(model, object(), "params=2x", objective="best")
    with pytest.raises(TypeError, match="objective: expected one of"):
        budget_plan(model, object(), "params=2x", objective=3)
