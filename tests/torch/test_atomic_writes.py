"""Every output file is written to a temporary file and renamed into place: a writer that fails or
is interrupted half-way leaves the previous file (its bytes and mode) as it was and no temporary
file behind; a replaced regular file keeps its permission bits. And ``export_onnx``'s capture of
stdout gives back everything but the exporter's graph dump, whatever happens."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from obc_torch_helpers import MLP, quantized_mlp

from obc_native import _files
from obc_native.budget import LevelDatabase
from obc_native.torch import ExportError, compress, export_onnx, save_compressed

pytestmark = [pytest.mark.torch, pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and FIFOs")]


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    """{name: (bytes, permission bits)} of every entry of ``directory`` (temporary files included)."""
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(Path(directory).iterdir())}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (test)")


def gguf_model():
    from obc_native.torch.gguf_export import gguf_layer_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    report = compress(model, [torch.randn(16, 64)], gguf_layer_config("Q4_0"), correction=None, baseline=False,
                      quiet=True)
    return model, report


# ----------------------------------------------------------------------------- the helper itself


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("how", ["bytes", "callable"])
def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, failure, how):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents")
    target.chmod(0o640)
    before = snapshot(tmp_path)

    def half_then_fail(temp):
        with open(temp, "wb") as handle:
            handle.write(b"new, half")
        raise failure

    if how == "bytes":  # the data are written, then the flush to disk fails: never renamed
        original = _files._fsync_file
        _files._fsync_file = lambda path: (_ for _ in ()).throw(failure)
        try:
            with pytest.raises(type(failure)):
                _files.write_file_atomically(str(target), b"new contents")
        finally:
            _files._fsync_file = original
    else:
        with pytest.raises(type(failure)):
            _files.write_file_atomically(str(target), half_then_fail)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("old_mode", [0o640, 0o600, 0o444])
def test_replaced_file_keeps_its_mode_and_new_file_gets_the_umask(tmp_path, old_mode):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(old_mode)
    _files.write_file_atomically(str(target), b"new")
    assert target.read_bytes() == b"new" and mode(target) == old_mode
    previous = os.umask(0o027)
    try:
        _files.write_file_atomically(str(tmp_path / "fresh.bin"), lambda temp: Path(temp).write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert mode(tmp_path / "fresh.bin") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "out.bin"]


def test_set_id_bits_are_not_carried_over_and_callable_writers_recreating_the_file_get_the_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o4750)

    def recreate_0600(temp):  # as safetensors does: remove and create with mode 0600
        os.unlink(temp)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"new")
        os.close(fd)

    _files.write_file_atomically(str(target), recreate_0600)
    assert target.read_bytes() == b"new" and mode(target) == 0o750


def test_links_are_replaced_and_special_files_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(b"not yours")
    elsewhere.chmod(0o600)
    link = tmp_path / "link.bin"
    link.symlink_to(elsewhere)
    _files.write_file_atomically(str(link), b"new")
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"not yours"  # never written through
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for name in ("fifo", "folder"):
        with pytest.raises(ExportError, match="not a regular file; refusing to replace it"):
            _files.write_file_atomically(str(tmp_path / name), b"x", error=ExportError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.bin", "fifo", "folder", "link.bin"]


# ----------------------------------------------------------------------------- each writer


def test_export_onnx(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    model, report = quantized_mlp()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 64), path, report=report)
    path.chmod(0o600)
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(_files, "_fsync_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            export_onnx(model, torch.randn(2, 64), path)  # float: another file
    assert snapshot(tmp_path) == before
    export_onnx(model, torch.randn(2, 64), path)
    assert mode(path) == 0o600 and path.read_bytes() != before["m.onnx"][0]


def test_save_gguf(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from obc_native.torch.gguf_export import save_gguf

    model, report = gguf_model()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a previous file")
    path.chmod(0o640)
    weights = model[0].weight.detach().clone()

    def half_then_full(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 100)
        disk_full()

    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            save_gguf(model, report, path)
    assert snapshot(tmp_path) == {"m.gguf": (b"a previous file", 0o640)}
    assert torch.equal(model[0].weight, weights)
    save_gguf(model, report, path)
    assert mode(path) == 0o640 and path.read_bytes()[:4] == b"GGUF"
    assert gguf.GGUFReader(str(path)).tensors


def test_save_compressed(tmp_path, monkeypatch):
    import safetensors.torch

    model, report = quantized_mlp()
    folder = tmp_path / "saved"
    save_compressed(model, folder, report)
    (folder / "manifest.json").chmod(0o600)
    (folder / "compressed.safetensors").chmod(0o640)
    before = snapshot(folder)

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        disk_full()

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            save_compressed(model, folder)  # without the report: another tensor file
    assert snapshot(folder) == before
    save_compressed(model, folder)
    assert mode(folder / "manifest.json") == 0o600 and mode(folder / "compressed.safetensors") == 0o640
    assert (folder / "compressed.safetensors").read_bytes() != before["compressed.safetensors"][0]


def test_level_database(tmp_path, monkeypatch):
    path = tmp_path / "levels.json"
    LevelDatabase(meta={"model": "old"}).save(path)
    path.chmod(0o600)
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(_files, "_fsync_file", disk_full)
        with pytest.raises(OSError):
            LevelDatabase(meta={"model": "new"}).save(path)
    assert snapshot(tmp_path) == before
    LevelDatabase(meta={"model": "new"}).save(path)
    assert mode(path) == 0o600 and LevelDatabase.load(path).meta["model"] == "new"


def test_hugging_face_folder(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import transformers.modeling_utils

    from obc_native.torch.hf_checkpoint import save_hf_checkpoint

    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    source = tmp_path / "source"
    source.mkdir()
    (source / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    folder = tmp_path / "hf"
    save_hf_checkpoint(model, folder, source=source)
    (folder / "model.safetensors").chmod(0o600)
    (folder / "config.json").chmod(0o640)
    before = snapshot(folder)
    assert {"model.safetensors", "config.json", "vocab.txt"} <= set(before)

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        disk_full()

    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.zero_()
    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            save_hf_checkpoint(model, folder)
    assert snapshot(folder) == before  # no staging folder, no partial weights, the old files whole
    written = save_hf_checkpoint(model, folder)
    assert "model.safetensors" in written and "config.json" in written
    assert mode(folder / "model.safetensors") == 0o600 and mode(folder / "config.json") == 0o640
    assert (folder / "model.safetensors").read_bytes() != before["model.safetensors"][0]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_hugging_face_folder_loses_stale_shards(tmp_path):
    """save_pretrained removed the shards of an earlier sharded save from the folder it wrote to;
    written through a staging folder, the same stale shards are removed here."""
    transformers = pytest.importorskip("transformers")
    from obc_native.torch.hf_checkpoint import save_hf_checkpoint

    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (folder / name).write_text("stale")
    (folder / "notes.txt").write_text("mine")
    save_hf_checkpoint(transformers.BertModel(config).eval(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_pt2_program(tmp_path, monkeypatch):
    from obc_native.cli import _save_exported_program

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "small.pt2"
    path.write_bytes(b"a previous program")
    path.chmod(0o640)

    def half_then_full(program, f, *args, **kwargs):
        Path(f).write_bytes(b"PK partial")
        disk_full()

    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "save", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            _save_exported_program(model, (torch.randn(2, 4),), None, str(path))
    assert snapshot(tmp_path) == {"small.pt2": (b"a previous program", 0o640)}
    _save_exported_program(model, (torch.randn(2, 4),), None, str(path))
    assert mode(path) == 0o640
    program = torch.export.load(str(path)).module()
    x = torch.randn(5, 4)
    torch.testing.assert_close(program(x), model(x))


# ----------------------------------------------------------------------------- export_onnx's stdout capture


class PrintsThenFails(torch.nn.Module):
    """Prints from Python and from another thread (straight to descriptor 1), then calls an operator
    without an ONNX form (the exporter dumps its graph on stdout)."""

    def forward(self, x):
        os.write(1, b"the model printed this\n")  # as C code or a real stdout would (capfd's sys.stdout does not)
        thread = threading.Thread(target=lambda: os.write(1, b"another thread wrote this\n"))
        thread.start()
        thread.join()
        return torch.linalg.eigvals(x).real


def test_failed_export_gives_back_what_was_printed_but_the_graph_dump(tmp_path, capfd):
    with pytest.raises(ExportError, match=r"aten::linalg_eigvals.*the model \(PrintsThenFails\)"):
        export_onnx(PrintsThenFails(), torch.randn(2, 3, 3), tmp_path / "m.onnx")
    out = capfd.readouterr().out
    # forward runs twice (once to count the outputs, once in the tracer): each print comes back
    assert out.count("the model printed this") == 2 and out.count("another thread wrote this") == 2, out
    assert "Torch IR graph" not in out and "aten::linalg_eigvals(" not in out, out


def test_interrupted_export_restores_stdout_and_gives_back_the_output(tmp_path, capfd):
    class Interrupted(torch.nn.Module):
        def forward(self, x):
            os.write(1, b"printed before the interrupt\n")
            raise KeyboardInterrupt

    before = os.fstat(1)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(Interrupted(), torch.randn(2, 3), tmp_path / "m.onnx")
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    print("printed after")
    out = capfd.readouterr().out
    assert out == "printed before the interrupt\nprinted after\n"
    assert list(tmp_path.iterdir()) == []


def test_captures_in_two_threads_do_not_leave_stdout_redirected(capfd):
    """Two exports in two threads: the second capture waits for the first; before, the second
    saved the first's redirection as "stdout" and restored it at the end."""
    from obc_native.torch.export_onnx import _CapturedStdout

    before = os.fstat(1)
    first_in = threading.Event()

    def first():
        with _CapturedStdout():
            first_in.set()
            time.sleep(0.2)
            os.write(1, b"first\n")

    def second():
        first_in.wait(5)
        with _CapturedStdout():
            os.write(1, b"second\n")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "first\nsecond\nafter\n"


