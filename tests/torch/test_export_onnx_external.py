"""ONNX export of large models: weights in an external-data file next to the ``.onnx`` (chosen by
``external_data=`` or, automatically, above protobuf's 2 GiB limit, lowered here through the
module's constant), written atomically as a pair, and graphs built without ever serializing the
weights. A real >2 GiB export takes about a minute and 5 GiB of memory: measured by hand, not here."""

from __future__ import annotations

import errno
import importlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from obc_torch_helpers import MLP

from obc_native.torch import ExportError, compress, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

export_module = importlib.import_module("obc_native.torch.export_onnx")  # the module, not the function
pytestmark = pytest.mark.torch


def quantized_model():
    """Two MatMulNBits layers (4-bit, groups of 16) and a dense head; initializers of several sizes."""
    torch.manual_seed(0)
    model = MLP(sizes=(64, 96, 64, 32))
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(32, 64, generator=generator) for _ in range(2)]
    recipe = {"default": {"bits": 4, "group_size": 16}, "skip": ["layers.2"]}
    report = compress(model, batches, recipe, correction=None, baseline=False, quiet=True)
    return model.eval(), report


def run(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def initializers(path) -> dict[str, np.ndarray]:
    """Every initializer of the ONNX file ``path`` (external data read from its folder)."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    """{name: (bytes, permission bits)} of every entry of ``directory`` (hidden ones included)."""
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(Path(directory).iterdir())}


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (test)")


@pytest.mark.parametrize("matmul_nbits", [True, False])
def test_external_data_runs_like_the_single_file_with_the_same_codes(tmp_path, matmul_nbits):
    model, report = quantized_model()
    single = export_onnx(model, torch.randn(2, 64), tmp_path / "single.onnx", report=report,
                         matmul_nbits=matmul_nbits)
    external = export_onnx(model, torch.randn(2, 64), tmp_path / "ext.onnx", report=report,
                           matmul_nbits=matmul_nbits, external_data=True)
    assert single.data_path is None and single.files == {str(tmp_path / "single.onnx"): single.file_size}
    data = tmp_path / "ext.onnx.data"
    assert external.data_path == str(data) and external.data_size == data.stat().st_size > 0
    assert external.files == {str(tmp_path / "ext.onnx"): external.file_size, str(data): external.data_size}
    assert external.file_size == (tmp_path / "ext.onnx").stat().st_size
    assert external.layers == single.layers
    assert f"{data}: {external.data_size} bytes (external data: the weights)" in external.table()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "single.onnx"]

    # the .onnx names its data file relative to its folder; every large initializer is there
    graph = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False).graph
    places = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL}
    assert places and {p["location"] for p in places.values()} == {"ext.onnx.data"}
    embedded = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < 1024 for t in embedded)
    assert sum(int(p["length"]) for p in places.values()) <= external.data_size
    assert external.file_size < single.file_size / 4

    # the single file is written as before the external-data path existed: no location fields
    assert not any(t.HasField("data_location") or t.external_data
                   for t in onnx.load(str(tmp_path / "single.onnx")).graph.initializer)

    # the same tensors (quantized codes, scales, zero points, float weights), bit for bit
    expected, got = initializers(tmp_path / "single.onnx"), initializers(tmp_path / "ext.onnx")
    assert sorted(expected) == sorted(got)
    codes = [name for name in expected if name.endswith(":codes")]
    assert len(codes) == 2
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name

    x = torch.randn(5, 64)
    assert np.array_equal(run(tmp_path / "ext.onnx", x), run(tmp_path / "single.onnx", x))
    # the pair still loads after a move: onnxruntime reads the data from the model's folder
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("ext.onnx", "ext.onnx.data"):
        (tmp_path / name).rename(moved / name)
    assert np.array_equal(run(moved / "ext.onnx", x), run(tmp_path / "single.onnx", x))


def test_automatic_choice_follows_the_size_limit(tmp_path, monkeypatch):
    model, report = quantized_model()
    path = tmp_path / "m.onnx"
    assert export_onnx(model, torch.randn(2, 64), path, report=report).data_path is None
    single_size = path.stat().st_size
    monkeypatch.setattr(export_module, "_SINGLE_FILE_LIMIT", single_size - 100)  # now "too big" for one file
    result = export_onnx(model, torch.randn(2, 64), path, report=report)
    assert result.data_path == str(path) + ".data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        np.testing.assert_allclose(run(path, x), model(x).numpy(), rtol=0, atol=1e-4)

    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match=r"protobuf's 2 GiB limit.*external_data=True"):
        export_onnx(model, torch.randn(2, 64), path, report=report, external_data=False)
    assert snapshot(tmp_path) == before  # nothing written, no staging folder left

    # the size estimate errs high (it counts the placeholders of detached data): well above it
    monkeypatch.setattr(export_module, "_SINGLE_FILE_LIMIT", 2 * single_size)
    assert export_onnx(model, torch.randn(2, 64), path, report=report).data_path is None


def test_large_models_are_traced_into_a_staging_folder(tmp_path, monkeypatch):
    """Above _IN_MEMORY_TRACE_LIMIT torch writes its export into a staging folder (its in-memory
    export refuses more than 2 GiB); the file is the same, and nothing is left in the folder."""
    model, report = quantized_model()
    export_onnx(model, torch.randn(2, 64), tmp_path / "memory.onnx", report=report)
    monkeypatch.setattr(export_module, "_IN_MEMORY_TRACE_LIMIT", 0)
    export_onnx(model, torch.randn(2, 64), tmp_path / "file.onnx", report=report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.onnx", "memory.onnx"]
    expected, got = initializers(tmp_path / "memory.onnx"), initializers(tmp_path / "file.onnx")
    assert sorted(expected) == sorted(got)
    assert all(np.array_equal(got[name], array) for name, array in expected.items())
    x = torch.randn(3, 64)
    assert np.array_equal(run(tmp_path / "file.onnx", x), run(tmp_path / "memory.onnx", x))


def test_external_tensors_of_the_trace_are_read_from_its_folder(tmp_path):
    """Above 2 GiB torch writes each tensor to a file of its own next to the model: read here
    (a model saved so by onnx stands in for it), and a location outside the folder is refused."""
    from onnx import TensorProto, helper

    weights = {"w": np.arange(512, dtype=np.float32).reshape(16, 32), "b": np.ones(32, np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    folder = tmp_path / "trace"
    folder.mkdir()
    onnx.save_model(helper.make_model(graph), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(folder.iterdir())) == 3
    graph_model = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    tensors = export_module._TensorData()
    tensors.detach_all(graph_model, str(folder))
    assert tensors.nbytes == sum(a.nbytes for a in weights.values())
    for tensor in graph_model.graph.initializer:
        assert np.array_equal(tensors.array(tensor), weights[tensor.name])
    tensors.embed(graph_model)  # back in the proto: what a single-file export writes
    assert {t.name: numpy_helper.to_array(t).tolist() for t in graph_model.graph.initializer} == {
        name: array.tolist() for name, array in weights.items()
    }

    escaping = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    for entry in escaping.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../elsewhere"
    with pytest.raises(RuntimeError, match="lies outside"):
        export_module._TensorData().detach_all(escaping, str(folder))


# ----------------------------------------------------------------------------- atomic pairs


def exported_pair(tmp_path):
    """A quantized model and a folder holding its external-data export m.onnx + m.onnx.data, the
    data file with mode 0600 (kept by a replacement)."""
    model, report = quantized_model()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 64), path, report=report, external_data=True)
    (tmp_path / "m.onnx.data").chmod(0o600)
    return model, report, path


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device (test)"), KeyboardInterrupt()])
def test_failure_half_way_through_the_data_file_leaves_the_previous_pair(tmp_path, monkeypatch, failure):
    model, report, path = exported_pair(tmp_path)
    before = snapshot(tmp_path)
    original = export_module._TensorData.write_external

    def half_then_fail(self, graph_model, file, location):
        original(self, graph_model, file, location)
        with open(file, "r+b") as handle:
            handle.truncate(os.path.getsize(file) // 2)
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(export_module._TensorData, "write_external", half_then_fail)
        with pytest.raises(type(failure)):
            export_onnx(model, torch.randn(2, 64), path, external_data=True)  # float: other files
    assert snapshot(tmp_path) == before  # no new file, no temporary file, no staging folder


@pytest.mark.parametrize("previous", [True, False])
def test_failure_renaming_the_onnx_file_puts_the_previous_data_back(tmp_path, monkeypatch, previous):
    """The data file is renamed into place first; if the .onnx cannot follow (its flush to disk
    fails here), the previous data file is restored, or the new one removed."""
    from obc_native import _files

    if previous:
        model, report, path = exported_pair(tmp_path)
    else:
        model, report = quantized_model()
        path = tmp_path / "m.onnx"
    before = snapshot(tmp_path)
    calls = []
    original = _files._fsync_file

    def second_fails(name):
        calls.append(name)
        if len(calls) == 2:  # the first is the data file's
            disk_full()
        original(name)

    with monkeypatch.context() as patch:
        patch.setattr(_files, "_fsync_file", second_fails)
        with pytest.raises(OSError, match="No space left"):
            export_onnx(model, torch.randn(2, 64), path, external_data=True)
    assert len(calls) == 2
    assert snapshot(tmp_path) == before


def test_reexport_replaces_both_files_and_a_single_file_export_drops_the_data(tmp_path):
    model, report, path = exported_pair(tmp_path)
    path.chmod(0o640)
    before = snapshot(tmp_path)
    x = torch.randn(4, 64)
    quantized = run(path, x)
    export_onnx(model, torch.randn(2, 64), path, external_data=True)  # float weights this time
    after = snapshot(tmp_path)
    assert sorted(after) == ["m.onnx", "m.onnx.data"]
    assert after["m.onnx"][0] != before["m.onnx"][0] and after["m.onnx.data"][0] != before["m.onnx.data"][0]
    assert after["m.onnx"][1] == 0o640 and after["m.onnx.data"][1] == 0o600  # modes kept
    assert len(after["m.onnx.data"][0]) > len(before["m.onnx.data"][0])  # float32 weights
    with torch.no_grad():
        np.testing.assert_allclose(run(path, x), model(x).numpy(), rtol=0, atol=1e-5)

    single = export_onnx(model, torch.randn(2, 64), path, report=report, external_data=False)
    assert single.data_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # the stale data file is gone
    assert np.array_equal(run(path, x), quantized)


def test_bad_external_data_arguments(tmp_path):
    model, report = quantized_model()
    with pytest.raises(TypeError, match="external_data must be None, True or False"):
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", external_data="yes")
    (tmp_path / "m.onnx.data").mkdir()  # refused before any work, unless no data file is wanted
    with pytest.raises(ExportError, match=r"external data file .*m\.onnx\.data: is a directory"):
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", external_data=True)
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]
    export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", external_data=False)
    assert (tmp_path / "m.onnx.data").is_dir()  # never removed: not a file an export wrote


def test_stale_staging_folder_of_a_killed_export_is_removed(tmp_path):
    from obc_native import _files

    dead = _files._host_tag() + "-" + str(dead_pid()) + "-0123456789ab"
    (tmp_path / f".obc-staging-{dead}" / "trace").mkdir(parents=True)
    (tmp_path / f".obc-staging-{dead}" / "m.onnx.data").write_bytes(b"half")
    model, report = quantized_model()
    export_onnx(model, torch.randn(2, 64), tmp_path / "m.onnx", report=report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def dead_pid() -> int:
    """The pid of a process that has exited and been waited for."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- command line


def test_cli_external_data_flag(tmp_path, capsys):
    from obc_native.cli import main
    from obc_native.torch import save_compressed

    model, report = quantized_model()
    save_compressed(model, tmp_path / "saved", report)
    torch.save(torch.randn(4, 64), tmp_path / "x.pt")
    out = tmp_path / "m.onnx"
    common = ["export", str(tmp_path / "saved"), "--out", str(out), "--example", str(tmp_path / "x.pt"),
              "--arch", "obc_torch_helpers:MLP", "--arch-kwargs", '{"sizes": [64, 96, 64, 32]}']
    assert main(common + ["--external-data", "yes"]) == 0
    printed = capsys.readouterr().out.splitlines()
    data_size = (tmp_path / "m.onnx.data").stat().st_size
    assert printed[-2] == f"{out}: {out.stat().st_size} bytes, opset 21"
    assert printed[-1] == f"{out}.data: {data_size} bytes (external data: the weights)"
    assert "layers.0: MatMulNBits 4-bit block 16" in printed
    assert main(common) == 0  # auto: small, one file; the data file of the previous export goes
    assert capsys.readouterr().out.splitlines()[-1] == f"{out}: {out.stat().st_size} bytes, opset 21"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "saved", "x.pt"]
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(common + ["--external-data", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
