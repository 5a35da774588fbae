"""Whole-model speed: layers reading the same input share one Hessian (and, in sequential mode,
one calibration pass); compress_to_budget is compress(budget=); the report's time breakdown."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from obc_torch_helpers import MLP
from torch import nn

from obc_native.torch import CompressionReport, LayerConfig, compress, compress_to_budget, find_layers
from obc_native.torch.calibration import run_calibration
from obc_native.torch.hessian import LayerHooks, sample_signature

pytestmark = pytest.mark.torch

compress_module = importlib.import_module("obc_native.torch.compress")


class Attention(nn.Module):
    """Single-head self-attention block: q, k and v read the same tensor; then out and fc."""

    def __init__(self, width: int = 12, inplace_between: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4)
        self.inplace_between = inplace_between
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        h = torch.tanh(self.embed(x))
        q = self.q(h)
        if self.inplace_between:
            h.mul_(0.5)  # same object, other values: k and v must not reuse q's samples
        k, v = self.k(h), self.v(h)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.fc(h + self.out(weights @ v))


class Twice(nn.Module):
    """``b`` reads ``a``'s input once, then its own (a mixed layer); ``a`` is called once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.b(torch.relu(y))


class Convs(nn.Module):
    """Three convolutions on one input: c1 and c2 alike, c3 with another kernel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.c3 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.c1(x) + self.c2(x) + self.c3(x)


def batches(shape, count=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def model(cls=Attention, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs)


def separate_hessians(net, data, names):
    """Each layer's Hessian from a pass of its own, without sharing."""
    found = find_layers(net)
    result = {}
    for name in names:
        with LayerHooks({name: found[name]}) as hooks:
            run_calibration(net, data, hooks)
        result[name] = hooks.hessians[name]
    return result


def shared_hooks(net, data):
    found = find_layers(net)
    with LayerHooks(found, share_inputs=True, record_order=True) as hooks:
        run_calibration(net, data, hooks)
    return hooks


def assert_same_stats(a, b):
    assert a.n == b.n
    assert torch.equal(a.hessian, b.hessian) and torch.equal(a.input_sum, b.input_sum)


