"""compress(): solver plumbing, sequential calibration, corrections, layouts and bad input."""

from __future__ import annotations

import copy
import importlib
import logging

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP, tiny_gpt2
from torch import nn

import obc_native
from obc_native.torch import (
    CalibrationError,
    CompressionError,
    LayerConfig,
    Override,
    Recipe,
    RecipeError,
    collect_hessians,
    compress,
    find_layers,
)
from obc_native.torch.layers import weight_matrix

pytestmark = pytest.mark.torch

# the module (obc_native.torch.compress the attribute is the function)
compress_module = importlib.import_module("obc_native.torch.compress")


class RecordingCore:
    """Delegates to obc_native, recording the Hessian each solver call received."""

    def __init__(self, fail_on_call: int | None = None):
        self.hessians: list[np.ndarray] = []
        self.fail_on_call = fail_on_call

    def __getattr__(self, name):
        target = getattr(obc_native, name)
        if not name.startswith(("prune_", "quantize")) or name == "prune_magnitude":
            return target

        def wrapper(W, H, *args, **kwargs):
            self.hessians.append(np.array(H))
            if self.fail_on_call is not None and len(self.hessians) == self.fail_on_call:
                raise obc_native.HessianError("injected failure")
            return target(W, H, *args, **kwargs)

        return wrapper


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_dense_mode_losses_match_dense_hessians(mlp, mlp_batches):
    dense = copy.deepcopy(mlp)
    stats = collect_hessians(dense, mlp_batches)
    config = LayerConfig(prune="unstructured", sparsity=0.5)
    report = compress(mlp, mlp_batches, config, correction=None, quiet=True)
    assert [layer.name for layer in report.compressed] == ["layers.0", "layers.1", "layers.2"]
    for layer in report.compressed:
        info = find_layers(mlp)[layer.name]
        before = weight_matrix(find_layers(dense)[layer.name]).numpy()
        after = weight_matrix(info).numpy()
        hessian = stats[layer.name].hessians()[0]
        assert layer.samples == 4 * 32
        assert layer.loss == pytest.approx(obc_native.layer_loss(before, after, hessian).sum(), rel=1e-6)
        assert layer.sparsity == pytest.approx(0.5, abs=1 / after.size)
        assert layer.loss < layer.baseline_loss
        assert layer.damp == pytest.approx(0.01)
    assert report.passes == 1 and report.batches == 4


def test_sequential_feeds_compressed_outputs_forward(mlp, mlp_batches, monkeypatch):
    """Each layer's solver sees the Hessian of inputs produced by the compressed earlier layers."""
    dense = copy.deepcopy(mlp)
    core = RecordingCore()
    monkeypatch.setattr(compress_module, "get_core", lambda: core)
    report = compress(
        mlp, mlp_batches, LayerConfig(prune="unstructured", sparsity=0.75), sequential=True, correction=None, quiet=True
    )
    assert report.calibration == "sequential" and report.passes == 1 + 3
    compressed_h = collect_hessians(mlp, mlp_batches)  # from the final, compressed model
    dense_h = collect_hessians(dense, mlp_batches)
    assert len(core.hessians) == 3
    for recorded, name in zip(core.hessians, ["layers.0", "layers.1", "layers.2"]):
        np.testing.assert_allclose(recorded, compressed_h[name].hessians()[0], rtol=1e-10, atol=1e-12)
    # the first layer sees the dense inputs; later ones differ from the dense model's
    np.testing.assert_allclose(core.hessians[0], dense_h["layers.0"].hessians()[0], rtol=1e-12)
    for index, name in [(1, "layers.1"), (2, "layers.2")]:
        assert not np.allclose(core.hessians[index], dense_h[name].hessians()[0], rtol=1e-3)


def test_dense_mode_uses_dense_inputs(mlp, mlp_batches, monkeypatch):
    dense_h = collect_hessians(copy.deepcopy(mlp), mlp_batches)
    core = RecordingCore()
    monkeypatch.setattr(compress_module, "get_core", lambda: core)
    compress(mlp, mlp_batches, LayerConfig(prune="unstructured", sparsity=0.75), correction=None, quiet=True)
    for recorded, name in zip(core.hessians, ["layers.0", "layers.1", "layers.2"]):
        np.testing.assert_allclose(recorded, dense_h[name].hessians()[0], rtol=1e-10)


