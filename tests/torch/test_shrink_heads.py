"""Attention heads pruned whole (structured_group = head size) and removed by shrink_attention_heads."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from obc_native.layer_config import LayerConfig as CoreLayerConfig
from obc_native.layer_solve import solve
from obc_native.torch import (
    LayerConfig,
    Override,
    Recipe,
    RecipeError,
    ShrinkError,
    compress,
    hf_attention_heads,
    hf_ffn_chains,
    shrink_attention_heads,
    shrink_structured,
)

pytestmark = pytest.mark.torch

HIDDEN, HEADS, HEAD_SIZE = 32, 4, 8


def tiny_bert(attention="eager", **extra):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=16,
                                     attn_implementation=attention, **extra)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def token_batches(count=2, batch=4, seq=8):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (batch, seq), generator=generator)} for _ in range(count)]


def heads_recipe(sparsity=0.5, method="obc", ffn=True):
    """FFN output.dense channel by channel (first), attention output.dense by heads (matches both: last wins)."""
    overrides = [Override("*.output.dense", prune="structured", sparsity=sparsity, method=method)] if ffn else []
    overrides.append(Override("*.attention.output.dense", prune="structured", sparsity=sparsity, method=method,
                              structured_group=HEAD_SIZE))
    return Recipe(default=None, overrides=overrides)


def last_hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def head_zero_counts(linear: nn.Linear) -> list[int]:
    return (linear.weight == 0).all(dim=0).view(-1, HEAD_SIZE).sum(dim=1).tolist()


# --- structured_group in the recipe and the solve ------------------------------------------------

@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_structured_group_zeroes_whole_groups(method):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 32)).astype(np.float32)
    X = rng.standard_normal((32, 64))
    H = 2 * X @ X.T / 64
    config = CoreLayerConfig(prune="structured", sparsity=0.5, structured_group=8, method=method)
    zero = (solve(config, W, H).weight == 0).all(axis=0).reshape(4, 8)
    assert zero.all(axis=1).sum() == 2 and (zero.all(axis=1) == zero.any(axis=1)).all()
    assert config.label == "structured 50% by 8"


def test_structured_group_conv_removes_channel_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    compress(model, data, Recipe(default=None, overrides=[
        Override("2", prune="structured", sparsity=0.5, structured_group=2)]), quiet=True)
    zero = (model[2].weight == 0).flatten(2).all(dim=2).all(dim=0).view(4, 2)  # channel pairs
    assert zero.all(dim=1).sum() == 2 and bool((zero.all(dim=1) == zero.any(dim=1)).all())


def test_structured_group_field_and_layer_checks():
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(RecipeError, match="structured_group must be an integer >= 1"):
            Override("x", structured_group=bad)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2))
    recipe = Recipe(default=None, overrides=[Override("2", prune="structured", sparsity=0.5, structured_group=5)])
    with pytest.raises(RecipeError, match=r"layer '2'.*structured_group=5 needs columns \(12\) divisible"):
        compress(model, [torch.randn(8, 4)], recipe, quiet=True)
    assert LayerConfig().structured_group == 1


# --- shrink_attention_heads -----------------------------------------------------------------------

def test_hf_attention_heads_lists_attention_blocks():
    model = tiny_bert()
    assert hf_attention_heads(model) == [
        (f"encoder.layer.{i}.attention.self", f"encoder.layer.{i}.attention.output.dense") for i in (0, 1)
    ]
    assert hf_attention_heads(nn.Sequential(nn.Linear(2, 2))) == []


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bert_heads_and_ffn_shrunk_equal_masked(attention):
    model = tiny_bert(attention)
    batches = token_batches()
    compress(model, batches, heads_recipe(), quiet=True)
    for i in (0, 1):
        assert sorted(head_zero_counts(model.encoder.layer[i].attention.output.dense)) == [0, 0, 8, 8]
    masked = copy.deepcopy(model)
    heads = shrink_attention_heads(model)
    ffn = shrink_structured(model, hf_ffn_chains(model))
    assert [(a.heads, a.kept, a.head_size) for a in heads.attentions] == [(4, 2, 8)] * 2
    assert [c.kept for c in ffn.chains] == [32, 32]
    layer = model.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.all_head_size == 16
    for name in ("query", "key", "value"):
        projection = getattr(layer.attention.self, name)
        assert projection.weight.shape == (16, HIDDEN) and projection.bias.shape == (16,)
        assert projection.out_features == 16
    assert layer.attention.output.dense.weight.shape == (HIDDEN, 16)
    assert model.config.num_attention_heads == HEADS  # the shared config is not touched
    assert heads.parameters_after == heads.parameters_before - 2 * 2 * (3 * (HIDDEN * 8 + 8) + HIDDEN * 8)
    batch = {**token_batches(1, batch=3, seq=7)[0], "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2,
                                                                                    [1] * 3 + [0] * 4])}
    torch.testing.assert_close(last_hidden(model, batch), last_hidden(masked, batch), rtol=1e-5, atol=1e-5)


def test_kept_heads_are_the_nonzero_ones_and_all_zero_keeps_one():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, 8:24] = 0  # heads 1 and 2
        model.encoder.layer[1].attention.output.dense.weight[:] = 0  # every head
    expected_value = model.encoder.layer[0].attention.self.value.weight[[*range(8), *range(24, 32)]].clone()
    masked = copy.deepcopy(model)
    report = shrink_attention_heads(model)
    assert [a.kept for a in report.attentions] == [2, 1]
    assert torch.equal(model.encoder.layer[0].attention.self.value.weight, expected_value)
    batch = token_batches(1)[0]
    torch.testing.assert_close(last_hidden(model, batch), last_hidden(masked, batch), rtol=1e-5, atol=1e-5)


def test_nothing_zero_changes_nothing():
    model = tiny_bert()
    before = copy.deepcopy(model)
    report = shrink_attention_heads(model)
    assert [a.removed for a in report.attentions] == [0, 0]
    assert report.parameters_after == report.parameters_before
    for a, b in zip(model.state_dict().values(), before.state_dict().values()):
        assert torch.equal(a, b)
    assert "parameters:" in report.table() and report.to_dict()["attentions"][0]["removed"] == 0


def test_partly_zero_head_is_an_error_naming_the_layer():
    model = tiny_bert()
    # channel-by-channel structured pruning of the attention projection: heads partly zero
    compress(model, token_batches(), Recipe(default=None, overrides=[
        Override("*.attention.output.dense", prune="structured", sparsity=0.3)]), quiet=True)
    before = copy.deepcopy(model)
    with pytest.raises(ShrinkError, match=r"output projection 'encoder.layer.0.attention.output.dense': head \d "
                                          r"has \d of its 8 input columns zero.*structured_group=8"):
        shrink_attention_heads(model)
    for a, b in zip(model.state_dict().values(), before.state_dict().values()):
        assert torch.equal(a, b)  # nothing changed, not even the first layer's heads


def test_attention_that_cannot_be_shrunk():
    model = tiny_bert()
    name = "encoder.layer.0.attention"
    with pytest.raises(ShrinkError, match=r"attentions\[0\]: the model has no module 'nope'"):
        shrink_attention_heads(model, [("nope", f"{name}.output.dense")])
    with pytest.raises(ShrinkError, match=rf"attention '{name}.output.dense' \(Linear\) cannot be shrunk.*"
                                          r"no Linear \['query', 'key', 'value'\]"):
        shrink_attention_heads(model, [(f"{name}.output.dense", f"{name}.output.dense")])
    with pytest.raises(ShrinkError, match=r"output projection 'encoder.layer.0.output.dense' has 64 inputs"):
        shrink_attention_heads(model, [(f"{name}.self", "encoder.layer.0.output.dense")])
    with pytest.raises(ShrinkError, match=r"output projection .* is a LayerNorm"):
        shrink_attention_heads(model, [(f"{name}.self", f"{name}.output.LayerNorm")])
    with pytest.raises(ShrinkError, match=r"in more than one pair"):
        shrink_attention_heads(model, [(f"{name}.self", f"{name}.output.dense")] * 2)
    with pytest.raises(ShrinkError, match=r"attentions\[0\]: expected \(attention module, output projection\)"):
        shrink_attention_heads(model, [(f"{name}.self",)])
    model.encoder.layer[0].attention.self.num_key_value_groups = 2
    with pytest.raises(ShrinkError, match=rf"attention '{name}.self' shares key/value heads"):
        shrink_attention_heads(model)
    del model.encoder.layer[0].attention.self.num_key_value_groups
    model.encoder.layer[0].attention.self.attention_head_size = 16
    with pytest.raises(ShrinkError, match=rf"attention '{name}.self': 4 heads x 16 = 64 features"):
        shrink_attention_heads(model)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        shrink_attention_heads({"a": model})
    mha = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "out": nn.Linear(8, 8)})
    with pytest.raises(ShrinkError, match="'attn' \\(MultiheadAttention\\) cannot be shrunk"):
        shrink_attention_heads(mha, [("attn", "out")])


def test_tied_projection_is_skipped():
    model = tiny_bert()
    self_attention = model.encoder.layer[1].attention.self
    self_attention.key.weight = self_attention.query.weight
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight[:, :8] = 0
    report = shrink_attention_heads(model)
    assert [a.attention for a in report.attentions] == ["encoder.layer.0.attention.self"]
    assert "tied weights" in report.skipped["encoder.layer.1.attention.self"]
    assert self_attention.num_attention_heads == HEADS


def test_shrunk_bert_exports_to_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_bert()
    compress(model, token_batches(), heads_recipe(method="magnitude"), quiet=True)
    shrink_attention_heads(model)
    shrink_structured(model, hf_ffn_chains(model))

    class Hidden(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    ids = token_batches(1)[0]["input_ids"]
    path = str(tmp_path / "bert.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(Hidden(model).eval(), (ids,), path, dynamo=False, input_names=["ids"], opset_version=17)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"ids": ids.numpy()})[0], last_hidden(model, {"input_ids": ids}),
                               rtol=1e-4, atol=1e-4)
