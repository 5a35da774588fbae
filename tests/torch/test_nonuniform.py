"""Non-uniform compression of models: level databases, budgets, stitching, save/load, CLI."""

from __future__ import annotations

import copy
import importlib
import json

import numpy as np
import pytest
import torch
from obc_torch_helpers import TinyCNN
from safetensors.torch import load_file
from torch import nn

import obc_native
from obc_native._arrays import count_for_sparsity
from obc_native.budget import BudgetSpec, InfeasibleBudgetError, LevelDatabase, LevelDatabaseError
from obc_native.cli import main
from obc_native.demo.model import WEIGHTS_PATH, DigitsCNN, evaluate, load_data, load_pretrained
from obc_native.torch import (
    CompressionReport,
    LayerConfig,
    LevelSpec,
    Recipe,
    RecipeError,
    build_database,
    collect_hessians,
    compress,
    flops_per_weight,
    load_compressed,
    load_database,
    measure_costs,
    read_manifest,
    save_compressed,
    uniform_sparsity,
)
from obc_native.torch.layers import channels_last_perm, find_layers, weight_matrix
from obc_native.torch.serialize import TENSORS_NAME

pytestmark = pytest.mark.torch

# DigitsCNN: weight matrix (out, in*kh*kw) and output positions per image of each layer
GEOMETRY = {
    "features.0": ((16, 9), 64),
    "features.3": ((32, 144), 16),
    "features.6": ((32, 288), 4),
    "classifier": ((10, 128), 1),
}
DENSE_FLOPS = sum(2 * rows * cols * positions for (rows, cols), positions in GEOMETRY.values())
TOTAL_WEIGHTS = sum(rows * cols for (rows, cols), _ in GEOMETRY.values())
PRUNE_LEVELS = LevelSpec(sparsities=(0.25, 0.5, 0.75, 0.9), nm=[(2, 4)])


@pytest.fixture(scope="module")
def digits():
    data = load_data()
    return data, load_pretrained(), data.calibration(128)


@pytest.fixture(scope="module")
def prune_db(digits):
    _, dense, calibration = digits
    return build_database(dense, calibration, PRUNE_LEVELS, quiet=True)


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, state):
    current = model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in state.items())


def nonzeros(model) -> dict[str, int]:
    return {name: int(torch.count_nonzero(weight_matrix(info))) for name, info in find_layers(model).items()}


def model_flops(model) -> float:
    counts = nonzeros(model)
    return sum(2.0 * counts[name] * positions for name, (_, positions) in GEOMETRY.items())


def stored_bits(directory, names) -> int:
    """Bits of the saved tensors of the named layers' weights (mask, values, codes, grid)."""
    tensors = load_file(str(directory / TENSORS_NAME))
    total = 0
    for key, tensor in tensors.items():
        base = key.split(":")[0]
        if base.endswith(".weight") and base[: -len(".weight")] in names:
            total += tensor.numel() * tensor.element_size() * 8
    return total


# ---------------------------------------------------------------------------------------------
# building


