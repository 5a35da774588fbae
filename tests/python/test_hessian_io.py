"""HessianAccumulator and Hessian files: numpy agreement, exact shard merging, round trips,
corrupted files, and agreement with the C API (outputs of tests/cmake_consumer)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

import obc_native
from obc_native import HessianAccumulator, load_hessian, save_hessian
from obc_native.hessian import read_hessian_info

REPO = Path(__file__).resolve().parents[2]
CONSUMER_OUT = Path(os.environ.get("OBC_CONSUMER_OUT", REPO / "build" / "cmake_consumer" / "out"))


def activations(n, cols, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mix = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    return (rng.standard_normal((n, cols)) @ mix + 0.5).astype(dtype)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def reseal(data: bytearray) -> bytearray:
    """Recomputes the trailing checksum, to reach the checks behind it."""
    data[-8:] = struct.pack("<Q", fnv1a64(bytes(data[:-8])))
    return data


# --- accumulator ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hessian_matches_numpy(dtype):
    X = activations(3000, 70, 1, dtype)
    acc = HessianAccumulator(70)
    acc.add(X)
    Xd = X.astype(np.float64)
    expected = 2.0 / len(X) * (Xd.T @ Xd)
    H = acc.hessian()
    assert H.dtype == np.float64 and H.shape == (70, 70)
    np.testing.assert_allclose(H, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    assert np.array_equal(H, H.T)
    np.testing.assert_allclose(acc.sum(), Xd.T @ Xd, rtol=1e-12, atol=1e-9)
    assert acc.count == 3000 and acc.cols == 70


def test_shards_merged_equal_one_shot():
    X = activations(2501, 33, 2)
    one_shot = HessianAccumulator(33)
    one_shot.add(X)
    shards = [HessianAccumulator(33) for _ in range(3)]
    for shard, part in zip(shards, np.array_split(X, [700, 1500])):
        shard.add(part)
    merged = shards[0]
    merged.merge(shards[1])
    merged.merge(shards[2])
    assert merged.count == one_shot.count == 2501
    scale = np.abs(one_shot.hessian()).max()
    np.testing.assert_allclose(merged.hessian(), one_shot.hessian(), rtol=0, atol=1e-13 * scale)


def test_shards_saved_by_processes_merge_exactly(tmp_path):
    """Calibration split across processes: each saves its shard; merging the files is exact."""
    X = activations(600, 12, 3)
    shards = []
    for i, part in enumerate(np.array_split(X, 3)):
        shard = HessianAccumulator(12)
        shard.add(part)
        save_hessian(shard, tmp_path / f"shard{i}.obchess")
        shards.append(shard)
    from_files = load_hessian(tmp_path / "shard0.obchess")
    in_memory = shards[0].copy()
    for i in (1, 2):
        from_files.merge(load_hessian(tmp_path / f"shard{i}.obchess"))
        in_memory.merge(shards[i])
    assert from_files.count == in_memory.count == 600
    assert np.array_equal(from_files.sum(), in_memory.sum())


def test_deterministic_and_thread_count_independent():
    X = activations(2100, 150, 4)
    sums = []
    for threads in (1, 2, 3, None):
        acc = HessianAccumulator(150, num_threads=threads)
        acc.add(X)
        sums.append(acc.sum())
    for s in sums[1:]:
        assert np.array_equal(s, sums[0])


def test_float_widths_give_identical_sums():
    X16 = activations(300, 8, 5, np.float16)
    a, b, c = HessianAccumulator(8), HessianAccumulator(8), HessianAccumulator(8)
    a.add(X16)
    b.add(X16.astype(np.float32))
    c.add(X16.astype(np.float64))
    assert np.array_equal(a.sum(), b.sum()) and np.array_equal(b.sum(), c.sum())


def test_non_contiguous_and_empty_batches():
    X = activations(200, 10, 6)
    a, b = HessianAccumulator(10), HessianAccumulator(10)
    a.add(np.asfortranarray(X))
    a.add(np.empty((0, 10)))
    b.add(X.copy())
    assert np.array_equal(a.sum(), b.sum()) and a.count == 200


def test_bad_input_is_rejected_and_leaves_state_unchanged():
    acc = HessianAccumulator(4)
    acc.add(np.ones((3, 4)))
    before = acc.sum()
    with pytest.raises(ValueError, match="expected 4 columns"):
        acc.add(np.ones((3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(np.ones(4))
    bad = np.ones((2, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.add(bad)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.add(bad.astype(np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        acc.add(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="4 columns"):
        acc.merge(HessianAccumulator(5))
    with pytest.raises(TypeError, match="HessianAccumulator"):
        acc.merge(before)
    assert np.array_equal(acc.sum(), before) and acc.count == 3
    with pytest.raises(ValueError, match="cols"):
        HessianAccumulator(0)
    with pytest.raises(TypeError):
        HessianAccumulator(3.5)
    with pytest.raises(ValueError, match="no samples"):
        HessianAccumulator(3).hessian()
    with pytest.raises(TypeError, match="path"):
        acc.save(42)


def test_copy_pickle_reset_and_self_merge():
    acc = HessianAccumulator(6, num_threads=2)
    acc.add(activations(50, 6, 7))
    clone = pickle.loads(pickle.dumps(acc))
    assert np.array_equal(clone.sum(), acc.sum()) and clone.count == 50
    assert clone.num_threads == 2
    copy = acc.copy()
    acc.merge(acc)
    assert acc.count == 100 and np.array_equal(acc.sum(), 2 * copy.sum())
    acc.reset()
    assert acc.count == 0 and not acc.sum().any()
    assert "cols=6" in repr(copy)


def test_concurrent_adds_are_serialized_and_release_the_gil():
    acc = HessianAccumulator(64)
    batches = [activations(500, 64, 100 + i) for i in range(8)]
    threads = [threading.Thread(target=acc.add, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acc.count == 4000
    X = np.concatenate(batches)
    np.testing.assert_allclose(acc.sum(), X.T @ X, rtol=1e-12, atol=1e-9 * np.abs(X.T @ X).max())


def test_accumulated_hessian_drives_the_solvers():
    X = activations(400, 16, 8)
    acc = HessianAccumulator(16)
    acc.add(X)
    W = np.random.default_rng(9).standard_normal((4, 16))
    result = obc_native.prune_unstructured(W, acc.hessian(), 0.5)
    loss_x = np.sum(((W - result.weight) @ X.T) ** 2, axis=1) / len(X)
    np.testing.assert_allclose(result.row_losses, loss_x, rtol=1e-9)


# --- files -------------------------------------------------------------------------------------


def test_file_round_trip_is_exact(tmp_path):
    acc = HessianAccumulator(21)
    acc.add(activations(77, 21, 10, np.float32))
    path = tmp_path / "layer.obchess"
    acc.save(path)
    back = HessianAccumulator.load(str(path))
    assert back.count == 77 and back.cols == 21
    assert np.array_equal(back.sum(), acc.sum())
    assert np.array_equal(back.hessian(), acc.hessian())
    assert read_hessian_info(path) == {
        "version": 1, "cols": 21, "count": 77, "file_bytes": 40 + 8 * 21 * 21,
    }
    # Overwrite in place, no temporary files left behind.
    acc.add(activations(3, 21, 11))
    save_hessian(acc, path)
    assert load_hessian(path).count == 80
    assert os.listdir(tmp_path) == ["layer.obchess"]


def test_byte_layout_matches_docs(tmp_path):
    """docs/hessian_format.md, checked byte by byte with an independent reader."""
    acc = HessianAccumulator(3)
    acc.add(activations(9, 3, 12))
    path = tmp_path / "h.obchess"
    acc.save(path)
    data = path.read_bytes()
    assert len(data) == 32 + 8 * 9 + 8
    magic, version, reserved, cols, count = struct.unpack_from("<8sIIQQ", data, 0)
    assert (magic, version, reserved, cols, count) == (b"OBCHESS\0", 1, 0, 3, 9)
    payload = np.frombuffer(data, dtype="<f8", count=9, offset=32).reshape(3, 3)
    assert np.array_equal(payload, acc.sum())
    assert struct.unpack_from("<Q", data, len(data) - 8)[0] == fnv1a64(data[:-8])


@pytest.fixture
def good_file(tmp_path):
    acc = HessianAccumulator(4)
    acc.add(activations(20, 4, 13))
    path = tmp_path / "good.obchess"
    acc.save(path)
    return path


def _corrupt(path, data):
    bad = path.with_name("bad.obchess")
    bad.write_bytes(bytes(data))
    return bad


def _put(data, offset, fmt, value):
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)


# Each edit turns a valid 4-column file into an invalid one; the error must say why.
CORRUPTIONS = {
    "magic": (lambda d: _put(d, 0, "<8s", b"NOTHESS\0"), "not an obc_native Hessian file"),
    "version": (lambda d: _put(d, 8, "<I", 2), "format version 2"),
    "reserved": (lambda d: reseal(_put(d, 12, "<I", 1) or d), "reserved header field"),
    "zero-cols": (lambda d: _put(d, 16, "<Q", 0), "invalid cols 0"),
    "cols-too-large": (lambda d: _put(d, 16, "<Q", 5), "truncated"),
    "huge-cols": (lambda d: _put(d, 16, "<Q", 1 << 40), "invalid cols"),
    "empty": (lambda d: d.clear(), "truncated"),
    "truncated-header": (lambda d: d.__delitem__(slice(20, None)), "truncated"),
    "truncated-payload": (lambda d: d.__delitem__(slice(60, None)), "truncated"),
    "truncated-checksum": (lambda d: d.pop(), "truncated"),
    "oversized": (lambda d: d.extend(b"\0"), "oversized"),
    "payload-bit": (lambda d: d.__setitem__(40, d[40] ^ 1), "checksum mismatch"),
    "count-bit": (lambda d: d.__setitem__(24, d[24] ^ 1), "checksum mismatch"),
    "checksum-bit": (lambda d: d.__setitem__(-1, d[-1] ^ 0x80), "checksum mismatch"),
    "asymmetric": (lambda d: reseal(_put(d, 40, "<d", 1e3) or d), "invalid Hessian file contents"),
    "nan": (lambda d: reseal(_put(d, 32, "<d", np.nan) or d), "finite"),
    "negative-diagonal": (lambda d: reseal(_put(d, 32, "<d", -1.0) or d), "non-negative"),
    # sum[0,1] = sum[1,0] far above sqrt(sum[0,0] sum[1,1]): symmetric but indefinite
    "indefinite": (lambda d: reseal(_put(d, 40, "<d", 1e6) or _put(d, 64, "<d", 1e6) or d),
                   r"invalid Hessian file contents: sum: expected a positive semidefinite .*"
                   r"indefinite one: \|sum\[1,0\]\| = 1e\+06"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_files_are_rejected(good_file, name):
    edit, message = CORRUPTIONS[name]
    data = bytearray(good_file.read_bytes())
    edit(data)
    bad = _corrupt(good_file, data)
    with pytest.raises(ValueError, match=message) as info:
        load_hessian(bad)
    assert "bad.obchess" in str(info.value)


def test_indefinite_sum_is_refused_at_load_or_named_by_the_solve(tmp_path):
    # Before: an indefinite sum loaded fine and the solve said only "increase damp". Now the load
    # checks every 2x2 minor (O(cols^2)); an indefiniteness only larger minors show (here all
    # 2x2 minors are positive, the determinant is not) is named by the solve instead.
    count = 2
    two_by_two = np.array([[1.0, 3.0], [3.0, 1.0]]) * count / 2
    with pytest.raises(ValueError, match=r"sum: expected a positive semidefinite sum .* "
                       r"indefinite one: \|sum\[1,0\]\| = 3 exceeds"):
        HessianAccumulator._from_state(two_by_two, count)
    H = np.array([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])
    assert np.linalg.eigvalsh(H)[0] < 0
    acc = HessianAccumulator._from_state(H * count / 2, count)
    acc.save(tmp_path / "h.obchess")
    H_loaded = load_hessian(tmp_path / "h.obchess").hessian()
    assert np.array_equal(H_loaded, H)
    W = np.random.default_rng(3).standard_normal((2, 3))
    for solve in (lambda: obc_native.quantize(W, H_loaded, 4),
                  lambda: obc_native.quantize(W, H_loaded, 4, method="gptq"),
                  lambda: obc_native.prune_unstructured(W, H_loaded, 0.5, damp=0.1)):
        with pytest.raises(obc_native.HessianError, match=r"H is not positive semidefinite .* inconsistent data"):
            solve()
    # Without damping a merely singular H fails the same way: the message allows for both.
    with pytest.raises(obc_native.HessianError, match=r"(?s)Increase damp.*may itself be indefinite"):
        obc_native.quantize(W, H_loaded, 4, damp=0.0)
    # Rounding never trips the load check: duplicated and opposite columns (|s_ij| = s_ii = s_jj)
    X = np.random.default_rng(4).standard_normal((5000, 4)).astype(np.float32)
    X = np.concatenate([X, X[:, :2], -X[:, 2:3] * 3], axis=1)
    good = HessianAccumulator(7)
    for start in range(0, 5000, 700):
        good.add(X[start:start + 700])
    good.save(tmp_path / "good.obchess")
    assert np.array_equal(load_hessian(tmp_path / "good.obchess").sum(), good.sum())


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(OSError, match="cannot open"):
        load_hessian(tmp_path / "missing.obchess")
    with pytest.raises(OSError):
        HessianAccumulator(2).save(tmp_path / "no" / "such" / "dir.obchess")


# --- agreement with the C API ----------------------------------------------------------------


def _consumer_outputs():
    manifest = CONSUMER_OUT / "manifest.json"
    if not manifest.is_file():
        pytest.skip(
            f"no C API outputs at {CONSUMER_OUT}: run scripts/test_cmake_consumer.sh first "
            "(scripts/test.sh does), or set OBC_CONSUMER_OUT"
        )
    meta = json.loads(manifest.read_text())
    if meta["version"] != obc_native.__version__:
        pytest.skip(f"C API outputs are from version {meta['version']}, "
                    f"the module is {obc_native.__version__}")
    return meta, {p.stem: np.load(p) for p in CONSUMER_OUT.glob("*.npy")}


def test_python_matches_the_c_api():
    """The C++ consumer ran the C API on its own inputs; Python on the same inputs must agree."""
    meta, out = _consumer_outputs()
    W, X = out["W"], out["X"]
    assert X.dtype == np.float32

    # Hessian: the same batches through the Python accumulator; the C++-written file loads.
    acc = HessianAccumulator(X.shape[1])
    acc.add(X[: meta["shard_rows"]])
    second = HessianAccumulator(X.shape[1])
    second.add(X[meta["shard_rows"]:])
    acc.merge(second)
    assert np.array_equal(acc.hessian(), out["H"])
    from_file = load_hessian(CONSUMER_OUT / "hessian.obchess")
    assert from_file.count == len(X)
    assert np.array_equal(from_file.hessian(), out["H"])
    H = acc.hessian()

    damp = meta["damp"]
    pruned = obc_native.prune_unstructured(W, H, meta["sparsity"], damp=damp,
                                           spread=meta["spread"])
    np.testing.assert_array_equal(pruned.mask, out["prune_kept"].astype(bool))
    np.testing.assert_allclose(pruned.weight, out["prune_weight"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pruned.row_losses, out["prune_row_losses"], rtol=1e-10)

    n, m = meta["nm"]
    nm = obc_native.prune_nm(W, H, n, m, damp=damp)
    np.testing.assert_allclose(nm.weight, out["nm_weight"], rtol=1e-12, atol=1e-12)

    quant = obc_native.quantize(W, H, meta["bits"], sym=meta["sym"], grid=meta["grid"], damp=damp,
                                method="obq", refine=False)
    np.testing.assert_array_equal(quant.codes, out["quant_codes"])
    np.testing.assert_array_equal(quant.zero, out["quant_zeros"])
    np.testing.assert_allclose(quant.scale, out["quant_scales"], rtol=1e-14)
    np.testing.assert_allclose(quant.weight, out["quant_weight"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(quant.row_losses, out["quant_row_losses"], rtol=1e-10)


def test_example_host_matches_the_c_api():
    """examples/cpp/obc_compress, run by scripts/test_cmake_consumer.sh on the same inputs."""
    _, out = _consumer_outputs()
    if "example_prune_weight" not in out:
        pytest.skip("no outputs of examples/cpp/obc_compress in the consumer directory")
    assert np.array_equal(out["example_prune_weight"], out["prune_weight"])
    assert np.array_equal(out["example_prune_kept"], out["prune_kept"])
    assert np.array_equal(out["example_quant_weight"], out["quant_weight"])
    assert np.array_equal(out["example_quant_codes"], out["quant_codes"])
    np.testing.assert_allclose(out["example_nm"], out["nm_weight"], rtol=1e-9, atol=1e-12)
    merged = load_hessian(CONSUMER_OUT / "example_merged.obchess")
    assert merged.count == 2 * len(out["X"])
