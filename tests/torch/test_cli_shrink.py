"""``obc-native shrink DIR``: the physically smaller model of a structurally pruned folder, as ONNX or .pt2."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from obc_native.cli import main
from obc_native.demo.model import WEIGHTS_PATH, DigitsCNN, load_data
from obc_native.torch import load_compressed

pytestmark = pytest.mark.torch

# features.0 stays dense; features.3 / features.6 lose half their input channels, so features.0 and
# features.3 lose output channels; the classifier loses whole 2x2 blocks, so features.6 does too
RECIPE = """\
default: {prune: structured, sparsity: 0.5}
skip: [features.0]
overrides:
  - {pattern: classifier, structured_group: 4}
"""


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shrink")
    data = load_data()
    torch.save(data.train_x[:128].clone(), directory / "calib.pt")
    torch.save(data.test_x[:8].clone(), directory / "example.pt")
    (directory / "recipe.yaml").write_text(RECIPE)
    args = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet",
            "--calibration", str(directory / "calib.pt"), "--recipe", str(directory / "recipe.yaml"),
            "--out", str(directory / "pruned")]
    assert main(args) == 0
    return directory


def masked_model(folder):
    model = DigitsCNN()
    load_compressed(model, folder / "pruned")
    return model.eval()


def test_shrink_to_onnx(pruned_folder, tmp_path, capsys, caplog):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "small.onnx"
    caplog.set_level(logging.INFO)
    assert main(["shrink", str(pruned_folder / "pruned"), "--out", str(out),
                 "--example", str(pruned_folder / "example.pt")]) == 0
    printed = capsys.readouterr().out
    # the counts are printed once, in the table: shrink_structured's INFO summary, which said
    # them again on stderr, is not passed on
    assert printed.count("parameters: ") == 1
    assert not [r.message for r in caplog.records if r.name.startswith("obc_native.torch")]
    assert re.search(r"features\.6 +classifier +32 +16\n", printed), printed
    assert "parameters: 15418 -> 4258" in printed and "max |shrunk - masked|" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = load_data().test_x[:32]  # another batch size than the example: the batch dimension is dynamic
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = masked_model(pruned_folder)(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    weights = {init.name: init for init in __import__("onnx").load(str(out)).graph.initializer}
    shapes = sorted(tuple(w.dims) for w in weights.values() if len(w.dims) == 2)
    assert (10, 16 * 4) in [s[::-1] for s in shapes] + shapes  # the classifier reads 16 channels x 2 x 2


@pytest.mark.slow  # ~1.5 s on a quiet machine, ~5 s under load; test_explicit_chains writes and runs a .pt2 too
def test_shrink_to_pt2(pruned_folder, tmp_path, capsys):
    out = tmp_path / "small.pt2"
    assert main(["shrink", str(pruned_folder / "pruned"), "--out", str(out), "--quiet",
                 "--example", str(pruned_folder / "example.pt")]) == 0
    assert capsys.readouterr().out == ""
    program = torch.export.load(str(out)).module()
    x = load_data().test_x[:5]
    with torch.no_grad():
        torch.testing.assert_close(program(x), masked_model(pruned_folder)(x), rtol=1e-5, atol=1e-5)
    sizes = {tuple(v.shape) for v in program.state_dict().values()}
    assert (10, 64) in sizes and (16, 8, 3, 3) in sizes


def test_explicit_chains(pruned_folder, tmp_path, capsys):
    out = tmp_path / "small.pt2"
    chains = '[["features.3", "features.4", "features.6"], ["features.6", "features.7", "classifier"]]'
    assert main(["shrink", str(pruned_folder / "pruned"), "--out", str(out), "--chains", chains,
                 "--example", str(pruned_folder / "example.pt")]) == 0
    printed = capsys.readouterr().out
    assert "features.0 " not in printed.splitlines()[1] and "parameters: 15418 ->" in printed
    program = torch.export.load(str(out)).module()
    assert tuple(program.state_dict()["features.0.weight"].shape) == (16, 1, 3, 3)  # not in a chain: kept
    assert program(load_data().test_x[:5]).shape == (5, 10)  # another batch size than the example's 8


def one_error_line(capsys, *expected):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obc-native: error: "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]


def test_bad_input(pruned_folder, tmp_path, capsys):
    folder, example = str(pruned_folder / "pruned"), str(pruned_folder / "example.pt")
    assert main(["shrink", folder, "--out", str(tmp_path / "small.bin"), "--example", example]) == 1
    one_error_line(capsys, "--out", ".onnx or .pt2")
    assert main(["shrink", folder, "--out", str(tmp_path / "no" / "small.onnx"), "--example", example]) == 1
    one_error_line(capsys, "--out")
    assert main(["shrink", folder, "--out", str(tmp_path / "s.onnx"), "--example", str(tmp_path / "x.pt")]) == 1
    one_error_line(capsys, "--example", "no such file")
    assert main(["shrink", folder, "--out", str(tmp_path / "s.onnx"), "--example", example,
                 "--chains", '["features.3"]']) == 1
    one_error_line(capsys, "--chains", "lists of module names")
    assert main(["shrink", folder, "--out", str(tmp_path / "s.onnx"), "--example", example,
                 "--chains", '[["features.6", "features.5", "classifier"]]']) == 1
    one_error_line(capsys, "'features.5'", "BatchNorm with 32 features")
    assert not any(tmp_path.iterdir())


def test_misaligned_classifier_in_a_given_chain_is_one_error_line(tmp_path, capsys):
    """The classifier pruned column by column: the chain through the flatten cannot be cut."""
    data = load_data()
    torch.save(data.train_x[:64].clone(), tmp_path / "calib.pt")
    torch.save(data.test_x[:4].clone(), tmp_path / "example.pt")
    (tmp_path / "recipe.yaml").write_text("default: null\noverrides:\n"
                                          "  - {pattern: classifier, prune: structured, sparsity: 0.5}\n")
    assert main(["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet",
                 "--calibration", str(tmp_path / "calib.pt"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--out", str(tmp_path / "pruned")]) == 0
    args = ["shrink", str(tmp_path / "pruned"), "--out", str(tmp_path / "s.onnx"), "--example",
            str(tmp_path / "example.pt")]
    assert main([*args, "--chains", '[["features.6", "features.7", "classifier"]]']) == 1
    one_error_line(capsys, "Linear 'classifier'", "structured_group=4")
    assert main(args) == 1  # traced: the chain is skipped, and then nothing is left to remove
    one_error_line(capsys, "no channel can be removed", "classifier", "structured_group=4")
    assert not (tmp_path / "s.onnx").exists()


def test_folder_without_structured_pruning(tmp_path, capsys):
    data = load_data()
    torch.save(data.train_x[:64].clone(), tmp_path / "calib.pt")
    torch.save(data.test_x[:4].clone(), tmp_path / "example.pt")
    (tmp_path / "recipe.yaml").write_text("default: {bits: 8}\n")
    assert main(["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet",
                 "--calibration", str(tmp_path / "calib.pt"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--out", str(tmp_path / "quantized")]) == 0
    assert main(["shrink", str(tmp_path / "quantized"), "--out", str(tmp_path / "s.pt2"), "--example",
                 str(tmp_path / "example.pt")]) == 1
    one_error_line(capsys, "no channel can be removed")
    assert not (tmp_path / "s.pt2").exists()


def test_hf_folder_shrinks_its_feed_forward_blocks(tmp_path, capsys):
    """A folder saved with --hf: the chains default to hf_ffn_chains (fx cannot trace BERT)."""
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).eval().save_pretrained(tmp_path / "bert")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    save_file({"input_ids": ids[:2], "attention_mask": torch.ones(2, 8, dtype=torch.int64)},
              tmp_path / "example.safetensors")
    save_file({"input_ids": ids[:2]}, tmp_path / "ids_only.safetensors")
    # the FFN output projections only ('*.output.dense' would take attention.output.dense too)
    (tmp_path / "r.yaml").write_text("default: null\noverrides:\n"
                                     "  - {pattern: '*[0-9].output.dense', prune: structured, sparsity: 0.5}\n")
    assert main(["compress", "--hf", str(tmp_path / "bert"), "--calibration", str(tmp_path / "ids.safetensors"),
                 "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    out = tmp_path / "small.onnx"
    assert main(["shrink", str(tmp_path / "pruned"), "--out", str(out), "--example",
                 str(tmp_path / "example.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"encoder\.layer\.1\.intermediate\.dense +encoder\.layer\.1\.output\.dense +32 +16\n", printed)
    masked = transformers.BertModel.from_pretrained(tmp_path / "pruned").eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids[:5].numpy(), "attention_mask": np.ones((5, 8), dtype=np.int64)}
    (hidden, *_) = session.run(None, feed)
    with torch.no_grad():
        expected = masked(input_ids=ids[:5]).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-5)

    # a one-tensor example named after a forward argument goes by keyword (positionally, the
    # TorchScript exporter failed on BertModel: "got multiple values for argument 'use_cache'")
    for command in (["shrink", str(tmp_path / "pruned"), "--out", str(tmp_path / "ids_only.onnx")],
                    ["export", str(tmp_path / "pruned"), "--format", "onnx", "--out", str(tmp_path / "q.onnx")]):
        assert main([*command, "--example", str(tmp_path / "ids_only.safetensors"), "--quiet"]) == 0, command
    session = ort.InferenceSession(str(tmp_path / "ids_only.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    (hidden, *_) = session.run(None, {"input_ids": ids[:5].numpy()})
    np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_option(pruned_folder, tmp_path, capsys, caplog):
    out = tmp_path / "small.pt2"
    caplog.set_level(logging.INFO)
    assert main(["shrink", str(pruned_folder / "pruned"), "--out", str(out), "--fold-batchnorm",
                 "--example", str(pruned_folder / "example.pt")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("folded features.1 into features.0") == 1  # not also "fold_batchnorm: ..." logged
    assert not [r.message for r in caplog.records if r.name.startswith("obc_native.torch")]
    assert "folded features.1 into features.0" in printed and "folded features.7 into features.6" in printed
    program = torch.export.load(str(out)).module()
    x = load_data().test_x[:5]
    with torch.no_grad():
        torch.testing.assert_close(program(x), masked_model(pruned_folder)(x), rtol=1e-5, atol=1e-5)
    # no BatchNorm is left in the program: its statistics are in the conv weights and biases
    assert not any("running_mean" in name for name in program.state_dict())
    # 4258, less the BatchNorm weight and bias of 8 + 16 + 16 channels, plus a conv bias for each: 4218
    assert "parameters: 15418 -> 4218" in printed


def test_hf_folder_loses_its_pruned_attention_heads(tmp_path, capsys):
    """Heads pruned whole (structured_group = head size) are removed by default, as the FFN width is;
    before, the command left them masked."""
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).eval().save_pretrained(tmp_path / "bert")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    (tmp_path / "r.yaml").write_text("default: null\noverrides:\n"
                                     "  - {pattern: '*.output.dense', prune: structured, sparsity: 0.5}\n"
                                     "  - {pattern: '*.attention.output.dense', structured_group: 4}\n")
    assert main(["compress", "--hf", str(tmp_path / "bert"), "--calibration", str(tmp_path / "ids.safetensors"),
                 "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "small.onnx"
    assert main(["shrink", str(tmp_path / "pruned"), "--out", str(out), "--example",
                 str(tmp_path / "ids.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"encoder\.layer\.1\.attention\.self +4 +2 +4\n", printed), printed
    assert re.search(r"encoder\.layer\.1\.intermediate\.dense +encoder\.layer\.1\.output\.dense +32 +16\n", printed)
    query = [i for i in __import__("onnx").load(str(out)).graph.initializer if "layer.1.attention.self.query" in i.name]
    assert query and all(8 in tuple(i.dims) for i in query)  # 2 heads x 4 features left of 16
    masked = transformers.BertModel.from_pretrained(tmp_path / "pruned").eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (hidden, *_) = session.run(None, {"input_ids": ids[:5].numpy()})
    with torch.no_grad():
        expected = masked(input_ids=ids[:5]).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, expected, rtol=1e-4, atol=1e-5)
