"""hessian_memory: the Hessians' memory estimated before calibration, dense calibration split in
groups of layers (bit for bit the one-pass result), early errors, bad option values."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from obc_torch_helpers import MLP
from torch import nn

from obc_native.torch import (
    EmbeddingRule, HessianMemoryError, LayerConfig, Recipe, build_database, compress, compress_to_budget,
)
from obc_native.torch.hessian_memory import (
    HessianBudget, available_memory, format_bytes, parse_memory, resolve_budget, split_in_groups,
)

pytestmark = pytest.mark.torch

hessian_memory_module = importlib.import_module("obc_native.torch.hessian_memory")
compress_module = importlib.import_module("obc_native.torch.compress")

GiB = 2**30


class Blocks(nn.Module):
    """Token embeddings, then two attention-like blocks (q, k, v read one tensor) and a head
    (its Hessians' bytes: see RECIPE below)."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(width, width) for name in ("q", "k", "v", "out")}) for _ in range(2)
        )
        self.head = nn.Linear(width, 4)
        self.forwards = 0

    def forward(self, ids):
        self.forwards += 1
        h = torch.tanh(self.embed(self.emb(ids)))
        for block in self.blocks:
            q, k, v = block["q"](h), block["k"](h), block["v"](h)
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            h = h + block["out"](weights @ v)
        return self.head(h)


