"""Deployment and planning entry points fed odd but plausible input: each refuses with an error
naming the argument or layer, before any work, leaving the model and earlier files as they were."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from obc_native.torch import (
    ExportError,
    LayerConfig,
    Override,
    Recipe,
    SerializationError,
    build_database,
    compress,
    export_onnx,
    load_compressed,
    save_compressed,
    shrink_structured,
)

pytestmark = pytest.mark.torch


def small_mlp(widths=(64, 64, 32)):
    torch.manual_seed(0)
    layers = [nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2])]
    return nn.Sequential(*layers).eval()


def quantized(recipe=None, widths=(64, 64, 32)):
    model = small_mlp(widths)
    batch = torch.randn(64, widths[0], generator=torch.Generator().manual_seed(1))
    report = compress(model, [batch], recipe or Recipe(default=LayerConfig(bits=4, group_size=32)), quiet=True)
    return model, report, batch


def state_of(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_state_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# A NUL cuts a C path short and a name over NAME_MAX (255 bytes on Linux file systems) cannot be
# created; both used to pass the up-front path check and fail only at the final write, after the
# export work, as a bare ValueError / OSError naming the temporary file.
BAD_NAMES = {"NUL": ("a\0b.out", "NUL character"), "long": ("a" * 250 + ".out", "file name too long")}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_onnx_export_refuses_unwritable_names_before_any_work(tmp_path, case, monkeypatch):
    pytest.importorskip("onnx")
    name, message = BAD_NAMES[case]
    model, report, batch = quantized()
    before = state_of(model)
    export_module = __import__("obc_native.torch.export_onnx", fromlist=["_torch_export"])

    def no_export(*args, **kwargs):  # the check must come first: nothing is traced
        raise AssertionError("exported before the path was checked")

    monkeypatch.setattr(export_module, "_torch_export", no_export)
    with pytest.raises(ExportError, match=message):
        export_onnx(model, batch[:2], str(tmp_path / name), report=report)
    assert os.listdir(tmp_path) == []
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_gguf_refuses_unwritable_names_and_leaves_the_model(tmp_path, case):
    pytest.importorskip("gguf")
    from obc_native.torch import gguf_layer_config, save_gguf

    name, message = BAD_NAMES[case]
    model, report, _ = quantized(Recipe(default=gguf_layer_config("Q4_0")))
    before = state_of(model)
    with pytest.raises(ValueError, match=message):
        save_gguf(model, report, str(tmp_path / name))
    assert os.listdir(tmp_path) == []
    assert_state_unchanged(model, before)


def test_level_database_save_names_the_path(tmp_path):
    torch.manual_seed(0)
    model = small_mlp((32, 16, 8))
    db = build_database(model, [torch.randn(64, 32)], quiet=True)
    # a missing folder: the message used to name the temporary file (.x.obc-<host>-<pid>-<token>.tmp.json)
    with pytest.raises(OSError, match=r"nope/x.json: folder .* does not exist"):
        db.save(tmp_path / "nope" / "x.json")
    with pytest.raises(OSError, match="file name too long"):
        db.save(tmp_path / ("a" * 250 + ".json"))
    assert os.listdir(tmp_path) == []


def test_save_compressed_refuses_a_nul_in_the_folder_name(tmp_path):
    model, report, _ = quantized()
    with pytest.raises(SerializationError, match="NUL character"):
        save_compressed(model, str(tmp_path / "a\0b"), report)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metadata", [{"x": object()}, {"loss": float("nan")}, {(1, 2): "tuple key"}, ["not", "dict"]])
def test_save_compressed_checks_metadata_before_replacing_an_earlier_save(tmp_path, metadata):
    """Unwritable metadata used to fail only at the manifest, after the tensor file had been
    replaced: the earlier save's manifest then named a checksum the folder no longer held."""
    model, report, _ = quantized()
    save_compressed(model, tmp_path, report)
    saved = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    other, other_report, _ = quantized(Recipe(default=LayerConfig(bits=3, group_size=32)))
    with pytest.raises(TypeError, match="metadata: expected"):
        save_compressed(other, tmp_path, other_report, metadata=metadata)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == saved
    load_compressed(small_mlp(), tmp_path)  # still whole


def test_load_compressed_widen_must_be_a_bool(tmp_path):
    model = small_mlp().half()
    report = compress(model, [torch.randn(64, 64).half()], Recipe(default=LayerConfig(bits=4, group_size=32)),
                      quiet=True)
    save_compressed(model, tmp_path, report)
    target = small_mlp()
    before = state_of(target)
    with pytest.raises(TypeError, match="widen: expected True or False, got 'no'"):
        load_compressed(target, tmp_path, widen="no")  # was taken as True
    assert_state_unchanged(target, before)


