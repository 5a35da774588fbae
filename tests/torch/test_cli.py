"""The obc-native command line: compress (state dict + arch, HF directory), report, demo."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from obc_torch_helpers import tiny_gpt2

from obc_native.cli import main
from obc_native.demo.model import WEIGHTS_PATH, DigitsCNN, load_data
from obc_native.torch import load_compressed, read_manifest

pytestmark = pytest.mark.torch

RECIPE = "default: {prune: nm, n: 2, m: 4, bits: 4, sym: false}\nskip: [features.0]\n"


@pytest.fixture
def digits_files(tmp_path):
    calibration = tmp_path / "calib.pt"
    torch.save(load_data().train_x[:96].clone(), calibration)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return calibration, recipe


def test_compress_state_dict_and_report(digits_files, tmp_path, capsys):
    calibration, recipe = digits_files
    out = tmp_path / "out"
    args = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN"]
    args += ["--calibration", str(calibration), "--recipe", str(recipe), "--out", str(out), "--batch-size", "32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "features.3" in printed and "2:4+int4 asym" in printed
    manifest = read_manifest(out)
    assert manifest["metadata"]["arch"] == "obc_native.demo.model:DigitsCNN"
    assert manifest["report"]["batches"] == 3
    model = DigitsCNN()
    load_compressed(model, out)
    assert float((model.features[3].weight == 0).float().mean()) >= 0.5

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "features.6" in printed and "sparse_quantized, 4-bit codes" in printed
    assert main(["report", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "obc_native.compressed"


def test_compress_errors(digits_files, tmp_path, capsys):
    calibration, recipe = digits_files
    module_file = tmp_path / "module.pt"
    torch.save(DigitsCNN(), module_file)
    base = ["compress", "--calibration", str(calibration), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert main([*base, "--model", str(module_file)]) == 1
    assert "--arch" in capsys.readouterr().err
    assert main([*base, "--model", str(module_file), "--arch", "obc_native.demo.model:DigitsCNN"]) == 1
    assert "weights_only=True" in capsys.readouterr().err
    assert main([*base, "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:Nope"]) == 1
    assert "no attribute 'Nope'" in capsys.readouterr().err
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("default: {prune: nm, n: 2, m: 4}\n")  # features.0 has one input channel
    bad = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN"]
    bad += ["--calibration", str(calibration), "--recipe", str(bad_recipe), "--out", str(tmp_path / "o")]
    assert main(bad) == 1
    assert "layer 'features.0'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "manifest.json: no such file" in capsys.readouterr().err


def test_trusted_pickled_module(digits_files, tmp_path):
    calibration, recipe = digits_files
    module_file = tmp_path / "module.pt"
    torch.save(DigitsCNN(), module_file)
    args = ["compress", "--model", str(module_file), "--trust-pickle", "--quiet"]
    args += ["--calibration", str(calibration), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert main(args) == 0
    assert read_manifest(tmp_path / "o")["metadata"]["source"] == "pickled_module"


def test_compress_hf_directory(tmp_path, capsys):
    from safetensors.torch import save_file

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"prune": "unstructured", "sparsity": 0.5}}))
    args = ["compress", "--hf", str(tmp_path / "hf"), "--calibration", str(tmp_path / "ids.safetensors")]
    args += ["--batch-size", "4", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--sequential"]
    assert main(args) == 0
    assert "transformer.h.0.mlp.c_fc" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()
    fresh = tiny_gpt2(seed=5)
    load_compressed(fresh, tmp_path / "out")
    assert float((fresh.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_compress_padded_token_calibration(tmp_path, capsys):
    """A dict with an attention_mask: only the real tokens count (--token-mask none: every
    position); a bad mask is one error line naming the batch."""
    from safetensors.torch import save_file

    bert = tiny_bert_dir(tmp_path)
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(12) < torch.tensor([3, 5, 12, 4, 7, 9, 2, 6])[:, None]).long()
    save_file({"input_ids": ids * mask, "attention_mask": mask}, tmp_path / "padded.safetensors")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"bits": 4}}))
    base = ["compress", "--hf", str(bert), "--calibration", str(tmp_path / "padded.safetensors")]
    base += ["--batch-size", "4", "--recipe", str(recipe), "--quiet"]
    for option, expected in (([], int(mask.sum())), (["--token-mask", "none"], mask.numel())):
        out = tmp_path / f"out{len(option)}"
        assert main([*base, *option, "--out", str(out)]) == 0
        rows = read_manifest(out)["report"]["layers"]
        samples = {row["name"]: row["samples"] for row in rows if row["name"] != "pooler.dense"}
        assert set(samples.values()) == {expected}, option
    save_file({"input_ids": ids, "attention_mask": mask * 2}, tmp_path / "bad.safetensors")
    bad = ["compress", "--hf", str(bert), "--calibration", str(tmp_path / "bad.safetensors"), "--batch-size", "4"]
    capsys.readouterr()
    assert main([*bad, "--recipe", str(recipe), "--out", str(tmp_path / "bad"), "--quiet"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("obc-native: error: ")]
    assert len(errors) == 1 and "calibration batch 0" in errors[0] and "only 0 and 1" in errors[0], errors
    # the advice names the flag, not the library's argument (was "pass token_mask=None")
    assert errors[0].endswith("; pass --token-mask none to count every position"), errors


def test_token_mask_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    """Errors about the mask said "token_mask=None" / "token_mask='pad'" (the Python argument)
    on the command line too, whose flag is --token-mask."""
    import importlib

    from safetensors.torch import save_file

    bert = tiny_bert_dir(tmp_path)
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(12) < torch.tensor([3, 5, 12, 4, 7, 9, 2, 6])[:, None]).long()
    save_file({"input_ids": ids * mask, "attention_mask": mask}, tmp_path / "padded.safetensors")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"bits": 4}}))
    base = ["compress", "--hf", str(bert), "--calibration", str(tmp_path / "padded.safetensors"), "--batch-size", "4",
            "--recipe", str(recipe), "--quiet"]

    def error_of(*options):
        capsys.readouterr()
        assert main([*base, *options, "--out", str(tmp_path / "out")]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("obc-native: error: ")]
        assert len(errors) == 1 and "token_mask" not in errors[0].replace(str(tmp_path), "TMP"), errors
        return errors[0]

    assert error_of("--token-mask", "pad") == (
        "obc-native: error: calibration batch 0: --token-mask 'pad' names a key of dict batches, and the batch is "
        "keys ['attention_mask', 'input_ids']; pass the right key, or --token-mask none")
    assert error_of("--token-mask", "").endswith("--token-mask: expected auto, a batch key or none, got ''")
    checkpoint = tmp_path / "ckpt"
    with monkeypatch.context() as old_version:  # a checkpoint written before the option existed
        old_version.setattr(importlib.import_module("obc_native.torch.compress"), "_token_mask_description",
                            lambda token_mask: {})
        old_version.setattr(importlib.import_module("obc_native.torch.checkpoint"), "_FORMAT", 1)
        assert main([*base, "--token-mask", "none", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]) == 0
    message = error_of("--checkpoint", str(checkpoint))
    assert "was written before the --token-mask option existed" in message
    assert "this run's --token-mask (the default, auto) could give" in message
    assert "Resume it with --token-mask none (as it was run)" in message


def tiny_bert_dir(tmp_path):
    """A randomly initialised one-block BERT saved as a Hugging Face directory (no download)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_hf_output_loads_with_from_pretrained(tmp_path, capsys):
    """The --hf output is a checkpoint that from_pretrained loads: the compressed model's outputs."""
    from safetensors.torch import save_file
    import transformers

    from obc_native.torch import compress

    source = tiny_bert_dir(tmp_path)
    (source / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    recipe = {"default": {"prune": "nm", "n": 2, "m": 4, "bits": 4, "sym": False}}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    args = ["compress", "--hf", str(source), "--calibration", str(tmp_path / "ids.safetensors")]
    args += ["--batch-size", "4", "--recipe", str(tmp_path / "r.json"), "--out", str(out), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()

    expected = transformers.BertModel.from_pretrained(source).eval()  # the same compression in memory
    compress(expected, list(ids.split(4)), recipe, quiet=True)
    loaded, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(loaded) is transformers.BertModel
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    weight = loaded.encoder.layer[0].intermediate.dense.weight
    assert float((weight == 0).float().mean()) >= 0.5  # 2:4, and codes that dequantize to 0
    assert len(torch.unique(weight[0])) <= 17  # 16 grid values and the pruned zeros
    test_ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=test_ids).last_hidden_state,
                           expected(input_ids=test_ids).last_hidden_state)
    # the obc_native format is in the same folder
    rebuilt = transformers.BertModel(transformers.AutoConfig.from_pretrained(out))
    load_compressed(rebuilt, out)
    for key, value in loaded.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_hf_checkpoint_that_would_not_load_faithfully_is_refused(tmp_path):
    """A checkpoint whose reload differs (here: a weight changed on load) raises; no weights stay."""
    transformers = pytest.importorskip("transformers")
    from obc_native.torch.hf_checkpoint import HFCheckpointError, save_hf_checkpoint

    class Drifting(transformers.BertModel):  # loads every checkpoint with one weight perturbed
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            model, info = transformers.BertModel.from_pretrained(*args, **kwargs)
            with torch.no_grad():
                model.pooler.dense.bias[0] += 1
            return model, info

    model = transformers.BertModel.from_pretrained(tiny_bert_dir(tmp_path))
    model.__class__ = Drifting
    with pytest.raises(HFCheckpointError, match="'pooler.dense.bias' loads differently"):
        save_hf_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(TypeError, match="model: expected a transformers.PreTrainedModel, got Linear"):
        save_hf_checkpoint(torch.nn.Linear(2, 2), tmp_path / "out")


