"""Recipes choose the quantizer (quant_method, refine) and the pruner (prune_method): parsing,
validation, compress() against direct numpy calls on the same Hessians, report fields, and level
databases that record their quantizer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP, TinyCNN

import obc_native
from obc_native import budget as B
from obc_native.torch import (
    CompressionReport,
    LayerConfig,
    Recipe,
    RecipeError,
    collect_hessians,
    compress,
    find_layers,
    load_recipe,
)
from obc_native.torch.layers import channels_last_perm, weight_matrix
from obc_native.torch.nonuniform import level_config
from obc_native.torch.report import LayerReport

pytestmark = pytest.mark.torch


# ------------------------------------------------------------------------------------------
# recipes


def test_recipe_fields_parse_and_default():
    config = LayerConfig()
    assert (config.quant_method, config.refine, config.prune_method) == ("auto", True, "exact")
    recipe = Recipe.from_dict(
        {
            "default": {"bits": 4, "quant_method": "gptq", "refine": False},
            "overrides": [{"pattern": "a", "prune": "nm", "prune_method": "sparsegpt"}],
        }
    )
    assert recipe.default.quant_method == "gptq" and recipe.default.refine is False
    config, _ = recipe.config_for("a")
    assert config.prune_method == "sparsegpt" and config.quant_method == "gptq"
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    "field, value",
    [
        ("quant_method", "gptq_natural"),
        ("quant_method", "obc"),  # the `method` field's value, not a quantizer
        ("quant_method", ["obq", "gptq"]),
        ("quant_method", None),
        ("refine", "yes"),
        ("refine", 1),
        ("prune_method", "obc"),
        ("prune_method", "SparseGPT"),
        ("prune_method", None),
    ],
)
def test_bad_values_name_the_field_and_file(field, value, tmp_path):
    with pytest.raises(RecipeError, match=rf"{field} must be"):
        Recipe.from_dict({"default": {"bits": 4, field: value}})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"default": {"bits": 4}, "overrides": [{"pattern": "x", field: value}]}))
    with pytest.raises(RecipeError, match=rf"recipe file '{path}'.*override 'x': {field} must be"):
        load_recipe(path)


def test_inconsistent_choices_name_the_field_and_file(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"default": {"prune": "structured", "sparsity": 0.25, "prune_method": "sparsegpt"}}))
    with pytest.raises(RecipeError, match=rf"recipe file '{path}'(.|\n)*prune_method='sparsegpt' has no structured"):
        compress(MLP(), [torch.randn(8, 16)], load_recipe(path), quiet=True)
    with pytest.raises(RecipeError, match="quant_method and prune_method choose the solvers"):
        LayerConfig(bits=4, method="rtn", quant_method="gptq").check()
    with pytest.raises(RecipeError, match="quant_method and prune_method choose the solvers"):
        LayerConfig(prune="nm", method="magnitude", prune_method="sparsegpt").check()
    # the structured baseline ignores the Hessian solvers: no SparseGPT rule to break
    LayerConfig(prune="structured", sparsity=0.5, prune_method="exact", method="magnitude").check()


# ------------------------------------------------------------------------------------------
# compress() equals direct numpy calls on the same Hessians


def _dense_inputs(model, batches):
    """Each layer's dense weight matrix (channels-last for convs) and Hessian, and the perm."""
    stats = collect_hessians(copy.deepcopy(model), batches)
    out = {}
    for name, info in find_layers(model).items():
        perm = channels_last_perm(info)
        W = weight_matrix(info).to(torch.float32).numpy()
        H = stats[name].hessians()[0]
        if perm is not None:
            W, H = np.ascontiguousarray(W[:, perm]), np.ascontiguousarray(H[np.ix_(perm, perm)])
        out[name] = (W, H, perm)
    return out


def _native(weight, perm):
    if perm is None:
        return weight
    native = np.empty_like(weight)
    native[:, perm] = weight
    return native


def _compressed(model, name):
    return weight_matrix(find_layers(model)[name]).numpy()


