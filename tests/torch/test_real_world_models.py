"""Models as users bring them: half-precision weights, nn.MultiheadAttention, inference tensors.

Each test here failed before its fix (audit of the torch layer): a float16 model saved its
quantized layers as plain values with a false "not on its grid" warning and could not be written
as GGUF; any model with nn.MultiheadAttention (every nn.Transformer*) failed to compress; a model
built under torch.inference_mode() failed with torch's in-place error after the first solve.
"""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from obc_native.torch import LayerConfig, compress, load_compressed, save_compressed
from obc_native.torch.layer_selection import select_layers

pytestmark = pytest.mark.torch


def small_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8, bias=False)).to(dtype).eval()


def batches(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(96, 32, generator=generator).to(dtype) for _ in range(2)]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", [LayerConfig(bits=4), LayerConfig(prune="nm", n=2, m=4, bits=3, sym=False)])
def test_non_float32_models_save_their_codes(tmp_path, caplog, dtype, config):
    model = small_mlp(dtype)
    report = compress(model, batches(dtype), config, quiet=True)
    assert model[0].weight.dtype == dtype
    save_compressed(model, tmp_path / "out", report)
    assert "not on its quantization grid" not in caplog.text
    restored = small_mlp(dtype)
    manifest = load_compressed(restored, tmp_path / "out")
    assert same_state(model, restored)  # bit-exact in the model's own dtype
    kinds = {entry["storage"] for entry in manifest["layers"].values()}
    assert kinds == {"sparse_quantized" if config.prune else "quantized"}


def test_weights_off_the_grid_in_float16_still_fall_back_to_values(tmp_path, caplog):
    model = small_mlp(torch.float16)
    report = compress(model, batches(torch.float16), LayerConfig(bits=4), quiet=True)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.01  # off the grid: must not be stored as (wrong) codes
    save_compressed(model, tmp_path / "out", report)
    assert "layer '0': weights are not on its quantization grid" in caplog.text
    restored = small_mlp(torch.float16)
    manifest = load_compressed(restored, tmp_path / "out")
    assert manifest["layers"]["0"]["storage"] in ("dense", "sparse")  # values, not codes
    assert manifest["layers"]["2"]["storage"] == "quantized"
    assert same_state(model, restored)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gguf_of_a_half_precision_model(tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    from obc_native.torch.gguf_export import gguf_layer_config, save_gguf

    model = small_mlp(dtype)
    report = compress(model, batches(dtype), gguf_layer_config("Q4_0"), quiet=True)
    layers = save_gguf(model, report, tmp_path / "m.gguf")
    assert [layer.name for layer in layers] == ["0", "2"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensor = next(t for t in reader.tensors if t.name == "0.weight")
    dequantized = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # the file holds the model's codes on float16 scales; the model holds its float32 grid rounded to its dtype
    scale = torch.from_numpy(report.layers[0].grid.scale).repeat_interleave(32, dim=1)
    codes = torch.round(model[0].weight.detach().float() / scale)
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(dequantized)), scale.half().float() * codes)


def transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_multihead_attention_out_proj_is_skipped_with_its_reason(caplog):
    # MultiheadAttention's forward reads out_proj.weight without calling out_proj: no hook fires
    model = transformer()
    model.train()  # as a model often arrives: dropout on
    out_proj = model.layers[0].self_attn.out_proj.weight.detach().clone()
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(2))
    report = compress(model, [x], LayerConfig(bits=4), quiet=True)
    assert [layer.name for layer in report.compressed] == [
        "layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"
    ]
    skipped = {layer.name: layer.skipped for layer in report.skipped}
    assert set(skipped) == {"layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"}
    assert all("MultiheadAttention" in reason for reason in skipped.values())
    assert "layers.0.self_attn.out_proj" in caplog.text
    assert torch.equal(model.layers[0].self_attn.out_proj.weight, out_proj)
    assert model.training and model.layers[0].dropout.training  # mode restored