def test_database_of_the_digits_cnn(digits, prune_db):
    _, dense, calibration = digits
    db = prune_db
    assert db.names == list(GEOMETRY)  # execution order
    for name, ((rows, cols), positions) in GEOMETRY.items():
        layer = db[name]
        assert layer.shape == (rows, cols)
        assert layer.settings["flops_per_weight"] == positions
        assert layer.settings["column_order"] == ("channels_last" if name in ("features.3", "features.6") else "native")
        assert layer.level("dense").loss == 0.0
        assert layer.level("dense").costs["flops"] == 2 * rows * cols * positions
        losses = [layer.level(f"sparse:{s}").loss for s in (0.25, 0.5, 0.75, 0.9)]
        assert all(a < b for a, b in zip(losses, losses[1:]))
        # uniform spread: ceil(s * cols) zeros in every row
        assert layer.level("sparse:0.75").costs["params"] == rows * (cols - count_for_sparsity(cols, 0.75))
    # the first conv has one input channel: no 2:4 groups along input channels
    assert "nm2:4" not in db["features.0"].labels
    assert db["features.0"].skipped == [("nm2:4", "m 4 does not divide the input channels per group (1)")]
    assert db.dense_cost("flops") == DENSE_FLOPS
    assert measure_costs(dense, db)["flops"] == DENSE_FLOPS
    applications = flops_per_weight(dense, calibration)
    assert applications == {name: float(positions) for name, (_, positions) in GEOMETRY.items()}
    costs = ("params", "bits", "flops", "bops")
    assert measure_costs(dense, applications) == {cost: db.dense_cost(cost) for cost in costs}
    assert db.meta["levels"]["damp"] == 0.01 and db.meta["calibration"]["batches"] == 2

    # levels are solved in channels-last order, as compress does: 2:4 along input channels
    hessian = collect_hessians(dense, calibration, ["features.3"])["features.3"].hessians()[0]
    info = find_layers(dense)["features.3"]
    perm = channels_last_perm(info)
    W = weight_matrix(info).numpy()
    expected = obc_native.prune_nm(W[:, perm], hessian[np.ix_(perm, perm)], 2, 4)
    assert db["features.3"].level("nm2:4").loss == pytest.approx(expected.loss, rel=1e-9)
    expected = obc_native.prune_unstructured(W[:, perm], hessian[np.ix_(perm, perm)], 0.5, spread="uniform")
    assert db["features.3"].level("sparse:0.5").loss == pytest.approx(expected.loss, rel=1e-9)


def test_build_leaves_the_model_unchanged_and_selects_layers(digits):
    _, dense, calibration = digits
    model = copy.deepcopy(dense).train()
    state = state_copy(model)
    db = build_database(model, calibration, {"sparsities": [0.5], "nm": []}, skip=["features.0"], quiet=True)
    assert db.names == ["features.3", "features.6", "classifier"]
    assert model.training and all(m.training for m in model.modules())
    assert_state_equal(model, state)
    db = build_database(model.eval(), calibration, {"sparsities": [0.5]}, layers=["features.*"],
                        recipe=Recipe(default=LayerConfig(prune="nm"), skip=["features.6"]), quiet=True)
    assert db.names == ["features.0", "features.3"]
    with pytest.raises(RecipeError, match="'feature.9' matches no supported layer"):
        build_database(model, calibration, layers=["feature.9"], quiet=True)
    with pytest.raises(ValueError, match="unknown field"):
        build_database(model, calibration, {"sparsity": [0.5]}, quiet=True)


def test_stitched_model_losses(digits):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    state = state_copy(model)
    db = build_database(model, calibration, {"sparsities": [0.5, 0.9], "nm": []}, stitch=True, quiet=True)
    assert_state_equal(model, state)
    assert db.meta["stitch"] == {"loss": "mse", "batches": 2}
    for layer in db:
        assert layer.level("dense").model_loss == 0.0
        assert 0 < layer.level("sparse:0.5").model_loss < layer.level("sparse:0.9").model_loss

    # by hand: only features.6 pruned to its level's weights, MSE of the logits against dense
    level = db["features.6"].level("sparse:0.9")
    info = find_layers(model)["features.6"]
    hessian = collect_hessians(model, calibration, ["features.6"])["features.6"].hessians()[0]
    perm = channels_last_perm(info)
    W = weight_matrix(info).numpy()
    pruned = obc_native.apply_level(W[:, perm], hessian[np.ix_(perm, perm)], level).weight
    native = np.empty_like(pruned)
    native[:, perm] = pruned
    x = torch.cat(calibration)
    with torch.no_grad():
        reference = model(x).double()
        model.features[6].weight.copy_(torch.from_numpy(native).reshape(32, 32, 3, 3))
        expected = float(torch.mean((model(x).double() - reference) ** 2))
    assert level.model_loss == pytest.approx(expected, rel=1e-6)

    # a task loss on (images, labels) batches: the increase over the dense model's
    data = load_data()
    labelled = list(zip(data.train_x[:128].split(64), data.train_y[:128].split(64)))
    model = copy.deepcopy(dense)
    task = build_database(
        model, labelled, {"sparsities": [0.9], "nm": []}, layers=["classifier"], stitch=True, quiet=True,
        forward=lambda net, batch: net(batch[0]),
        loss_fn=lambda output, batch: nn.functional.cross_entropy(output, batch[1]),
    )
    assert task.meta["stitch"]["loss"] == "loss_fn"
    assert task["classifier"].level("dense").model_loss == 0.0
    with torch.no_grad():
        dense_loss = np.mean([float(nn.functional.cross_entropy(dense(x), y)) for x, y in labelled])
        model.classifier.weight.copy_(
            torch.from_numpy(obc_native.apply_level(
                weight_matrix(find_layers(model)["classifier"]).numpy(),
                collect_hessians(model, labelled, ["classifier"], forward=lambda net, b: net(b[0]))[
                    "classifier"].hessians()[0],
                task["classifier"].level("sparse:0.9"),
            ).weight)
        )
        pruned_loss = np.mean([float(nn.functional.cross_entropy(model(x), y)) for x, y in labelled])
    assert task["classifier"].level("sparse:0.9").model_loss == pytest.approx(pruned_loss - dense_loss, rel=1e-6)


