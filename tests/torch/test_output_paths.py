"""Outputs that cannot be written (a missing folder, a file where a folder belongs, a directory
given as the file, a read-only folder) are refused before any work, by the Python functions and by
``obc-native export``, ``shrink`` and ``compress --hf``, with a message that names the path."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from obc_torch_helpers import MLP, quantized_mlp

from obc_native.cli import main
from obc_native.torch import ExportError, LayerConfig, compress, export_onnx, save_compressed

pytestmark = [pytest.mark.torch, pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")]


def unwritable_directory(tmp_path):
    """A folder in which no file can be created (a read-only one; /proc/self when root)."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        (directory / "probe").write_text("")
    except OSError:
        return str(directory)
    (directory / "probe").unlink()  # root ignores permissions: /proc refuses new files
    if os.path.isdir("/proc/self"):
        return "/proc/self"
    pytest.skip("no unwritable directory on this machine")


def bad_files(tmp_path):
    """{what: (output file path, text the error must contain)}."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    os.mkfifo(tmp_path / "a_fifo.out")  # a writer would block on it; replacing it is refused
    return {
        "a FIFO": (tmp_path / "a_fifo.out", "exists and is not a regular file"),
        "missing folder": (tmp_path / "missing" / "m.out", "does not exist"),
        "folder is a file": (tmp_path / "a_file" / "m.out", "is a file, not a folder"),
        "directory given": (tmp_path / "a_dir", "is a directory; give the name of the file"),
        "read-only folder": (os.path.join(unwritable_directory(tmp_path), "m.out"), "cannot write in"),
    }


def bad_folders(tmp_path):
    """{what: (output folder, text the error must contain)}."""
    (tmp_path / "a_file").write_text("")
    unwritable = unwritable_directory(tmp_path)
    return {
        "a file": (tmp_path / "a_file", "is a file; give a folder"),
        "under a file": (tmp_path / "a_file" / "sub", "cannot create the folder"),
        "read-only folder": (unwritable, "cannot write in the folder"),
        "under a read-only folder": (os.path.join(unwritable, "new"), "cannot create the folder"),
    }


# ----------------------------------------------------------------------------- Python functions


def test_export_onnx(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("torch.onnx.export ran"))
    for what, (path, expected) in bad_files(tmp_path).items():
        with pytest.raises(ExportError, match=expected):
            export_onnx(MLP(sizes=(4, 2)), torch.randn(1, 4), path)


def test_save_gguf_leaves_the_model_unchanged(tmp_path):
    pytest.importorskip("gguf")
    from obc_native.torch.gguf_export import GGUFExportError, gguf_layer_config, save_gguf

    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    report = compress(model, [torch.randn(16, 64)], gguf_layer_config("Q4_0"), correction=None, baseline=False,
                      quiet=True)
    before = model[0].weight.detach().clone()
    for what, (path, expected) in bad_files(tmp_path).items():
        with pytest.raises(GGUFExportError, match=expected):
            save_gguf(model, report, path)
        assert torch.equal(model[0].weight, before), what


def test_export_onnx_takes_a_saved_folder_as_bytes(tmp_path):
    """report= a save_compressed folder was taken as str or os.PathLike but not as bytes (a
    TypeError "report must be a CompressionReport ...") while every other path argument took it."""
    pytest.importorskip("onnx")
    model, report = quantized_mlp()
    save_compressed(model, tmp_path / "saved", report)
    example = torch.randn(2, model.layers[0].in_features)
    layers = {}
    for form in (str, os.fsencode, lambda p: p):
        layers[form] = export_onnx(model, example, tmp_path / "m.onnx", report=form(tmp_path / "saved")).layers
    assert len({tuple(sorted(v.items())) for v in layers.values()}) == 1 and layers[str]
    with pytest.raises(TypeError, match="report must be a CompressionReport, a saved model folder or None, got int"):
        export_onnx(model, example, tmp_path / "m.onnx", report=3)


def test_save_compressed(tmp_path, monkeypatch):
    model, report = quantized_mlp()
    from obc_native.torch import serialize

    monkeypatch.setattr(serialize, "find_layers", lambda m: pytest.fail("the layers were encoded"))
    for what, (directory, expected) in bad_folders(tmp_path).items():
        with pytest.raises(serialize.SerializationError, match=expected):
            save_compressed(model, directory, report)
    for name in ("manifest.json", "compressed.safetensors"):  # a FIFO, or a folder, under a file's name
        folder = tmp_path / f"with_{name}"
        folder.mkdir()
        os.mkfifo(folder / name)
        (folder / "other").mkdir()
        (folder / "other" / name).mkdir()
        for directory in (folder, folder / "other"):
            with pytest.raises(serialize.SerializationError, match=f"{name}: (exists and is not a regular|is a dir)"):
                save_compressed(model, directory, report)


def test_save_hf_checkpoint(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from obc_native.torch.hf_checkpoint import HFCheckpointError, save_hf_checkpoint

    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    model = transformers.BertModel(config)
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: pytest.fail("save_pretrained ran"))
    for what, (directory, expected) in bad_folders(tmp_path).items():
        with pytest.raises(HFCheckpointError, match=expected):
            save_hf_checkpoint(model, directory)
    fifo = tmp_path / "with_fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")
    with pytest.raises(HFCheckpointError, match="config.json: exists and is not a regular file"):
        save_hf_checkpoint(model, fifo)


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a command starts reading the saved model: --out is checked first."""
    monkeypatch.setattr("obc_native.torch.read_manifest", lambda d: pytest.fail("the saved folder was read"))
    monkeypatch.setattr("obc_native.cli._load_model", lambda args: pytest.fail("the model was loaded"))