def test_multihead_attention_out_proj_is_left_out_of_budget_selection():
    selected, left_out = select_layers(transformer())
    assert "layers.0.self_attn.out_proj" not in selected
    assert "MultiheadAttention" in left_out["layers.0.self_attn.out_proj"]


def test_model_built_under_inference_mode_is_refused_before_any_work(monkeypatch):
    with torch.inference_mode():
        model = small_mlp()
    compress_module = sys.modules["obc_native.torch.compress"]  # the package re-exports the function

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(compress_module, "run_calibration", no_calibration)
    with pytest.raises(ValueError, match=r"model: 0\.weight, 0\.bias, 2\.weight are inference tensors"):
        compress(model, batches(), LayerConfig(bits=4), quiet=True)
    monkeypatch.undo()
    with torch.inference_mode():  # where such a model can be written in place
        report = compress(model, batches(), LayerConfig(bits=4), quiet=True)
    assert len(report.compressed) == 2


def test_nan_weight_is_named_before_any_work():
    # before: "layer '2': calibration input contains NaN or Inf", pointing at the data
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"model: parameter\(s\) 0\.weight contain NaN or Inf"):
        compress(model, batches(), LayerConfig(bits=4), quiet=True)


def test_finiteness_check_needs_no_full_size_temporary(monkeypatch):
    # before: torch.isfinite(param).all() per parameter, a boolean temporary of the parameter's
    # size (131 MB for a 32000 x 4096 embedding). Now a sum, then chunks if the sum is not finite.
    module = importlib.import_module("obc_native.torch.compress")
    monkeypatch.setattr(module, "_FINITE_CHUNK", 7)
    sizes = []
    isfinite = torch.isfinite

    def recording(t):
        sizes.append(t.numel())
        return isfinite(t)

    monkeypatch.setattr(torch, "isfinite", recording)
    base = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(2))
    views = [
        lambda t: t, lambda t: t.half(), lambda t: t.to(torch.bfloat16), lambda t: t.double(),
        lambda t: t.transpose(0, 2), lambda t: t.permute(1, 2, 0), lambda t: t[:, ::2],
        lambda t: t[0, 0, 0], lambda t: t.reshape(-1)[::3],
        # finite, but the float16 sum overflows: decided by the chunks
        lambda t: torch.full((40,), 60000.0, dtype=torch.float16),
    ]
    for make in views:
        sizes.clear()
        assert module._all_finite(make(base.clone()))
        assert max(sizes) <= 7
        for value in (float("nan"), float("inf"), -float("inf")):
            size = make(base).numel()
            for index in (0, size // 2, size - 1):
                broken = make(base.clone())  # a view of the clone: writes reach what is checked
                broken[tuple(int(i) for i in np.unravel_index(index, broken.shape))] = value
                sizes.clear()
                assert not module._all_finite(broken), (broken.shape, value, index)
                assert max(sizes) <= 7
    overflowing = views[-1](base)
    assert not torch.isfinite(overflowing.sum())
    sizes.clear()
    assert module._all_finite(overflowing) and sizes[0] == 1 and len(sizes) > 1  # sum, then chunks
    both = base.clone()  # +Inf and -Inf: the sum is NaN, still caught
    both[0, 0, 0], both[5, 4, 3] = float("inf"), -float("inf")
    assert not module._all_finite(both)
    monkeypatch.undo()
    model = small_mlp()
    with torch.no_grad():
        model[0].weight[63, 31] = float("inf")
    with pytest.raises(ValueError, match=r"model: parameter\(s\) 0\.weight contain NaN or Inf"):
        compress(model, batches(), LayerConfig(bits=4), quiet=True)


def test_inputs_and_labels_batches_hint_at_forward():
    from torch.utils.data import DataLoader, TensorDataset

    from obc_native.torch import CalibrationError

    data = torch.cat(batches())
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=48)
    with pytest.raises(CalibrationError, match=r"forward=lambda model, batch: model\(batch\[0\]\)"):
        compress(small_mlp(), loader, LayerConfig(bits=4), quiet=True)
    first = lambda model, batch: model(batch[0])  # noqa: E731
    report = compress(small_mlp(), loader, LayerConfig(bits=4), forward=first, quiet=True)
    assert report.batches == 4


