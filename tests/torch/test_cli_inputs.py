"""obc-native: one error line that says what is wrong (malformed calibration files, shrink finding no chain)."""

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


@pytest.mark.slow  # a Llama folder compressed, then loaded again: about 9 s on a busy 2-core machine
def test_shrink_names_structured_layers_no_chain_reaches(tmp_path, capsys):
    # before: "no channel can be removed (structured pruning: ...)", as if nothing had been pruned
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    recipe = tmp_path / "s.yaml"
    recipe.write_text("default: null\noverrides: [{pattern: '*.down_proj', prune: structured, sparsity: 0.5}]\n")
    assert main(["compress", "--hf", str(tmp_path / "llama"), "--calibration", str(tmp_path / "ids.safetensors"),
                 "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["shrink", str(tmp_path / "out"), "--out", str(tmp_path / "s.onnx"), "--example",
                 str(tmp_path / "ids.safetensors")]) == 1
    one_error_line(capsys, "no channel can be removed", "structurally pruned model.layers.0.mlp.down_proj",
                   "gated MLP")
    assert not (tmp_path / "s.onnx").exists()