def one_error_line(capsys, *expected):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obc-native: error: --out "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("command, suffix", [("export", ".onnx"), ("shrink", ".onnx"), ("shrink", ".pt2")])
def test_cli_export_and_shrink(command, suffix, tmp_path, capsys, no_load):
    example = tmp_path / "example.pt"
    torch.save(torch.zeros(1, 1, 8, 8), example)
    (tmp_path / f"a_dir{suffix}").mkdir()
    cases = bad_files(tmp_path)
    cases["directory given"] = (tmp_path / f"a_dir{suffix}", cases["directory given"][1])
    os.mkfifo(tmp_path / f"a_fifo{suffix}")
    cases["a FIFO"] = (tmp_path / f"a_fifo{suffix}", cases["a FIFO"][1])
    for what, (path, expected) in cases.items():
        out = str(path) if what in ("directory given", "a FIFO") else os.path.splitext(str(path))[0] + suffix
        args = [command, str(tmp_path / "saved"), "--out", out, "--example", str(example)]
        assert main(args + (["--format", "onnx"] if command == "export" else [])) == 1, what
        one_error_line(capsys, expected)


def test_cli_compress_hf(tmp_path, capsys, no_load):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    save_file({"input_ids": torch.zeros(4, 8, dtype=torch.long)}, tmp_path / "ids.safetensors")
    (tmp_path / "r.yaml").write_text("default: {bits: 4}\n")
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    unwritable = unwritable_directory(tmp_path)
    cases = {tmp_path / "a_file": "exists and is not a directory", tmp_path / "a_file" / "sub": "is not a directory",
             unwritable: "cannot write", os.path.join(unwritable, "new"): "cannot"}
    for out, expected in cases.items():
        assert main(["compress", "--hf", str(tmp_path / "bert"), "--calibration", str(tmp_path / "ids.safetensors"),
                     "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 1
        one_error_line(capsys, expected)



# ----------------------------------------------------------------------------- path types


def path_forms(path):
    """{what: the same output path as str, bytes and os.PathLike}."""
    return {"str": str(path), "bytes": os.fsencode(path), "PathLike": path}


def test_every_writer_takes_str_bytes_and_pathlike_and_names_a_wrong_type(tmp_path):
    """One type rule for every output path (``_files.path_str``): export_onnx used to refuse bytes
    that save_gguf took; save_compressed, save_hf_checkpoint and compress(checkpoint=) failed on
    bytes with os.path.join's "Can't mix strings and bytes in path components"."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("onnx")
    from obc_native.torch import build_database, gguf_layer_config, load_compressed, save_gguf, save_hf_checkpoint

    model, report = quantized_mlp()
    gguf_model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    gguf_report = compress(gguf_model, [torch.randn(16, 64)], gguf_layer_config("Q4_0"), correction=None,
                           baseline=False, quiet=True)
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    bert = transformers.BertModel(config)
    small, batch = MLP(sizes=(16, 8)), torch.randn(32, 16)
    database = build_database(small, [batch], quiet=True)
    writers = {  # name: (write(path), the argument's name in a TypeError, what the path must be afterwards)
        "export_onnx": (lambda p: export_onnx(MLP(sizes=(4, 2)), torch.randn(1, 4), p), "path", os.path.isfile),
        "save_gguf": (lambda p: save_gguf(gguf_model, gguf_report, p), "path", os.path.isfile),
        "save_compressed": (lambda p: save_compressed(model, p, report), "directory", os.path.isdir),
        "save_hf_checkpoint": (lambda p: save_hf_checkpoint(bert, p), "directory", os.path.isdir),
        "LevelDatabase.save": (database.save, "path", os.path.isfile),
        "compress(checkpoint=)": (lambda p: compress(copy.deepcopy(small), [batch], LayerConfig(bits=4), checkpoint=p,
                                                     quiet=True),
                                  "checkpoint", os.path.isdir),
    }
    for name, (write, argument, exists) in writers.items():
        for form, path in path_forms(tmp_path / f"{name}-out").items():
            write(path)
            assert exists(tmp_path / f"{name}-out"), (name, form)
        with pytest.raises(TypeError, match=f"{re.escape(argument)}: expected a str, bytes or os.PathLike, got int"):
            write(3)
    saved = os.fsencode(tmp_path / "save_compressed-out")
    fresh = MLP(sizes=(64, 32))
    load_compressed(fresh, saved)  # the saved folder reads back under the same bytes path
    assert torch.equal(fresh.layers[0].weight, model.layers[0].weight)
