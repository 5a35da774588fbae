"""Static per-tensor activation quantization wrappers."""

from __future__ import annotations

import copy

import pytest
import torch

from obc_native.torch import ActQuantWrapper, quantize_activations, remove_activation_quantization
from obc_native.torch.actquant import fake_quantize

pytestmark = pytest.mark.torch


def captured_inputs(wrapper, batches, model):
    seen = []
    handle = wrapper.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
    return torch.cat([s.reshape(-1) for s in seen])


@pytest.mark.parametrize("sym", [False, True])
def test_minmax_grid_covers_range_with_few_levels(mlp, mlp_batches, sym):
    wrappers = quantize_activations(mlp, mlp_batches, bits=4, sym=sym)
    assert set(wrappers) == {"layers.0", "layers.1", "layers.2"}
    assert isinstance(mlp.layers[0], ActQuantWrapper)
    values = captured_inputs(wrappers["layers.1"], mlp_batches, mlp)
    assert len(torch.unique(values)) <= 16
    raw = torch.cat(mlp_batches).reshape(-1)
    quantized = captured_inputs(wrappers["layers.0"], mlp_batches, mlp)
    scale = float(wrappers["layers.0"].scale)
    # min-max: nothing is clipped, so the error is at most half a step
    assert float((quantized - raw).abs().max()) <= scale / 2 + 1e-6


def test_mse_no_worse_than_minmax(mlp, mlp_batches):
    raw = torch.cat(mlp_batches)
    errors = {}
    for method in ("minmax", "mse"):
        model = copy.deepcopy(mlp)
        wrapper = quantize_activations(model, mlp_batches, bits=3, method=method, include=["layers.0"])["layers.0"]
        errors[method] = float(torch.mean((fake_quantize(raw, wrapper.scale, wrapper.zero, 3) - raw) ** 2))
    assert errors["mse"] <= errors["minmax"]


def test_include_exclude_and_remove(mlp, mlp_batches):
    dense = copy.deepcopy(mlp)
    wrappers = quantize_activations(mlp, mlp_batches, bits=8, include=["layers.*"], exclude=["layers.2"])
    assert set(wrappers) == {"layers.0", "layers.1"}
    x = mlp_batches[0]
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), dense(x), atol=0.05, rtol=0.05)  # 8 bits: close
    assert remove_activation_quantization(mlp) == 2
    with torch.no_grad():
        assert torch.equal(mlp(x), dense(x))
    with pytest.raises(ValueError, match="no supported layer"):
        quantize_activations(mlp, mlp_batches, include=["nothing"])
    with pytest.raises(ValueError, match="method"):
        quantize_activations(mlp, mlp_batches, method="percentile")
