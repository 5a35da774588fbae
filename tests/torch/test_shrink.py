"""shrink_structured: pruned channels removed with their producers; outputs equal the masked model's."""

from __future__ import annotations

import copy

import pytest
import torch
from obc_torch_helpers import MLP
from torch import nn

from obc_native.torch import LayerConfig, Override, Recipe, ShrinkError, compress, hf_ffn_chains, shrink_structured

pytestmark = pytest.mark.torch

STRUCTURED = LayerConfig(prune="structured", sparsity=0.5)


def assert_same_outputs(masked, shrunk, *inputs):
    with torch.no_grad():
        expected, actual = masked(*inputs), shrunk(*inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


class ConvChain(nn.Module):
    """conv -> BN -> ReLU -> conv (grouped) -> BN -> GELU -> conv, with biases."""

    def __init__(self, groups=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.gelu(self.bn2(self.conv2(x)))
        return self.conv3(x)


def randomize_norms(model):
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data = torch.randn(tensor.shape, generator=generator)
            module.running_var.data = torch.rand(module.running_var.shape, generator=generator) + 0.5
    return model.eval()


def test_cnn_after_compress_is_smaller_and_equal(cnn, cnn_batches):
    compress(cnn, cnn_batches, Recipe(default=STRUCTURED, skip=["conv1"]), quiet=True)
    masked = copy.deepcopy(cnn)
    report = shrink_structured(cnn)
    assert [(c.producer, c.consumer, c.between, c.channels, c.kept) for c in report.chains] == [
        ("conv1", "conv2", ["bn1"], 8, 4)
    ]
    assert cnn.conv1.weight.shape == (4, 1, 3, 3) and cnn.bn1.running_mean.shape == (4,)
    assert cnn.conv2.weight.shape == (8, 4, 3, 3)
    assert "fc" in report.skipped  # conv2 -> flatten -> fc: not a channel chain
    assert report.parameters_after < report.parameters_before
    assert_same_outputs(masked, cnn, torch.randn(5, 1, 8, 8))


def test_mlp_bias_through_nonlinearity_is_removed(mlp, mlp_batches):
    """The producer's removed channels are not zero (bias, then tanh): they reach only zero columns."""
    compress(mlp, mlp_batches, Recipe(default=STRUCTURED, skip=["layers.0"]), quiet=True)
    masked = copy.deepcopy(mlp)
    removed_rows = (mlp.layers[1].weight == 0).all(dim=0)
    assert removed_rows.sum() == 16 and mlp.layers[0].bias[removed_rows].abs().min() > 0
    report = shrink_structured(mlp)
    assert [(c.producer, c.consumer, c.kept) for c in report.chains] == [("layers.0", "layers.1", 16),
                                                                       ("layers.1", "layers.2", 16)]
    assert mlp.layers[1].weight.shape == (16, 16) and mlp.layers[1].bias.shape == (16,)
    assert mlp.layers[0].out_features == 16 and mlp.layers[2].in_features == 16
    assert_same_outputs(masked, mlp, torch.randn(7, 16))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_convolutions(groups):
    torch.manual_seed(0)
    model = randomize_norms(ConvChain(groups=groups))
    with torch.no_grad():
        model.conv2.weight.view(groups, 8 // groups, 8 // groups, 3, 3)[:, :, 0] = 0  # column 0 of every group
        model.conv3.weight[:, [1, 2, 5]] = 0  # unequal per group of conv2's outputs when grouped
    masked = copy.deepcopy(model)
    report = shrink_structured(model)
    kept = {c.consumer: c.kept for c in report.chains}
    assert kept["conv2"] == 8 - groups
    # conv3's zero channels 1, 2, 5 are conv2's outputs; equal per conv2 group: groups 2 -> [1,2 | 5] -> one each
    assert kept["conv3"] == {1: 5, 2: 6, 4: 8}[groups]
    assert model.conv2.weight.shape == (kept["conv3"], (8 - groups) // groups, 3, 3)
    assert model.bn1.num_features == 8 - groups and model.bn2.running_var.shape == (kept["conv3"],)
    assert_same_outputs(masked, model, torch.randn(2, 3, 6, 6))


def test_depthwise_producer_keeps_its_channels():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        model[3].weight[:, 1] = 0
    masked = copy.deepcopy(model)
    report = shrink_structured(model)
    assert report.chains[0].removed == 0 and model[1].out_channels == 4
    assert_same_outputs(masked, model, torch.randn(1, 2, 5, 5))


def test_residual_and_shared_channels_are_skipped():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.relu(h)) + h

    model = Residual()
    with torch.no_grad():
        model.b.weight[:, :3] = 0
    before = copy.deepcopy(model)
    report = shrink_structured(model)
    assert report.chains == [] and "users" in report.skipped["b"]
    assert_same_outputs(before, model, torch.randn(2, 6))
    assert model.a.out_features == 6


def tiny_bert(intermediate=32):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=intermediate, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


# The FFN output projection of BERT-like layers: "<index>.output.dense". "*.output.dense" also
# matches "<index>.attention.output.dense" (and "crossattention.output.dense"), which
# hf_ffn_chains does not shrink: pruned by it, they only lose accuracy.
BERT_FFN = "*[0-9].output.dense"


@pytest.mark.parametrize("cross_attention", [False, True])
def test_ffn_pattern_selects_the_ffn_chains_consumers_only(cross_attention):
    transformers = pytest.importorskip("transformers")
    from obc_native.torch import hf_attention_heads
    from obc_native.torch.layers import find_layers

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, is_decoder=cross_attention,
                                     add_cross_attention=cross_attention)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    names = list(find_layers(bert))
    ffn = {consumer for _, consumer in hf_ffn_chains(bert)}
    attention = {projection for _, projection in hf_attention_heads(bert)}
    assert len(ffn) == 3 and len(attention) == (6 if cross_attention else 3)
    assert {n for n in names if Override("*.output.dense").matches(n)} == ffn | attention  # the loose pattern
    assert {n for n in names if Override(BERT_FFN).matches(n)} == ffn
    plans = Recipe(default=None, overrides=[Override(BERT_FFN, prune="structured", sparsity=0.5)]).resolve(
        find_layers(bert))
    assert {name for name, plan in plans.items() if plan.config is not None} == ffn

    # GPT-2 (Conv1D layers): no BERT-like FFN block, the pattern matches nothing; its FFN output
    # projection is "*.mlp.c_proj" ("*.c_proj" would take the attention's c_proj too)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2,
                                                          n_head=2))
    names = list(find_layers(gpt2))
    assert hf_ffn_chains(gpt2) == [] and not [n for n in names if Override(BERT_FFN).matches(n)]
    assert [n for n in names if Override("*.mlp.c_proj").matches(n)] == ["h.0.mlp.c_proj", "h.1.mlp.c_proj"]
    assert len([n for n in names if Override("*.c_proj").matches(n)]) == 4