@pytest.mark.parametrize(
    "quant_method, refine",
    [("auto", True), ("obq", False), ("gptq", True), ("gptq-natural", False), ("rtn", True)],
)
def test_quant_methods_match_numpy(mlp, mlp_batches, quant_method, refine):
    inputs = _dense_inputs(mlp, mlp_batches)
    config = LayerConfig(bits=3, sym=False, quant_method=quant_method, refine=refine)
    report = compress(mlp, mlp_batches, config, correction=None, baseline=False, quiet=True)
    for layer in report.compressed:
        W, H, _ = inputs[layer.name]
        direct = obc_native.quantize(W, H, 3, sym=False, method=quant_method, refine=refine)
        np.testing.assert_array_equal(_compressed(mlp, layer.name), direct.weight)
        names, counts = np.unique(direct.row_method_names(), return_counts=True)
        assert layer.quant_rows == dict(zip(names.tolist(), counts.tolist()))
        assert sum(layer.quant_rows.values()) == W.shape[0]
        assert layer.quant_loss == direct.loss and layer.quant_loss_unrefined == direct.loss_unrefined
        if not refine:
            assert layer.quant_loss == layer.quant_loss_unrefined
    if quant_method != "auto":
        assert all(set(layer.quant_rows) == {quant_method} for layer in report.compressed)


@pytest.mark.parametrize("quant_method", ["gptq", "obq"])
def test_quant_methods_on_convs_run_channels_last(cnn, cnn_batches, quant_method):
    inputs = _dense_inputs(cnn, cnn_batches)
    config = LayerConfig(bits=3, quant_method=quant_method)
    report = compress(cnn, cnn_batches, config, correction=None, baseline=False, quiet=True)
    assert [layer.name for layer in report.compressed] == ["conv1", "conv2", "fc"]
    for layer in report.compressed:
        W, H, perm = inputs[layer.name]
        direct = obc_native.quantize(W, H, 3, method=quant_method)
        np.testing.assert_array_equal(_compressed(cnn, layer.name), _native(direct.weight, perm))
        assert layer.quant_rows == {quant_method: W.shape[0]}


def test_auto_is_the_default_and_refinement_helps(mlp, mlp_batches):
    inputs = _dense_inputs(mlp, mlp_batches)
    report = compress(mlp, mlp_batches, LayerConfig(bits=3), correction=None, baseline=False, quiet=True)
    for layer in report.compressed:
        W, H, _ = inputs[layer.name]
        np.testing.assert_array_equal(_compressed(mlp, layer.name), obc_native.quantize(W, H, 3).weight)
        assert set(layer.quant_rows) <= {"obq", "gptq"}
        assert layer.quant_loss <= layer.quant_loss_unrefined
    table = report.table()
    assert "quantizers" in table and "refined" in table and " -> " in table


def test_sparsegpt_joint_sweep_on_cnn(cnn, cnn_batches):
    """prune_method='sparsegpt' + bits + quant_method='auto': one prune_quantize_sparsegpt sweep,
    convs in channels-last column order."""
    inputs = _dense_inputs(cnn, cnn_batches)
    recipe = Recipe(
        default=LayerConfig(prune="nm", n=2, m=4, bits=4, prune_method="sparsegpt"),
        skip=["conv1"],  # one input channel: 2:4 groups need 4
    )
    report = compress(cnn, cnn_batches, recipe, correction=None, baseline=False, quiet=True)
    assert [layer.name for layer in report.compressed] == ["conv2", "fc"]
    for layer in report.compressed:
        W, H, perm = inputs[layer.name]
        direct = obc_native.prune_quantize_sparsegpt(W, H, 4, n=2, m=4)
        expected = np.array(direct.weight, dtype=np.float32)
        expected[~direct.mask] = 0.0
        np.testing.assert_array_equal(_compressed(cnn, layer.name), _native(expected, perm))
        assert layer.quant_rows == {"gptq-natural": W.shape[0]}
        assert layer.quant_loss == direct.loss
    assert report.layer("conv2").config["prune_method"] == "sparsegpt"


def test_sparsegpt_pruning_then_chosen_quantizer(cnn, cnn_batches):
    """An explicit quant_method with SparseGPT pruning: prune, then quantize with it."""
    inputs = _dense_inputs(cnn, cnn_batches)
    recipe = Recipe(
        default=LayerConfig(prune="unstructured", sparsity=0.5, bits=4, prune_method="sparsegpt", quant_method="obq"),
        skip=["conv1"],
    )
    compress(cnn, cnn_batches, recipe, correction=None, baseline=False, quiet=True)
    for name in ("conv2", "fc"):
        W, H, perm = inputs[name]
        pruned = obc_native.prune_unstructured(W, H, 0.5, method="sparsegpt").weight
        q = np.array(obc_native.quantize(pruned, H, 4, method="obq").weight, dtype=np.float32)
        q[pruned == 0] = 0.0
        np.testing.assert_array_equal(_compressed(cnn, name), _native(q, perm))