def state(net):
    return {key: value.clone() for key, value in net.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_both(make, data, monkeypatch, **kwargs):
    """compress() with and without sharing: (reports, states)."""
    reports, states = [], []
    for share in (True, False):
        monkeypatch.setattr(compress_module, "_SHARE_INPUTS", share)
        net = make()
        reports.append(compress(net, data, quiet=True, **kwargs))
        states.append(state(net))
    return reports, states


# ---------------------------------------------------------------- shared Hessians


def test_shared_hessians_equal_separate_passes_bit_for_bit():
    net, data = model(), batches((2, 5, 8))
    hooks = shared_hooks(net, data)
    owner, mixed = hooks.share_hessians()
    assert mixed == [] and owner["k"] == owner["v"] == "q" and owner["embed"] == "embed"
    assert hooks.hessians["k"] is hooks.hessians["q"] is hooks.hessians["v"]
    separate = separate_hessians(net, data, list(find_layers(net)))
    for name, stats in separate.items():
        assert_same_stats(hooks.hessians[name], stats)


def test_inplace_change_between_calls_is_not_shared():
    net, data = model(inplace_between=True), batches((2, 5, 8))
    hooks = shared_hooks(net, data)
    owner, _ = hooks.share_hessians()
    assert owner["q"] == "q" and owner["k"] == "k" and owner["v"] == "k"
    separate = separate_hessians(net, data, ["q", "k", "v"])
    for name in ("q", "k", "v"):
        assert_same_stats(hooks.hessians[name], separate[name])
    assert not torch.equal(hooks.hessians["q"].hessian, hooks.hessians["k"].hessian)


def test_layers_with_other_sample_layouts_do_not_share():
    net, data = model(Convs), batches((2, 3, 6, 6))
    assert sample_signature(find_layers(net)["c1"]) != sample_signature(find_layers(net)["c3"])
    hooks = shared_hooks(net, data)
    owner, mixed = hooks.share_hessians()
    assert owner == {"c1": "c1", "c2": "c1", "c3": "c3"} and mixed == []
    separate = separate_hessians(net, data, ["c2", "c3"])
    assert_same_stats(hooks.hessians["c2"], separate["c2"])
    assert_same_stats(hooks.hessians["c3"], separate["c3"])


def test_partly_shared_layer_is_calibrated_on_its_own(monkeypatch):
    data = batches((4, 8))
    hooks = shared_hooks(model(Twice), data)
    assert hooks.input_owners() == ({"a": "a"}, ["b"])
    reports, states = run_both(lambda: model(Twice), data, monkeypatch, recipe=LayerConfig(bits=4))
    assert_state_equal(*states)
    assert [row.loss for row in reports[0].layers] == [row.loss for row in reports[1].layers]
    assert reports[0].passes == 2 and reports[1].passes == 1  # the mixed layer's own pass


# ---------------------------------------------------------------- compress with sharing


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("config", [LayerConfig(bits=4), LayerConfig(prune="nm", n=2, m=4)])
def test_compress_with_shared_inputs_is_bit_identical(sequential, config, monkeypatch):
    data = batches((2, 5, 8))
    reports, states = run_both(model, data, monkeypatch, recipe=config, sequential=sequential)
    assert_state_equal(*states)
    strip = lambda report: [{k: v for k, v in row.to_dict().items() if k != "seconds"} for row in report.layers]
    assert strip(reports[0]) == strip(reports[1])
    assert [row.name for row in reports[0].layers] == ["embed", "q", "k", "v", "out", "fc"]


def test_sequential_passes_drop_and_stop_early(monkeypatch):
    data = batches((2, 5, 8))
    counts = {}
    for share in (True, False):
        monkeypatch.setattr(compress_module, "_SHARE_INPUTS", share)
        net = model()
        fc_calls = []
        net.fc.register_forward_pre_hook(lambda *args: fc_calls.append(1))
        report = compress(net, data, LayerConfig(bits=4), sequential=True, correction=None, quiet=True)
        counts[share] = (report.passes, net.forwards, len(fc_calls))
    # trace + one pass per group (embed, qkv, out, fc) vs per layer; every pass is over 3 batches
    assert counts[True][:2] == (1 + 4, 3 * (1 + 4))
    assert counts[False][:2] == (1 + 6, 3 * (1 + 6))
    # only the trace pass and fc's own pass reach fc: the others stop after their deepest layer
    assert counts[True][2] == counts[False][2] == 3 * 2


def test_sequential_does_not_share_a_layer_called_twice(monkeypatch):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            for _ in range(2):  # b reads what a read, but a's second input depends on a and b
                x = torch.tanh(self.a(x) + self.b(x))
            return x

    data = batches((4, 8))
    hooks = shared_hooks(model(Loop), data)
    assert hooks.input_owners()[0]["b"] == "a"  # dense mode shares ...
    reports, states = run_both(lambda: model(Loop), data, monkeypatch, recipe=LayerConfig(bits=4), sequential=True)
    assert reports[0].passes == reports[1].passes == 3  # ... sequential mode does not
    assert_state_equal(*states)


# ---------------------------------------------------------------- compress_to_budget


def test_compress_to_budget_equals_compress_with_budget(mlp_batches):
    torch.manual_seed(0)
    one = MLP()
    two = copy.deepcopy(one)
    a = compress(one, mlp_batches, budget="params=2x", quiet=True)
    b = compress_to_budget(two, mlp_batches, "params=2x", quiet=True)
    assert_state_equal(state(one), state(two))
    strip = lambda report: [{k: v for k, v in row.to_dict().items() if k != "seconds"} for row in report.layers]
    assert strip(a) == strip(b) and a.budget == b.budget and a.passes == b.passes
    assert a.database.to_dict() == b.database.to_dict()


def test_budget_options_need_a_budget(mlp, mlp_batches):
    with pytest.raises(ValueError, match="damp apply to non-uniform compression: pass budget="):
        compress(mlp, mlp_batches, LayerConfig(bits=4), damp=0.1, quiet=True)
    with pytest.raises(TypeError, match="unexpected keyword.*bogus"):
        compress(mlp, mlp_batches, LayerConfig(bits=4), bogus=1, quiet=True)


# ---------------------------------------------------------------- where the time went


@pytest.mark.parametrize("sequential", [False, True])
def test_time_breakdown(sequential):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5))
    report = compress(net, batches((4, 3, 6, 6)), LayerConfig(bits=4), sequential=sequential, quiet=True)
    parts = [report.pass_seconds, report.hessian_seconds, report.solve_seconds, report.correction_seconds]
    assert all(part > 0 for part in parts) and report.database_seconds == 0
    assert sum(parts) <= report.seconds
    assert report.solve_seconds <= sum(row.seconds for row in report.layers)
    line = report.table().splitlines()[-1]
    assert line.startswith("time: passes ") and "Hessians" in line and "correction" in line
    restored = CompressionReport.from_dict(json.loads(report.to_json()))
    assert restored.pass_seconds == report.pass_seconds and restored.solve_seconds == report.solve_seconds
    assert restored.table() == report.table()


def test_time_breakdown_of_a_budget_run(mlp, mlp_batches):
    report = compress_to_budget(mlp, mlp_batches, "params=2x", quiet=True)
    assert report.database_seconds > 0 and report.hessian_seconds > 0 and report.correction_seconds > 0
    total = report.pass_seconds + report.hessian_seconds + report.database_seconds + report.solve_seconds
    assert total + report.correction_seconds <= report.seconds
    assert "database" in report.time_line()


def test_reports_without_times_still_load():
    data = {"layers": [], "calibration": "dense", "passes": 1, "seconds": 2.0}
    report = CompressionReport.from_dict(data)
    assert report.pass_seconds == 0.0 and "other 2.00 s" in report.table()


def test_inference_mode_inputs_are_not_shared():
    """Inference tensors have no version counter: their reuse cannot be checked, so no sharing."""
    net, data = model(), batches((2, 5, 8))
    found = find_layers(net)
    with LayerHooks(found, share_inputs=True) as hooks, torch.inference_mode():
        run_calibration(net, data, hooks)
    owner, mixed = hooks.share_hessians()
    assert owner == {name: name for name in found} and mixed == []
    separate = separate_hessians(net, data, ["k"])
    assert torch.equal(hooks.hessians["k"].hessian, separate["k"].hessian)
