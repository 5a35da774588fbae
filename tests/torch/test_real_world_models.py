"""Models as users bring them: half-precision weights, nn.MultiheadAttention, inference tensors.

Each test here failed before its fix (audit of the torch layer): a float16 model saved its
quantized layers as plain values with a false "not on its grid" warning and could not be written
as GGUF; any model with nn.MultiheadAttention (every nn.Transformer*) failed to compress; a model
built under torch.inference_mode() failed with torch's in-place error after the first solve.
"""

from __future__ import annotations

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
    # the file holds the exact grid; the model holds it rounded to its dtype
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(dequantized)).to(dtype), model[0].weight.detach())


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


def test_inputs_and_labels_batches_hint_at_forward():
    from torch.utils.data import DataLoader, TensorDataset

    from obc_native.torch import CalibrationError

    data = torch.cat(batches())
    loader = DataLoader(TensorDataset(data, torch.zeros(len(data))), batch_size=48)
    with pytest.raises(CalibrationError, match=r"forward=lambda model, batch: model\(batch\[0\]\)"):
        compress(small_mlp(), loader, LayerConfig(bits=4), quiet=True)
    report = compress(small_mlp(), loader, LayerConfig(bits=4), forward=lambda model, batch: model(batch[0]), quiet=True)
    assert report.batches == 4