def test_folder_with_the_old_tensor_file_name_loads(tmp_path):
    """Folders saved when the tensor file was called model.safetensors still load."""
    from obc_native.torch import compress, save_compressed
    from obc_native.torch.serialize import MANIFEST_NAME, TENSORS_NAME

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
    report = compress(model, batches, {"default": {"prune": "nm", "n": 2, "m": 4}}, quiet=True)
    save_compressed(model, tmp_path, report)
    (tmp_path / TENSORS_NAME).rename(tmp_path / "model.safetensors")
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["tensors"] = "model.safetensors"
    del manifest["manifest_sha256"]  # that version wrote no manifest checksum (loads with a warning)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    load_compressed(fresh, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_demo_command_subset(capsys):
    assert main(["demo", "--recipes", "4-bit"]) == 0
    printed = capsys.readouterr().out
    assert "4-bit             auto " in printed and "4-bit             RTN " in printed
    assert "dense" in printed and "ExactOBS/OBQ" not in printed
    assert "BN re-estimated" in printed and "auto - RTN: " in printed
    assert main(["demo", "--recipes", "5-bit"]) == 1


def test_demo_command_budget_subset(capsys):
    assert main(["demo", "--recipes", "3x fewer FLOPs"]) == 0
    printed = capsys.readouterr().out
    assert "non-uniform DP" in printed and "uniform" in printed and "[ok] non-uniform (DP)" in printed


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the CLI starts loading the model: errors must come before any work."""

    def fail(args):
        raise AssertionError("the model was loaded although the command line is wrong")

    monkeypatch.setattr("obc_native.cli._load_model", fail)


def unwritable_directory(tmp_path):
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        (directory / "probe").write_text("")
    except OSError:
        return directory
    (directory / "probe").unlink()  # root ignores permissions: /proc refuses new files
    if os.path.isdir("/proc/self"):
        return "/proc/self"
    pytest.skip("no unwritable directory on this machine")


def compress_args(tmp_path, calibration, recipe, out):
    args = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet"]
    return args + ["--calibration", str(calibration), "--recipe", str(recipe), "--out", str(out)]


def one_error_line(capsys, *expected):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obc-native: error: "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_bad_recipe_paths(digits_files, tmp_path, capsys, no_work):
    calibration, _ = digits_files
    assert main(compress_args(tmp_path, calibration, tmp_path / "missing.yaml", tmp_path / "o")) == 1
    one_error_line(capsys, "--recipe", "missing.yaml: no such file")
    assert main(compress_args(tmp_path, calibration, tmp_path, tmp_path / "o")) == 1
    one_error_line(capsys, "--recipe", "is a directory")
    assert not (tmp_path / "o").exists()


def test_bad_recipe_values_are_one_line_naming_the_file(digits_files, tmp_path, capsys, no_work):
    calibration, _ = digits_files
    for text, expected in [("default: {prune: unstructured, sparsity: 0.5, damp: .inf}", "damp must be"),
                           ("default: {prune: unstructured, sparsity: 2024-01-01}", "sparsity must be")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        assert main(compress_args(tmp_path, calibration, recipe, tmp_path / "o")) == 1
        one_error_line(capsys, str(recipe), expected)
    recipe.write_bytes("default: {bits: 4}  # d\xe9faut\n".encode("latin-1"))
    assert main(compress_args(tmp_path, calibration, recipe, tmp_path / "o")) == 1
    one_error_line(capsys, str(recipe), "UTF-8")


def test_bad_out_is_reported_before_compressing(digits_files, tmp_path, capsys, no_work):
    calibration, recipe = digits_files
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert main(compress_args(tmp_path, calibration, recipe, a_file)) == 1
    one_error_line(capsys, "--out", "exists and is not a directory")
    assert main(compress_args(tmp_path, calibration, recipe, a_file / "sub")) == 1
    one_error_line(capsys, "--out", "is not a directory")
    for name in ("model.safetensors", "pytorch_model.bin"):  # an HF checkpoint or an old obc_native output
        holder = tmp_path / f"holds_{name}"
        holder.mkdir()
        (holder / name).write_bytes(b"")
        assert main(compress_args(tmp_path, calibration, recipe, holder)) == 1
        one_error_line(capsys, "--out", name, "from_pretrained would load")
    read_only = unwritable_directory(tmp_path)
    for out in (os.path.join(read_only, "new"), read_only):
        assert main(compress_args(tmp_path, calibration, recipe, out)) == 1
        one_error_line(capsys, "--out")


def test_failed_compression_leaves_no_empty_out_directory(digits_files, tmp_path, capsys, caplog):
    calibration, _ = digits_files
    recipe = tmp_path / "nm.yaml"
    recipe.write_text("default: {prune: nm, n: 2, m: 4}\n")  # features.0 has one input channel
    out = tmp_path / "new" / "out"
    assert main(compress_args(tmp_path, calibration, recipe, out)) == 1
    err = capsys.readouterr().err  # the recipe's problems, one per line, and nothing else
    assert err.startswith("obc-native: error: recipe file") and "features.0" in err and "unchanged" not in err
    assert not (tmp_path / "new").exists()
    recipe.write_text("default: {prune: nm, n: 2, m: 4}\nskip: [features.0]\n")
    with pytest.raises(SystemExit) as exit_info:  # argparse checks the range before any work
        main([*compress_args(tmp_path, calibration, recipe, out), "--threads", "-1"])
    assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    wrong_shape = tmp_path / "rgb.pt"
    torch.save(torch.zeros(4, 3, 8, 8), wrong_shape)  # the model takes one channel
    assert main([*compress_args(tmp_path, calibration, recipe, out), "--calibration", str(wrong_shape)]) == 1
    one_error_line(capsys, "calibration batch 0")
    assert "unchanged" not in caplog.text  # logged records do not reach capsys in tests
    assert not (tmp_path / "new").exists()


def test_bad_database_path_is_reported_before_building(digits_files, tmp_path, capsys, no_work):
    calibration, recipe = digits_files
    budget = ["--budget", "flops=2x", "--database"]
    assert main([*compress_args(tmp_path, calibration, recipe, tmp_path / "o"), *budget,
                 str(tmp_path / "missing" / "levels.json")]) == 1
    one_error_line(capsys, "--database", "does not exist")
    assert main([*compress_args(tmp_path, calibration, recipe, tmp_path / "o"), *budget, str(tmp_path)]) == 1
    one_error_line(capsys, "--database", "is a directory")
    read_only = unwritable_directory(tmp_path)
    assert main([*compress_args(tmp_path, calibration, recipe, tmp_path / "o"), *budget,
                 os.path.join(read_only, "levels.json")]) == 1
    one_error_line(capsys, "--database", "cannot write")
    if hasattr(os, "mkfifo"):  # a FIFO was taken for a path to build the database at, and refused only after
        os.mkfifo(tmp_path / "levels.fifo")
        assert main([*compress_args(tmp_path, calibration, recipe, tmp_path / "o"), *budget,
                     str(tmp_path / "levels.fifo")]) == 1
        one_error_line(capsys, "--database", "not a regular file")


def test_bad_hf_directory(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"prune": "unstructured", "sparsity": 0.5}}))
    calibration = tmp_path / "ids.pt"
    torch.save(torch.zeros(4, 8, dtype=torch.long), calibration)
    base = ["compress", "--calibration", str(calibration), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert main([*base, "--hf", str(tmp_path / "no_such_model")]) == 1
    one_error_line(capsys, "--hf", "no such directory")
    (tmp_path / "empty").mkdir()
    assert main([*base, "--hf", str(tmp_path / "empty")]) == 1
    one_error_line(capsys, "--hf", "no config.json")
    bert = tiny_bert_dir(tmp_path)
    (bert / "model.safetensors").unlink()  # a config without weights
    capsys.readouterr()  # save_pretrained's progress bar
    assert main([*base, "--hf", str(bert)]) == 1
    one_error_line(capsys, "--hf", "cannot load the Hugging Face model")


def test_bad_arch_kwargs(digits_files, tmp_path, capsys):
    calibration, recipe = digits_files
    args = compress_args(tmp_path, calibration, recipe, tmp_path / "o")
    assert main([*args, "--arch-kwargs", "{nope"]) == 1
    one_error_line(capsys, "--arch-kwargs", "not valid JSON")
    assert main([*args, "--arch-kwargs", '{"width": 3}']) == 1
    one_error_line(capsys, "--arch", "width")


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone away (``obc-native report --json | head -1``)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_report_into_a_closed_pipe(digits_files, tmp_path, capsys, monkeypatch):
    calibration, recipe = digits_files
    out = tmp_path / "out"
    assert main(compress_args(tmp_path, calibration, recipe, out)) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["report", str(out), "--json"]) == 1
    assert main(["report", str(out)]) == 1
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_report_into_a_closed_pipe_process(digits_files, tmp_path):
    """The real thing: no traceback and no 'Exception ignored' message when the reader exits."""
    calibration, recipe = digits_files
    out = tmp_path / "out"
    assert main(compress_args(tmp_path, calibration, recipe, out)) == 0
    code = "import sys; from obc_native.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", code, "report", str(out), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # before the child has imported anything: every write fails
    _, err = process.communicate(timeout=120)
    assert err.decode() == "" and process.returncode == 1


def test_corrupt_safetensors_inputs(digits_files, tmp_path, capsys):
    calibration, recipe = digits_files
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    args = compress_args(tmp_path, calibration, recipe, tmp_path / "o")
    assert main([*args, "--model", str(corrupt)]) == 1
    one_error_line(capsys, str(corrupt), "not a readable safetensors file")
    assert main([*args, "--calibration", str(corrupt)]) == 1
    one_error_line(capsys, str(corrupt), "not a readable safetensors file")


def test_report_of_a_malformed_manifest(digits_files, tmp_path, capsys):
    from obc_native.torch.serialize import MANIFEST_NAME

    calibration, recipe = digits_files
    out = tmp_path / "out"
    assert main(compress_args(tmp_path, calibration, recipe, out)) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["layers"]["features.3"]["storage"]
    del manifest["manifest_sha256"]  # as an older manifest (else the checksum catches the edit first)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["report", str(out)]) == 1
    one_error_line(capsys, "malformed manifest", "storage")


def test_report_says_which_quantized_layers_are_stored_as_values(tmp_path, capsys):
    """A quantized layer save_compressed stores as values (its grid does not fit, e.g. a shrunk
    layer) used to be listed with the report's mode only, as if the file held its codes."""
    from obc_native.torch import LayerConfig, compress, save_compressed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    report = compress(model, [torch.randn(64, 64)], LayerConfig(bits=4, group_size=32), quiet=True)
    with torch.no_grad():  # as if cut: the first layer's weights leave the grid
        model[0].weight.add_(1e-3)
    save_compressed(model, tmp_path / "out", report)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  0: dense, 4096 non-zeros of [64, 64]; stored as values, not codes: weights are not on its quantization " \
           "grid" in lines
    assert [line for line in lines if line.startswith("  2: ")][0].startswith("  2: quantized, 4-bit codes, ")
    assert sum("stored as values" in line for line in lines) == 1