def test_gguf_refuses_bad_reports_and_tensor_types_with_clear_errors(tmp_path):
    pytest.importorskip("gguf")
    from obc_native.torch import GGUFExportError, gguf_layer_config, save_gguf

    model, report, _ = quantized(Recipe(default=gguf_layer_config("Q4_0")))
    with pytest.raises(TypeError, match="report: expected the CompressionReport"):
        save_gguf(model, None, tmp_path / "m.gguf")
    with pytest.raises(TypeError, match="path: expected a str, bytes or os.PathLike, got int"):
        save_gguf(model, report, 3)
    # the report of a model of other widths: was a numpy broadcasting error
    other = small_mlp((64, 32, 32))
    before = state_of(other)
    with pytest.raises(GGUFExportError, match=r"layer '0': the report's grid has scales of shape \(64, 2\), but the "
                                              r"layer is 32 x 64"):
        save_gguf(other, report, tmp_path / "m.gguf")
    assert_state_unchanged(other, before)
    # a bool mask buffer: was gguf's own "Only F16, F32, F64, I8, I16, I32, I64 tensors are supported"
    model.register_buffer("mask", torch.ones(4, dtype=torch.bool))
    before = state_of(model)
    with pytest.raises(GGUFExportError, match="state-dict tensor 'mask' is torch.bool"):
        save_gguf(model, report, tmp_path / "m.gguf")
    assert_state_unchanged(model, before)
    assert os.listdir(tmp_path) == []


def test_onnx_export_names_bad_dense_and_another_models_report(tmp_path):
    pytest.importorskip("onnx")
    model, report, batch = quantized()
    with pytest.raises(TypeError, match="dense: expected a list of layer-name patterns"):
        export_onnx(model, batch[:2], tmp_path / "m.onnx", report=report, dense=None)
    assert os.listdir(tmp_path) == []


def test_onnx_export_of_another_models_report_or_a_shrunk_model_keeps_the_layers_that_fit(tmp_path, caplog):
    """A grid that no longer has its layer's shape (a layer shrink_structured cut, or the report of
    a model of other widths) used to raise "the report's grid has 64 rows of scales"; the CLI's
    shrink exported float weights. Now such a layer is exported with float weights and a warning
    naming it, as save_compressed stores it as values; the layers whose grids fit stay quantized."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, report, batch = quantized()
    other, _, _ = quantized(widths=(64, 96, 32))
    written = export_onnx(other, batch[:2], tmp_path / "other.onnx", report=report)
    assert list(written.layers) == []
    assert ("layer '0': the report's grid (scales (64, 2), groups of 32) does not fit the 96 x 64 weight (a layer "
            "shrink_structured cut, or the report of another model); exported with float weights") in caplog.text
    assert "layer '2': the report's grid (scales (32, 2), groups of 32) does not fit the 32 x 96 weight" in caplog.text

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    recipe = Recipe(default=LayerConfig(bits=4, group_size=32),
                    overrides=[Override("2", prune="structured", sparsity=0.5)])
    report = compress(mlp, [batch], recipe, quiet=True)
    x = batch[:4]
    shrink = shrink_structured(mlp)
    assert [(c.producer, c.consumer, c.kept) for c in shrink.chains if c.removed] == [("0", "2", 32)]
    caplog.clear()
    written = export_onnx(mlp, x, tmp_path / "shrunk.onnx", report=report)
    assert set(written.layers) == {"4"}  # still on its grid: quantized
    warned = sorted(r.getMessage().split("'")[1] for r in caplog.records if "exported with float" in r.getMessage())
    assert warned == ["0", "2"]
    session = ort.InferenceSession(str(tmp_path / "shrunk.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, mlp(x).numpy(), rtol=1e-4, atol=1e-5)
    # the saved folder of the same model and report: the same layers are stored as values
    manifest = save_compressed(mlp, tmp_path / "saved", report)
    assert {name: e["storage"] for name, e in manifest["layers"].items()}["4"] in ("quantized", "sparse_quantized")
    assert {manifest["layers"][name]["storage"] for name in ("0", "2")} <= {"dense", "sparse"}


class LeNet(nn.Module):
    """The PyTorch tutorial's CNN: its flatten is ``x.view(-1, 16 * 5 * 5)``, a width fixed in the code."""

    def __init__(self, flatten: str = "literal"):
        super().__init__()
        self.flatten = flatten
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if self.flatten == "literal":
            x = x.view(-1, 16 * 5 * 5)
        else:
            x = x.view(-1, self.fc1.in_features)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("flatten", ["literal", "attribute"])