def test_graph_dump_is_cut_out_exactly():
    from obc_native.torch.export_onnx import _split_graph_dump

    dump = (b"Torch IR graph at exception: graph(%0 : Float(2)):\n"
            b"  %1 : Float(2) = aten::x(%0), scope: m.M::\n  return (%1)\n\n")
    dump_text, rest = _split_graph_dump(b"before\n" + dump + b"after\n")
    assert dump_text == dump and rest == b"before\nafter\n"
    assert _split_graph_dump(b"no dump\n") == (b"", b"no dump\n")


def test_interrupt_while_leaving_the_capture_still_restores_stdout(monkeypatch, capfd):
    import importlib

    module = importlib.import_module("obc_native.torch.export_onnx")  # the module, not the function
    calls = []

    def flush_interrupted_on_exit():
        calls.append(1)
        if len(calls) == 2:  # the flush when leaving: a Ctrl-C arrives right then
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "_flush_stdout", flush_interrupted_on_exit)
    before = os.fstat(1)
    with pytest.raises(KeyboardInterrupt):
        with module._CapturedStdout():
            os.write(1, b"inside\n")
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    os.write(1, b"after\n")
    assert capfd.readouterr().out.endswith("after\n")
    assert module._STDOUT_LOCK.acquire(blocking=False)  # released
    module._STDOUT_LOCK.release()
