"""Hessians from hooks equal direct computations from explicitly unfolded inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from obc_torch_helpers import reference_patches, tiny_gpt2
from torch import nn

from obc_native.torch import CalibrationError, LayerHooks, collect_hessians, describe_layer
from obc_native.torch.calibration import run_calibration
from obc_native.torch.layers import channels_last_perm, input_samples, weight_matrix

pytestmark = pytest.mark.torch


def direct_hessian(samples: np.ndarray) -> np.ndarray:
    """2/n X^T X for samples (n, cols), float64."""
    return 2.0 / samples.shape[0] * samples.T @ samples


def hook_hessians(module: nn.Module, batches) -> tuple[list[np.ndarray], int]:
    model = nn.Sequential(module)
    info = describe_layer("0", module)
    with LayerHooks({"0": info}) as hooks:
        run_calibration(model, batches, hooks)
    return hooks.hessians["0"].hessians(), hooks.hessians["0"].n


def test_linear_counts_every_token():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    batches = [torch.randn(3, 5, 6), torch.randn(2, 7, 6)]
    hessians, n = hook_hessians(layer, batches)
    samples = torch.cat([b.reshape(-1, 6) for b in batches]).double().numpy()
    assert n == 3 * 5 + 2 * 7
    assert len(hessians) == 1
    np.testing.assert_allclose(hessians[0], direct_hessian(samples), rtol=1e-12, atol=1e-12)


CONV2D_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 3), padding=(1, 2), dilation=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, stride=2, padding=1),  # depthwise x2
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="same", dilation=2),
    pytest.param(
        dict(in_channels=2, out_channels=2, kernel_size=2, padding="same"),  # asymmetric 'same'
        marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    ),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"),
]


@pytest.mark.parametrize("kwargs", CONV2D_CASES, ids=str)
def test_conv2d_matches_explicit_unfold(kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(**kwargs).double()
    batches = [torch.randn(2, kwargs["in_channels"], 7, 6, dtype=torch.float64) for _ in range(2)]
    hessians, n = hook_hessians(conv, batches)
    patches = np.concatenate([reference_patches(b.numpy(), conv) for b in batches], axis=1)
    assert len(hessians) == conv.groups
    assert n == patches.shape[1]
    for g in range(conv.groups):
        np.testing.assert_allclose(hessians[g], direct_hessian(patches[g]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs", CONV2D_CASES[:5], ids=str)
def test_conv2d_samples_reproduce_output(kwargs):
    """Samples times the unit's weight matrix (transposed) give the conv output channels."""
    torch.manual_seed(2)
    conv = nn.Conv2d(**kwargs).double()
    info = describe_layer("conv", conv)
    x = torch.randn(2, kwargs["in_channels"], 7, 6, dtype=torch.float64)
    samples = input_samples(info, x)
    out = conv(x)
    matrix = weight_matrix(info)
    for g in range(info.groups):
        rows = slice(g * info.rows, (g + 1) * info.rows)
        expected = out[:, rows].permute(0, 2, 3, 1).reshape(-1, info.rows) - conv.bias[rows]
        torch.testing.assert_close(samples[g] @ matrix[rows].T, expected.detach())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3),
        dict(in_channels=3, out_channels=4, kernel_size=5, stride=2, padding=2, dilation=2),
        dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
        dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="replicate"),
    ],
    ids=str,
)
def test_conv1d_matches_explicit_unfold(kwargs):
    torch.manual_seed(3)
    conv = nn.Conv1d(**kwargs).double()
    batches = [torch.randn(3, kwargs["in_channels"], 11, dtype=torch.float64)]
    hessians, n = hook_hessians(conv, batches)
    patches = reference_patches(batches[0].numpy(), conv)
    assert n == patches.shape[1]
    for g in range(conv.groups):
        np.testing.assert_allclose(hessians[g], direct_hessian(patches[g]), rtol=1e-10, atol=1e-10)