def test_half_precision_save_widens_into_a_float32_model(tmp_path):
    from obc_native.torch import SerializationError, export_onnx

    model = small_mlp(torch.float16)
    report = compress(model, batches(torch.float16), LayerConfig(prune="nm", n=2, m=4, bits=4), quiet=True)
    save_compressed(model, tmp_path / "out", report)
    wide = small_mlp(torch.float32)
    with pytest.raises(SerializationError, match="architecture mismatch"):
        load_compressed(wide, tmp_path / "out")  # dtypes must match unless asked
    load_compressed(wide, tmp_path / "out", widen=True)
    assert wide[0].weight.dtype == torch.float32
    assert torch.equal(wide[0].bias.half(), model[0].bias) and torch.equal(wide[0].bias, model[0].bias.float())
    for index in (0, 2):  # the float32 grid values themselves, whose float16 rounding the model holds
        grid = report.layer(str(index)).grid  # symmetric, one group per row
        weight = wide[index].weight.detach()
        scale = torch.from_numpy(np.repeat(grid.scale, weight.shape[1], axis=1).astype(np.float32))
        assert torch.equal(weight, scale * (weight / scale).round())
        assert torch.equal(weight.half(), model[index].weight)
    export_onnx(wide, batches()[0][:4], tmp_path / "m.onnx", report=tmp_path / "out")  # needs float32 grids
    narrow = small_mlp(torch.float16)
    float32_model = small_mlp(torch.float32)
    save_compressed(float32_model, tmp_path / "dense")
    with pytest.raises(SerializationError, match="architecture mismatch"):
        load_compressed(narrow, tmp_path / "dense", widen=True)  # narrowing is never done


