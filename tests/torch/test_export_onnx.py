"""ONNX export: the stored codes decode to exactly our weights, onnxruntime matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP, TinyCNN

from obc_native.torch import (
    ExportError,
    LayerConfig,
    Override,
    Recipe,
    compress,
    export_onnx,
    load_compressed,
    quantize_activations,
    save_compressed,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402


def run_onnx(path, *inputs, fused_accuracy_level: str | None = "0"):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if fused_accuracy_level is not None:
        # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with accuracy level 4 (int8
        # inputs) unless told otherwise
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", fused_accuracy_level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def torch_output(model, *inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The onnxruntime MatMulNBits bit order, written from its spec: first value in the low bits."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def decode_matmul_nbits(graph_model, layer: str) -> np.ndarray:
    """``N x K`` float32 weights of the MatMulNBits node of ``layer``, decoded by the spec."""
    node = next(n for n in graph_model.graph.node if n.name == f"{layer}/MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arrays = {i.name: numpy_helper.to_array(i) for i in graph_model.graph.initializer}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    codes = unpack_low_first(arrays[node.input[1]], bits, block).reshape(n, blocks * block)[:, :k]
    scales = arrays[node.input[2]].reshape(n, blocks)
    zeros = unpack_low_first(arrays[node.input[3]].reshape(n, -1), bits, blocks)
    index = np.arange(k) // block
    return ((codes.astype(np.float32) - zeros[:, index].astype(np.float32)) * scales[:, index]).astype(np.float32)


def decode_dequantized(graph_model, layer: str) -> np.ndarray:
    """Run the layer's weight-dequantization nodes alone in onnxruntime; returns the weight they feed."""
    nodes = [n for n in graph_model.graph.node if n.name.startswith(f"{layer}/weight_")]
    assert nodes and nodes[0].op_type == "DequantizeLinear"
    names = {i for n in nodes for i in n.input}
    initializers = [i for i in graph_model.graph.initializer if i.name in names]
    output = helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "weight", [], [output], initializers)
    small = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def wide_mlp():
    torch.manual_seed(0)
    return MLP(sizes=(64, 96, 64, 32))


def mlp_data():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(32, 64, generator=generator) for _ in range(2)]


@pytest.mark.parametrize(
    "config, expected",
    [
        (LayerConfig(bits=4, group_size=16, sym=False), "MatMulNBits 4-bit block 16"),
        (LayerConfig(bits=4), "MatMulNBits 4-bit block"),  # one grid per row: repeated per block
        (LayerConfig(bits=3, group_size=32, sym=True), "MatMulNBits 4-bit block 32"),
        (LayerConfig(bits=8, group_size=16), "MatMulNBits 8-bit block 16"),
        (LayerConfig(prune="nm", n=2, m=4, bits=2, group_size=16), "MatMulNBits 2-bit block 16"),
    ],
)
def test_linear_matmul_nbits_exact_codes(config, expected, tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, config, correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report)
    graph_model = onnx.load(result.path)
    for index, layer in enumerate(model.layers):
        name = f"layers.{index}"
        assert result.layers[name].startswith(expected)
        assert_bitwise(decode_matmul_nbits(graph_model, name), layer.weight.detach().numpy())
    assert not [i.name for i in graph_model.graph.initializer if i.name.endswith("weight")]  # no float copy left
    x = torch.randn(7, 64)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3
    assert result.file_size == (tmp_path / "m.onnx").stat().st_size


@pytest.mark.parametrize(
    "config, form",
    [
        (LayerConfig(bits=4, group_size=16, sym=False), "DequantizeLinear uint4 blocked 16"),
        (LayerConfig(bits=5), "DequantizeLinear uint8 per-channel"),
    ],
)
def test_linear_dequantize_linear_exact_codes(config, form, tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, config, correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report, matmul_nbits=False)
    graph_model = onnx.load(result.path)
    assert all(n.domain in ("", "ai.onnx") for n in graph_model.graph.node)  # standard ONNX only
    for index, layer in enumerate(model.layers):
        assert result.layers[f"layers.{index}"] == form
        weight = layer.weight.detach().numpy()
        decoded = decode_dequantized(graph_model, f"layers.{index}")
        assert_bitwise(decoded if decoded.shape == weight.shape else np.ascontiguousarray(decoded.T), weight)
    x = torch.randn(5, 64)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3