def test_grouped_conv_and_token_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            y = torch.relu(self.conv(x))  # (B, 8, 4, 4)
            return self.proj(y.flatten(2).transpose(1, 2))  # 16 tokens of 8 features

    torch.manual_seed(0)
    model = Net().eval()
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 4, 4, 4, generator=generator) for _ in range(2)]
    assert flops_per_weight(model, batches) == {"conv": 16.0, "proj": 16.0}
    db = build_database(model, batches, {"sparsities": [0.5], "nm": [(2, 4)]}, quiet=True)
    conv = db["conv"]
    assert conv.shape == (8, 18) and conv.settings["groups"] == 2
    assert "nm2:4" not in conv.labels  # 2 input channels per group
    hessians = collect_hessians(model, batches, ["conv"])["conv"].hessians()
    perm = channels_last_perm(find_layers(model)["conv"])
    W = weight_matrix(find_layers(model)["conv"]).numpy()
    expected = sum(
        obc_native.prune_unstructured(W[g * 4 : (g + 1) * 4][:, perm], h[np.ix_(perm, perm)], 0.5,
                                      spread="uniform").loss
        for g, h in enumerate(hessians)
    )
    assert conv.level("sparse:0.5").loss == pytest.approx(expected, rel=1e-9)
    assert db["proj"].level("nm2:4").costs["flops"] == 2 * 32 * 16

    report = compress(model, batches, budget="flops=1.5x", database=db, quiet=True)
    budget = (2 * 8 * 18 * 16 + 2 * 8 * 8 * 16) / 1.5
    assert report.budget["budget"] == pytest.approx(budget)
    flops = sum(2 * int(torch.count_nonzero(m.weight)) * 16 for m in (model.conv, model.proj))
    assert report.budget["achieved"]["flops"] == flops <= budget


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_and_mismatch(digits, prune_db, tmp_path):
    _, dense, calibration = digits
    path = tmp_path / "levels.json"
    prune_db.save(path)
    loaded = load_database(path, dense)
    assert loaded.to_dict() == prune_db.to_dict()
    assert obc_native.solve_budget(loaded, "flops=2x").labels == obc_native.solve_budget(prune_db, "flops=2x").labels

    other = TinyCNN()
    with pytest.raises(LevelDatabaseError, match="does not match the model: layers not in the model"):
        load_database(path, other)
    wider = DigitsCNN()
    wider.classifier = nn.Linear(128, 12)
    with pytest.raises(LevelDatabaseError, match=r"classifier: database \(10, 128\), model \(12, 128\)"):
        load_database(path, wider)
    state = state_copy(wider)
    with pytest.raises(LevelDatabaseError, match="shape mismatch"):
        compress(wider, calibration, budget="flops=2x", database=str(path), quiet=True)
    assert_state_equal(wider, state)
    # a recipe selecting other layers than the database has
    with pytest.raises(LevelDatabaseError, match="layers not in the model"):
        load_database(path, dense, recipe=Recipe(default=LayerConfig(prune="nm"), skip=["features.0"]))


# ---------------------------------------------------------------------------------------------
# compress with a budget