def test_shrink_keeps_a_flatten_whose_width_is_fixed_in_the_code(flatten):
    """``x.view(-1, 400)`` used to be shrunk like ``x.flatten(1)``: the model then failed with
    "shape '[-1, 400]' is invalid for input of size 700". A width read from the Linear still shrinks."""
    torch.manual_seed(0)
    model = LeNet(flatten).eval()
    with torch.no_grad():
        model.fc1.weight[:, :50] = 0  # conv2 channels 0 and 1: two blocks of 5 * 5 columns
    x = torch.randn(2, 3, 32, 32)
    masked = copy.deepcopy(model)
    report = shrink_structured(model)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), rtol=1e-5, atol=1e-6)
    if flatten == "literal":
        assert report.chains == [] and "view/reshape(-1, 400)" in report.skipped["fc1"]
        assert model.conv2.out_channels == 16 and model.fc1.in_features == 400
    else:
        assert [(c.producer, c.consumer, c.kept) for c in report.chains] == [("conv2", "fc1", 14)]
        assert model.fc1.in_features == 14 * 25
    assert model.fc1.in_features == (400 if flatten == "literal" else 350)


def test_shrink_keeps_a_view_that_folds_channels_into_the_batch():
    """``x.view(-1, h*w)`` of an (N, C, h, w) tensor makes rows of single channels: the Linear's
    columns are positions, not channels; shrinking used to cut conv channels and break the model."""

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(-1, 16))

    torch.manual_seed(0)
    model = Rows().eval()
    with torch.no_grad():
        model.fc.weight[:, :4] = 0  # one "block" of 16 / 4 columns: the first row of each channel
    x = torch.randn(5, 3, 4, 4)
    expected = model(x).detach()
    report = shrink_structured(model)
    assert report.chains == [] and "fc" in report.skipped
    assert torch.equal(model(x).detach(), expected)


def test_reports_of_half_precision_models_export_after_widening(tmp_path):
    """A float16 model's quantized layers are refused by name; the saved folder loads widened
    into a float32 model whose weights are on the grid again, and that exports exactly."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = small_mlp().half()
    batch = torch.randn(64, 64).half()
    report = compress(model, [batch], Recipe(default=LayerConfig(bits=4, group_size=32)), quiet=True)
    with pytest.raises(ExportError, match="layer '0': weights are torch.float16"):
        export_onnx(model, batch[:2], tmp_path / "m.onnx", report=report)
    save_compressed(model, tmp_path / "out", report)
    wide = small_mlp()
    load_compressed(wide, tmp_path / "out", widen=True)
    export_onnx(wide, batch[:2].float(), tmp_path / "m.onnx", report=tmp_path / "out")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = batch[:4].float()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = wide(x).numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_shrink_with_fold_of_an_untraceable_model_changes_nothing():
    """Given chains (for a model fx cannot trace) with fold_batchnorm=True used to cut the channels,
    then fail to trace for the fold: an error with the model already changed."""
    from obc_native.torch import ShrinkError

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                x = x * 1
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    torch.manual_seed(0)
    model = DataDependent().eval()
    with torch.no_grad():
        model.conv2.weight[:, :3] = 0
    before = state_of(model)
    with pytest.raises(ShrinkError, match="fold_batchnorm=True: torch.fx cannot trace DataDependent.*nothing was "
                                          "changed"):
        shrink_structured(model, chains=[("conv1", "bn", "conv2")], fold_batchnorm=True)
    assert_state_unchanged(model, before)
    assert model.conv1.out_channels == 8
    report = shrink_structured(model, chains=[("conv1", "bn", "conv2")])  # without folding it shrinks
    assert report.chains[0].kept == 5


def test_shrink_error_in_a_later_given_chain_leaves_the_model_unchanged():
    """The first given chain used to be cut before the second raised: conv 0 lost three channels."""
    from obc_native.torch import ShrinkError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 16, 5)).eval()
    with torch.no_grad():
        model[2].weight[:, :3] = 0  # chain 0 -> 2: three removable channels
        model[5].weight[:, :5] = 0  # chain 2 -> 5: five zero columns, not whole blocks of 16
    before = state_of(model)
    x = torch.randn(2, 3, 4, 4)
    expected = model(x).detach()
    with pytest.raises(ShrinkError, match="Linear '5': its zero input columns"):
        shrink_structured(model, chains=[("0", "2"), ("2", "5")])
    assert_state_unchanged(model, before)
    assert (model[0].out_channels, model[2].in_channels) == (8, 8)
    assert torch.equal(model(x).detach(), expected)
