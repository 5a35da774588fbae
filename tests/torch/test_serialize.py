"""Save / load: bit packing, bit-exact round trips, compact files, clear errors on bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP, TinyCNN, tiny_gpt2, write_manifest
from torch import nn

from obc_native.torch import (
    LayerConfig,
    Recipe,
    SerializationError,
    compress,
    load_compressed,
    read_manifest,
    save_compressed,
)
from obc_native.torch.serialize import MANIFEST_NAME, TENSORS_NAME, pack_bits, unpack_bits

pytestmark = pytest.mark.torch


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        bytes_a, bytes_b = (t.reshape(-1).numpy().view(np.uint8) for t in (sa[key], sb[key]))
        assert np.array_equal(bytes_a, bytes_b), key


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 13, 1000):
        values = rng.integers(0, 1 << bits, size=count, dtype=np.uint8)
        packed = pack_bits(values, bits)
        assert packed.size == -(-count * bits // 8)
        np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)


def test_pack_layout():
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 15, 0], dtype=np.uint8), 4), [0x12, 0xF0])
    np.testing.assert_array_equal(pack_bits(np.array([1, 0, 1], dtype=np.uint8), 1), [0b10100000])
    with pytest.raises(ValueError, match="fit in 3 bits"):
        pack_bits(np.array([8], dtype=np.uint8), 3)
    with pytest.raises(SerializationError, match="bytes"):
        unpack_bits(np.zeros(3, dtype=np.uint8), 4, 8)


RECIPES = {
    "unstructured": LayerConfig(prune="unstructured", sparsity=0.5),
    "2:4+int4": LayerConfig(prune="nm", n=2, m=4, bits=4, sym=False),
    "int3": LayerConfig(bits=3, sym=True),
    "int4-g8": LayerConfig(bits=4, group_size=8, sym=False),
    "structured+int5": LayerConfig(prune="structured", sparsity=0.25, bits=5),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_cnn_roundtrip_bit_exact(name, cnn, cnn_batches, tmp_path):
    recipe = Recipe(default=RECIPES[name], skip=["conv1"])
    report = compress(cnn, cnn_batches, recipe, baseline=False, quiet=True)
    manifest = save_compressed(cnn, tmp_path, report)
    bits = RECIPES[name].bits
    for layer in ("conv2", "fc"):
        entry = manifest["layers"][layer]
        assert ("quantized" in entry["storage"]) == (bits is not None)
        assert ("sparse" in entry["storage"]) == (RECIPES[name].prune is not None)
    fresh = TinyCNN()
    load_compressed(fresh, tmp_path)
    assert_bit_identical(cnn, fresh)
    x = cnn_batches[0]
    with torch.no_grad():
        assert torch.equal(cnn.eval()(x), fresh.eval()(x))


def test_gpt2_roundtrip_bit_exact(tmp_path):
    model = tiny_gpt2(layers=1)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}]
    report = compress(model, batches, LayerConfig(prune="nm", n=2, m=4, bits=4), baseline=False, quiet=True)
    save_compressed(model, tmp_path, report)
    fresh = tiny_gpt2(seed=1, layers=1)
    load_compressed(fresh, tmp_path)
    assert_bit_identical(model, fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # ties survive loading


def test_files_shrink_with_compression(tmp_path):
    torch.manual_seed(0)
    calibration = [torch.randn(64, 128) for _ in range(2)]
    sizes = {}
    for name, config in [
        ("dense", None),
        ("50%", LayerConfig(prune="unstructured", sparsity=0.5)),
        ("75%", LayerConfig(prune="unstructured", sparsity=0.75)),
        ("int4", LayerConfig(bits=4)),
        ("2:4+int4", LayerConfig(prune="nm", n=2, m=4, bits=4)),
    ]:
        torch.manual_seed(1)
        model = MLP(sizes=(128, 128, 128), bias=False)
        report = None
        if config is not None:
            report = compress(model, calibration, config, correction=None, baseline=False, quiet=True)
        directory = tmp_path / name.replace(":", "_").replace("%", "")
        save_compressed(model, directory, report)
        sizes[name] = os.path.getsize(directory / TENSORS_NAME)
        load_compressed(MLP(sizes=(128, 128, 128), bias=False), directory)
    dense = sizes["dense"]
    assert dense > 2 * 128 * 128 * 4
    assert sizes["50%"] < 0.6 * dense  # 1/32 mask + half the values
    assert sizes["75%"] < 0.35 * dense
    assert sizes["int4"] < 0.15 * dense  # 1/8 codes + per-row grids
    assert sizes["2:4+int4"] < 0.2 * dense  # 1/32 mask + 1/16 codes


def test_save_without_report_stores_sparse_values(mlp, mlp_batches, tmp_path):
    compress(mlp, mlp_batches, LayerConfig(prune="unstructured", sparsity=0.9), correction=None, quiet=True)
    manifest = save_compressed(mlp, tmp_path)
    assert {e["storage"] for e in manifest["layers"].values()} == {"sparse"}
    fresh = MLP()
    load_compressed(fresh, tmp_path)
    assert_bit_identical(mlp, fresh)


def test_weights_modified_after_compression_fall_back_to_values(mlp, mlp_batches, tmp_path, caplog):
    report = compress(mlp, mlp_batches, LayerConfig(bits=4), correction=None, quiet=True)
    with torch.no_grad():
        mlp.layers[0].weight[0, 0] += 1e-3  # off the grid
    manifest = save_compressed(mlp, tmp_path, report)
    assert manifest["layers"]["layers.0"]["storage"] in ("dense", "sparse")
    assert manifest["layers"]["layers.1"]["storage"] == "quantized"
    assert "not on its quantization grid" in caplog.text
    fresh = MLP()
    load_compressed(fresh, tmp_path)
    assert_bit_identical(mlp, fresh)


@pytest.fixture
def saved(cnn, cnn_batches, tmp_path):
    report = compress(cnn, cnn_batches, Recipe(default=LayerConfig(prune="nm", bits=4), skip=["conv1"]), quiet=True)
    save_compressed(cnn, tmp_path, report)
    return tmp_path


def test_corrupted_tensor_file(saved):
    path = saved / TENSORS_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SerializationError, match="checksum mismatch"):
        load_compressed(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_truncated_tensor_file_with_matching_checksum(saved):
    path = saved / TENSORS_NAME
    path.write_bytes(path.read_bytes()[:100])
    manifest = json.loads((saved / MANIFEST_NAME).read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(saved, manifest)
    with pytest.raises(SerializationError, match="cannot read tensors"):
        load_compressed(TinyCNN(), saved)


def test_bad_manifests(saved, tmp_path):
    with pytest.raises(SerializationError, match="no such file"):
        load_compressed(TinyCNN(), tmp_path / "missing")
    manifest_path = saved / MANIFEST_NAME
    original = manifest_path.read_text()
    manifest_path.write_text(original[: len(original) // 2])
    with pytest.raises(SerializationError, match="corrupted manifest"):
        read_manifest(saved)
    data = json.loads(original)
    data["version"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(SerializationError, match="version 99"):
        read_manifest(saved)
    data = json.loads(original)
    data["layers"]["fc"]["nonzeros"] += 1
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(SerializationError, match="manifest checksum mismatch"):
        load_compressed(TinyCNN(), saved)
    write_manifest(saved, data)
    with pytest.raises(SerializationError, match="layer 'fc': mask"):
        load_compressed(TinyCNN(), saved)


def test_mismatched_architectures(saved):
    with pytest.raises(SerializationError, match="architecture mismatch.*keys"):
        load_compressed(MLP(), saved)

    class Wider(TinyCNN):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8 * 4 * 4, 12)

    with pytest.raises(SerializationError, match=r"architecture mismatch: layer 'fc' has weight \[12, 128\]"):
        load_compressed(Wider(), saved)

    class Renamed(TinyCNN):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False, groups=2)

    with pytest.raises(SerializationError, match="layer 'conv2'"):
        load_compressed(Renamed(), saved)

    class Other(TinyCNN):
        def __init__(self):
            super().__init__()
            self.fc = nn.Conv1d(128, 10, 1)

    with pytest.raises(SerializationError, match="layer 'fc' is Conv1d"):
        load_compressed(Other(), saved)


def test_negative_zero_and_other_dtypes_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLP(sizes=(16, 32, 8)).double()
    with torch.no_grad():
        model.layers[0].weight[:, ::2] = 0.0
        model.layers[0].weight[0, 0] = -0.0
    save_compressed(model, tmp_path)
    fresh = MLP(sizes=(16, 32, 8)).double()
    load_compressed(fresh, tmp_path)
    assert_bit_identical(model, fresh)
    assert torch.signbit(fresh.layers[0].weight[0, 0])


def test_another_models_report_or_a_shrunk_layer_stores_the_weights_as_values(tmp_path, caplog):
    """A report of another model (same widths or not) never changes what is saved: its grids do
    not hold these weights, so each layer is stored as values, with a warning that says why, and
    loads back bit for bit. A shrunk model saves with its own report the same way."""
    from obc_native.torch import shrink_structured

    def mlp(seed, sizes=(64, 64, 32)):
        torch.manual_seed(seed)
        return MLP(sizes=sizes).eval()

    batch = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    recipe = Recipe(default=LayerConfig(bits=4, group_size=32))
    model, other = mlp(0), mlp(1)
    report = compress(model, [batch], recipe, correction=None, quiet=True)
    compress(other, [batch], recipe, correction=None, quiet=True)
    manifest = save_compressed(other, tmp_path / "same_widths", report)
    assert {e["storage"] for e in manifest["layers"].values()} <= {"dense", "sparse"}
    assert {e["stored_as_values"] for e in manifest["layers"].values()} == {"weights are not on its quantization grid"}
    assert "weights are not on its quantization grid; stored as values" in caplog.text
    loaded = mlp(2)
    load_compressed(loaded, tmp_path / "same_widths")
    assert_bit_identical(other, loaded)

    caplog.clear()
    wider = mlp(3, sizes=(64, 96, 32))
    save_compressed(wider, tmp_path / "other_widths", report)
    assert ("layer 'layers.0': the report's grid (scales (64, 2), groups of 32) does not fit the 96 x 64 weight (the report of "
            "another model, or a shrunk layer); stored as values") in caplog.text
    loaded = mlp(4, sizes=(64, 96, 32))
    load_compressed(loaded, tmp_path / "other_widths")
    assert_bit_identical(wider, loaded)

    pruned = mlp(5)
    report = compress(pruned, [batch], Recipe(default=LayerConfig(prune="structured", sparsity=0.5, bits=4)),
                      correction=None, quiet=True)
    shrink_structured(pruned)
    assert pruned.layers[0].out_features < 64
    caplog.clear()
    # layers.1's per-row grid (groups of 64) still covers its 32 remaining columns, but not in a
    # shape load_compressed reads: this folder used to be written and then refused as malformed
    manifest = save_compressed(pruned, tmp_path / "shrunk", report)
    assert "layer 'layers.1': the report's grid (scales (32, 1), groups of 64) does not fit" in caplog.text
    # the entry keeps the report's mode, and says the file holds values, not codes, and why
    entry = manifest["layers"]["layers.1"]
    assert entry["storage"] in ("dense", "sparse") and "bits" not in entry and entry["mode"] == report.layers[1].mode
    assert entry["stored_as_values"] == ("the report's grid (scales (32, 1), groups of 64) does not fit the 32 x "
                                         f"{pruned.layers[0].out_features} weight (the report of another model, or "
                                         "a shrunk layer)")
    loaded = mlp(6, sizes=(64, pruned.layers[0].out_features, 32))
    load_compressed(loaded, tmp_path / "shrunk")
    assert_bit_identical(pruned, loaded)
