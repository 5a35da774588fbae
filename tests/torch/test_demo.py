"""The demo: ExactOBS / quantize() keeps accuracy and beats magnitude / RTN on the shipped digits CNN."""

from __future__ import annotations

import os

import pytest
import torch

from obc_native.demo import BUDGETS, RECIPES, DemoResult, expectations, format_results, paired_difference, run_demo
from obc_native.demo.model import WEIGHTS_PATH, DigitsCNN, accuracy, load_data, load_pretrained, train_model

pytestmark = pytest.mark.torch


def test_shipped_weights_and_data():
    assert os.path.getsize(WEIGHTS_PATH) < 100_000
    data = load_data()
    assert data.train_x.shape == (1297, 1, 8, 8) and data.test_x.shape == (500, 1, 8, 8)
    assert float(data.train_x.min()) >= 0.0 and float(data.train_x.max()) <= 1.0
    assert accuracy(load_pretrained(), data.test_x, data.test_y) >= 97.0


def test_compressed_accuracy_meets_expectations():
    torch.manual_seed(0)
    results = run_demo()  # every recipe, both methods, and the FLOP budgets (a few seconds)
    assert len(results) == 2 + 2 * len(RECIPES) + 2 * len(BUDGETS)
    dense = results[0]
    rows = {(r.recipe, r.method): r for r in results[1:]}
    # the reference of the compressed rows: dense weights, BatchNorm re-estimated on the calibration
    # images; that alone moves the predictions (the shipped statistics are training running averages)
    reestimated = rows["dense", "dense-bn"]
    assert (reestimated.flops, reestimated.file_bytes) == (dense.flops, dense.file_bytes)
    assert reestimated.kl_dense > 0 and reestimated.test_loss != dense.test_loss
    assert reestimated.kl_reference == 0 and dense.kl_reference == pytest.approx(reestimated.kl_dense, rel=0.5)
    table = format_results(results)
    assert all(name in table for name in RECIPES)
    checks = expectations(results)
    assert len(checks) == 6 + 2 * len(BUDGETS) and all(checks.values()), checks
    assert "FAILED" not in table
    assert "BN re-estimated" in table
    # the paired test-loss differences to the baseline, one line per recipe, with their standard error
    for recipe in RECIPES:
        mean, error = paired_difference(rows[recipe, "obc"], rows[recipe, "baseline"])
        assert mean == pytest.approx(rows[recipe, "obc"].test_loss - rows[recipe, "baseline"].test_loss, abs=1e-6)
        assert 0 < error < 0.05
        assert f"{mean:+.4f} +- {error:.4f}" in table, recipe
        assert f"KL(ref) {rows[recipe, 'obc'].kl_reference:.4f} vs {rows[recipe, 'baseline'].kl_reference:.4f}" in table
    # within 1 point of dense accuracy at 50% sparsity and 4 bits
    assert rows["unstructured 50%", "obc"].accuracy >= dense.accuracy - 1.0
    assert rows["4-bit", "obc"].accuracy >= dense.accuracy - 1.0
    # better than magnitude pruning / round-to-nearest at 75% and 3 bits
    for recipe in ("unstructured 75%", "3-bit"):
        ours, baseline = rows[recipe, "obc"], rows[recipe, "baseline"]
        assert ours.accuracy > baseline.accuracy, recipe
        assert ours.test_loss < baseline.test_loss, recipe
    # quantized predictions closer to the dense model's than RTN's, with and without the shift of
    # the BatchNorm re-estimation; without it by a wider margin (about 3.5x at 4 bits)
    for recipe in ("4-bit", "3-bit"):
        assert 0 < rows[recipe, "obc"].kl_dense < rows[recipe, "baseline"].kl_dense, recipe
        assert 0 < 2 * rows[recipe, "obc"].kl_reference < rows[recipe, "baseline"].kl_reference, recipe
    assert dense.kl_dense == 0
    # files shrink with the compression
    assert rows["unstructured 75%", "obc"].file_bytes < 0.4 * dense.file_bytes
    assert rows["3-bit", "obc"].file_bytes < 0.2 * dense.file_bytes
    # FLOP budgets: both allocations within the budget, the DP's at least as accurate
    for name, factor in BUDGETS.items():
        ours, uniform = rows[name, "nonuniform"], rows[name, "uniform"]
        assert ours.budget == pytest.approx(dense.flops / factor)
        assert ours.flops <= ours.budget and uniform.flops <= uniform.budget
        assert ours.accuracy >= uniform.accuracy, name
        assert name in table and "non-uniform DP" in table


def test_paired_difference_is_the_mean_and_standard_error_of_per_image_differences():
    def result(losses):
        losses = torch.tensor(losses, dtype=torch.float64)
        return DemoResult("4-bit", "obc", 100.0, float(losses.mean()), 1, 0.0, image_losses=losses)

    # differences 1, 2, 3, 6: mean 3, sample standard deviation sqrt(14 / 3), standard error that / 2
    mean, error = paired_difference(result([2.0, 2.0, 4.0, 7.0]), result([1.0, 0.0, 1.0, 1.0]))
    assert mean == pytest.approx(3.0) and error == pytest.approx((14 / 3) ** 0.5 / 2)
    # one row against itself: no difference, no spread
    assert paired_difference(result([0.5, 0.1, 0.2]), result([0.5, 0.1, 0.2])) == (0.0, 0.0)


def test_method_labels_name_what_ran():
    from obc_native.demo import method_label

    assert method_label("unstructured 50%", "obc") == "ExactOBS"
    assert method_label("2:4", "baseline") == "magnitude"
    assert method_label("4-bit", "obc") == "auto" and method_label("3-bit", "baseline") == "RTN"
    assert method_label("2:4 + 4-bit", "obc") == "ExactOBS + auto"
    assert method_label("2:4 + 4-bit", "baseline") == "magnitude + RTN"
    assert method_label("2x fewer FLOPs", "nonuniform") == "non-uniform DP"
    assert method_label("dense", "dense-bn") == "BN re-estimated"


@pytest.mark.slow
def test_training_works():
    data = load_data()
    model = train_model(data, epochs=2)
    assert isinstance(model, DigitsCNN)
    assert accuracy(model, data.test_x, data.test_y) > 50.0


@pytest.mark.slow
def test_missing_weights_are_trained_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = load_pretrained(str(tmp_path / "missing.safetensors"))
    assert (tmp_path / "obc_native" / "digits_cnn.safetensors").is_file()
    data = load_data()
    assert accuracy(model, data.test_x, data.test_y) > 90.0
    again = load_pretrained(str(tmp_path / "missing.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