def test_group_without_power_of_two_block_uses_dequantize(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    batches = [torch.randn(32, 40)]
    report = compress(model, batches, LayerConfig(bits=4), correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report)
    # 40 and 24 columns: no power of two >= 16 divides them, so MatMulNBits cannot hold the grid
    assert result.layers == {"0": "DequantizeLinear uint4 per-channel", "2": "DequantizeLinear uint4 per-channel"}
    graph_model = onnx.load(result.path)
    assert_bitwise(decode_dequantized(graph_model, "0"), model[0].weight.detach().numpy())
    x = torch.randn(3, 40)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3


class Sequence3d(torch.nn.Module):
    """Linear layers on (batch, tokens, features): the exporter folds W.T for MatMul."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


@pytest.mark.parametrize("matmul_nbits", [True, False])
def test_linear_on_3d_inputs(matmul_nbits, tmp_path):
    torch.manual_seed(0)
    model = Sequence3d()
    batches = [torch.randn(4, 6, 32)]
    report = compress(model, batches, LayerConfig(bits=4, group_size=32), correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report, matmul_nbits=matmul_nbits)
    graph_model = onnx.load(result.path)
    for name in ("up", "down"):
        weight = getattr(model, name).weight.detach().numpy()
        if matmul_nbits:
            assert result.layers[name] == "MatMulNBits 4-bit block 32"
            assert_bitwise(decode_matmul_nbits(graph_model, name), weight)
        else:
            assert_bitwise(np.ascontiguousarray(decode_dequantized(graph_model, name).T), weight)
    x = torch.randn(2, 6, 32)  # another batch size than traced: dynamic batch axis
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3


CNN_RECIPES = {
    "2:4+int4": (LayerConfig(prune="nm", n=2, m=4, bits=4, sym=False), {}),
    "int4-g8": (LayerConfig(bits=4, group_size=8), {}),
    # 24 columns per group: channels-last groups that span kernel positions (C = 8)
    "int8-g24": (LayerConfig(bits=8), {"conv2": 24}),
}


@pytest.mark.parametrize("name", list(CNN_RECIPES))
def test_conv_qdq_exact_codes(name, cnn, cnn_batches, tmp_path):
    config, groups = CNN_RECIPES[name]
    overrides = [Override(layer, group_size=size) for layer, size in groups.items()]
    report = compress(cnn, cnn_batches, Recipe(default=config, skip=["conv1"], overrides=overrides), quiet=True)
    result = export_onnx(cnn, cnn_batches[0], tmp_path / "c.onnx", report=report)
    assert result.layers["conv2"].startswith("DequantizeLinear")
    assert "conv1" not in result.layers  # skipped: dense
    graph_model = onnx.load(result.path)
    assert_bitwise(decode_dequantized(graph_model, "conv2"), cnn.conv2.weight.detach().numpy())
    conv_nodes = [n for n in graph_model.graph.node if n.op_type == "Conv"]
    assert len(conv_nodes) == 2  # BatchNorm was not folded into the quantized conv's weights
    x = torch.randn(3, 1, 8, 8)
    assert relative_error(run_onnx(result.path, x), torch_output(cnn, x)) < 1e-3


def test_conv1d_and_depthwise(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(4, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv1d(8, 8, 5, groups=8, padding=2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 12, 4),
    ).eval()
    batches = [torch.randn(16, 4, 12)]
    recipe = Recipe(default=LayerConfig(bits=4, sym=True), overrides=[Override("0", group_size=4)])
    report = compress(model, batches, recipe, correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "c.onnx", report=report)
    graph_model = onnx.load(result.path)
    for name in ("0", "2"):
        assert_bitwise(decode_dequantized(graph_model, name), model.get_submodule(name).weight.detach().numpy())
    x = torch.randn(2, 4, 12)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3


@pytest.mark.parametrize(
    "bits, form", [(8, "QDQ uint8"), (4, "QDQ uint4"), (16, "QDQ uint16"), (3, "fake-quantize 3-bit (float ops)")]
)
def test_activation_quantization_qdq(bits, form, tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    wrappers = quantize_activations(model, batches, bits=bits)
    result = export_onnx(model, batches[0], tmp_path / "a.onnx", report=report)
    assert result.activations == {name: form for name in wrappers}
    assert all(form.startswith("MatMulNBits") for form in result.layers.values())
    graph_model = onnx.load(result.path)
    if bits in (4, 8, 16):
        quantize = [n for n in graph_model.graph.node if n.op_type == "QuantizeLinear"]
        assert len(quantize) == len(wrappers)
        arrays = {i.name: i for i in graph_model.graph.initializer}
        for node, wrapper in zip(quantize, wrappers.values()):
            assert numpy_helper.to_array(arrays[node.input[1]]) == np.float32(wrapper.scale)
            assert int(numpy_helper.to_array(arrays[node.input[2]])) == int(wrapper.zero)
    x = torch.randn(50, 64)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3
    assert not any(n.domain == "obc_native" for n in graph_model.graph.node)


class KeywordModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 16)

    def forward(self, x, mask=None, **unused):
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden if mask is None else hidden * mask)


def test_keyword_inputs_and_activation_scopes(tmp_path):
    torch.manual_seed(0)
    model = KeywordModel().eval()
    x, mask = torch.randn(8, 32), (torch.rand(8, 64) > 0.2).float()
    batches = [{"x": x, "mask": mask}]
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    wrappers = quantize_activations(model, batches, bits=8)
    result = export_onnx(model, (), tmp_path / "k.onnx", report=report, example_kwargs={"x": x, "mask": mask})
    assert result.activations == {"fc1": "QDQ uint8", "fc2": "QDQ uint8"} and sorted(wrappers) == ["fc1", "fc2"]
    assert sorted(result.layers) == ["fc1", "fc2"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(result.path, options, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "mask"]
    x2, mask2 = torch.randn(3, 32), (torch.rand(3, 64) > 0.2).float()
    got = session.run(None, {"x": x2.numpy(), "mask": mask2.numpy()})[0]
    with torch.no_grad():
        expected = model(x=x2, mask=mask2).numpy()
    assert relative_error(got, expected) < 1e-3


def test_pruned_only_and_dense_layers_stay_float(tmp_path):
    model, batches = wide_mlp(), mlp_data()
    recipe = Recipe(default=LayerConfig(prune="unstructured", sparsity=0.5), overrides=[Override("layers.2", bits=4)])
    report = compress(model, batches, recipe, correction=None, baseline=False, quiet=True)
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report, dense=["layers.2"])
    assert result.layers == {}
    graph_model = onnx.load(result.path)
    weights = [numpy_helper.to_array(i) for i in graph_model.graph.initializer if i.dims and len(i.dims) == 2]
    assert len(weights) == 3 and all(w.dtype == np.float32 for w in weights)
    x = torch.randn(5, 64)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-6


def test_saved_folder_gives_the_same_graph(tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    first = export_onnx(model, batches[0], tmp_path / "a.onnx", report=report)
    save_compressed(model, tmp_path / "saved", report)
    fresh = MLP(sizes=(64, 96, 64, 32))
    load_compressed(fresh, tmp_path / "saved")
    second = export_onnx(fresh, batches[0], tmp_path / "b.onnx", report=tmp_path / "saved")
    assert first.layers == second.layers
    again = export_onnx(model, batches[0], tmp_path / "c.onnx", report=report)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes() and again.layers == first.layers
    a, b = onnx.load(first.path), onnx.load(second.path)
    arrays_a = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    arrays_b = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert arrays_a.keys() == arrays_b.keys()
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)
    assert json.loads(dict((p.key, p.value) for p in b.metadata_props)["obc_native.layers"]) == second.layers


class Conv1D(torch.nn.Module):
    """Shaped like Hugging Face's GPT-2 ``Conv1D`` (weight stored in x out), without transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("matmul_nbits", [True, False])
def test_hf_conv1d(matmul_nbits, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(64, 32), torch.nn.GELU(), Conv1D(32, 64))
    batches = [torch.randn(4, 5, 32)]
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    assert [layer.kind for layer in report.compressed] == ["hf_conv1d", "hf_conv1d"]
    result = export_onnx(model, batches[0], tmp_path / "g.onnx", report=report, matmul_nbits=matmul_nbits)
    graph_model = onnx.load(result.path)
    for name in ("0", "2"):
        weight = model.get_submodule(name).weight.detach().numpy()  # in x out: our matrix is its transpose
        if matmul_nbits:
            assert result.layers[name] == "MatMulNBits 4-bit block 16"
            assert_bitwise(decode_matmul_nbits(graph_model, name), np.ascontiguousarray(weight.T))
        else:
            assert_bitwise(decode_dequantized(graph_model, name), weight)
    x = torch.randn(3, 5, 32)
    assert relative_error(run_onnx(result.path, x), torch_output(model, x)) < 1e-3


def test_hf_decoder_exports_without_its_key_value_cache(tmp_path):
    """GPT-2 returned its cache object, which the exporter cannot trace; without an attention mask
    transformers' mask code calls aten::diff, and the error says to give one."""
    from obc_torch_helpers import tiny_gpt2

    model = tiny_gpt2().eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    report = compress(model, [ids], Recipe(default=LayerConfig(bits=4, group_size=16), skip=["lm_head"]), quiet=True)
    with pytest.raises(ExportError, match=r"Hugging Face model, give an attention_mask input in the example"):
        export_onnx(model, (), tmp_path / "g.onnx", example_kwargs={"input_ids": ids}, report=report)
    mask = torch.ones_like(ids)
    result = export_onnx(model, (), tmp_path / "g.onnx", example_kwargs={"input_ids": ids, "attention_mask": mask},
                         report=report)
    assert model.config.use_cache is True  # restored
    assert result.layers["transformer.h.0.mlp.c_fc"] == "MatMulNBits 4-bit block 16"
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    test_ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    (logits,) = session.run(None, {"input_ids": test_ids.numpy(), "attention_mask": np.ones((3, 8), np.int64)})
    with torch.no_grad():
        expected = model(input_ids=test_ids).logits.numpy()
    assert relative_error(logits, expected) < 1e-3


# ----------------------------------------------------------------------------- bad input


def test_unwritable_path_fails_before_any_work(tmp_path, monkeypatch):
    model, batches = wide_mlp(), mlp_data()

    def no_export(*args, **kwargs):
        raise AssertionError("torch.onnx.export must not run")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, batches[0], tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, batches[0], tmp_path)
    with pytest.raises(TypeError, match="path: expected a str, bytes or os.PathLike, got int"):
        export_onnx(model, batches[0], 3)


