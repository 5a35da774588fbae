"""A model that is itself one supported layer (module name "") compresses, saves and loads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from obc_native.cli import main
from obc_native.torch import compress, load_compressed, read_manifest, save_compressed
from obc_native.torch.layers import param_key

pytestmark = pytest.mark.torch


def test_param_key():
    assert param_key("fc", "weight") == "fc.weight"
    assert param_key("a.b", "bias") == "a.b.bias"
    assert param_key("", "weight") == "weight"


@pytest.mark.parametrize(
    "layer, shape",
    [(lambda: nn.Linear(16, 8), (32, 16)), (lambda: nn.Conv2d(4, 8, 3), (8, 4, 6, 6))],
    ids=["linear", "conv2d"],
)
@pytest.mark.parametrize("sequential", [False, True])
def test_single_layer_model(layer, shape, sequential, tmp_path):
    torch.manual_seed(0)
    model = layer()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(*shape, generator=generator) for _ in range(2)]
    report = compress(model, batches, {"default": {"prune": "nm", "n": 2, "m": 4, "bits": 4}},
                      sequential=sequential, quiet=True)
    assert [layer.name for layer in report.compressed] == [""]
    assert report.table().splitlines()[2].startswith("(model) ")
    assert float((model.weight == 0).float().mean()) >= 0.5  # 2:4, plus codes that round to zero
    save_compressed(model, tmp_path, report)
    assert read_manifest(tmp_path)["layers"][""]["weight_key"] == "weight"
    fresh = layer()
    load_compressed(fresh, tmp_path)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_single_layer_budget():
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(1))]
    report = compress(model, batches, budget="params=2x", levels={"sparsities": [0.5], "nm": []}, quiet=True)
    assert [layer.name for layer in report.compressed] == [""]
    assert float((model.weight == 0).float().mean()) == 0.5


def test_single_layer_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(nn.Linear(16, 8).state_dict(), tmp_path / "w.safetensors")
    save_file({"x": torch.randn(64, 16, generator=torch.Generator().manual_seed(1))}, tmp_path / "x.safetensors")
    (tmp_path / "r.json").write_text(json.dumps({"default": {"prune": "unstructured", "sparsity": 0.25}}))
    out = tmp_path / "out"
    args = ["compress", "--model", str(tmp_path / "w.safetensors"), "--arch", "torch.nn:Linear"]
    args += ["--arch-kwargs", '{"in_features": 16, "out_features": 8}']
    args += ["--calibration", str(tmp_path / "x.safetensors")]
    args += ["--recipe", str(tmp_path / "r.json"), "--quiet", "--out"]
    args, budget = [*args, str(out)], [*args, str(tmp_path / "budget")]
    assert main(args) == 0, capsys.readouterr().err
    fresh = nn.Linear(16, 8)
    load_compressed(fresh, out)
    assert int((fresh.weight == 0).sum()) == 32
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "  (model): sparse" in capsys.readouterr().out
    budget += ["--budget", "params=2x", "--database", str(tmp_path / "db.json")]
    assert main(budget) == 0, capsys.readouterr().err  # builds and saves the database
    assert main(budget) == 0, capsys.readouterr().err  # reuses it
    load_compressed(fresh, tmp_path / "budget")
    assert int((fresh.weight == 0).sum()) >= 64