@pytest.mark.parametrize("spec", ["flops=2x", "flops=3.5x", "params=3x", "params=4000"])
def test_budget_is_never_exceeded(digits, prune_db, spec):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    report = compress(model, calibration, budget=spec, database=prune_db, quiet=True)
    cost, value = spec.split("=")
    if value.endswith("x"):
        dense_cost = DENSE_FLOPS if cost == "flops" else TOTAL_WEIGHTS
        budget = dense_cost / float(value[:-1])
    else:
        budget = float(value)
    achieved = model_flops(model) if cost == "flops" else sum(nonzeros(model).values())
    assert achieved <= budget
    assert report.budget["budget"] == pytest.approx(budget)
    assert report.budget["achieved"][cost] == achieved
    assert report.budget["achieved"][cost] <= report.budget["cost"] <= budget
    # every layer at its chosen level: same mask count and loss as in the database
    for layer in report.compressed:
        level = prune_db[layer.name].level(layer.level)
        assert layer.level_costs == level.costs
        assert layer.loss == pytest.approx(level.loss, rel=1e-6, abs=1e-12)
        assert nonzeros(model)[layer.name] == level.costs["params"]
    table = report.table()
    assert "level" in table and f"budget {report.budget['spec']}" in table


def test_bits_budget_is_never_exceeded_on_disk(digits, tmp_path):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    levels = LevelSpec(sparsities=(0.5, 0.8), nm=[(2, 4)], bits=(3, 4, 8), joint=[(2, 4, 4)], sym=False)
    report = compress(model, calibration, budget="bits=4.5", levels=levels, quiet=True)
    db = report.database
    assert report.budget["budget"] == 4.5 * TOTAL_WEIGHTS
    chosen = {layer.name: layer.level for layer in report.compressed}
    assert any(label.startswith(("q", "nm2:4+q")) for label in chosen.values()), chosen
    save_compressed(model, tmp_path / "out", report)
    on_disk = stored_bits(tmp_path / "out", set(GEOMETRY))
    assert on_disk == report.budget["achieved"]["bits"] <= 4.5 * TOTAL_WEIGHTS
    assert on_disk <= sum(db[name].level(label).costs["bits"] for name, label in chosen.items())
    manifest = read_manifest(tmp_path / "out")
    assert {name: entry["level"] for name, entry in manifest["layers"].items()} == chosen
    restored = DigitsCNN()
    load_compressed(restored, tmp_path / "out")
    assert_state_equal(restored, model.state_dict())
    again = CompressionReport.from_dict(json.loads(report.to_json()))
    assert again.budget == report.budget and [layer.level for layer in again.layers] == list(chosen.values())


def test_recipe_selects_layers_and_skipped_layers_are_reported(digits):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    state = state_copy(model)
    recipe = Recipe(default=LayerConfig(prune="nm"), skip=["features.0"])
    report = compress(model, calibration, recipe, budget="flops=2x", levels=PRUNE_LEVELS, quiet=True)
    assert report.database.names == ["features.3", "features.6", "classifier"]
    assert [layer.name for layer in report.skipped] == ["features.0"]
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    assert report.budget["budget"] == pytest.approx(report.database.dense_cost("flops") / 2)


def test_nonuniform_beats_uniform_at_the_same_flops(digits):
    data, dense, calibration = digits
    torch.manual_seed(0)
    calibration = data.calibration(256)
    levels = LevelSpec(sparsities=tuple(round(0.05 * i, 2) for i in range(1, 20)), nm=())
    db = build_database(dense, calibration, levels, stitch=True, quiet=True)
    for factor in (2, 3):
        spec = f"flops={factor}x"
        ours = copy.deepcopy(dense)
        compress(ours, calibration, budget=spec, database=db, baseline=False, quiet=True)
        sparsity = uniform_sparsity(db, spec)
        uniform = copy.deepcopy(dense)
        compress(uniform, calibration, LayerConfig(prune="unstructured", sparsity=sparsity), baseline=False, quiet=True)
        budget = DENSE_FLOPS / factor
        assert model_flops(ours) <= budget and model_flops(uniform) <= budget
        assert model_flops(uniform) > 0.99 * budget  # the smallest sparsity that meets the budget
        accuracy, loss = evaluate(ours, data.test_x, data.test_y)
        uniform_accuracy, uniform_loss = evaluate(uniform, data.test_x, data.test_y)
        assert accuracy >= uniform_accuracy, factor
        assert loss < uniform_loss, factor


