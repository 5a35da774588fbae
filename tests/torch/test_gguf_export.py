"""save_gguf: Q4_0 / Q8_0 blocks that gguf's own reader dequantizes to the model's codes on float16 scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from obc_native.torch import LayerConfig, Recipe, compress
from obc_native.torch.gguf_export import GGUFExportError, gguf_layer_config, save_gguf

pytestmark = pytest.mark.torch
gguf = pytest.importorskip("gguf")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


BATCHES = [torch.randn(96, 64, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("block_type", ["Q4_0", "Q8_0"])
def test_gguf_reader_dequantizes_to_the_model_codes_on_float16_scales(tmp_path, block_type):
    model = small_model()
    report = compress(model, BATCHES, Recipe(default=gguf_layer_config(block_type), skip=["2", "4"]), quiet=True)
    before = model[0].weight.detach().clone()
    layers = save_gguf(model, report, tmp_path / "m.gguf")
    assert [(l.name, l.type, l.shape) for l in layers] == [("0", block_type, (48, 64))]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["0.weight"].tensor_type == getattr(gguf.GGMLQuantizationType, block_type)
    dequantized = gguf.quants.dequantize(tensors["0.weight"].data, tensors["0.weight"].tensor_type)
    assert dequantized.shape == (48, 64)
    # the same codes as the model's, on the report's scales rounded to float16
    scale = torch.from_numpy(report.layers[0].grid.scale).repeat_interleave(32, dim=1)
    levels = torch.round(before / scale)
    expected = (scale.half().float() * levels).numpy()
    assert np.array_equal(dequantized.view(np.uint32), expected.view(np.uint32))
    # float16 scales: a change of at most 2^-11 of a group's scale per level, reported
    assert layers[0].max_abs_change == float(np.abs(dequantized - before.numpy()).max())
    assert 0 < layers[0].max_abs_change <= float(before.abs().max()) * 2**-10
    assert torch.equal(model[0].weight, before)  # the model is left as it was
    for key, value in model.state_dict().items():
        if key != "0.weight":
            assert tensors[key].tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(tensors[key].data).reshape(value.shape), value.numpy()), key


def test_gguf_twice_gives_the_same_file_and_leaves_the_model_unchanged(tmp_path):
    """save_gguf used to set the model's weights to their float16-scale values, so a second call
    with the same model and report failed with "weights off the reported grid"."""
    from obc_native.torch import EmbeddingRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 40)).eval()
    ids = [torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(2))]
    recipe = Recipe(default=gguf_layer_config("Q8_0"), skip=["3"],
                    embeddings=[EmbeddingRule("0", bits=4, sym=True, group_size=32)])
    report = compress(model, ids, recipe, quiet=True)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    first = save_gguf(model, report, tmp_path / "a.gguf")
    second = save_gguf(model, report, tmp_path / "b.gguf")
    assert first == second and sorted(l.name for l in first) == ["0", "1"]
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key].view(torch.uint8).flatten(),
                                                               value.view(torch.uint8).flatten()), key


def test_gguf_q4_0_blocks_match_ggml_reference_packing(tmp_path):
    """A grid gguf's own Q4_0 quantizer reproduces: same bytes (nibble layout, float16 scale)."""
    model = nn.Sequential(nn.Linear(32, 2, bias=False))
    weights = torch.tensor([[-8.0] + [float(i % 16 - 8) for i in range(1, 32)],
                            [3.5] + [float((i * 5) % 16 - 8) / 2 for i in range(1, 32)]])
    with torch.no_grad():
        model[0].weight.copy_(weights * 0.25)
    from obc_native.torch.report import CompressionReport, LayerReport, QuantGrid

    grid = QuantGrid(4, True, 32, "native", np.array([[0.25], [0.125]], dtype=np.float32),
                     np.full((2, 1), 8, dtype=np.uint8))
    layer = LayerReport(name="0", kind="linear", shape=(2, 32), mode="int4", method="rtn", sparsity=0.0, bits=4,
                        loss=0.0, seconds=0.0, grid=grid)
    report = CompressionReport(layers=[layer])
    save_gguf(model, report, tmp_path / "m.gguf")
    stored = next(t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name == "0.weight")
    assert np.array_equal(np.asarray(stored.data)[0], gguf.quants.quantize(model[0].weight[:1].detach().numpy(),
                                                                            gguf.GGMLQuantizationType.Q4_0)[0])


def test_grids_gguf_cannot_hold_are_refused(tmp_path):
    model = small_model()
    report = compress(model, BATCHES, Recipe(default=LayerConfig(bits=4, sym=False, group_size=32), skip=["2", "4"]),
                      quiet=True)
    with pytest.raises(GGUFExportError, match="layer '0': grid of 4 bits, sym=False, group_size=32"):
        save_gguf(model, report, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    conv = nn.Sequential(nn.Conv2d(32, 4, 1))
    report = compress(conv, [torch.randn(8, 32, 3, 3)], Recipe(default=gguf_layer_config("Q8_0")), quiet=True)
    with pytest.raises(GGUFExportError, match=r"layer '0' \(Conv2d\): only nn.Linear"):
        save_gguf(conv, report, tmp_path / "c.gguf")
    with pytest.raises(ValueError, match=r"\['bits'\] are fixed by Q4_0"):
        gguf_layer_config("Q4_0", bits=3)
    with pytest.raises(ValueError, match="block_type: expected one of"):
        gguf_layer_config("Q5_K")
    with pytest.raises(TypeError, match="block_type: expected one of"):
        gguf_layer_config(4)


def test_scale_outside_float16_is_refused(tmp_path):
    from obc_native.torch.report import CompressionReport, LayerReport, QuantGrid

    model = nn.Sequential(nn.Linear(32, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(32.0).remainder(16).sub(8).mul(1e5).view(1, 32))
    grid = QuantGrid(4, True, 32, "native", np.array([[1e5]], dtype=np.float32), np.full((1, 1), 8, dtype=np.uint8))
    layer = LayerReport(name="0", kind="linear", shape=(1, 32), mode="int4", method="rtn", sparsity=0.0, bits=4,
                        loss=0.0, seconds=0.0, grid=grid)
    before = model[0].weight.detach().clone()
    with pytest.raises(GGUFExportError, match="layer '0': a scale outside float16's range"):
        save_gguf(model, CompressionReport(layers=[layer]), tmp_path / "m.gguf")
    assert torch.equal(model[0].weight, before) and not (tmp_path / "m.gguf").exists()


def test_quantized_embedding_table_as_q4_0(tmp_path):
    """A recipe's embedding table (symmetric 4-bit, groups of 32) is written as Q4_0 blocks too."""
    from obc_native.torch import EmbeddingRule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 8)).eval()
    ids = [torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(2))]
    recipe = Recipe(default=gguf_layer_config("Q4_0"), skip=["1"],
                    embeddings=[EmbeddingRule("0", bits=4, sym=True, group_size=32)])
    report = compress(model, ids, recipe, quiet=True)
    layers = save_gguf(model, report, tmp_path / "m.gguf")
    assert [(l.name, l.type, l.shape) for l in layers] == [("0", "Q4_0", (40, 64))]
    tensor = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["0.weight"]
    dequantized = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    scale = torch.from_numpy(next(l for l in report.layers if l.name == "0").grid.scale).repeat_interleave(32, dim=1)
    expected = scale.half().float() * torch.round(model[0].weight.detach() / scale)
    assert np.array_equal(dequantized.view(np.uint32), expected.numpy().view(np.uint32))