def test_sequential_stops_forward_early(mlp_batches):
    """Layers after the one being calibrated are not run."""
    torch.manual_seed(0)
    model = MLP()
    calls = {"last": 0}
    model.layers[2].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    compress(model, mlp_batches, Recipe(default=LayerConfig(bits=4), skip=["layers.2"]), sequential=True, quiet=True)
    # discovery pass (4) + BN-less bias correction needs no extra pass; layers 0 and 1 stop early
    assert calls["last"] == 4


def test_bias_correction_restores_mean_output(mlp_batches):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    dense = copy.deepcopy(model)
    data = torch.cat(mlp_batches)
    for sequential in (False, True):
        compressed = copy.deepcopy(dense)
        report = compress(
            compressed,
            mlp_batches,
            LayerConfig(prune="unstructured", sparsity=0.8, bits=3),
            sequential=sequential,
            quiet=True,
        )
        assert report.correction == "bias"
        assert all(layer.bias_corrected for layer in report.compressed)
        with torch.no_grad():
            first_dense, first = dense[0](data).mean(0), compressed[0](data).mean(0)
            out_dense, out = dense(data).mean(0), compressed(data).mean(0)
        torch.testing.assert_close(first, first_dense, atol=1e-5, rtol=1e-5)
        if sequential:  # the last layer's correction targets the dense model's mean output
            torch.testing.assert_close(out, out_dense, atol=1e-5, rtol=1e-5)


def test_batchnorm_recalibration(cnn, cnn_batches):
    report = compress(cnn, cnn_batches, Recipe(default=LayerConfig(prune="unstructured", sparsity=0.5)), quiet=True)
    assert report.correction == "batchnorm" and report.passes == 2
    with torch.no_grad():
        outputs = torch.cat([cnn.conv1(b) for b in cnn_batches])
    torch.testing.assert_close(cnn.bn1.running_mean, outputs.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not cnn.training and cnn.bn1.momentum == 0.1


def test_conv_nm_runs_along_input_channels(cnn, cnn_batches):
    compress(cnn, cnn_batches, Recipe(default=LayerConfig(prune="nm", n=2, m=4), skip=["conv1"]), quiet=True)
    weight = cnn.conv2.weight.detach()  # (8 out, 8 in, 3, 3)
    groups = weight.permute(0, 2, 3, 1).reshape(8, 9, 2, 4)  # (out, kernel position, group, 4 channels)
    assert torch.all((groups == 0).sum(-1) == 2)


def test_conv_structured_removes_input_channels(cnn, cnn_batches):
    recipe = Recipe(default=LayerConfig(prune="structured", sparsity=0.4), skip=["conv1", "fc"])
    report = compress(cnn, cnn_batches, recipe, quiet=True)
    weight = cnn.conv2.weight.detach()
    dead = (weight == 0).all(dim=3).all(dim=2).all(dim=0)  # whole input channels
    assert int(dead.sum()) == 4  # ceil(0.4 * 8)
    assert report.layer("conv2").sparsity == pytest.approx(0.5)


def test_grouped_and_depthwise_convs(cnn_batches):
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
    )
    core = RecordingCore()
    recipe = Recipe(
        default=LayerConfig(prune="nm", n=2, m=4, bits=4), overrides=[Override("4", prune=None)], skip=["0"]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress_module, "get_core", lambda: core)
        report = compress(model, cnn_batches, recipe, correction=None, baseline=False, quiet=True)
    # 2:4 then int4 on 2 groups of conv "2", int4 on 16 depthwise groups of conv "4"
    assert len(core.hessians) == 2 * 2 + 16
    assert core.hessians[0].shape == (36, 36) and core.hessians[-1].shape == (9, 9)
    assert report.layer("4").bits == 4 and report.layer("4").sparsity < 0.5
    grid = report.layer("4").grid
    assert grid.scale.shape == (16, 1)
    for row in model[4].weight.detach().reshape(16, 9):
        assert len(torch.unique(row)) <= 16