def test_uniform_sparsity(prune_db):
    s = uniform_sparsity(prune_db, "flops=2x")
    assert s == 0.5  # every layer's weight count is even
    s = uniform_sparsity(prune_db, "params=3x", spread="uniform")
    zeros = sum(rows * count_for_sparsity(cols, s) for (rows, cols), _ in GEOMETRY.values())
    assert TOTAL_WEIGHTS - zeros <= TOTAL_WEIGHTS / 3
    assert uniform_sparsity(prune_db, "flops=1x") == 0.0
    assert uniform_sparsity(prune_db, "flops=0") == 1.0
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable bits"):
        uniform_sparsity(prune_db, "bits=0")  # the bitmasks remain


# ---------------------------------------------------------------------------------------------
# bad input


def test_infeasible_budget_states_the_smallest_cost(digits, prune_db, monkeypatch):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    state = state_copy(model)
    smallest = prune_db.min_cost("flops")
    with pytest.raises(InfeasibleBudgetError, match=f"smallest achievable flops is {smallest!r}") as info:
        compress(model, calibration, budget="flops=100x", database=prune_db, quiet=True)
    assert info.value.min_cost == smallest
    assert_state_equal(model, state)
    # built on the fly: the same error type before the database is built (from the layers'
    # shapes and the levels), with a lower bound of the smallest cost; the model untouched
    def no_build(*args, **kwargs):
        raise AssertionError("the level database was built for an infeasible budget")

    monkeypatch.setattr(importlib.import_module("obc_native.torch.compress"), "_build", no_build)
    with pytest.raises(InfeasibleBudgetError, match="checked before building the level database") as info:
        compress(model, calibration, budget="flops=100x", levels=PRUNE_LEVELS, quiet=True)
    assert 0 < info.value.min_cost <= smallest
    assert_state_equal(model, state)


