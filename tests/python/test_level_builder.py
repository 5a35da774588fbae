"""Tests for obc_native.level_builder: a layer's levels equal separate solves, and apply_level
reproduces them (obc_native.levels)."""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_problem

import obc_native
from obc_native.level_builder import build_layer_levels


def test_trace_levels_equal_separate_solves():
    W, H, _ = make_problem(6, 16, seed=7, zeros=0.1)
    sparsities = (0.25, 0.5, 0.8)
    for spread in ("uniform", "global"):
        layer = build_layer_levels(W, H, sparsities=sparsities, nm=(), spread=spread,
                                     keep_weights=True)
        for s in sparsities:
            level = layer.level(f"sparse:{s!r}")
            ref = obc_native.prune_unstructured(W, H, s, spread=spread)
            assert level.loss == pytest.approx(ref.loss, rel=1e-9)
            np.testing.assert_allclose(level.weight, ref.weight, rtol=1e-9, atol=1e-12)
            assert level.costs["params"] == np.count_nonzero(ref.weight)
            assert level.params == {"sparsity": s, "spread": spread}
        blocked = build_layer_levels(W, H, sparsities=sparsities, block=4, nm=(), spread=spread)
        for s in sparsities:
            ref = obc_native.prune_blocked(W, H, s, 4, spread=spread)
            assert blocked.level(f"block4:{s!r}").loss == pytest.approx(ref.loss, rel=1e-9)


def test_other_levels_equal_separate_solves():
    W, H, _ = make_problem(5, 16, seed=8)
    layer = build_layer_levels(W, H, sparsities=(), nm=[(2, 4), (1, 2)], bits=[3, 8],
                                 joint=[(2, 4, 4)], sym=False, group_size=8)
    assert layer.labels == ["dense", "nm2:4", "nm1:2", "q3a:g8", "q8a:g8", "nm2:4+q4a:g8"]
    assert layer.level("dense").loss == 0.0
    assert layer.level("nm2:4").loss == pytest.approx(obc_native.prune_nm(W, H, 2, 4).loss, rel=1e-12)
    q = obc_native.quantize(W, H, 3, sym=False, group_size=8)
    assert layer.level("q3a:g8").loss == pytest.approx(q.loss, rel=1e-12)
    pruned = obc_native.prune_nm(W, H, 2, 4).weight
    joint = obc_native.quantize(pruned, H, 4, sym=False, group_size=8).weight
    expected = obc_native.layer_loss(W, joint, H).sum()
    assert layer.level("nm2:4+q4a:g8").loss == pytest.approx(expected, rel=1e-12)
    assert layer.reference_loss == pytest.approx(obc_native.layer_loss(W, 0 * W, H).sum())
    # apply() reproduces every level
    for level in layer.levels:
        assert layer.apply(W, H, level).loss == pytest.approx(level.loss, rel=1e-9, abs=1e-300)


def test_apply_level_reproduces_trace_levels():
    W, H, _ = make_problem(4, 8, seed=9)
    layer = build_layer_levels(W, H, sparsities=(0.5,), block=2, nm=(), spread="global")
    for level in layer.levels:
        result = layer.apply(W, H, level.label)
        assert result.loss == pytest.approx(level.loss, rel=1e-9, abs=1e-300)


def test_incompatible_levels_are_skipped():
    W, H, _ = make_problem(3, 6, seed=11)
    layer = build_layer_levels(W, H, sparsities=(0.5,), block=4, nm=[(2, 4)], bits=[4],
                                 group_size=4, joint=[(1, 3, 4)])
    assert layer.labels == ["dense"]
    assert [label for label, _ in layer.skipped] == ["block4:0.5", "nm2:4", "q4:g4", "nm1:3+q4:g4"]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(spread="rows"), ValueError, "spread"),
    (dict(sparsities=(0.5, 0.5)), ValueError, "distinct"),
    (dict(sparsities=(1.5,)), ValueError, "sparsities"),
    (dict(nm=[(4, 2)]), ValueError, "0 < n < m"),
    (dict(nm=[(2,)]), ValueError, "tuples of 2"),
    (dict(bits=[9]), ValueError, "bits"),
    (dict(flops_per_weight=-1.0), ValueError, "flops_per_weight"),
    (dict(act_bits="half"), TypeError, "act_bits"),
    (dict(name=3), TypeError, "name"),
])
def test_build_layer_levels_bad_input(kwargs, exc, match):
    W, H, _ = make_problem(2, 8, seed=12)
    with pytest.raises(exc, match=match):
        build_layer_levels(W, H, **kwargs)



def test_sparsegpt_levels_equal_separate_sparsegpt_solves():
    W, H, _ = make_problem(6, 16, seed=13)
    layer = build_layer_levels(W, H, sparsities=(0.25, 0.5), nm=[(2, 4)], bits=[4], joint=[(2, 4, 3)],
                               prune_method="sparsegpt", keep_weights=True)
    assert layer.labels == ["dense", "sparse:0.25@sparsegpt", "sparse:0.5@sparsegpt", "nm2:4@sparsegpt", "q4",
                            "nm2:4@sparsegpt+q3"]
    for s in (0.25, 0.5):
        level = layer.level(f"sparse:{s!r}@sparsegpt")
        ref = obc_native.prune_unstructured(W, H, s, spread="uniform", method="sparsegpt")
        assert level.loss == ref.loss
        assert level.params == {"sparsity": s, "spread": "uniform", "prune_method": "sparsegpt"}
        np.testing.assert_array_equal(level.weight, ref.weight)
    assert layer.level("nm2:4@sparsegpt").loss == obc_native.prune_nm(W, H, 2, 4, method="sparsegpt").loss
    assert "prune_method" not in layer.level("q4").params  # quantization prunes nothing
    # joint with the default quantizer: one joint SparseGPT sweep, loss against the dense W
    sweep = obc_native.prune_quantize_sparsegpt(W, H, 3, n=2, m=4)
    joint = layer.level("nm2:4@sparsegpt+q3")
    np.testing.assert_array_equal(joint.weight, np.where(sweep.mask, sweep.weight, 0))
    assert joint.loss == pytest.approx(obc_native.layer_loss(W, joint.weight, H).sum(), rel=1e-12)
    for level in layer.levels:  # apply_level repeats each level's solve
        if level.label not in ("dense", "q4"):
            assert level.config().prune_method == "sparsegpt"
        assert layer.apply(W, H, level).loss == level.loss


def test_sparsegpt_blocked_levels_and_bad_pruner():
    W, H, _ = make_problem(4, 16, seed=14)
    layer = build_layer_levels(W, H, sparsities=(0.5,), block=4, nm=(), prune_method="sparsegpt", spread="global")
    ref = obc_native.prune_blocked(W, H, 0.5, 4, spread="global", method="sparsegpt")
    assert layer.labels == ["dense", "block4:0.5@sparsegpt"] and layer.levels[1].loss == ref.loss
    with pytest.raises(ValueError, match="prune_method"):
        build_layer_levels(W, H, prune_method="fast")
