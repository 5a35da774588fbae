"""fold_batchnorm: conv -> BatchNorm pairs folded into the conv (shrink_structured(fold_batchnorm=True))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from obc_native.torch import LayerConfig, Override, Recipe, ShrinkError, compress, fold_batchnorm, shrink_structured

pytestmark = pytest.mark.torch


def randomize_norms(model):
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                module.weight.data = torch.randn(module.weight.shape, generator=generator)
                module.bias.data = torch.randn(module.bias.shape, generator=generator)
            if module.track_running_stats:
                module.running_mean.data = torch.randn(module.running_mean.shape, generator=generator)
                module.running_var.data = torch.rand(module.running_var.shape, generator=generator) + 0.5
    return model.eval()


def assert_same_outputs(expected_model, model, x):
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_model(x), rtol=1e-5, atol=1e-5)


class Pairs(nn.Module):
    """Foldable: a biased conv + affine BN, a bias-free conv1d + non-affine BN, a grouped conv3d.
    Not foldable: ReLU between conv and BN; a conv output read twice; BN without running stats."""

    def __init__(self):
        super().__init__()
        self.biased, self.bn_biased = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu_first, self.bn_after_relu = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.shared, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.batch_stats, self.bn_batch_stats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.line, self.bn_line = nn.Conv1d(4, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6, affine=False)
        self.cube, self.bn_cube = nn.Conv3d(6, 6, 1, groups=3), nn.BatchNorm3d(6)

    def forward(self, x):
        x = self.bn_biased(self.biased(x))
        x = self.bn_after_relu(torch.relu(self.relu_first(x)))
        y = self.shared(x)
        x = self.bn_shared(y) + y
        x = self.bn_batch_stats(self.batch_stats(x))
        x = self.bn_line(self.line(x.flatten(2)))
        return self.bn_cube(self.cube(x.unsqueeze(-1).unsqueeze(-1)))


def test_folds_exactly_the_direct_pairs():
    torch.manual_seed(0)
    model = randomize_norms(Pairs())
    expected = copy.deepcopy(model)
    folded = fold_batchnorm(model)
    assert folded == [("biased", "bn_biased"), ("line", "bn_line"), ("cube", "bn_cube")]
    assert isinstance(model.bn_biased, nn.Identity) and isinstance(model.bn_line, nn.Identity)
    assert model.line.bias is not None and model.line.bias.shape == (6,)  # a bias-free conv gains one
    assert isinstance(model.bn_after_relu, nn.BatchNorm2d) and isinstance(model.bn_shared, nn.BatchNorm2d)
    assert_same_outputs(expected, model, torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)))


def test_shrink_then_fold_equals_the_masked_model(cnn, cnn_batches):
    recipe = Recipe(default=LayerConfig(prune="structured", sparsity=0.5), skip=["conv1"],
                    overrides=[Override("fc", structured_group=16)])
    compress(cnn, cnn_batches, recipe, quiet=True)
    randomize_norms(cnn)  # after compress: statistics far from (0, 1) make a wrong fold visible
    masked = copy.deepcopy(cnn)
    report = shrink_structured(cnn, fold_batchnorm=True)
    assert [c.kept for c in report.chains] == [4, 4]
    assert report.folded == [("conv1", "bn1"), ("conv2", "bn2")] and "folded bn2 into conv2" in report.table()
    assert report.to_dict()["folded"] == [["conv1", "bn1"], ["conv2", "bn2"]]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())
    # BatchNorm's 4 parameters per channel go, each conv gains a bias per channel
    assert report.parameters_after == shrink_structured(masked).parameters_after - 2 * 4 - 2 * 4 + 2 * 4
    assert_same_outputs(masked, cnn, torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)))


def test_without_the_option_nothing_is_folded(cnn):
    report = shrink_structured(cnn)
    assert report.folded == [] and isinstance(cnn.bn1, nn.BatchNorm2d)


def test_untraceable_model_with_fold_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="fold_batchnorm: torch.fx cannot trace Dynamic"):
        fold_batchnorm(Dynamic().eval())
    with pytest.raises(ShrinkError, match="cannot trace Dynamic.*fold_batchnorm=False"):
        shrink_structured(Dynamic().eval(), [("conv", "conv")] * 0, fold_batchnorm=True)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_fold_option_must_be_a_bool(cnn, value):
    with pytest.raises(TypeError, match="fold_batchnorm: expected a bool"):
        shrink_structured(cnn, fold_batchnorm=value)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fold_batchnorm("model")


def test_batchnorm_in_training_mode_is_refused_before_any_change(cnn, cnn_batches):
    """Folding running statistics changes what a training-mode BatchNorm computes (it normalizes
    with each batch's statistics): it used to be folded anyway."""
    model = randomize_norms(Pairs()).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"BatchNorm 'bn_biased', 'bn_line', 'bn_cube' in training mode.*"
                                         r"call model.eval\(\) first"):
        fold_batchnorm(model)
    assert isinstance(model.bn_biased, nn.BatchNorm2d)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # only the BatchNorm layers that would be folded count: one after a ReLU may train
    model.eval()
    model.bn_after_relu.train()
    assert fold_batchnorm(model) == [("biased", "bn_biased"), ("line", "bn_line"), ("cube", "bn_cube")]
    # shrink_structured(fold_batchnorm=True) refuses before it cuts a channel
    recipe = Recipe(default=LayerConfig(prune="structured", sparsity=0.5), skip=["conv1"],
                    overrides=[Override("fc", structured_group=16)])
    compress(cnn, cnn_batches, recipe, quiet=True)
    cnn.bn2.train()
    widths = cnn.conv2.weight.shape
    with pytest.raises(ShrinkError, match=r"fold_batchnorm=True: BatchNorm 'bn2' in training mode.*nothing was changed"):
        shrink_structured(cnn, fold_batchnorm=True)
    assert cnn.conv2.weight.shape == widths
    cnn.eval()
    assert shrink_structured(cnn, fold_batchnorm=True).folded == [("conv1", "bn1"), ("conv2", "bn2")]
