"""Sequential calibration with cached outputs of finished modules (compress(cache_outputs=True)):
the same bits as without, less forward work, off by default."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from obc_torch_helpers import MLP, TinyCNN
from torch import nn

from obc_native.torch import LayerConfig, compress
from obc_native.torch.hessian import CalibrationError

pytestmark = pytest.mark.torch

output_cache = importlib.import_module("obc_native.torch.output_cache")

CONFIG = LayerConfig(prune="unstructured", sparsity=0.5)


def _report_dict(report) -> dict:
    """The report without its timings (and without what differs only by timing)."""
    data = report.to_dict()
    for key in [k for k in data if k.endswith("seconds") or k == "seconds"]:
        data.pop(key)
    for row in data.get("layers", []):
        row.pop("seconds", None)
    return data


def _same_results(model: nn.Module, batches, config=CONFIG, **options) -> tuple[nn.Module, object]:
    """Compress two copies, with and without the cache; assert equal weights and reports."""
    plain, cached = copy.deepcopy(model), copy.deepcopy(model)
    expected = compress(plain, batches, config, sequential=True, quiet=True, **options)
    caches = []
    original_init = output_cache.OutputCache.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        caches.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(output_cache.OutputCache, "__init__", init)
        report = compress(cached, batches, config, sequential=True, cache_outputs=True, quiet=True, **options)
    assert len(caches) == 1
    report.cache_lookups = caches[0].lookups  # for the tests below
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(a, b), name
    assert _report_dict(report) == _report_dict(expected)
    return cached, report


class Counted(nn.Module):
    """A wrapper counting its forward calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.inner(x)


def test_mlp_bits_and_skipped_compute(mlp_batches):
    torch.manual_seed(0)
    model = MLP(sizes=(16, 32, 32, 32, 8))
    for i, layer in enumerate(model.layers):
        model.layers[i] = Counted(layer)
    _same_results(model, mlp_batches)
    # cached run alone: the first block runs in the recording pass and the pass of layers 0 and
    # 1 (recording its output), and is looked up in the passes of layers 2 and 3
    cached = copy.deepcopy(model)
    compress(cached, mlp_batches, CONFIG, sequential=True, cache_outputs=True, quiet=True, correction=None)
    first = cached.layers[0]
    assert first.forwards == 3 * len(mlp_batches)
    plain = copy.deepcopy(model)
    compress(plain, mlp_batches, CONFIG, sequential=True, quiet=True, correction=None)
    assert plain.layers[0].forwards == 5 * len(mlp_batches)  # the recording pass + 4 passes


def test_cnn_with_batchnorm(cnn_batches):
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    for correction in ("auto", "bias"):
        _, report = _same_results(model, cnn_batches, correction=correction)
        assert report.cache_lookups > 0


class TwiceCalled(nn.Module):
    """``block`` is called twice per batch: it is never cached (its second input differs)."""

    def __init__(self):
        super().__init__()
        self.block = Counted(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.block(x)))


def test_module_called_twice_is_not_cached():
    torch.manual_seed(0)
    model = TwiceCalled()
    batches = [torch.randn(16, 8) for _ in range(3)]
    _same_results(model, batches)
    # the block is not cached, so each of the passes runs it: compare against the plain run
    plain = copy.deepcopy(model)
    plain.block.forwards = 0
    compress(plain, batches, CONFIG, sequential=True, quiet=True)
    again = copy.deepcopy(model)
    again.block.forwards = 0
    compress(again, batches, CONFIG, sequential=True, cache_outputs=True, quiet=True)
    assert again.block.forwards == plain.block.forwards


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_tiny_bert_bits_and_lookups():
    model = _tiny_bert()
    generator = torch.Generator().manual_seed(3)
    batches = [
        {
            "input_ids": torch.randint(0, 50, (4, 8), generator=generator),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
        }
        for _ in range(2)
    ]
    config = LayerConfig(bits=4, quant_method="gptq", refine=False)
    _, report = _same_results(model, batches, config)
    assert report.cache_lookups > 0
    cached = copy.deepcopy(model)
    words = []  # computations of the embeddings (a lookup of them does not call their children)
    cached.embeddings.word_embeddings.register_forward_hook(lambda *args: words.append(1))
    intermediate = []
    # (hooks on a looked-up module still fire: count its child's computations)
    cached.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *args: intermediate.append(1))
    report = compress(cached, batches, config, sequential=True, cache_outputs=True, quiet=True)
    assert report.passes == 1 + 2 * 4  # recording pass + per block: q/k/v, attention output, intermediate, output
    # embeddings: computed in the recording pass and recorded in the first group's pass
    assert len(words) == 2 * len(batches)
    # layer 0's intermediate: computed in the recording pass and in the output layer's pass
    # (final there: recorded; the intermediate layer's own pass stops before its forward hooks),
    # then looked up (also in the pass recording the whole block's outputs)
    assert len(intermediate) == 2 * len(batches)


def test_shuffled_batches_are_refused():
    torch.manual_seed(0)
    model = MLP()
    batches = [torch.randn(8, 16) for _ in range(3)]

    class Shuffling:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            order = batches if self.passes == 1 else batches[::-1]
            return iter(order)

        def __len__(self):
            return len(batches)

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="same batches in the same order"):
        compress(model, Shuffling(), CONFIG, sequential=True, cache_outputs=True, quiet=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # restored


def test_default_off_and_bad_arguments(mlp, mlp_batches):
    import inspect

    assert inspect.signature(compress).parameters["cache_outputs"].default is False
    with pytest.raises(ValueError, match="cache_outputs.*sequential=True"):
        compress(copy.deepcopy(mlp), mlp_batches, CONFIG, cache_outputs=True, quiet=True)
    with pytest.raises(TypeError, match="cache_outputs: expected a bool"):
        compress(copy.deepcopy(mlp), mlp_batches, CONFIG, sequential=True, cache_outputs="yes", quiet=True)


def test_clone_of_outputs():
    nested = {"a": (torch.ones(2), [torch.zeros(1), 3]), "b": None}
    copied = output_cache._clone(nested)
    assert torch.equal(copied["a"][0], nested["a"][0]) and copied["a"][0] is not nested["a"][0]
    assert copied["a"][1][1] == 3
    with pytest.raises(output_cache._Unclonable):
        output_cache._clone(object())


def test_tiny_gpt2_bits():
    """HF Conv1D layers, blocks returning tuples, a key/value cache object passed along."""
    from obc_torch_helpers import tiny_gpt2

    model = tiny_gpt2(layers=2)
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 64, (4, 8), generator=generator) for _ in range(2)]
    _, report = _same_results(model, batches)
    assert report.cache_lookups > 0


class Boxed:
    """An output type the cache cannot copy."""

    def __init__(self, tensor):
        self.tensor = tensor


class BoxingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        return Boxed(torch.tanh(self.layer(x)))


def test_unclonable_output_is_computed():
    """A module returning an object the cache cannot copy is computed in every pass (its inner
    modules, which return tensors, are cached instead)."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = BoxingBlock()
            self.heads = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))

        def forward(self, x):
            return self.heads(self.block(x).tensor)

    model = Model()
    batches = [torch.randn(16, 8) for _ in range(2)]
    _, report = _same_results(model, batches)
    # block: refused in heads.0's pass; block.layer and heads.0 recorded in heads.1's pass,
    # looked up in heads.2's
    assert report.cache_lookups == 2 * len(batches)