@pytest.mark.parametrize("prune", ["unstructured", "nm", "blocked"])
def test_sparsegpt_pruning_alone(mlp, mlp_batches, prune):
    inputs = _dense_inputs(mlp, mlp_batches)
    config = LayerConfig(prune=prune, sparsity=0.5, block=4, prune_method="sparsegpt")
    report = compress(mlp, mlp_batches, config, correction=None, baseline=False, quiet=True)
    for layer in report.compressed:
        W, H, _ = inputs[layer.name]
        if prune == "unstructured":
            direct = obc_native.prune_unstructured(W, H, 0.5, method="sparsegpt")
        elif prune == "nm":
            direct = obc_native.prune_nm(W, H, 2, 4, method="sparsegpt")
        else:
            direct = obc_native.prune_blocked(W, H, 0.5, 4, method="sparsegpt")
        np.testing.assert_array_equal(_compressed(mlp, layer.name), direct.weight)
        assert layer.quant_rows is None and layer.quant_loss is None
    # ExactOBS differs (it is the default)
    exact = compress(MLP(), mlp_batches, LayerConfig(prune=prune, sparsity=0.5, block=4), correction=None, quiet=True)
    assert exact.layers[0].config["prune_method"] == "exact"


def test_sparsegpt_blocked_joint_sweep(mlp, mlp_batches):
    inputs = _dense_inputs(mlp, mlp_batches)
    config = LayerConfig(prune="blocked", sparsity=0.5, block=4, spread="uniform", bits=3, prune_method="sparsegpt")
    compress(mlp, mlp_batches, config, correction=None, baseline=False, quiet=True)
    for name, (W, H, _) in inputs.items():
        direct = obc_native.prune_quantize_sparsegpt(W, H, 3, sparsity=0.5, block=4, spread="uniform")
        expected = np.array(direct.weight, dtype=np.float32)
        expected[~direct.mask] = 0.0
        np.testing.assert_array_equal(_compressed(mlp, name), expected)


def test_baseline_reports_no_quantizers(mlp, mlp_batches):
    report = compress(mlp, mlp_batches, LayerConfig(bits=4, method="rtn"), correction=None, quiet=True)
    assert all(layer.quant_rows is None for layer in report.compressed)
    assert "quantizers" not in report.table()


# ------------------------------------------------------------------------------------------
# reports


def test_report_fields_round_trip_and_old_dicts(mlp, mlp_batches):
    report = compress(mlp, mlp_batches, LayerConfig(bits=4, quant_method="gptq"), correction=None, quiet=True)
    data = json.loads(report.to_json())
    layer = data["layers"][0]
    assert layer["quant_rows"] == {"gptq": 32}
    assert layer["quant_loss"] == report.layers[0].quant_loss
    assert CompressionReport.from_dict(data) == report
    for key in ("quant_rows", "quant_loss_unrefined", "quant_loss"):
        del layer[key]
    old = LayerReport.from_dict(layer)
    assert (old.quant_rows, old.quant_loss_unrefined, old.quant_loss) == (None, None, None)
    CompressionReport.from_dict(data).table()


def test_table_shows_counts_most_rows_first():
    layer = LayerReport(
        name="a", kind="Linear", shape=(768, 64), mode="int4", method="obc", bits=4, loss=1.0,
        quant_rows={"obq": 8, "gptq": 760}, quant_loss_unrefined=2.0, quant_loss=1.5,
    )
    table = CompressionReport(layers=[layer]).table()
    assert "gptq 760, obq 8" in table and "2 -> 1.5 (-25.0%)" in table


# ------------------------------------------------------------------------------------------
# level databases


def _layer_problem(seed=0, rows=8, cols=16):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((cols, 64))
    return rng.standard_normal((rows, cols)).astype(np.float32), 2 * X @ X.T / 64