def test_weights_off_grid_name_the_layer(tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    with torch.no_grad():
        model.layers[1].weight[0, 0] += 1e-3
    with pytest.raises(ExportError, match=r"layer 'layers\.1'.*no longer on its quantization grid.*dense"):
        export_onnx(model, batches[0], tmp_path / "m.onnx", report=report)
    assert not (tmp_path / "m.onnx").exists()
    result = export_onnx(model, batches[0], tmp_path / "m.onnx", report=report, dense=["layers.1"])
    assert set(result.layers) == {"layers.0", "layers.2"}
    save_compressed(model, tmp_path / "saved", report)  # a saved folder's grids, the weights not loaded
    with pytest.raises(ExportError, match=r"load its weights into the model first \(load_compressed"):
        export_onnx(wide_mlp(), batches[0], tmp_path / "m.onnx", report=tmp_path / "saved")


def test_report_of_another_model(tmp_path):
    model, batches = wide_mlp(), mlp_data()
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False, quiet=True)
    other = torch.nn.Sequential(torch.nn.Linear(64, 10))
    with pytest.raises(ExportError, match=r"report names layer 'layers\.0'"):
        export_onnx(other, batches[0], tmp_path / "m.onnx", report=report)
    with pytest.raises(TypeError, match="report must be"):
        export_onnx(model, batches[0], tmp_path / "m.onnx", report={"layers": []})


