"""Every new file the package writes gets the permission bits a plain ``open(path, "w")`` would give
(0666 less the umask), also where it is written to a temporary file and renamed into place; a
replaced file keeps its own."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP

from obc_native.budget import LevelDatabase
from obc_native.hessian import HessianAccumulator
from obc_native.torch import LayerConfig, compress, export_onnx, save_compressed

pytestmark = [pytest.mark.torch, pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")]

UMASK = 0o027  # not the usual 022, so that a hard-coded 0644 would fail too
EXPECTED = 0o666 & ~UMASK


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    yield
    os.umask(previous)


def modes(directory) -> dict[str, str]:
    """{file name relative to directory: octal permission bits} of every file below it."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = oct(stat.S_IMODE(os.stat(path).st_mode))
    return found


def assert_open_modes(directory, expected_files):
    found = modes(directory)
    assert set(expected_files) <= set(found), found
    assert found == {name: oct(EXPECTED) for name in found}


def quantized_mlp():
    torch.manual_seed(0)
    model = MLP(sizes=(32, 48, 16))
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(1))]
    report = compress(model, batches, LayerConfig(bits=4, group_size=16), correction=None, baseline=False,
                      quiet=True)
    return model, batches, report


def test_onnx_exports_and_saved_models(tmp_path, umask):
    pytest.importorskip("onnx")
    model, batches, report = quantized_mlp()
    export_onnx(MLP(sizes=(32, 48, 16)), batches[0], tmp_path / "float.onnx")
    export_onnx(model, batches[0], tmp_path / "q.onnx", report=report)
    save_compressed(model, tmp_path / "saved", report)
    assert_open_modes(tmp_path, ["float.onnx", "q.onnx", "saved/manifest.json", "saved/compressed.safetensors"])
    (tmp_path / "q.onnx").chmod(0o600)  # a replaced file keeps its mode (test_atomic_writes.py: every writer)
    export_onnx(model, batches[0], tmp_path / "q.onnx", report=report)
    assert stat.S_IMODE((tmp_path / "q.onnx").stat().st_mode) == 0o600


def test_level_database_checkpoint_and_hessian_files(tmp_path, umask):
    model, batches, _ = quantized_mlp()
    compress(model, batches, LayerConfig(bits=4), correction=None, baseline=False, quiet=True,
             checkpoint=tmp_path / "checkpoint")
    LevelDatabase(meta={"model": "test"}).save(tmp_path / "levels.json")
    accumulator = HessianAccumulator(4)
    accumulator.add(np.ones((3, 4), dtype=np.float32))
    accumulator.save(tmp_path / "h.obch")
    assert len(modes(tmp_path / "checkpoint")) >= 2
    assert_open_modes(tmp_path, ["levels.json", "h.obch"])


def test_hugging_face_folder_and_gguf(tmp_path, umask):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from obc_native.torch.gguf_export import gguf_layer_config, save_gguf
    from obc_native.torch.hf_checkpoint import save_hf_checkpoint

    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    torch.manual_seed(0)
    save_hf_checkpoint(transformers.BertModel(config).eval(), tmp_path / "hf")
    linear = torch.nn.Sequential(torch.nn.Linear(64, 8))
    report = compress(linear, [torch.randn(16, 64)], gguf_layer_config("Q8_0"), correction=None, baseline=False,
                      quiet=True)
    save_gguf(linear, report, tmp_path / "m.gguf")
    assert_open_modes(tmp_path, ["hf/model.safetensors", "hf/config.json", "m.gguf"])


def test_float_export_declares_no_unused_opset_domain(tmp_path, capfd):
    """torch warned "Custom opset domain: 'obc_native' provided is not used" on every float export."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    export_onnx(MLP(sizes=(32, 48, 16)), torch.randn(4, 32), tmp_path / "float.onnx")
    captured = capfd.readouterr()
    assert "opset domain" not in captured.err + captured.out
    domains = {entry.domain for entry in onnx.load(str(tmp_path / "float.onnx")).opset_import}
    assert "obc_native" not in domains