def test_joint_keeps_zeros_on_grid(mlp, mlp_batches):
    config = LayerConfig(prune="nm", n=2, m=4, bits=3, sym=False)
    report = compress(mlp, mlp_batches, config, correction=None, quiet=True)
    for layer in report.compressed:
        weight = find_layers(mlp)[layer.name].module.weight.detach()
        assert torch.all((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2)
        assert all(len(torch.unique(row)) <= 8 for row in weight)
        assert layer.mode == "2:4+int3 asym"


def test_baseline_method(mlp, mlp_batches):
    dense = copy.deepcopy(mlp)
    config = LayerConfig(prune="unstructured", sparsity=0.5, method="magnitude")
    report = compress(mlp, mlp_batches, config, correction=None, quiet=True)
    for layer in report.compressed:
        assert layer.loss == layer.baseline_loss
        before = dense.get_submodule(layer.name).weight.detach().numpy()
        expected = obc_native.prune_magnitude(before, 0.5)
        np.testing.assert_array_equal(mlp.get_submodule(layer.name).weight.detach().numpy(), expected)


def test_gpt2_hf_conv1d_nm(monkeypatch):
    model = tiny_gpt2()
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for g in generators]
    report = compress(model, batches, LayerConfig(prune="nm", n=2, m=4), sequential=True, quiet=True)
    assert report.layer("lm_head").skipped  # tied to the embedding
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    weight = model.transformer.h[0].mlp.c_fc.weight.detach()  # stored (in, out)
    groups = weight.t().reshape(weight.shape[1], -1, 4)  # along the input dimension
    assert torch.all((groups == 0).sum(-1) == 2)


def test_progress_and_quiet(mlp, mlp_batches, capsys, caplog):
    compress(copy.deepcopy(mlp), mlp_batches, LayerConfig(bits=4), quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    compress(mlp, mlp_batches, LayerConfig(bits=4), quiet=False)
    captured = capsys.readouterr()
    assert captured.out == "" and "layers.2" in captured.err  # tqdm on stderr with the layer name


def test_report_table_and_json(mlp, mlp_batches):
    report = compress(mlp, mlp_batches, Recipe(default=LayerConfig(bits=4), skip=["layers.1"]), quiet=True)
    table = report.table()
    assert "layers.0" in table and "skipped by recipe pattern 'layers.1'" in table
    data = report.to_dict()
    assert [layer["name"] for layer in data["layers"]] == ["layers.0", "layers.2", "layers.1"]
    from obc_native.torch import CompressionReport

    restored = CompressionReport.from_dict(data)
    assert restored.layers == report.layers


# ---------------------------------------------------------------- bad input


def test_model_without_matching_layers(mlp_batches):
    with pytest.raises(RecipeError, match="no supported layers"):
        compress(nn.Sequential(nn.ReLU()), mlp_batches, LayerConfig(bits=4), quiet=True)
    with pytest.raises(RecipeError, match="no layer matches"):
        compress(MLP(), mlp_batches, Recipe(overrides=[Override("nothing*", bits=4)], strict=False), quiet=True)


def test_empty_calibration(mlp):
    state = state_copy(mlp)
    for empty in ([], iter([])):
        with pytest.raises(CalibrationError, match="empty"):
            compress(mlp, empty, LayerConfig(bits=4), quiet=True)
    assert_state_equal(mlp, state)


@pytest.mark.parametrize(
    "batch, message",
    [
        (torch.randn(4, 15), r"batch 1 \(tensor \(4, 15\) torch.float32\)"),
        (torch.randn(4, 16, dtype=torch.float64), "batch 1.*float"),
        (torch.randint(0, 3, (4, 16)), "batch 1.*layer 'layers.0'.*not a floating point"),
        (torch.full((4, 16), float("nan")), "batch 1.*layer 'layers.0'.*NaN"),
    ],
    ids=["shape", "float64", "int", "nan"],
)
def test_bad_batches_leave_model_untouched(mlp, mlp_batches, batch, message):
    state = state_copy(mlp)
    for sequential in (False, True):
        with pytest.raises(CalibrationError, match=message):
            compress(mlp, [mlp_batches[0], batch], LayerConfig(bits=4), sequential=sequential, quiet=True)
        assert_state_equal(mlp, state)


def test_impossible_pattern_names_layer(cnn, cnn_batches):
    state = state_copy(cnn)
    with pytest.raises(RecipeError, match="layer 'conv1'.*input channels"):
        compress(cnn, cnn_batches, LayerConfig(prune="nm", n=2, m=4), quiet=True)
    assert_state_equal(cnn, state)


def test_failure_midway_restores_everything(cnn, cnn_batches, monkeypatch, caplog):
    state = state_copy(cnn)
    monkeypatch.setattr(compress_module, "get_core", lambda: RecordingCore(fail_on_call=3))
    with caplog.at_level(logging.ERROR, logger="obc_native.torch"):
        with pytest.raises(CompressionError, match="layer 'fc'.*injected") as info:
            compress(cnn, cnn_batches, LayerConfig(prune="unstructured", sparsity=0.5), sequential=True, quiet=True)
    assert "restored" in caplog.text
    assert any("restored" in note for note in getattr(info.value, "__notes__", ["restored"]))
    assert_state_equal(cnn, state)


def test_never_called_layer(mlp_batches):
    model = MLP()
    model.unused = nn.Linear(3, 3)
    with pytest.raises(CalibrationError, match="unused.*never called"):
        compress(model, mlp_batches, LayerConfig(bits=4), quiet=True)
    compress(model, mlp_batches, Recipe(default=LayerConfig(bits=4), skip=["unused"]), quiet=True)


def test_nan_produced_by_model(mlp_batches):
    torch.manual_seed(0)
    model = MLP()
    # a NaN made by the forward (a NaN parameter is refused up front, naming it: see
    # test_real_world_models.py); the hook is the model's own, like an op that overflows
    model.layers[1].register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with pytest.raises(CalibrationError, match="layer 'layers.2'.*NaN or Inf"):
        compress(model, mlp_batches, Recipe(default=LayerConfig(bits=4), skip=["layers.1"]), quiet=True)


def test_training_flag_restored(mlp, mlp_batches):
    mlp.train()
    compress(mlp, mlp_batches, LayerConfig(bits=4), quiet=True)
    assert mlp.training and all(m.training for m in mlp.modules())


def test_tuple_and_dict_batches():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 4)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    tuples = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(2)]
    dicts = [{"x": x, "y": y} for x, y in tuples]
    first, second = TwoInputs(), TwoInputs()
    second.load_state_dict(first.state_dict())
    report_t = compress(first, tuples, LayerConfig(bits=4), correction=None, quiet=True)
    report_d = compress(second, dicts, LayerConfig(bits=4), correction=None, quiet=True)
    assert [r.loss for r in report_t.layers] == [r.loss for r in report_d.layers]
    assert torch.equal(first.a.weight, second.a.weight)