def test_bad_budgets(digits, prune_db):
    _, dense, calibration = digits
    model = copy.deepcopy(dense)
    state = state_copy(model)
    with pytest.raises(ValueError, match="unknown cost type 'latency'"):
        compress(model, calibration, budget="latency=2x", quiet=True)
    with pytest.raises(ValueError, match="unknown cost type 'latency'"):
        compress(model, calibration, budget="latency=2x", database=prune_db, quiet=True)
    with pytest.raises(ValueError, match=">= 0"):
        compress(model, calibration, budget="flops=-2x", quiet=True)
    with pytest.raises(ValueError, match=">= 0"):
        compress(model, calibration, budget=BudgetSpec("flops", -1.0, "absolute"), database=prune_db, quiet=True)
    with pytest.raises(ValueError, match="COST=VALUE"):
        compress(model, calibration, budget="two times fewer flops", quiet=True)
    with pytest.raises(TypeError, match="budget"):
        compress(model, calibration, budget=2.0, quiet=True)
    with pytest.raises(ValueError, match="sequential"):
        compress(model, calibration, budget="flops=2x", sequential=True, quiet=True)
    with pytest.raises(ValueError, match="pass budget="):
        compress(model, calibration, LayerConfig(prune="nm"), database=prune_db, quiet=True)
    with pytest.raises(ValueError, match="recipe"):
        compress(model, calibration, quiet=True)
    with pytest.raises(ValueError, match="stitch=True"):
        compress(model, calibration, budget="flops=2x", objective="model", quiet=True)
    with pytest.raises(ValueError, match="no model_loss"):
        compress(model, calibration, budget="flops=2x", database=prune_db, objective="model", quiet=True)
    with pytest.raises(ValueError, match="objective"):
        compress(model, calibration, budget="flops=2x", objective="best", quiet=True)
    with pytest.raises(TypeError, match="objective: expected one of"):  # a wrong type
        compress(model, calibration, budget="flops=2x", objective=None, quiet=True)
    with pytest.raises(TypeError, match="database"):
        compress(model, calibration, budget="flops=2x", database={"layers": []}, quiet=True)
    assert_state_equal(model, state)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_budget_end_to_end(tmp_path, capsys):
    calibration = tmp_path / "calib.pt"
    torch.save(load_data().train_x[:96].clone(), calibration)
    base = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN"]
    base += ["--calibration", str(calibration), "--database", str(tmp_path / "levels.json")]
    levels = ["--levels", '{"sparsities": [0.25, 0.5, 0.75, 0.9]}']
    assert main([*base, "--budget", "flops=2x", *levels, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "level database saved to" in printed and "budget flops=2x" in printed
    db = LevelDatabase.load(tmp_path / "levels.json")
    assert db.names == list(GEOMETRY)

    model = DigitsCNN()
    load_compressed(model, tmp_path / "a")
    assert model_flops(model) <= DENSE_FLOPS / 2
    assert main(["report", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "a")
    for name in GEOMETRY:
        level = next(layer["level"] for layer in manifest["report"]["layers"] if layer["name"] == name)
        assert level in db[name].labels
        if name in manifest["layers"]:
            assert f"{name}: " in printed and f"level {level}" in printed

    # the saved database is reused for another budget
    assert main([*base, "--budget", "params=3x", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    model = DigitsCNN()
    load_compressed(model, tmp_path / "b")
    assert sum(nonzeros(model).values()) <= TOTAL_WEIGHTS / 3

    assert main([*base, "--budget", "flops=100x", "--out", str(tmp_path / "c")]) == 1
    error = capsys.readouterr().err
    assert f"smallest achievable flops is {db.min_cost('flops')!r}" in error
    assert main([*base, "--budget", "flops=2x", *levels, "--out", str(tmp_path / "c")]) == 1
    assert "--levels and --stitch apply when building" in capsys.readouterr().err
    assert main([*base[:-2], "--budget", "speed=2x", "--out", str(tmp_path / "c")]) == 1
    assert "unknown cost type 'speed'" in capsys.readouterr().err
    assert main([*base[:-2], "--out", str(tmp_path / "c")]) == 1
    assert "--recipe" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("cost, levels", [
    ("params", PRUNE_LEVELS), ("flops", {"sparsities": [0.5, 0.9], "nm": [(2, 4)], "block": 4}),
    ("bits", {"sparsities": [], "nm": [], "bits": [2, 4], "group_size": 8}),
    ("bops", {"sparsities": [0.5], "bits": [4], "joint": [(2, 4, 4)], "act_bits": "same"}),
])
def test_the_feasibility_check_before_building_never_refuses_a_reachable_budget(cost, levels):
    """check_budget_reachable's bound is at most the built database's smallest cost, for every
    cost type and kind of level (dead inputs included: their weights are zeroed by the solvers)."""
    from obc_native.torch.budgeting import check_budget_reachable
    from obc_native.torch.database import _as_level_spec
    from obc_native.torch.hessian import LayerHooks
    from obc_native.torch.calibration import run_calibration
    from obc_native.torch.level_calibration import _Applications

    torch.manual_seed(0)
    model = TinyCNN().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    batches[0][:, :, :, :2] = 0  # some dead positions
    batches[1][:, :, :, :2] = 0
    with torch.no_grad():
        model.fc.weight[:, :3] = 0  # a few weights zero already
    db = build_database(model, batches, levels, quiet=True)
    infos = {name: info for name, info in find_layers(model).items() if name in db}
    counting = _Applications(infos)
    with LayerHooks(infos) as hooks, counting:
        count = run_calibration(model, batches, hooks)
    per_sample = {name: total / count for name, total in counting.totals.items()}
    spec = _as_level_spec(levels)
    exact = BudgetSpec(cost, db.min_cost(cost), "absolute")
    check_budget_reachable(exact, {n: infos[n] for n in db.names}, hooks.hessians, per_sample, spec)
    below = BudgetSpec(cost, db.min_cost(cost) * 0.5, "absolute")
    if not (spec.bits or spec.joint):  # quantized levels: non-zeros bounded by 0 only, a loose bound
        with pytest.raises(InfeasibleBudgetError, match="checked before building"):
            check_budget_reachable(below, {n: infos[n] for n in db.names}, hooks.hessians, per_sample, spec)