class Twice(nn.Module):
    """``b`` reads ``a``'s input once, then its own (a layer whose inputs are partly shared)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.c(self.b(torch.relu(y)))


def blocks():
    torch.manual_seed(0)
    return Blocks()


def token_batches(count=3):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 10, (2, 6), generator=generator) for _ in range(count)]


def float_batches(shape, count=3):
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def state(net):
    return {key: value.clone() for key, value in net.state_dict().items()}


def assert_same_run(a, b):
    (report_a, state_a), (report_b, state_b) = a, b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    rows_a = [(r.name, r.loss, r.baseline_loss, r.samples, r.sparsity) for r in report_a.layers]
    rows_b = [(r.name, r.loss, r.baseline_loss, r.samples, r.sparsity) for r in report_b.layers]
    assert rows_a == rows_b  # the same floats, bit for bit, in the same order


def run(make, data, recipe, **options):
    net = make()
    report = compress(net, data, recipe, quiet=True, **options)
    return report, state(net)


# ---------------------------------------------------------------- the option and the helpers


@pytest.mark.parametrize(
    "value, expected",
    [
        ("8GiB", 8 * GiB), ("500MB", 500 * 10**6), ("1.5 KiB", 1536), ("2 gb", 2 * 10**9), ("100", 100),
        ("1e9", 10**9), ("64 B", 64), (4096, 4096), (8e9, 8 * 10**9), ("auto", "auto"), (" AUTO ", "auto"),
    ],
)
def test_parse_memory_accepts_counts_and_sizes(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", [-1, 0, "0GB", "-1GiB", "eight", "8 GX", "8G", "", "1e999", 1.5, float("nan"), 0.4])
def test_parse_memory_refuses_bad_values_naming_the_option(value):
    with pytest.raises(ValueError, match="hessian_memory"):
        parse_memory(value)


@pytest.mark.parametrize("value", [None, True, [1], b"8GiB", 1j])
def test_parse_memory_refuses_other_types(value):
    with pytest.raises(TypeError, match="hessian_memory"):
        parse_memory(value)


def test_available_memory_reads_memavailable(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   1000 kB\n")
    assert available_memory("cpu", meminfo=str(meminfo)) == 1000 * 1024
    # without the line (an old kernel, another system): the free physical pages, else unknown
    pages = {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(hessian_memory_module.os, "sysconf", pages.__getitem__)
    assert available_memory("cpu", meminfo=str(tmp_path / "missing")) == 3 * 4096

    def no_sysconf(key):
        raise ValueError(key)

    monkeypatch.setattr(hessian_memory_module.os, "sysconf", no_sysconf)
    assert available_memory("cpu", meminfo=str(tmp_path / "missing")) is None
    assert available_memory("meta") is None


def test_resolve_budget_auto_is_a_fraction_of_the_available_memory():
    budget = resolve_budget("auto", "cpu", available=lambda device: 4 * GiB)
    assert budget.limit == 3 * GiB and "auto" in budget.origin and "4.0 GiB" in budget.origin
    unknown = resolve_budget("auto", "cpu", available=lambda device: None)
    assert unknown.limit is None and "unknown" in unknown.origin
    assert resolve_budget("2KiB") == HessianBudget(2048, "hessian_memory=2.0 KiB")
    assert format_bytes(512) == "512 B" and format_bytes(45.2 * GiB) == "45.2 GiB"


def test_split_in_groups_packs_consecutive_units():
    units = [("a", 4), ("b", 4), ("c", 8), ("d", 1), ("e", 9), ("f", 2)]
    assert split_in_groups(units, 8) == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert split_in_groups(units, 100) == [["a", "b", "c", "d", "e", "f"]]
    assert split_in_groups([], 8) == []


# ---------------------------------------------------------------- split dense calibration

# Blocks' Hessians, each counted twice: embed 2*8*8*8 = 1024 B; every 12-column layer 2304 B;
# q, k and v share one: 1024 + 2 * (2304 + 2304) + 2304 = 12544 B once shared.
RECIPE = Recipe(default=LayerConfig(prune="unstructured", sparsity=0.5), embeddings=[EmbeddingRule("emb", bits=4)])


def test_split_dense_calibration_is_bit_identical_to_one_pass(caplog):
    data = token_batches()
    one = run(blocks, data, RECIPE, hessian_memory="1GiB")
    assert one[0].passes == 1
    with caplog.at_level(logging.INFO, logger="obc_native.torch"):
        split = run(blocks, data, RECIPE, hessian_memory=4700)
    # groups: [embed, b0.q/k/v] [b0.out, b1.q/k/v] [b1.out, head]: a pass without Hessians + 3
    assert split[0].passes == 4
    assert_same_run(one, split)
    assert "3 groups" in caplog.text and "hessian_memory=4.6 KiB" in caplog.text
    assert split[0].layers[0].name == "emb" and split[0].layers[0].mode != "skipped"  # quantized first


def test_hessians_that_fit_once_shared_take_one_more_pass(caplog):
    data = token_batches()
    one = run(blocks, data, RECIPE, hessian_memory="1GiB")
    with caplog.at_level(logging.INFO, logger="obc_native.torch"):
        shared = run(blocks, data, RECIPE, hessian_memory=15000)  # 21760 B apart, 12544 B shared
    assert shared[0].passes == 2 and "once layers reading one input share one" in caplog.text
    assert_same_run(one, shared)
    # a budget run goes on too (it holds them all, shared)
    budget = [blocks(), blocks()]
    reports = [
        compress_to_budget(net, data, "params=2x", hessian_memory=memory, quiet=True)
        for net, memory in zip(budget, ("1GiB", 15000))
    ]
    assert [report.passes for report in reports] == [1, 2]
    assert_same_run((reports[0], state(budget[0])), (reports[1], state(budget[1])))


def test_one_group_per_hessian_and_the_auto_limit(monkeypatch):
    data = token_batches()
    one = run(blocks, data, RECIPE)  # auto: plenty of memory here
    assert one[0].passes == 1
    # "auto" with (fake) 3 KiB available: 2304 B each, one Hessian per group: 6 groups
    monkeypatch.setattr(hessian_memory_module, "available_memory", lambda device: 3072)
    split = run(blocks, data, RECIPE)
    assert split[0].passes == 1 + 6
    assert_same_run(one, split)


def test_split_with_partly_shared_inputs_and_bias_correction():
    data = float_batches((4, 8))

    def make():
        torch.manual_seed(3)
        return Twice()

    config = LayerConfig(bits=3)
    one = run(make, data, config, hessian_memory=10**9)
    split = run(make, data, config, hessian_memory=1100)  # 1024 B each: a, b, c alone
    assert split[0].passes > one[0].passes
    assert_same_run(one, split)
    assert all(row.bias_corrected for row in split[0].layers)


def test_split_conv_model_with_batchnorm(cnn, cnn_batches):
    import copy

    def make():
        return copy.deepcopy(cnn)

    config = LayerConfig(prune="unstructured", sparsity=0.5)
    one = run(make, cnn_batches, config, hessian_memory="1GiB")
    # conv1 (9 cols) 1296 B, conv2 (72 cols) 82944 B, fc (128 cols) 262144 B: [conv1, conv2], [fc]
    split = run(make, cnn_batches, config, hessian_memory=262144)
    assert split[0].passes > one[0].passes and split[0].correction == "batchnorm"
    assert_same_run(one, split)


def test_split_run_resumes_from_a_checkpoint(tmp_path):
    data = token_batches()
    one = run(blocks, data, RECIPE, hessian_memory="1GiB")
    for stop in ("blocks.0.k", "blocks.0.out"):  # within a group, at a group's first layer
        original = compress_module._Run.compress_layer

        def failing(self, name, *args):
            if name == stop:
                raise KeyboardInterrupt
            return original(self, name, *args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(compress_module._Run, "compress_layer", failing)
            with pytest.raises(KeyboardInterrupt):
                run(blocks, data, RECIPE, hessian_memory=4700, checkpoint=tmp_path / stop)
        resumed = run(blocks, data, RECIPE, hessian_memory=4700, checkpoint=tmp_path / stop)
        assert_same_run(one, resumed)
        assert_same_run(one, run(blocks, data, RECIPE, hessian_memory=4700, checkpoint=tmp_path / stop))  # all done


def test_a_failed_split_run_restores_the_model():
    data = token_batches()
    net = blocks()
    before = state(net)
    config = LayerConfig(prune="unstructured", sparsity=0.5)
    plan = {name: config for name in ("embed", "blocks.0.q", "blocks.1.out", "head")}  # one group each

    calls = []
    original = compress_module._Run.compress_layer

    def failing(self, name, *args):
        calls.append(name)
        if name == "head":
            raise RuntimeError("boom")
        return original(self, name, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compress_module._Run, "compress_layer", failing)
        with pytest.raises(RuntimeError, match="boom"):
            compress(net, data, plan, quiet=True, hessian_memory=2400)
    assert calls == ["embed", "blocks.0.q", "blocks.1.out", "head"]
    assert net.forwards == 3 + 4 * 3  # the pass without Hessians, then one pass per group
    after = state(net)
    for key in before:
        assert torch.equal(before[key], after[key]), key


# ---------------------------------------------------------------- early errors


def test_a_hessian_larger_than_the_limit_fails_before_any_pass():
    net = blocks()
    before = state(net)
    with pytest.raises(HessianMemoryError, match=r"layer 'blocks\.0\.q' alone needs 2\.2 KiB.*hessian_memory=2\.0 KiB"):
        compress(net, token_batches(), RECIPE, hessian_memory=2048)
    assert net.forwards == 0
    assert all(torch.equal(before[key], value) for key, value in state(net).items())  # embeddings too
    with pytest.raises(HessianMemoryError, match="blocks.0.q"):
        compress(blocks(), token_batches(), RECIPE, hessian_memory=2048, sequential=True)


def test_sequential_checks_only_the_largest_hessian():
    data = token_batches()
    expected = run(blocks, data, RECIPE, sequential=True, hessian_memory="1GiB")
    report, weights = run(blocks, data, RECIPE, sequential=True, hessian_memory=2304)
    assert report.passes == expected[0].passes
    assert_same_run(expected, (report, weights))


def test_budget_runs_refuse_hessians_that_do_not_fit_together():
    net = blocks()
    with pytest.raises(HessianMemoryError, match=r"need 12\.2 KiB at once.*sequential=True"):
        compress_to_budget(net, token_batches(), "params=2x", hessian_memory=6000)
    assert net.forwards == 3  # the pass without Hessians only
    with pytest.raises(HessianMemoryError, match=r"layer 'blocks\.0\.q' alone"):
        compress_to_budget(blocks(), token_batches(), "params=2x", hessian_memory=2000)
    # MLP 16-32-32-8: 2 * 8 * (16^2 + 32^2 + 32^2) = 36864 B, no sharing in a level database
    with pytest.raises(HessianMemoryError, match=r"need 36\.0 KiB at once.*'layers\.1'"):
        build_database(MLP(), float_batches((4, 16)), hessian_memory=8000)


@pytest.mark.parametrize("value, error", [(-5, ValueError), (0, ValueError), ("lots", ValueError), (None, TypeError)])
def test_bad_hessian_memory_fails_before_any_work(value, error):
    net = blocks()
    with pytest.raises(error, match="hessian_memory"):
        compress(net, token_batches(), RECIPE, hessian_memory=value)
    assert net.forwards == 0
    with pytest.raises(error, match="hessian_memory"):
        build_database(MLP(), float_batches((4, 16)), hessian_memory=value)
    with pytest.raises(error, match="hessian_memory"):
        compress(blocks(), token_batches(), budget="params=2x", hessian_memory=value)


# ---------------------------------------------------------------- the command line


def test_cli_hessian_memory(tmp_path, capsys):
    from obc_native.cli import main
    from obc_native.demo.model import WEIGHTS_PATH, DigitsCNN, load_data
    from obc_native.torch import find_layers, read_manifest
    from obc_native.torch.hessian_memory import ACCUMULATION_COPIES, hessian_bytes

    calibration = tmp_path / "calib.pt"
    torch.save(load_data().train_x[:64].clone(), calibration)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {prune: nm, n: 2, m: 4}\nskip: [features.0]\n")
    base = ["compress", "--model", WEIGHTS_PATH, "--arch", "obc_native.demo.model:DigitsCNN", "--quiet"]
    base += ["--calibration", str(calibration), "--recipe", str(recipe)]
    assert main([*base, "--out", str(tmp_path / "bad"), "--hessian-memory", "lots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("obc-native: error: --hessian-memory: expected 'auto'") and "\n" not in err
    assert main([*base, "--out", str(tmp_path / "small"), "--hessian-memory", "1KiB"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alone needs" in err[0] and "hessian_memory=1.0 KiB" in err[0]
    # the largest Hessian alone fits: one group per Hessian, the same files as one pass
    needs = [ACCUMULATION_COPIES * hessian_bytes(info) for name, info in find_layers(DigitsCNN()).items()]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "split"), "--hessian-memory", str(max(needs))]) == 0
    one, split = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "split")
    assert split["report"]["passes"] > one["report"]["passes"]
    assert (tmp_path / "one" / "compressed.safetensors").read_bytes() == (
        tmp_path / "split" / "compressed.safetensors"
    ).read_bytes()