def test_database_records_the_quantizer_and_reproduces_it(tmp_path):
    W, H = _layer_problem()
    layer = B.build_layer_levels(W, H, name="l", sparsities=(), nm=(), bits=[3], joint=[(2, 4, 4)],
                                 quant_method="gptq", refine=False)
    quant, joint = layer.levels[1], layer.levels[2]
    assert quant.params["method"] == "gptq" and quant.params["refine"] is False
    assert joint.params["method"] == "gptq"
    assert quant.loss == obc_native.quantize(W, H, 3, method="gptq", refine=False).loss
    path = tmp_path / "db.json"
    B.LevelDatabase([layer]).save(path)
    loaded = B.LevelDatabase.load(path)["l"]
    assert loaded.levels[1].params == quant.params
    for level in loaded.levels[1:]:
        assert B.apply_level(W, H, level).loss == level.loss
    config = level_config(loaded.levels[1])
    assert (config.quant_method, config.refine) == ("gptq", False)
    # the default: auto with refinement
    default = B.build_layer_levels(W, H, sparsities=(), nm=(), bits=[3])
    assert default.levels[1].params["method"] == "auto" and default.levels[1].params["refine"] is True
    assert default.levels[1].loss == obc_native.quantize(W, H, 3).loss
    with pytest.raises(ValueError, match="quant_method"):
        B.build_layer_levels(W, H, sparsities=(), nm=(), bits=[3], quant_method="best")


def test_old_database_levels_mean_obq_without_refinement(tmp_path):
    """A database saved before quantize() had methods: its quant / joint levels have no method,
    and their losses were OBQ's; loading must reproduce them."""
    W, H = _layer_problem(1)
    layer = B.build_layer_levels(W, H, name="l", sparsities=(), nm=(), bits=[3], joint=[(2, 4, 3)],
                                 quant_method="obq", refine=False)
    for level in layer.levels[1:]:
        del level.params["method"], level.params["refine"]
    path = tmp_path / "old.json"
    B.LevelDatabase([layer]).save(path)
    assert '"method"' not in path.read_text()
    loaded = B.LevelDatabase.load(path)["l"]
    for level in loaded.levels[1:]:
        assert B.level_quantizer(level) == ("obq", False)
        assert B.apply_level(W, H, level).loss == level.loss
    assert B.apply_level(W, H, loaded.levels[1]).loss != obc_native.quantize(W, H, 3).loss  # not auto
    config = level_config(loaded.levels[1])
    assert (config.quant_method, config.refine) == ("obq", False)


@pytest.mark.parametrize("key, value", [("method", "best"), ("method", 3), ("refine", "no")])
def test_database_with_a_bad_quantizer_is_rejected(tmp_path, key, value):
    W, H = _layer_problem(2)
    layer = B.build_layer_levels(W, H, name="l", sparsities=(), nm=(), bits=[3])
    layer.levels[1].params[key] = value
    path = tmp_path / "bad.json"
    B.LevelDatabase([layer]).save(path)
    with pytest.raises(B.LevelDatabaseError, match=rf"level 1: params '{key}' must be"):
        B.LevelDatabase.load(path)


def test_compress_budget_applies_the_database_quantizer(mlp_batches):
    model = MLP()
    levels = {"sparsities": (), "nm": (), "bits": (3, 8), "joint": [(2, 4, 4)], "quant_method": "gptq-natural",
              "refine": False}
    report = compress(model, mlp_batches, budget="bits=4.6", levels=levels, correction=None, quiet=True)
    db = report.database
    kinds = set()
    for layer in report.compressed:
        level = db[layer.name].level(layer.level)
        kinds.add(level.kind)
        assert level.params["method"] == "gptq-natural" and level.params["refine"] is False
        assert layer.quant_rows == {"gptq-natural": layer.shape[0]}
        assert layer.config["quant_method"] == "gptq-natural"
        # the quantizer's own loss, as a recipe reports it (a joint level's: against the pruned weights)
        assert layer.quant_loss is not None and layer.quant_loss_unrefined is not None
        if level.kind == "quant":
            # float32 layers: GPTQ's factor and sweep run in float32, so its own (step) loss
            # matches the measured one to float32 accuracy (measured 4e-8 relative), not 1e-9.
            assert layer.quant_loss == layer.quant_loss_unrefined == pytest.approx(layer.loss, rel=1e-5)
    assert kinds == {"quant", "joint"}