def test_weight_not_a_matmul_constant_names_the_layer(tmp_path):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 16)

        def forward(self, x):  # uses the weight in a computation, not as a MatMul constant
            return x @ (self.fc.weight * 2).t()

    torch.manual_seed(0)
    model = Scaled()
    report = compress(model, [torch.randn(8, 32)], LayerConfig(bits=4, group_size=16), baseline=False, quiet=True,
                      correction=None, forward=lambda m, b: m.fc(b))
    with pytest.raises(ExportError, match=r"layer 'fc'.*skip it.*dense=\["):
        export_onnx(model, torch.randn(2, 32), tmp_path / "m.onnx", report=report)


class Eigenvalues(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real  # no ONNX form


class CallsEigenvalues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.block = torch.nn.Sequential(torch.nn.ReLU(), Eigenvalues())

    def forward(self, x):
        return self.block(self.fc(x))


def test_unexportable_operator_is_an_export_error(tmp_path, capfd):
    with pytest.raises(ExportError, match="torch.onnx.export cannot export.*'aten::linalg_eigvals'.*the model "
                                          r"\(Eigenvalues\): replace"):
        export_onnx(Eigenvalues(), torch.randn(2, 3, 3), tmp_path / "m.onnx")
    # the module that calls it is named, also inside the keyword-input wrapper; the exporter's
    # dump of its whole graph on stdout is gone
    x = torch.randn(2, 3, 3)
    for kwargs in ({"example_args": x}, {"example_args": (), "example_kwargs": {"x": x}}):
        with pytest.raises(ExportError, match=r"called in module 'block\.1' \(Eigenvalues\)"):
            export_onnx(CallsEigenvalues(), path=tmp_path / "m.onnx", **kwargs)
    nested = torch.nn.Module()  # scope names skip containers that are only indexed: the full name is found
    nested.net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ModuleDict({"inner": CallsEigenvalues()}))
    nested.forward = lambda x: nested.net[1]["inner"](x)
    with pytest.raises(ExportError, match=r"called in module 'net\.1\.inner\.block\.1' \(Eigenvalues\)"):
        export_onnx(nested, torch.randn(2, 3, 3), tmp_path / "m.onnx")
    assert "graph" not in capfd.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    model, batches = wide_mlp(), mlp_data()
    with pytest.raises(ValueError, match="accuracy_level"):
        export_onnx(model, batches[0], tmp_path / "m.onnx", accuracy_level=7)
    with pytest.raises(TypeError, match="example_args"):
        export_onnx(model, [batches[0]], tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="model must be"):
        export_onnx("model", batches[0], tmp_path / "m.onnx")