@pytest.mark.slow  # compress + from_pretrained check + ONNX export: about 14 s on a busy 2-core machine
def test_cli_exports_a_float16_hugging_face_model(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from obc_torch_helpers import tiny_gpt2
    from safetensors.torch import save_file

    from obc_native.cli import main

    tiny_gpt2().half().save_pretrained(tmp_path / "hf")  # config.json says float16, as most LLMs' do
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    save_file({"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])}, tmp_path / "example.safetensors")
    (tmp_path / "r.yaml").write_text("default: {bits: 4}\n")
    args = ["compress", "--hf", str(tmp_path / "hf"), "--calibration", str(tmp_path / "ids.safetensors"),
            "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {entry["dtype"] for entry in manifest["layers"].values()} == {"float16"}
    assert {entry["storage"] for entry in manifest["layers"].values()} == {"quantized"}
    capsys.readouterr()
    args = ["export", str(tmp_path / "out"), "--out", str(tmp_path / "m.onnx"), "--example",
            str(tmp_path / "example.safetensors")]
    assert main(args) == 0, capsys.readouterr().err
    assert "MatMulNBits 4-bit" in capsys.readouterr().out


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "legacy_weight_norm"])
def test_parametrized_weights_are_skipped_not_reported_compressed(wrap, caplog):
    # before: reported int4, while the weight stayed dense (a parametrization recomputes it)
    model = small_mlp()
    if wrap == "legacy_weight_norm":
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(model[0])
    else:
        getattr(nn.utils.parametrizations, wrap)(model[0])
    report = compress(model, batches(), LayerConfig(bits=4), quiet=True)
    assert [layer.name for layer in report.compressed] == ["2"]
    assert "computed from other parameters" in report.skipped[0].skipped
    assert "layer '0': weight is computed" in caplog.text
    with torch.no_grad():
        model(batches()[0])
    assert len(torch.unique(model[2].weight[0])) <= 16  # the other layer is on its 4-bit grid


def test_checkpoint_of_a_bfloat16_model_resumes(tmp_path, monkeypatch):
    # before: TypeError "Got unsupported ScalarType BFloat16" writing the first layer's file
    compress_module = sys.modules["obc_native.torch.compress"]
    expected = small_mlp(torch.bfloat16)
    compress(expected, batches(torch.bfloat16), LayerConfig(bits=4), quiet=True)
    compress(small_mlp(torch.bfloat16), batches(torch.bfloat16), LayerConfig(bits=4), quiet=True, checkpoint=tmp_path)
    solved = []
    run = compress_module._Run.compress_layer

    def counting(self, name, *args, **kwargs):
        solved.append(name)
        return run(self, name, *args, **kwargs)

    monkeypatch.setattr(compress_module._Run, "compress_layer", counting)
    model = small_mlp(torch.bfloat16)
    compress(model, batches(torch.bfloat16), LayerConfig(bits=4), quiet=True, checkpoint=tmp_path)
    assert solved == []  # both layers came from the checkpoint, bit for bit
    assert same_state(model, expected)


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_batches_of_another_dtype_than_the_model_say_so(model_dtype):
    from obc_native.torch import CalibrationError

    name = str(model_dtype).replace("torch.", "")
    with pytest.raises(CalibrationError, match=f"float32 tensors and the model's parameters are {name}: cast"):
        compress(small_mlp(model_dtype), batches(torch.float32), LayerConfig(bits=4), quiet=True)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).to(model_dtype)
    with pytest.raises(CalibrationError, match=f"model's parameters are {name}"):
        compress(conv, [torch.randn(2, 3, 6, 6)], LayerConfig(bits=4), quiet=True)


def test_a_batch_of_no_samples_is_not_called_a_branch_not_taken():
    from obc_native.torch import CalibrationError

    # before: "never called", though the layer ran (on a (0, 32) input)
    with pytest.raises(CalibrationError, match=r"\['0', '2'\] were never called .*or only on batches of 0 samples"):
        compress(small_mlp(), [torch.zeros(0, 32)], LayerConfig(bits=4), quiet=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_report_loss_is_of_the_weights_as_stored(dtype):
    # A half-precision model holds the float32 solution rounded to its dtype: the report's loss
    # and sparsity are of those weights (before: of the float32 solution), the solver's own loss
    # is loss_unrounded. Layer "0" sees the calibration batches themselves, so H is known here.
    model = small_mlp(dtype)
    dense = model[0].weight.detach().to(torch.float64).numpy()
    data = batches(dtype)
    report = compress(model, data, LayerConfig(prune="unstructured", sparsity=0.5, bits=4), quiet=True)
    X = torch.cat(data).to(torch.float64).numpy()
    H = 2.0 / X.shape[0] * X.T @ X
    stored = model[0].weight.detach().to(torch.float64).numpy()
    delta = dense - stored
    expected = 0.5 * float(np.einsum("ri,ij,rj->", delta, H, delta))
    row = report.layer("0")
    assert row.loss == pytest.approx(expected, rel=1e-6)
    assert row.sparsity == float(np.mean(stored == 0))
    if dtype == torch.float32:
        assert row.loss_unrounded is None
    else:
        assert row.loss_unrounded is not None and row.loss_unrounded != row.loss
        assert row.loss_unrounded == pytest.approx(row.loss, rel=0.2)
    assert type(row).from_dict(row.to_dict()) == row


def test_weights_beyond_the_models_dtype_range_are_an_error(monkeypatch):
    # A float16 model cannot hold a solution beyond 65504: an error naming the layer, not Inf
    # weights in the model (before: stored as Inf, with a finite loss in the report).
    import obc_native

    module = importlib.import_module("obc_native.torch.compress")

    class HugeCore:
        def __getattr__(self, name):
            return getattr(obc_native, name)

        def prune_unstructured(self, W, H, *args, **kwargs):
            result = obc_native.prune_unstructured(W, H, *args, **kwargs)
            result.weight[0, 0] = 1e5
            return result

    monkeypatch.setattr(module, "get_core", HugeCore)
    model = small_mlp(torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(module.CompressionError, match=r"layer '0': compressed weights exceed the range .*float16"):
        compress(model, batches(torch.float16), LayerConfig(prune="unstructured", sparsity=0.5), quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