def test_unbatched_conv_input():
    conv = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    hessians, n = hook_hessians(conv, [x])
    patches = reference_patches(x[None].numpy(), conv)
    assert n == 9
    np.testing.assert_allclose(hessians[0], direct_hessian(patches[0]), rtol=1e-12)


def test_running_mean_is_float64_even_for_float32_models():
    torch.manual_seed(4)
    layer = nn.Linear(5, 3)
    batches = [torch.randn(10, 5) * 1000 for _ in range(3)]
    hessians, _ = hook_hessians(layer, batches)
    samples = torch.cat(batches).double().numpy()
    assert hessians[0].dtype == np.float64
    np.testing.assert_allclose(hessians[0], direct_hessian(samples), rtol=1e-12)


def test_hf_conv1d_in_tiny_gpt2():
    model = tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: captured[name].append(args[0].detach().clone())
        )
        for name in names
    ]
    generator = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 64, (2, 9), generator=generator)} for _ in range(2)]
    try:
        stats = collect_hessians(model, batches, names)
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        module = model.get_submodule(name)
        info = describe_layer(name, module)
        assert info.kind == "hf_conv1d"
        assert (info.out_features, info.cols) == (module.weight.shape[1], module.weight.shape[0])
        samples = torch.cat([x.reshape(-1, info.cols) for x in captured[name]]).double().numpy()
        assert stats[name].n == 2 * 2 * 9
        np.testing.assert_allclose(stats[name].hessians()[0], direct_hessian(samples), rtol=1e-10, atol=1e-12)
        # the weight matrix is out x in: y = x W^T + b
        x = captured[name][0]
        torch.testing.assert_close(module(x), x @ weight_matrix(info).T + module.bias)


def test_channels_last_permutation():
    conv = nn.Conv2d(3, 2, (2, 2))
    info = describe_layer("c", conv)
    perm = channels_last_perm(info)
    # position k*C + c holds native column c*K + k
    for k in range(4):
        for c in range(3):
            assert perm[k * 3 + c] == c * 4 + k
    assert channels_last_perm(describe_layer("l", nn.Linear(4, 4))) is None


def test_hooks_removed_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    info = describe_layer("1", model[1])
    with pytest.raises(CalibrationError, match="batch 0"):
        with LayerHooks({"1": info}) as hooks:
            run_calibration(model, [torch.randn(3, 5)], hooks)
    assert not model[1]._forward_pre_hooks
    with pytest.raises(CalibrationError, match=r"layer '1'.*NaN"):
        with LayerHooks({"1": info}) as hooks:
            run_calibration(model, [torch.full((3, 4), float("nan"))], hooks)
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks


class _SwallowingModel(nn.Module):
    """A forward that wraps every layer in ``try: ... except Exception:`` and runs on (as some
    model code does to skip optional branches); counts the layers it actually ran."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.ran = []

    def forward(self, x):
        for name in ("first", "second"):
            try:
                x = getattr(self, name)(x)
                self.ran.append(name)
            except Exception:  # noqa: BLE001 - the pattern under test
                self.ran.append(f"{name} failed")
        return x


def test_stop_forward_is_not_swallowed_by_the_models_except_exception():
    torch.manual_seed(5)
    model = _SwallowingModel()
    batches = [torch.randn(3, 4), torch.randn(2, 4)]
    infos = {"first": describe_layer("first", model.first)}
    with LayerHooks(infos, stop_after={"first": 1}) as hooks:
        count = run_calibration(model, batches, hooks)
    assert count == 2
    # every pass stopped inside `first`'s hook: neither the model's except branch nor `second` ran
    assert model.ran == []
    samples = torch.cat(batches).double().numpy()
    assert hooks.hessians["first"].n == 5
    np.testing.assert_allclose(hooks.hessians["first"].hessians()[0], direct_hessian(samples),
                               rtol=1e-12, atol=1e-12)
