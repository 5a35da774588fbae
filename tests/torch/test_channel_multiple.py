"""LayerConfig.channel_multiple: structured pruning that keeps a multiple of N input channels (a
hardware-aware width), never pruning less than the requested fraction."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from obc_native._arrays import count_for_sparsity
from obc_native.layer_config import kept_structured_units, structured_sparsity
from obc_native.layer_solve import solve
from obc_native.torch import LayerConfig, Override, Recipe, RecipeError, compress, shrink_structured

pytestmark = pytest.mark.torch


def assert_same_outputs(masked, shrunk, *inputs):
    with torch.no_grad():
        expected, actual = masked(*inputs), shrunk(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multiple", [1, 2, 3, 4, 8, 16])
def test_kept_count_is_the_largest_multiple_that_prunes_at_least_the_fraction(multiple):
    for units in range(1, 70):
        for sparsity in (0.0, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.99, 1.0):
            asked = count_for_sparsity(units, sparsity)
            kept = kept_structured_units(units, sparsity, multiple)
            assert kept % multiple == 0 and units - kept >= asked
            assert kept + multiple > units - asked  # the largest such multiple: no more pruned than needed
            if kept:  # the solvers' count of the handed-on sparsity is exactly what is removed
                assert count_for_sparsity(units, structured_sparsity(units, sparsity, multiple)) == units - kept
    assert structured_sparsity(10, 0.3) == 0.3  # multiple 1: the sparsity unchanged


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_solve_keeps_a_multiple_of_the_channel_groups(method):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((6, 40)).astype(np.float32)  # 20 channels of 2 columns
    X = rng.standard_normal((200, 40))
    H = X.T @ X / 200
    config = LayerConfig(prune="structured", sparsity=0.25, channel_multiple=8, method=method)
    dead = (solve(config, W, H, structured_group=2).weight == 0).all(axis=0).reshape(20, 2)
    # 25% of 20 prunes 5, keeps 15; rounded down to 8 kept, so 12 channels go (60%)
    assert dead.all(axis=1).sum() == 12 and (dead.all(axis=1) == dead.any(axis=1)).all()


def test_conv_and_flattened_linear_keep_multiples_and_shrink_exactly(cnn, cnn_batches):
    """TinyCNN: conv2 reads conv1's 8 channels, fc reads conv2's 8 channels x 4 x 4. At 25% each
    keeps 6 of 8, rounded to 4 with channel_multiple=4; the shrunk model computes the masked one."""
    recipe = Recipe(default=LayerConfig(prune="structured", sparsity=0.25, channel_multiple=4), skip=["conv1"],
                    overrides=[Override("fc", structured_group=16)])
    report = compress(cnn, cnn_batches, recipe, quiet=True)
    assert report.layer("conv2").mode == "structured 25% x4"
    assert report.layer("fc").config["channel_multiple"] == 4
    masked = copy.deepcopy(cnn)
    shrunk = shrink_structured(cnn)
    assert [(c.producer, c.channels, c.kept) for c in shrunk.chains] == [("conv1", 8, 4), ("conv2", 8, 4)]
    assert_same_outputs(masked, cnn, torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(4)))


def test_without_a_multiple_the_same_recipe_keeps_six(cnn, cnn_batches):
    """The counterpart of the test above: the rounding is what took the kept count from 6 to 4."""
    recipe = Recipe(default=LayerConfig(prune="structured", sparsity=0.25), skip=["conv1"],
                    overrides=[Override("fc", structured_group=16)])
    compress(cnn, cnn_batches, recipe, quiet=True)
    assert [c.kept for c in shrink_structured(cnn).chains] == [6, 6]


def test_linear_chain_rounds_kept_width(mlp, mlp_batches):
    """MLP 16-32-32-8: layers.1 at 30% prunes ceil(9.6) = 10 of 32 (22 kept), rounded to 16 kept."""
    recipe = Recipe(default=None, overrides=[Override("layers.1", prune="structured", sparsity=0.3,
                                                      channel_multiple=8)])
    compress(mlp, mlp_batches, recipe, quiet=True)
    masked = copy.deepcopy(mlp)
    chains = shrink_structured(mlp).chains
    assert [(c.producer, c.consumer, c.kept) for c in chains if c.removed] == [("layers.0", "layers.1", 16)]
    assert mlp.layers[1].in_features == 16
    assert_same_outputs(masked, mlp, torch.randn(7, 16, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("value", [0, -8, 2.5, True, "8", None])
def test_channel_multiple_must_be_a_positive_integer(value):
    with pytest.raises(RecipeError, match=r"channel_multiple must be an integer >= 1, got"):
        LayerConfig(prune="structured", sparsity=0.5, channel_multiple=value).check()


def test_channel_multiple_is_for_structured_pruning_only():
    with pytest.raises(RecipeError, match=r"channel_multiple=8.*prune='structured' only, got prune='unstructured'"):
        LayerConfig(prune="unstructured", sparsity=0.5, channel_multiple=8).check()


def test_multiple_larger_than_the_layer_names_it(cnn, cnn_batches):
    before = copy.deepcopy(cnn.state_dict())
    recipe = Recipe(default=None, overrides=[Override("conv2", prune="structured", sparsity=0.5,
                                                      channel_multiple=16)])
    with pytest.raises(RecipeError, match=r"'conv2'.*channel_multiple=16 is larger than the layer's 8 input channels"):
        compress(cnn, cnn_batches, recipe, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_multiple_that_would_keep_nothing_is_refused(cnn, cnn_batches):
    """fc: 8 channel blocks at 50% keep 4, and no positive multiple of 8 is <= 4."""
    recipe = Recipe(default=None, overrides=[Override("fc", prune="structured", sparsity=0.5, structured_group=16,
                                                      channel_multiple=8)])
    with pytest.raises(RecipeError, match=r"'fc'.*channel_multiple=8 at sparsity 0.5 would keep none of the "
                                          r"layer's 8 groups of 16 input channels"):
        compress(cnn, cnn_batches, recipe, quiet=True)


def test_repr_leaves_out_the_default_multiple():
    # checkpoint fingerprints hash repr(recipe): the default must print as before the field existed
    assert "channel_multiple" not in repr(LayerConfig(prune="structured", sparsity=0.5))
    rounded = LayerConfig(prune="structured", sparsity=0.5, channel_multiple=8)
    assert repr(rounded).endswith(", channel_multiple=8)") and eval(repr(rounded)) == rounded


def test_recipe_file_takes_the_field(tmp_path):
    pytest.importorskip("yaml")
    from obc_native.torch import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("default: {prune: structured, sparsity: 0.25, channel_multiple: 16}\n"
                    "overrides:\n  - {pattern: features.3, channel_multiple: 8}\n")
    recipe = load_recipe(path)
    assert recipe.default.channel_multiple == 16
    path.write_text("default: {prune: structured, sparsity: 0.25, channel_multiple: 0}\n")
    with pytest.raises(RecipeError, match="channel_multiple must be an integer >= 1, got 0"):
        load_recipe(path)
