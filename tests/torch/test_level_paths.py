"""A database level and a recipe are one description (a LayerConfig) solved by one solve():
compress(budget=) gives the same weights and report as compress(recipe) of the chosen levels'
configurations (obc_native.layer_solve, torch/solve.py; issue 16)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from obc_torch_helpers import TinyCNN

import obc_native
from obc_native.torch import LayerConfig, LevelSpec, Override, Recipe, build_database, compress
from obc_native.torch.layers import find_layers, weight_matrix

pytestmark = pytest.mark.torch


def test_one_layer_config_and_solve_everywhere():
    from obc_native.torch import nonuniform, recipe, solve

    assert recipe.LayerConfig is obc_native.LayerConfig is LayerConfig
    assert solve.UnitResult is obc_native.UnitResult
    assert nonuniform.level_config is obc_native.budget.level_config


@pytest.mark.parametrize("budget, quant", [("flops=2.5x", {}), ("bops=12x", {"joint": [(2, 4, 4)]}),
                                           ("bits=5", {"bits": (3, 6), "sym": False}),
                                           ("bops=12x", {"joint": [(2, 4, 4)], "prune_method": "sparsegpt"})])
def test_budget_levels_equal_the_recipe_of_their_configs(budget, quant):
    torch.manual_seed(0)
    dense = TinyCNN().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    levels = LevelSpec(sparsities=(0.4, 0.8), nm=[(2, 4)], **quant)
    db = build_database(copy.deepcopy(dense), batches, levels, quiet=True)
    by_budget = copy.deepcopy(dense)
    report = compress(by_budget, batches, budget=budget, database=db, correction=None, quiet=True)
    chosen = {layer.name: db[layer.name].level(layer.level) for layer in report.compressed}
    configs = {name: level.config(db[name].settings["damp"]) for name, level in chosen.items()}
    assert sum(c is not None for c in configs.values()) >= 2
    assert all(c is None or c.prune is None or c.prune_method == quant.get("prune_method", "exact")
               for c in configs.values())
    recipe = Recipe(overrides=[Override(name, **dataclasses.asdict(config))
                               for name, config in configs.items() if config is not None])
    by_recipe = copy.deepcopy(dense)
    report_recipe = compress(by_recipe, batches, recipe, correction=None, quiet=True)
    for name, info in find_layers(by_budget).items():
        assert torch.equal(weight_matrix(info), weight_matrix(find_layers(by_recipe)[name])), name
    for row in report.compressed:
        if configs[row.name] is None:
            continue
        other = report_recipe.layer(row.name)
        assert (row.loss, row.damp, row.mode, row.config) == (other.loss, other.damp, other.mode, other.config)
        assert (row.quant_rows, row.quant_loss, row.quant_loss_unrefined) == (
            other.quant_rows, other.quant_loss, other.quant_loss_unrefined)
        if row.grid is not None:
            np.testing.assert_array_equal(row.grid.scale, other.grid.scale)
            np.testing.assert_array_equal(row.grid.zero, other.grid.zero)


def test_sparsegpt_level_spec_is_recorded_in_the_levels_and_the_meta(tmp_path):
    torch.manual_seed(1)
    model = TinyCNN().eval()
    batches = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    spec = LevelSpec(sparsities=(0.5,), nm=[(2, 4)], prune_method="sparsegpt")
    db = build_database(model, batches, spec, quiet=True)
    assert db["fc"].labels == ["dense", "sparse:0.5@sparsegpt", "nm2:4@sparsegpt"]
    assert db["conv1"].skipped[0][0] == "nm2:4@sparsegpt"  # 1 input channel: no N:M
    assert db.meta["levels"]["prune_method"] == "sparsegpt"
    assert "prune_method" not in LevelSpec().to_dict()  # databases of ExactOBS levels: meta as before
    assert LevelSpec.from_dict(spec.to_dict()) == spec and LevelSpec.from_dict(LevelSpec().to_dict()) == LevelSpec()
    with pytest.raises(ValueError, match="prune_method"):
        LevelSpec(prune_method="fast")
