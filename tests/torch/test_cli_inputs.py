"""obc-native: malformed calibration / example files are one error line naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from obc_native.cli import main
from obc_native.demo.model import WEIGHTS_PATH

pytestmark = pytest.mark.torch


def compress_with(tmp_path, calibration):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("default: {bits: 4}\n")
    return ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet",
            "--calibration", str(calibration), "--recipe", str(recipe), "--out", str(tmp_path / "out")]


def one_error_line(capsys, *expected):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obc-native: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def test_malformed_npy_calibration_is_one_error_line(tmp_path, capsys):
    # before: an empty .npy was a traceback (EOFError), an object array an error naming no file
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    text = tmp_path / "text.npy"
    np.save(text, np.array(["a", "b"]))
    for path, reason in [(empty, "No data left"), (objects, "Object arrays"), (text, "dtype <U1")]:
        assert main(compress_with(tmp_path, path)) == 1
        one_error_line(capsys, str(path))
        assert not (tmp_path / "out").exists()


def test_empty_torch_file_names_its_error_type(tmp_path, capsys):
    empty = tmp_path / "calib.pt"
    empty.write_bytes(b"")
    assert main(compress_with(tmp_path, empty)) == 1
    one_error_line(capsys, str(empty), "weights_only=True (EOFError)")  # before: "()"
