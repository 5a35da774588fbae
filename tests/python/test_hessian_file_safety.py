"""Hessian files: saving never deletes what it did not create, loading reads only regular files
(no hang on a FIFO), sums never overflow to Inf, and damaged files give ValueError only."""

from __future__ import annotations

import os
import random
import signal
import struct
import time

import numpy as np
import pytest

from obc_native import HessianAccumulator, load_hessian, save_hessian
from obc_native.hessian import read_hessian_info
from file_safety import deadline




def _accumulator(cols=5, n=7, seed=0) -> HessianAccumulator:
    acc = HessianAccumulator(cols)
    acc.add(np.random.default_rng(seed).standard_normal((n, cols)))
    return acc


def test_save_onto_an_existing_directory_keeps_it(tmp_path):
    target = tmp_path / "layer.obchess"
    target.mkdir()
    with pytest.raises(OSError, match="refusing to replace a directory"):
        _accumulator().save(target)
    assert target.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["layer.obchess"]  # no temporary left behind


def test_save_refuses_to_overwrite_other_files_but_replaces_hessian_files(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(OSError, match="not an obc_native Hessian file"):
        save_hessian(_accumulator(), other)
    assert other.read_text() == "keep me"
    target = tmp_path / "layer.obchess"
    target.touch()  # an empty placeholder may be replaced
    save_hessian(_accumulator(n=3), target)
    save_hessian(_accumulator(n=4), target)
    assert load_hessian(target).count == 4
    assert sorted(os.listdir(tmp_path)) == ["layer.obchess", "notes.txt"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o640, 0o600])
def test_replaced_hessian_file_keeps_its_mode(tmp_path, mode):
    target = tmp_path / "layer.obchess"
    _accumulator(seed=0).save(target)
    target.chmod(mode)
    _accumulator(seed=1).save(target)
    assert (os.stat(target).st_mode & 0o7777) == mode
    np.testing.assert_array_equal(load_hessian(target).hessian(), _accumulator(seed=1).hessian())
    previous = os.umask(0o027)
    try:
        _accumulator().save(tmp_path / "new.obchess")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "new.obchess").st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["layer.obchess", "new.obchess"]


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.obchess"
    os.mkfifo(fifo)
    pid = os.fork()
    if pid == 0:  # the child tries; a blocked open() cannot be interrupted from Python
        code = 3
        try:
            load_hessian(fifo)
        except OSError as err:
            code = 0 if "regular file" in str(err) else 2
        except BaseException:
            code = 1
        try:
            read_hessian_info(fifo)
            code = 4
        except OSError:
            pass
        except BaseException:
            code = 5
        os._exit(code)
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("load_hessian blocked on a FIFO")
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(OSError, match="refusing to replace a FIFO"):
        _accumulator().save(fifo)


def test_values_whose_squares_overflow_are_rejected():
    acc = HessianAccumulator(2)
    with pytest.raises(ValueError, match="values too large"):
        acc.add(np.array([[1e200, 1.0]]))
    assert acc.count == 0 and not acc.sum().any()
    acc.add(np.array([[6e153, 1.0]]))  # square 3.6e307: representable, and so is 2/n * S
    assert np.isfinite(acc.hessian()).all()
    with pytest.raises(ValueError, match="values too large"):
        acc.add(np.array([[6e153, 1.0]]))  # the running sum would exceed the limit
    assert acc.count == 1
    with pytest.raises(ValueError, match="too large"):
        acc.merge(acc.copy())
    assert np.isfinite(acc.hessian()).all()


def test_state_with_huge_entries_is_rejected(tmp_path):
    # A file whose (checksummed) payload holds DBL_MAX: 2/n * S would be Inf.
    cols = 2
    payload = np.diag([np.finfo(np.float64).max, 1.0]).astype("<f8").tobytes()
    path = tmp_path / "huge.obchess"
    path.write_bytes(_signed(struct.pack("<8sIIQQ", b"OBCHESS\0", 1, 0, cols, 1) + payload))
    with pytest.raises(ValueError, match="invalid Hessian file contents"):
        load_hessian(path)


def _fnv1a64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def _signed(body: bytes) -> bytes:
    return body + struct.pack("<Q", _fnv1a64(body))


def _check_rejected_or_valid(path, label):
    try:
        with deadline(10):
            acc = load_hessian(path)
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001 - anything but ValueError is the bug
        pytest.fail(f"{label}: {type(err).__name__}: {err}")
    else:
        assert np.isfinite(acc.sum()).all(), label
        if acc.count:
            assert np.isfinite(acc.hessian()).all(), label
    try:
        read_hessian_info(path)
    except ValueError:
        pass
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"info {label}: {type(err).__name__}: {err}")


def _fuzz(tmp_path, cases: int, seed: int, resign_rate: float = 0.5):
    rng = random.Random(seed)
    original = bytearray()
    good = tmp_path / "good.obchess"
    _accumulator(cols=6, n=9, seed=seed).save(good)
    original = good.read_bytes()
    bad = tmp_path / "bad.obchess"
    size = len(original)
    for offset in sorted({0, 1, 8, 31, 32, 33, size - 8, size - 1} | {rng.randrange(size) for _ in range(cases)}):
        bad.write_bytes(original[:offset])
        _check_rejected_or_valid(bad, f"truncated at {offset}")
    for _ in range(cases):
        data = bytearray(original)
        at = rng.randrange(size)
        data[at] ^= 1 << rng.randrange(8)
        body = bytes(data[:-8])
        resign = rng.random() < resign_rate  # re-checksummed: the contents checks must catch it
        bad.write_bytes(_signed(body) if resign else bytes(data))
        _check_rejected_or_valid(bad, f"bit flipped at {at}{' (re-signed)' if resign else ''}")
    for cols in (0, 2**28, 2**28 + 1, 2**40, 2**64 - 1, 10**15):  # huge sizes: no allocation first
        header = struct.pack("<8sIIQQ", b"OBCHESS\0", 1, 0, cols, 1)
        bad.write_bytes(header + original[32:])
        _check_rejected_or_valid(bad, f"cols = {cols}")
    for count in (0, 2**64 - 1):
        bad.write_bytes(_signed(struct.pack("<8sIIQQ", b"OBCHESS\0", 1, 0, 6, count) + original[32:-8]))
        _check_rejected_or_valid(bad, f"count = {count}")
    for value in (np.inf, np.nan, -1.0, np.finfo(np.float64).max, -np.finfo(np.float64).max):
        payload = np.frombuffer(original[32:-8], "<f8").copy()
        payload[rng.randrange(payload.size)] = value
        bad.write_bytes(_signed(original[:32] + payload.tobytes()))
        _check_rejected_or_valid(bad, f"payload entry {value}")


def test_fuzz_hessian_files(tmp_path):
    _fuzz(tmp_path, cases=60, seed=1)


@pytest.mark.slow
def test_fuzz_hessian_files_sweep(tmp_path):
    for seed in range(2, 12):
        _fuzz(tmp_path, cases=300, seed=seed)