def test_dataloader_with_labels_and_generators(mlp):
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.randn(64, 16), torch.randint(0, 8, (64,)))
    loader = DataLoader(dataset, batch_size=16)
    report = compress(
        copy.deepcopy(mlp), loader, LayerConfig(bits=4), sequential=True, forward=lambda m, b: m(b[0]), quiet=True
    )
    assert report.batches == 4 and report.layer("layers.0").samples == 64
    # a one-shot generator is materialised so that sequential mode can make several passes
    generator = (x for x, _ in loader)
    report = compress(mlp, generator, LayerConfig(bits=4), sequential=True, quiet=True)
    assert [layer.samples for layer in report.compressed] == [64, 64, 64]


def test_conv_blocked_runs_along_input_channels(cnn, cnn_batches):
    recipe = Recipe(default=LayerConfig(prune="blocked", sparsity=0.5, block=4), skip=["conv1", "fc"])
    report = compress(cnn, cnn_batches, recipe, quiet=True)
    weight = cnn.conv2.weight.detach()
    blocks = weight.permute(0, 2, 3, 1).reshape(8, 9, 2, 4)  # 4 consecutive channels at one position
    zeros = (blocks == 0).sum(-1)
    assert torch.all((zeros == 0) | (zeros == 4))
    assert int((zeros == 4).sum()) == 8 * 9  # ceil(0.5 * 144 blocks)
    assert report.layer("conv2").mode == "blocked4 50%"


def test_only_matched_layers_change(mlp, mlp_batches):
    state = state_copy(mlp)
    recipe = Recipe(overrides=[Override("layers.1", bits=3)])
    report = compress(mlp, mlp_batches, recipe, quiet=True)
    assert [layer.name for layer in report.compressed] == ["layers.1"]
    after = mlp.state_dict()
    changed = sorted(key for key in state if not torch.equal(state[key], after[key]))
    assert changed == ["layers.1.bias", "layers.1.weight"]  # weight compressed, bias corrected


@pytest.mark.parametrize("threads", [-1, 1.5, True, "2"])
def test_bad_thread_count_is_rejected_before_any_work(mlp, mlp_batches, threads, monkeypatch):
    """num_threads is checked up front, not reported as the first layer's solver error."""
    monkeypatch.setattr(compress_module, "run_calibration", lambda *a, **k: pytest.fail("calibration ran"))
    with pytest.raises((ValueError, TypeError), match="num_threads") as info:
        compress(mlp, mlp_batches, LayerConfig(bits=4), num_threads=threads, quiet=True)
    assert "layer" not in str(info.value)
    with pytest.raises((ValueError, TypeError), match="num_threads"):
        compress(mlp, mlp_batches, budget="params=2x", num_threads=threads, quiet=True)
