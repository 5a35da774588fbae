"""Bit-exact save / load round trips at realistic layer sizes, for every storage kind.

Small layers hide layout bugs: numpy switches the memory order of some intermediate arrays only
from about 64k elements on (a pruned + quantized 256 x 256 layer once came back with every
pruned weight non-zero). The layers here are >= 384 x 1536 entries or the conv equivalent.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from obc_native.torch import LayerConfig, compress, load_compressed, save_compressed

pytestmark = pytest.mark.torch

ROWS, COLS = 384, 1536


def _linear():
    return nn.Sequential(nn.Linear(COLS, ROWS))


def _conv():
    return nn.Sequential(nn.Conv2d(128, 384, 3, padding=1))  # 384 x 1152 weight matrix


def _conv_grouped():
    return nn.Sequential(nn.Conv2d(256, 384, 3, padding=1, groups=2))


def _hf_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return nn.Sequential(pytorch_utils.Conv1D(ROWS, COLS))  # weight (COLS, ROWS), transposed


MODELS = {
    "linear": (_linear, lambda g: torch.randn(8, COLS, generator=g)),
    "conv2d": (_conv, lambda g: torch.randn(2, 128, 6, 6, generator=g)),
    "conv2d_groups": (_conv_grouped, lambda g: torch.randn(2, 256, 6, 6, generator=g)),
    "hf_conv1d": (_hf_conv1d, lambda g: torch.randn(8, COLS, generator=g)),
}

# (recipe, storage the saver must choose); baselines (magnitude / round to nearest) keep it fast.
CASES = {
    "sparse": (LayerConfig(prune="unstructured", sparsity=0.5, method="magnitude"), "sparse"),
    "nm": (LayerConfig(prune="nm", n=2, m=4, method="magnitude"), "sparse"),
}
for sym in (True, False):
    for group in (None, 64):
        tag = f"{'sym' if sym else 'asym'}-{'row' if group is None else f'g{group}'}"
        CASES[f"int4-{tag}"] = (LayerConfig(bits=4, sym=sym, group_size=group, method="rtn"), "quantized")
        CASES[f"2:4+int4-{tag}"] = (
            LayerConfig(prune="nm", n=2, m=4, bits=4, sym=sym, group_size=group, method="rtn"),
            "sparse_quantized",
        )
        CASES[f"50%+int3-{tag}"] = (
            LayerConfig(prune="unstructured", sparsity=0.5, bits=3, sym=sym, group_size=group, method="rtn"),
            "sparse_quantized",
        )


def _build(model_name: str, seed: int = 0):
    factory, batch = MODELS[model_name]
    torch.manual_seed(seed)
    model = factory()
    generator = torch.Generator().manual_seed(seed + 1)
    return model, [batch(generator) for _ in range(2)]


def _assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        bytes_a, bytes_b = (t.contiguous().reshape(-1).numpy().view(np.uint8) for t in (sa[key], sb[key]))
        assert np.array_equal(bytes_a, bytes_b), key


def _roundtrip(model: nn.Module, report, tmp_path, model_name: str) -> nn.Module:
    save_compressed(model, tmp_path, report)
    fresh, _ = _build(model_name, seed=99)  # different initial weights: everything must be loaded
    load_compressed(fresh, tmp_path)
    _assert_bit_identical(model, fresh)
    return fresh


# Every storage kind, sym / asym and per-row / grouped on each layer type runs by default on
# one representative each; the full cross product is the slow sweep.
_QUICK = {
    ("linear", "sparse"), ("linear", "int4-sym-row"), ("linear", "int4-asym-g64"),
    ("linear", "2:4+int4-sym-row"), ("linear", "2:4+int4-asym-g64"), ("linear", "50%+int3-asym-row"),
    ("conv2d", "2:4+int4-asym-g64"), ("conv2d", "int4-sym-g64"), ("conv2d_groups", "50%+int3-sym-g64"),
    ("hf_conv1d", "2:4+int4-sym-g64"), ("hf_conv1d", "int4-asym-row"), ("hf_conv1d", "nm"),
}
_PAIRS = [
    pytest.param(model_name, case, marks=() if (model_name, case) in _QUICK else pytest.mark.slow)
    for case in CASES
    for model_name in MODELS
]


@pytest.mark.parametrize(("model_name", "case"), _PAIRS)
def test_roundtrip_every_storage_kind(model_name, case, tmp_path):
    config, storage = CASES[case]
    model, batches = _build(model_name)
    report = compress(model, batches, config, baseline=False, correction=None, quiet=True)
    weight = model[0].weight.detach()
    zeros_before = int((weight == 0).sum())
    manifest = save_compressed(model, tmp_path, report)
    (entry,) = manifest["layers"].values()
    assert entry["storage"] == storage
    fresh = _roundtrip(model, report, tmp_path, model_name)
    assert int((fresh[0].weight == 0).sum()) == zeros_before
    if config.prune is not None:
        assert zeros_before >= weight.numel() // 2


def test_reported_example_256x256_2of4_int4(tmp_path):
    """The reported case: every pruned weight came back non-zero after the round trip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    batches = [torch.randn(16, 256, generator=torch.Generator().manual_seed(1))]
    report = compress(model, batches, LayerConfig(prune="nm", n=2, m=4, bits=4), baseline=False, quiet=True)
    nonzeros = int((model[0].weight != 0).sum())
    assert nonzeros <= 256 * 256 // 2
    save_compressed(model, tmp_path, report)
    fresh = nn.Sequential(nn.Linear(256, 256))
    load_compressed(fresh, tmp_path)
    assert int((fresh[0].weight != 0).sum()) == nonzeros
    _assert_bit_identical(model, fresh)


@pytest.mark.parametrize("model_name", ["linear", "conv2d", "hf_conv1d"])
def test_roundtrip_dense_fallback(model_name, tmp_path, caplog):
    """Weights moved off their grid after compression: stored densely, still bit exact."""
    model, batches = _build(model_name)
    report = compress(model, batches, LayerConfig(bits=4, method="rtn"), baseline=False, correction=None, quiet=True)
    with torch.no_grad():
        model[0].weight.add_(1e-3)
    with caplog.at_level(logging.WARNING, logger="obc_native.torch"):
        manifest = save_compressed(model, tmp_path, report)
    (entry,) = manifest["layers"].values()
    assert entry["storage"] == "dense"
    _roundtrip(model, report, tmp_path, model_name)
