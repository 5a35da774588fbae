"""Structured pruning in channel groups (LayerConfig.structured_group) and shrink_structured's
conv -> [BN / element-wise / pooling] -> flatten -> Linear chains (a CNN's classifier)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from obc_native.torch import LayerConfig, Override, Recipe, RecipeError, ShrinkError, compress, shrink_structured

pytestmark = pytest.mark.torch

STRUCTURED = LayerConfig(prune="structured", sparsity=0.5)


def assert_same_outputs(masked, shrunk, *inputs):
    with torch.no_grad():
        expected, actual = masked(*inputs), shrunk(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def zero_blocks(linear: nn.Linear, channels: list[int], spatial: int) -> None:
    """Zero the Linear's input columns of the given conv channels (blocks of ``spatial`` columns)."""
    with torch.no_grad():
        for c in channels:
            linear.weight[:, c * spatial:(c + 1) * spatial] = 0


def randomize_norms(model):
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data = torch.randn(tensor.shape, generator=generator)
            module.running_var.data = torch.rand(module.running_var.shape, generator=generator) + 0.5
    return model.eval()


# --- LayerConfig.structured_group through compress -------------------------------------------------------------


def test_linear_structured_group_prunes_whole_blocks(cnn, cnn_batches):
    """fc reads conv2's 8 channels x 4 x 4 flattened: groups of 16 columns go together."""
    recipe = Recipe(default=None, overrides=[Override("fc", prune="structured", sparsity=0.5, structured_group=16)])
    report = compress(cnn, cnn_batches, recipe, quiet=True)
    zero = (cnn.fc.weight == 0).all(dim=0).view(8, 16)
    assert zero.all(dim=1).sum() == 4  # ceil(0.5 * 8) whole channel blocks
    assert not (zero & ~zero.all(dim=1, keepdim=True)).any()  # and no stray column
    assert report.layer("fc").config["structured_group"] == 16
    assert report.layer("fc").mode == "structured 50% by 16"


def test_linear_structured_group_magnitude_baseline(cnn, cnn_batches):
    recipe = Recipe(default=None, overrides=[
        Override("fc", prune="structured", sparsity=0.25, structured_group=16, method="magnitude")])
    compress(cnn, cnn_batches, recipe, quiet=True)
    zero = (cnn.fc.weight == 0).all(dim=0).view(8, 16)
    assert zero.all(dim=1).sum() == 2 and zero.sum() == 32


def test_conv_structured_group_counts_whole_channels(cnn, cnn_batches):
    """For a conv, structured_group=2 removes pairs of consecutive input channels (2 * kh*kw columns)."""
    recipe = Recipe(default=None, overrides=[Override("conv2", prune="structured", sparsity=0.5, structured_group=2)])
    compress(cnn, cnn_batches, recipe, quiet=True)
    zero = (cnn.conv2.weight == 0).flatten(2).all(dim=2).all(dim=0).view(4, 2)
    assert zero.all(dim=1).sum() == 2 and (zero.all(dim=1) == zero.any(dim=1)).all()


def test_structured_group_that_does_not_divide_names_the_layer(cnn, cnn_batches):
    before = copy.deepcopy(cnn.state_dict())
    recipe = Recipe(default=None, overrides=[Override("fc", prune="structured", sparsity=0.5, structured_group=48)])
    with pytest.raises(RecipeError, match=r"fc.*structured_group=48.*\(128\)"):
        compress(cnn, cnn_batches, recipe, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "16"])
def test_structured_group_must_be_a_positive_integer(value):
    with pytest.raises(RecipeError, match="structured_group"):
        LayerConfig(prune="structured", sparsity=0.5, structured_group=value).check()


# --- conv -> ... -> flatten -> Linear ----------------------------------------------------------------------------


def test_cnn_classifier_chain_after_compress(cnn, cnn_batches):
    recipe = Recipe(default=STRUCTURED, skip=["conv1"], overrides=[Override("fc", structured_group=16)])
    compress(cnn, cnn_batches, recipe, quiet=True)
    masked = copy.deepcopy(cnn)
    report = shrink_structured(cnn)
    assert [(c.producer, c.consumer, c.between, c.channels, c.kept, c.columns_per_channel)
            for c in report.chains] == [("conv1", "conv2", ["bn1"], 8, 4, 1), ("conv2", "fc", ["bn2"], 8, 4, 16)]
    assert not report.skipped
    assert cnn.conv2.weight.shape == (4, 4, 3, 3) and cnn.bn2.running_var.shape == (4,)
    assert cnn.fc.weight.shape == (10, 64) and cnn.fc.in_features == 64
    assert report.to_dict()["chains"][1]["columns_per_channel"] == 16
    assert_same_outputs(masked, cnn, torch.randn(5, 1, 8, 8))