def test_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("obc_native.cli._cmd_report", interrupted)
    assert main(["report", "anywhere"]) == 130
    one_error_line(capsys, "interrupted")


def test_model_file_errors_are_one_line(digits_files, tmp_path, capsys):
    from safetensors.torch import save_file

    calibration, recipe = digits_files
    args = compress_args(tmp_path, calibration, recipe, tmp_path / "o")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle at all")
    assert main([*args[:2], str(garbage), "--trust-pickle", *args[5:]]) == 1
    one_error_line(capsys, str(garbage), "cannot be loaded as a saved module")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, wrong)
    assert main([*args[:2], str(wrong), *args[3:]]) == 1
    one_error_line(capsys, "does not fit", "Missing key")


def test_main_leaves_logging_as_it_found_it(capsys):
    import logging

    failure_logger = logging.getLogger("obc_native.torch.failure")
    before = failure_logger.level
    assert main(["report", "nowhere"]) == 1
    assert failure_logger.level == before


class _TwoInputs(torch.nn.Module):
    def forward(self, x, mask=None):  # pragma: no cover - only its signature is read
        return x


def test_one_tensor_dict_goes_by_keyword_when_forward_names_it(tmp_path):
    """A one-tensor calibration dict feeds the argument its key names; before, a file holding
    {"mask": t} silently called model(t), i.e. fed the mask as the input."""
    from safetensors.torch import save_file

    from obc_native.cli import _calibration_batches

    samples = torch.arange(12.0).reshape(6, 2)
    for key, keyword in (("mask", True), ("x", True), ("data", False)):
        path = tmp_path / f"{key}.safetensors"
        save_file({key: samples}, path)
        batches = _calibration_batches(str(path), 4, _TwoInputs())
        assert len(batches) == 2
        if keyword:
            assert all(isinstance(b, dict) and list(b) == [key] for b in batches)
            assert torch.equal(torch.cat([b[key] for b in batches]), samples)
        else:  # a key forward does not know: the one unnamed input, positionally
            assert all(isinstance(b, torch.Tensor) for b in batches)
            assert torch.equal(torch.cat(batches), samples)


def test_compress_cache_outputs_same_files(tmp_path, capsys):
    """--sequential --cache-outputs saves the weights --sequential saves; alone it is an error."""
    from safetensors.torch import save_file

    model = tiny_gpt2(layers=2)
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": {"prune": "unstructured", "sparsity": 0.5}}))
    args = ["compress", "--hf", str(tmp_path / "hf"), "--calibration", str(tmp_path / "ids.safetensors")]
    args += ["--batch-size", "4", "--recipe", str(recipe), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "bad"), "--cache-outputs"]) != 0
    assert "--cache-outputs applies to sequential calibration" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "plain"), "--sequential"]) == 0
    assert main(args + ["--out", str(tmp_path / "cached"), "--sequential", "--cache-outputs"]) == 0
    plain, cached = tiny_gpt2(seed=5, layers=2), tiny_gpt2(seed=6, layers=2)
    load_compressed(plain, tmp_path / "plain")
    load_compressed(cached, tmp_path / "cached")
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(a, b), name
