"""What a write killed with ``kill -9`` leaves (a temporary file of ``write_file_atomically``, a
staging folder of a Hugging Face save or an ONNX export) is removed by the next write into that
folder, and only that: names carry the host and the pid, and an entry is removed only when it has
exactly our form, this host's tag, and a pid that no process has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from obc_native import _files

pytestmark = [pytest.mark.torch, pytest.mark.skipif(os.name != "posix", reason="kill -9 and process ids")]


def dead_pid() -> int:
    """The pid of a process that has exited and been waited for (free, barring reuse)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_writer(folder, script: str) -> None:
    """Run ``script`` (which ends by killing itself with SIGKILL) in a child Python, ``folder`` and
    ``_files`` defined; wait for it and check it died of SIGKILL."""
    code = "import os, signal\nfrom obc_native import _files\nfolder = " + repr(str(folder)) + "\n"
    code += textwrap.dedent(script)
    child = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()


def test_a_killed_write_leaves_files_that_the_next_write_removes(tmp_path):
    killed_writer(tmp_path, """
        staging = _files.make_staging_folder(folder)
        with open(os.path.join(staging, "model.safetensors"), "wb") as handle:
            handle.write(b"half a checkpoint")

        def killed(temp):
            with open(temp, "wb") as handle:
                handle.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)

        _files.write_file_atomically(os.path.join(folder, "model.onnx"), killed)
    """)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2, left
    assert left[0].startswith(".model.obc-") and left[0].endswith(".tmp.onnx")
    assert left[1].startswith(".obc-staging-")
    _files.write_file_atomically(str(tmp_path / "other.bin"), b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.bin"]


def test_only_our_dead_entries_are_removed(tmp_path):
    host, dead = _files._host_tag(), dead_pid()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f".obc-staging-{host}-{dead}-0123456789ab", f".m.onnx.obc-{host}-{dead}-0123456789ab.tmp.onnx",
                 f".write-probe-obc-{host}-{dead}-0123456789ab.tmp", f".x.obc-{host}-{dead}-0123456789ab.tmp"]
        kept_folders = [
            f".obc-staging-{host}-{os.getpid()}-0123456789ab",  # this process: a save in progress
            f".obc-staging-{host}-{sleeper.pid}-0123456789ab",  # another live process
            f".obc-staging-{other_host}-{dead}-0123456789ab",  # another host sharing the folder
            ".obc-staging-k2j4h5l6",  # an earlier version's name: no pid, cannot be proved dead
            f".obc-staging-{host}-{dead}-0123456789abc",  # not exactly our form
            f".m.onnx.obc-{host}-{dead}-0123456789ab.tmp.onnx.d",  # a folder with a temporary file's name
        ]
        kept_files = [
            f".m.onnx.obc-{host}-{os.getpid()}-0123456789ab.tmp.onnx",
            f".m.onnx.obc-{other_host}-{dead}-0123456789ab.tmp.onnx",
            ".m.onnx.0123456789ab.tmp.onnx",  # an earlier version's temporary name
            f"m.onnx.obc-{host}-{dead}-0123456789ab.tmp.onnx",  # not hidden: not ours
            f".obc-staging-{host}-{dead}-fedcba987654",  # a file with a staging folder's name
            f".notes.obc-{host}-{dead}-0123456789ab.tmp.txt.bak",
        ]
        for name in stale[:1] + kept_folders:
            (tmp_path / name).mkdir()
            (tmp_path / name / "inside").write_bytes(b"x")
        for name in stale[1:] + kept_files:
            (tmp_path / name).write_bytes(b"x")
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / "precious").write_bytes(b"keep")
        link = f".obc-staging-{host}-{dead}-aaaaaaaaaaaa"
        (tmp_path / link).symlink_to(target, target_is_directory=True)  # never followed
        before = {p.name for p in tmp_path.iterdir()}

        removed = _files.remove_stale_temporaries(str(tmp_path))
        assert sorted(removed) == sorted(stale)
        assert {p.name for p in tmp_path.iterdir()} == before - set(stale)
        assert (target / "precious").read_bytes() == b"keep" and (tmp_path / link).is_symlink()
        for name in kept_folders:
            assert (tmp_path / name / "inside").read_bytes() == b"x"
        assert _files.remove_stale_temporaries(str(tmp_path)) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    # the sleeper is gone now: its folder can go too
    assert _files.remove_stale_temporaries(str(tmp_path)) == [f".obc-staging-{host}-{sleeper.pid}-0123456789ab"]


def test_process_check(monkeypatch):
    assert _files._process_exists(os.getpid())
    assert not _files._process_exists(dead_pid())
    assert _files._process_exists(1)  # init: exists (another user's: PermissionError or not)
    assert _files._process_exists(0) and _files._process_exists(-5)  # os.kill would signal a group
    monkeypatch.setattr(_files.os, "name", "nt")  # Windows' os.kill(pid, 0) would end the process
    assert _files._process_exists(dead_pid())


def test_a_killed_hugging_face_save_is_cleaned_by_the_next_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from obc_native.torch.hf_checkpoint import save_hf_checkpoint

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    killed_writer(folder, """
        staging = _files.make_staging_folder(folder)
        with open(os.path.join(staging, "model.safetensors"), "wb") as handle:
            handle.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".obc-staging-")]
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=8)
    torch.manual_seed(0)
    save_hf_checkpoint(transformers.BertModel(config).eval(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