class Head(nn.Module):
    """conv -> BN -> ReLU -> [pool] -> flatten (one of several spellings) -> [Dropout] -> Linear."""

    def __init__(self, flatten: str, pool: str | None, conv_groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=conv_groups)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2) if pool == "module" else None
        self.use_function_pool = pool == "function"
        self.flatten_kind = flatten
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.1)
        spatial = 1 if pool == "function" else 4 if pool == "module" else 16
        self.fc = nn.Linear(6 * spatial, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.pool is not None:
            x = self.pool(x)
        if self.use_function_pool:
            x = F.adaptive_avg_pool2d(x, 1)
        if self.flatten_kind == "module":
            x = self.flat(x)
        elif self.flatten_kind == "function":
            x = torch.flatten(x, 1)
        elif self.flatten_kind == "method":
            x = x.flatten(start_dim=1)
        elif self.flatten_kind == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten_kind == "view_width":
            x = x.view(-1, self.fc.in_features)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.fc(self.drop(x))


@pytest.mark.parametrize("flatten", ["module", "function", "method", "view", "view_width", "reshape"])
@pytest.mark.parametrize("pool", [None, "module", "function"])
def test_flatten_spellings_and_pooling(flatten, pool):
    torch.manual_seed(0)
    model = randomize_norms(Head(flatten, pool))
    spatial = model.fc.in_features // 6
    zero_blocks(model.fc, [1, 4], spatial)
    masked = copy.deepcopy(model)
    report = shrink_structured(model)
    assert [(c.producer, c.consumer, c.between, c.kept, c.columns_per_channel) for c in report.chains] == [
        ("conv", "fc", ["bn"], 4, spatial)]
    assert model.conv.out_channels == 4 and model.conv.bias.shape == (4,) and model.fc.in_features == 4 * spatial
    # the kept blocks are channels 0, 2, 3, 5 in order
    kept_columns = torch.cat([torch.arange(c * spatial, (c + 1) * spatial) for c in (0, 2, 3, 5)])
    assert torch.equal(model.fc.weight, masked.fc.weight[:, kept_columns])
    assert_same_outputs(masked, model, torch.randn(3, 4, 4, 4))


def test_grouped_producer_removes_the_same_count_per_group():
    torch.manual_seed(0)
    model = randomize_norms(Head("module", None, conv_groups=2))  # channels 0-2 and 3-5 are two groups
    zero_blocks(model.fc, [0, 1, 3], 16)  # group 0 loses two, group 1 one: one each is removed
    masked = copy.deepcopy(model)
    report = shrink_structured(model)
    assert report.chains[0].kept == 4 and model.conv.weight.shape == (4, 2, 3, 3)
    assert (model.fc.weight == 0).all(dim=0).sum() == 16  # channel 1's block stays (zero) in the model
    assert_same_outputs(masked, model, torch.randn(3, 4, 4, 4))


def test_explicit_flatten_chain_matches_the_traced_one():
    torch.manual_seed(0)
    traced = randomize_norms(Head("view", "module"))
    zero_blocks(traced.fc, [2], 4)
    given = copy.deepcopy(traced)
    shrink_structured(traced)
    report = shrink_structured(given, [("conv", "bn", "fc")])
    assert report.chains[0].columns_per_channel == 4 and report.chains[0].kept == 5
    for key, value in traced.state_dict().items():
        assert torch.equal(value, given.state_dict()[key]), key


def test_misaligned_zero_columns_traced_are_skipped_with_the_fix(caplog):
    """The Linear was pruned column by column (structured_group=1): the chain is left as it is."""
    torch.manual_seed(0)
    model = randomize_norms(Head("function", None))
    zero_blocks(model.fc, [1], 16)
    with torch.no_grad():
        model.fc.weight[:, 40] = 0  # a stray zero column in channel 2's block
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="obc_native.torch"):
        report = shrink_structured(model)
    assert not report.chains
    assert "'fc'" in report.skipped["fc"] and "structured_group=16" in report.skipped["fc"]
    assert "structured_group=16" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_misaligned_zero_columns_in_a_given_chain_raise():
    torch.manual_seed(0)
    model = randomize_norms(Head("function", None))
    with torch.no_grad():
        model.fc.weight[:, 3] = 0
    with pytest.raises(ShrinkError, match=r"Linear 'fc'.*\[3\].*16 columns.*conv 'conv'.*structured_group=16"):
        shrink_structured(model, [("conv", "bn", "fc")])
    assert model.conv.out_channels == 6 and model.fc.in_features == 96


def test_spatial_size_that_cannot_be_inferred_names_both_layers():
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ShrinkError, match=r"spatial size.*conv '0'.*Linear '2'.*12 input features.*5 output"):
        shrink_structured(model, [("0", "2")])


def test_given_flatten_chain_with_a_wrong_norm():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ShrinkError, match=r"chains\[0\]: '1'.*BatchNorm with 4 features"):
        shrink_structured(model, [("0", "1", "3")])


class NotAChannelFlatten(nn.Module):
    """flatten(2) keeps the channels in dimension 1: the Linear mixes positions, not channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(2))


def test_other_reshapes_are_not_chains():
    model = NotAChannelFlatten()
    with torch.no_grad():
        model.fc.weight[:, 0] = 0
    report = shrink_structured(model)
    assert not report.chains and "fc" in report.skipped and model.conv.out_channels == 4


class SharedFeatures(nn.Module):
    """The flattened features are also read by a second head: nothing can be cut."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        flat = x.flatten(1)
        return self.fc(flat), self.aux(x.view(x.size(0), -1))


def test_features_read_twice_are_skipped():
    model = SharedFeatures()
    zero_blocks(model.fc, [0], 4)
    report = shrink_structured(model)
    assert not report.chains and "users" in report.skipped["fc"]