def test_hf_bert_ffn_with_explicit_chains():
    model = tiny_bert()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShrinkError, match="hf_ffn_chains"):
        shrink_structured(model)
    chains = hf_ffn_chains(model)
    assert chains == [(f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in (0, 1)]
    recipe = Recipe(default=None, overrides=[Override(BERT_FFN, prune="structured", sparsity=0.5)])
    compress(model, [{"input_ids": ids}], recipe, quiet=True)
    for layer in model.encoder.layer:  # the attention projection is not pruned (it would stay masked)
        assert bool((layer.attention.output.dense.weight != 0).all())
    masked = copy.deepcopy(model)
    report = shrink_structured(model, chains)
    assert [c.kept for c in report.chains] == [16, 16]
    assert model.encoder.layer[0].intermediate.dense.weight.shape == (16, 16)
    assert model.encoder.layer[1].output.dense.weight.shape == (16, 16)
    with torch.no_grad():
        expected, actual = masked(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_bad_chains():
    model = ConvChain()
    with pytest.raises(ShrinkError, match=r"chains\[0\]: the model has no module 'nope'"):
        shrink_structured(model, [("conv1", "nope")])
    with pytest.raises(ShrinkError, match=r"chains\[0\]: producer 'conv1' has 8 output channels but consumer "
                                          r"'conv1' has 3"):
        shrink_structured(model, [("conv1", "conv1")])
    with pytest.raises(ShrinkError, match="chains: norm bn1 in more than one chain"):
        shrink_structured(model, [("conv1", "bn1", "conv2"), ("conv2", "bn1", "conv3")])
    with pytest.raises(ShrinkError, match="'conv2' is a Conv2d; between producer and consumer only BatchNorm"):
        shrink_structured(model, [("conv1", "conv2", "conv3")])
    with pytest.raises(ShrinkError, match="must be both Linear or both Conv"):
        shrink_structured(nn.ModuleDict({"a": nn.Linear(3, 8), "b": nn.Conv2d(8, 2, 1)}), [("a", "b")])
    with pytest.raises(ShrinkError, match="producer 'bn1' is a BatchNorm2d"):
        shrink_structured(model, [("bn1", "conv2")])
    with pytest.raises(ShrinkError, match=r"chains\[1\]: expected module names"):
        shrink_structured(model, [("conv1", "conv2"), ("conv3",)])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        shrink_structured({"conv1": model.conv1})


def test_explicit_chains_match_the_traced_ones():
    torch.manual_seed(1)
    traced = randomize_norms(ConvChain(groups=2))
    with torch.no_grad():
        traced.conv2.weight[:, 0] = 0
        traced.conv3.weight[:, [0, 7]] = 0
    given = copy.deepcopy(traced)
    expected = shrink_structured(traced)
    report = shrink_structured(given, [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")])
    assert report.chains == expected.chains and [c.kept for c in report.chains] == [6, 6]
    for a, b in zip(traced.state_dict().values(), given.state_dict().values()):
        assert torch.equal(a, b)


def test_tied_and_directly_read_weights_are_left_alone():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 6)
            self.c.weight = self.a.weight  # tied: removing a's rows would change c too

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.c(x).sum(dim=-1, keepdim=True)

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.a.weight.sum()

    for model_class, reason in ((Tied, "tied weights"), (Direct, "read directly")):
        model = model_class()
        with torch.no_grad():
            model.b.weight[:, :2] = 0
        before = copy.deepcopy(model)
        report = shrink_structured(model)
        assert report.chains == [] and reason in report.skipped["b"]
        assert model.a.out_features == 6
        assert_same_outputs(before, model, torch.randn(3, 4))


def test_tables_stay_aligned_for_long_names():
    """Hugging Face names (encoder.layer.0.intermediate.dense) ran past the fixed 32-wide columns."""
    from obc_native.torch import HeadShrinkReport, ShrinkReport, ShrunkHeads
    from obc_native.torch.shrink import ShrunkChain

    long = "encoder.layer.11.intermediate.dense.with.a.longer.name"
    chains = ShrinkReport(chains=[ShrunkChain("fc1", "fc2", [], 64, 32), ShrunkChain(long, long + "2", [], 3072, 1536)])
    heads = HeadShrinkReport(attentions=[ShrunkHeads("a.self", "a.out", 12, 6, 64),
                                         ShrunkHeads(long + ".attention.self", "o", 12, 6, 64)])
    for table in (chains.table(), heads.table()):
        rows = table.splitlines()[:3]
        assert len({len(row) for row in rows}) == 1, table  # header and rows end in the same column
