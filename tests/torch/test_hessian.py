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


# ---- the CPU path: the core's symmetric Gram update (_core.accumulate_gram) ----


def _longdouble_gram(samples: np.ndarray) -> np.ndarray:
    """sum x x^T in extended precision: a reference independent of any GEMM's blocking."""
    x = samples.astype(np.longdouble)
    return (x.T @ x).astype(np.float64)


def test_cpu_hessian_is_the_cores_gram_update():
    """The hooks' batch sum on the CPU is exactly _core.accumulate_gram of the samples (not
    torch's baddbmm), within 1e-12 of an extended-precision reference, exactly symmetric."""
    from obc_native import _core

    torch.manual_seed(1)
    layer = nn.Linear(300, 8)  # two 256-column tiles
    batch = torch.randn(5, 500, 300) + 0.3  # 2500 rows: two 2048-row chunks
    model = nn.Sequential(layer)
    with LayerHooks({"0": describe_layer("0", layer)}) as hooks:
        run_calibration(model, [batch], hooks)
    stats = hooks.hessians["0"]
    stats.end_batch()  # the batch's sum onto the (empty) total
    total = stats.total.numpy()[0]
    expected = np.zeros((300, 300))
    _core.accumulate_gram(expected, batch.reshape(-1, 300).numpy(), 1)
    assert np.array_equal(total, expected)
    assert np.array_equal(total, total.T)
    reference = _longdouble_gram(batch.reshape(-1, 300).double().numpy())
    assert np.abs(total - reference).max() <= 1e-12 * np.abs(reference).max()


def test_cpu_hessian_same_bits_for_every_thread_count():
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    batches = [torch.randn(4, 3, 20, 20), torch.randn(3, 3, 20, 20)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            hessians, _ = hook_hessians(layer, batches)
            results.append(hessians[0])
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_cpu_hessian_float32_float64_and_bfloat16_inputs_agree():
    """The core widens float32 rows itself: float32 inputs give the bits of their float64 copy;
    bfloat16 inputs (exact in float32) the bits of their float32 copy."""
    torch.manual_seed(3)
    batch = torch.randn(2, 40, 24)
    h32, _ = hook_hessians(nn.Linear(24, 3), [batch])
    h64, _ = hook_hessians(nn.Linear(24, 3).double(), [batch.double()])
    assert np.array_equal(h32[0], h64[0])
    low = batch.bfloat16()
    hb, _ = hook_hessians(nn.Linear(24, 3).bfloat16(), [low])
    hf, _ = hook_hessians(nn.Linear(24, 3), [low.float()])
    assert np.array_equal(hb[0], hf[0])


def test_accumulate_gram_binding_checks_its_arguments():
    from obc_native import _core

    x = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="total: expected a float64"):
        _core.accumulate_gram(np.zeros((3, 3), dtype=np.float32), x)
    with pytest.raises(TypeError, match="X: expected a float32 or float64"):
        _core.accumulate_gram(np.zeros((3, 3)), x.astype(np.int32))
    with pytest.raises(ValueError, match="total: expected a square"):
        _core.accumulate_gram(np.zeros((3, 4)), x)
    with pytest.raises(ValueError, match="total: expected a writable C-contiguous"):
        _core.accumulate_gram(np.zeros((6, 6))[::2, ::2], x)
    with pytest.raises(ValueError, match="X: expected 3 columns"):
        _core.accumulate_gram(np.zeros((3, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="X: expected rows of contiguous values"):
        _core.accumulate_gram(np.zeros((2, 2)), np.ones((4, 4))[:, ::2])
    skew = np.zeros((3, 3))
    skew[0, 2] = 1.0
    with pytest.raises(ValueError, match="exactly symmetric"):
        _core.accumulate_gram(skew, x)
    with pytest.raises(ValueError, match="finite"):
        _core.accumulate_gram(np.zeros((3, 3)), np.full((4, 3), np.nan))
    total = np.zeros((3, 3))
    _core.accumulate_gram(total, x[::2])  # strided rows are read in place
    assert np.array_equal(total, np.full((3, 3), 2.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_hessian_rejects_non_finite_sample_naming_the_layer(bad):
    layer = nn.Linear(5, 2)
    batch = torch.randn(30, 5)
    batch[29, 4] = bad  # the last value of the last row
    with LayerHooks({"proj": describe_layer("proj", layer)}) as hooks:
        with pytest.raises(CalibrationError, match="layer 'proj'.*NaN or Inf"):
            run_calibration(nn.ModuleDict({"proj": layer}), [batch], hooks, forward=lambda m, b: m["proj"](b))


def test_finite_check_of_large_but_finite_inputs():
    """Values whose float32 sum overflows are still finite: the fast check falls back to the
    exact one, and calibration goes on."""
    from obc_native.torch.hessian import _all_finite

    big = torch.full((4, 3), 3e38)
    assert not bool(torch.isfinite(big.sum()))
    assert _all_finite(big)
    assert not _all_finite(torch.tensor([1.0, float("nan")]))
    assert not _all_finite(torch.tensor([float("inf"), -float("inf")]))


def test_cpu_hessians_skip_symmetrizing_an_exactly_symmetric_sum():
    """The core's sums are exactly symmetric: hessians() equals 2/n S bit for bit (what the
    symmetrization would give too), and partials merged from elsewhere are symmetrized."""
    torch.manual_seed(4)
    layer = nn.Linear(40, 3)
    with LayerHooks({"0": describe_layer("0", layer)}) as hooks:
        run_calibration(nn.Sequential(layer), [torch.randn(50, 40), torch.randn(20, 40)], hooks)
    stats = hooks.hessians["0"]
    (h,) = stats.hessians()
    assert np.array_equal(h, (stats.total[0] * (2.0 / stats.n)).numpy())
    assert np.array_equal(h, h.T)
    skew = np.zeros((1, 40, 40))
    skew[0, 0, 1] = 1.0
    stats.merge_partials([(skew, np.zeros((1, 40)), 1)])
    (merged,) = stats.hessians()
    assert np.array_equal(merged, merged.T)