# ----------------------------------------------------------------------------- command line


def test_cli_export(tmp_path, capsys):
    from obc_native.cli import main

    torch.manual_seed(0)
    model = TinyCNN().eval()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    calibration = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(calibration, tmp_path / "calib.pt")
    (tmp_path / "r.json").write_text(json.dumps({"default": {"bits": 4, "group_size": 8}, "skip": ["conv1"]}))
    arch = "obc_torch_helpers:TinyCNN"
    assert main(["compress", "--model", str(tmp_path / "w.safetensors"), "--arch", arch, "--calibration",
                 str(tmp_path / "calib.pt"), "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "out"), "--out", str(out),  # --format onnx is the default
                 "--example", str(tmp_path / "calib.pt")]) == 0
    printed = capsys.readouterr().out
    # fc: groups of 8 columns, no MatMulNBits block size (a power of two >= 16) fits in them
    assert "conv2: DequantizeLinear uint4 blocked 8\nfc: DequantizeLinear uint4 blocked 8\n" in printed
    fresh = TinyCNN()
    load_compressed(fresh, tmp_path / "out")
    x = torch.randn(4, 1, 8, 8)
    assert relative_error(run_onnx(out, x), torch_output(fresh.eval(), x)) < 1e-3

    assert main(["export", str(tmp_path / "out"), "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx"),
                 "--example", str(tmp_path / "calib.pt")]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "out"), "--format", "onnx", "--out", str(out),
                 "--example", str(tmp_path / "none.pt")]) == 1
    assert "--example" in capsys.readouterr().err
    size = out.stat().st_size
    for option, expected in ((["--format", "tflite"], "--format tflite: unknown format; export writes onnx"),
                             (["--format", "gguf"], "save_gguf"),
                             (["--out", str(tmp_path / "m.gguf")], "export writes ONNX (give a .onnx file)")):
        args = ["export", str(tmp_path / "out"), "--out", str(out), "--example", str(tmp_path / "calib.pt")]
        assert main(args + option) == 1
        err = capsys.readouterr().err
        assert err.startswith("obc-native: error: ") and expected in err and len(err.splitlines()) == 1, err
    assert out.stat().st_size == size and not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_cli_export_of_a_hugging_face_folder(tmp_path, capsys):
    """A folder written by `compress --hf` is rebuilt from its config.json; keyword example inputs."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from obc_native.cli import main

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (16, 8), generator=generator)
    example = {"input_ids": ids, "attention_mask": torch.ones(16, 8, dtype=torch.long)}
    save_file(example, str(tmp_path / "ids.safetensors"))
    (tmp_path / "r.json").write_text(json.dumps({"default": {"bits": 4, "group_size": 16}}))
    assert main(["compress", "--hf", str(tmp_path / "bert"), "--calibration", str(tmp_path / "ids.safetensors"),
                 "--batch-size", "8", "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    out = tmp_path / "bert.onnx"
    assert main(["export", str(tmp_path / "out"), "--format", "onnx", "--out", str(out),
                 "--example", str(tmp_path / "ids.safetensors")]) == 0
    assert "encoder.layer.0.intermediate.dense: MatMulNBits 4-bit block 16" in capsys.readouterr().out
    model = transformers.BertModel(config)
    load_compressed(model, tmp_path / "out")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == ["attention_mask", "input_ids"]  # keyword inputs
    test_ids = torch.randint(0, 100, (3, 8), generator=generator)
    mask = torch.ones(3, 8, dtype=torch.long)
    got = session.run(None, {"input_ids": test_ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model.eval()(input_ids=test_ids, attention_mask=mask).last_hidden_state.numpy()
    assert relative_error(got, expected) < 1e-3
