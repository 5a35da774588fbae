"""Tests for obc_native.layer_solve (one solve for every path) and obc_native.levels' conversion
between a Level's stored form and its LayerConfig."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from problems import make_problem

import obc_native
from obc_native import budget as B
from obc_native.layer_config import LayerConfig
from obc_native.layer_solve import from_solver_columns, solve, to_solver_columns
from obc_native.levels import Level, level_config, level_params

# every kind of level, as a LayerConfig (None: dense)
LEVEL_CONFIGS = [
    None,
    LayerConfig(prune="unstructured", sparsity=0.5, spread="uniform"),
    LayerConfig(prune="blocked", sparsity=0.25, block=4, spread="global"),
    LayerConfig(prune="nm", n=2, m=4),
    LayerConfig(bits=3, sym=False, group_size=8, quant_method="gptq", refine=False),
    LayerConfig(prune="nm", n=1, m=4, bits=4, grid="minmax", quant_method="obq"),
    LayerConfig(prune="blocked", sparsity=0.5, block=2, spread="uniform", prune_method="sparsegpt"),
    LayerConfig(prune="nm", n=2, m=4, bits=4, prune_method="sparsegpt"),  # one joint SparseGPT sweep
]


def test_public_names():
    assert obc_native.LayerConfig is LayerConfig and obc_native.solve is solve
    assert B.level_config is level_config and B.Level is Level  # the old home re-exports


@pytest.mark.parametrize("config", LEVEL_CONFIGS, ids=lambda c: "dense" if c is None else c.label)
def test_level_form_round_trips(config):
    kind, params = level_params(config)
    level = Level(kind=kind, params=params, loss=0.0, costs={})
    assert level_config(level, damp=0.05) == (None if config is None else dataclasses.replace(config, damp=0.05))
    assert Level.of(config, 0.0, {}).label == level.label
    assert level.is_dense == (config is None)


def test_level_form_keeps_the_stored_keys_and_their_order():
    """The database file writes params in this key order: a new build writes the same bytes."""
    assert list(level_params(LEVEL_CONFIGS[1])[1]) == ["sparsity", "spread"]
    assert list(level_params(LEVEL_CONFIGS[2])[1]) == ["block", "sparsity", "spread"]
    assert level_params(LEVEL_CONFIGS[3]) == ("nm", {"n": 2, "m": 4})
    kind, params = level_params(LEVEL_CONFIGS[5])
    assert kind == "joint" and list(params) == ["n", "m", "bits", "sym", "group_size", "grid", "method", "refine"]
    # a SparseGPT level names its pruner last; an ExactOBS level names none (as before the choice)
    assert level_params(LEVEL_CONFIGS[6]) == ("blocked", {"block": 2, "sparsity": 0.5, "spread": "uniform",
                                                          "prune_method": "sparsegpt"})
    assert list(level_params(LEVEL_CONFIGS[7])[1])[-1] == "prune_method"


def test_a_level_without_a_quantizer_means_obq_without_refinement():
    level = Level(kind="quant", params={"bits": 4, "sym": True, "group_size": None, "grid": "mse"}, loss=0.0, costs={})
    config = level.config()
    assert (config.quant_method, config.refine, config.damp) == ("obq", False, 0.01)


@pytest.mark.parametrize("config", [
    LayerConfig(prune="structured", sparsity=0.5),
    LayerConfig(prune="unstructured", sparsity=0.5, method="magnitude"),
    LayerConfig(prune="unstructured", sparsity=0.5, bits=4),
    LayerConfig(),
])
def test_configs_without_a_level_form_are_refused(config):
    with pytest.raises(ValueError, match="config"):
        level_params(config)


def test_unknown_level_kind():
    with pytest.raises(ValueError, match="unknown kind 'sparse'"):
        level_config(Level(kind="sparse", params={}, loss=0.0, costs={}))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_level_is_solve_of_the_level_config(dtype):
    """apply_level and solve(level.config()) run the same solvers: identical weights."""
    W, H, _ = make_problem(6, 16, seed=21)
    W = W.astype(dtype)
    for config in LEVEL_CONFIGS[1:]:
        level = Level.of(config, 0.0, {})
        applied = B.apply_level(W, H, level, damp=0.02)
        solved = solve(level.config(0.02), W, H)
        assert solved.weight.dtype == W.dtype
        np.testing.assert_array_equal(applied.weight, solved.weight)


def test_joint_solve_is_prune_then_quantize_keeping_zeros():
    W, H, _ = make_problem(5, 16, seed=22)
    result = solve(LayerConfig(prune="nm", n=2, m=4, bits=3, sym=False), W, H)
    pruned = obc_native.prune_nm(W, H, 2, 4)
    quant = obc_native.quantize(pruned.weight, H, 3, sym=False)
    np.testing.assert_array_equal(result.weight, np.where(pruned.mask, quant.weight, 0))
    assert result.quant_loss == quant.loss and result.quant_loss_unrefined == quant.loss_unrefined
    assert result.scale.shape == (5, 1) and result.zero.dtype == np.uint8
    # apply_level measures the joint level's losses against the dense W
    level = Level.of(LayerConfig(prune="nm", n=2, m=4, bits=3, sym=False), 0.0, {})
    assert B.apply_level(W, H, level).loss == pytest.approx(obc_native.layer_loss(W, result.weight, H).sum(),
                                                            rel=1e-12)


@pytest.mark.parametrize("config", [
    LayerConfig(prune="nm", n=2, m=4),
    LayerConfig(prune="blocked", sparsity=0.5, block=2),
    LayerConfig(bits=4, group_size=4),
    LayerConfig(prune="nm", n=2, m=4, bits=4, method="magnitude"),
], ids=lambda c: c.label + " " + c.method)
def test_column_perm_solves_in_the_permuted_order_and_returns_the_given_order(config):
    W, H, _ = make_problem(4, 12, seed=23)
    perm = np.random.default_rng(0).permutation(12)
    result = solve(config, W, H, column_perm=perm)
    w_perm, h_perm = to_solver_columns(W, H, perm)
    np.testing.assert_array_equal(w_perm, W[:, perm])
    np.testing.assert_array_equal(h_perm, H[np.ix_(perm, perm)])
    direct = solve(config, w_perm, h_perm)
    np.testing.assert_array_equal(result.weight, from_solver_columns(direct.weight, perm))
    np.testing.assert_array_equal(result.weight[:, perm], direct.weight)
    assert to_solver_columns(W, H, None) == (W, H) and from_solver_columns(W, None) is W


def test_structured_group_removes_whole_column_groups():
    W, H, _ = make_problem(4, 12, seed=24)
    result = solve(LayerConfig(prune="structured", sparsity=0.5), W, H, structured_group=3)
    dead = (result.weight == 0).all(axis=0).reshape(4, 3)
    assert dead.all(axis=1).sum() == 2 and (dead.all(axis=1) == dead.any(axis=1)).all()


def test_solvers_namespace_is_used():
    calls = []

    class Recording:
        def __getattr__(self, name):
            target = getattr(obc_native, name)

            def wrapper(*args, **kwargs):
                calls.append(name)
                return target(*args, **kwargs)

            return wrapper

    W, H, _ = make_problem(4, 8, seed=25)
    solve(LayerConfig(prune="nm", n=2, m=4, bits=4), W, H, solvers=Recording())
    assert calls == ["prune_nm", "quantize"]
