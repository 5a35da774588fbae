"""Padded token batches: the padding positions (attention_mask 0) count in no calibration statistic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from obc_native.torch import LayerConfig, collect_hessians, compress, quantize_activations
from obc_native.torch.calibration import as_token_mask, batch_token_mask, run_calibration
from obc_native.torch.hessian import CalibrationError, LayerHooks
from obc_native.torch.layers import find_layers, masked_tokens
from obc_native.torch.stitching import _Stitcher

transformers = pytest.importorskip("transformers")

PAD_TO = 24
LENGTHS = [3, 9, 5, 12, 4, 7, 11, 6]


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=PAD_TO,
    )
    return transformers.BertModel(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=PAD_TO)
    return transformers.GPT2Model(config).eval()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=PAD_TO,
    )
    return transformers.LlamaModel(config).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def sentences():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, 60, (length,), generator=generator) for length in LENGTHS]


def padded_batches(per_batch: int = 3, mask_dtype=torch.long):
    """Right-padded batches (pad id 0) of the sentences, with their attention masks."""
    texts = sentences()
    batches = []
    for start in range(0, len(texts), per_batch):
        group = texts[start : start + per_batch]
        ids = torch.zeros(len(group), PAD_TO, dtype=torch.long)
        mask = torch.zeros(len(group), PAD_TO, dtype=mask_dtype)
        for row, text in enumerate(group):
            ids[row, : len(text)] = text
            mask[row, : len(text)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def one_by_one():
    """Each sentence alone, unpadded: the reference statistics."""
    return [
        {"input_ids": text[None], "attention_mask": torch.ones(1, len(text), dtype=torch.long)} for text in sentences()
    ]


def assert_close(value, reference):
    """Equal to float32 activation rounding (the padded run sums attention over more, masked, keys)."""
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())


def close(value, reference) -> bool:
    try:
        assert_close(value, reference)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("kind", list(MODELS))
def test_padded_batches_give_the_hessians_of_the_unpadded_sentences(kind):
    model = MODELS[kind]()
    reference = collect_hessians(model, one_by_one())
    masked = collect_hessians(model, padded_batches())
    whole = collect_hessians(model, padded_batches(), token_mask=None)  # the behaviour before masking
    for name, ref in reference.items():
        if name == "pooler.dense":  # BERT's pooler reads the (B, C) first tokens: not masked, all real
            assert ref.n == masked[name].n == whole[name].n == len(LENGTHS)
            assert_close(masked[name].hessians()[0], ref.hessians()[0])
            continue
        assert ref.n == sum(LENGTHS)
        assert masked[name].n == sum(LENGTHS), name
        assert_close(masked[name].hessians()[0], ref.hessians()[0])
        assert_close(masked[name].input_mean(), ref.input_mean())
        # the padding positions would count: more samples, another Hessian
        assert whole[name].n == len(LENGTHS) * PAD_TO
        assert not close(whole[name].hessians()[0], ref.hessians()[0]), name


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
def test_any_mask_dtype_of_zeros_and_ones(mask_dtype):
    model = tiny_bert()
    expected = collect_hessians(model, padded_batches())
    got = collect_hessians(model, padded_batches(mask_dtype=mask_dtype))
    for name in expected:
        assert got[name].n == expected[name].n
        assert np.array_equal(got[name].hessians()[0], expected[name].hessians()[0])


def test_output_means_leave_out_the_padding():
    model = tiny_gpt2()
    infos = find_layers(model)

    def means(batches, token_mask="auto"):
        with LayerHooks(infos, hessians=False, output_means=True) as hooks:
            run_calibration(model, batches, hooks, token_mask=token_mask)
        return {name: (acc.n, acc.mean()) for name, acc in hooks.outputs.items()}

    reference, masked, whole = means(one_by_one()), means(padded_batches()), means(padded_batches(), None)
    for name, (count, mean) in reference.items():
        assert masked[name][0] == count == sum(LENGTHS)
        assert_close(masked[name][1], mean)
        assert whole[name][0] == len(LENGTHS) * PAD_TO and not close(whole[name][1], mean)


def test_the_report_counts_real_tokens_in_every_mode():
    samples = {}
    for mode in ("dense", "sequential", "cached"):
        model = tiny_bert()
        report = compress(
            model, padded_batches(), LayerConfig(bits=4), sequential=mode != "dense", cache_outputs=mode == "cached",
            quiet=True,
        )
        samples[mode] = {row.name: row.samples for row in report.compressed}
    for mode, rows in samples.items():
        assert rows.pop("pooler.dense") == len(LENGTHS)  # (B, C) first tokens
        assert set(rows.values()) == {sum(LENGTHS)}, mode


def test_sequential_with_the_output_cache_is_bit_identical_on_padded_batches():
    models = [tiny_bert(), tiny_bert()]
    reports = [
        compress(model, padded_batches(), LayerConfig(bits=4), sequential=True, cache_outputs=cached, quiet=True)
        for model, cached in zip(models, (False, True))
    ]
    for (name, tensor), other in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(tensor, other), name
    assert [row.loss for row in reports[0].layers] == [row.loss for row in reports[1].layers]


def test_compressing_on_padded_batches_matches_the_unpadded_sentences():
    """The solves see the unpadded Hessians (to rounding): equal losses, on the real data."""
    config = LayerConfig(prune="unstructured", sparsity=0.5)
    reference = compress(tiny_gpt2(), one_by_one(), config, correction=None, quiet=True)
    masked = compress(tiny_gpt2(), padded_batches(), config, correction=None, quiet=True)
    whole = compress(tiny_gpt2(), padded_batches(), config, correction=None, quiet=True, token_mask=None)
    losses = {row.name: row.loss for row in reference.compressed}
    assert_close([row.loss for row in masked.compressed], list(losses.values()))
    assert not close([row.loss for row in whole.compressed], list(losses.values()))


def test_activation_ranges_ignore_the_padding():
    def ranges(batches, token_mask="auto"):
        wrappers = quantize_activations(tiny_bert(), batches, token_mask=token_mask)
        return {name: float(w.scale) for name, w in wrappers.items()}

    reference, masked, whole = ranges(one_by_one()), ranges(padded_batches()), ranges(padded_batches(), None)
    assert_close(list(masked.values()), list(reference.values()))
    assert not close(list(whole.values()), list(reference.values()))


def test_junk_padding_does_not_set_the_scale():
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    junk = x.masked_fill(~mask.bool()[..., None], 1e3)
    scales = {}
    for token_mask in ("auto", None):
        model = FlatAndTokens()
        batches = [{"x": junk, "attention_mask": mask}]
        wrappers = quantize_activations(model, batches, include=["tokens"], token_mask=token_mask)
        scales[token_mask] = float(wrappers["tokens"].scale)
    real = x[mask.bool()]
    expected = (max(float(real.max()), 0.0) - min(float(real.min()), 0.0)) / 255
    assert scales["auto"] == pytest.approx(expected, rel=1e-6)
    assert scales[None] > 1e3 / 255


def test_stitched_squared_error_leaves_out_the_padding():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=1, n_head=2, n_positions=PAD_TO)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = padded_batches()
    stitcher = _Stitcher(model, batches, torch.device("cpu"), None, None)
    assert [ref.shape[0] for ref in stitcher.reference] == [int(b["attention_mask"].sum()) for b in batches]
    whole = _Stitcher(model, batches, torch.device("cpu"), None, None, None)
    assert [ref.shape[:2] for ref in whole.reference] == [b["input_ids"].shape for b in batches]


class FlatAndTokens(nn.Module):
    """``tokens`` reads (B, T, C); ``flat`` the same values flattened to (B*T, C), and ``conv`` a
    (B, C, T) layout: only the (B, T, C) input is masked."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Linear(4, 4)
        self.flat = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x, attention_mask):
        return self.tokens(x).sum() + self.flat(x.reshape(-1, 4)).sum() + self.conv(x.transpose(1, 2)).sum()


def test_inputs_of_other_shapes_are_taken_whole():
    model = FlatAndTokens()
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    stats = collect_hessians(model, [{"x": x, "attention_mask": mask}])
    assert stats["tokens"].n == 5
    assert stats["flat"].n == 8 and stats["conv"].n == 8
    real = x[mask.bool()].double()
    np.testing.assert_allclose(stats["tokens"].hessians()[0], 2 / 5 * (real.T @ real).numpy(), rtol=1e-12)


def test_masked_tokens_selects_rows_of_matching_leading_dimensions():
    mask = torch.tensor([[True, False, True]])
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(masked_tokens(x, mask), x[0, [0, 2]])
    flat = x.reshape(3, 4)
    assert masked_tokens(flat, mask) is flat  # (B*T, C): not (B, T, ...), taken whole
    assert masked_tokens(x.reshape(1, 3, 2, 2), mask).shape == (2, 2, 2)
    assert masked_tokens(x, None) is x


def test_mask_options():
    model = tiny_gpt2()
    reference = collect_hessians(model, padded_batches())
    tuples = [(b["input_ids"], b["attention_mask"]) for b in padded_batches()]
    renamed = [{"input_ids": b["input_ids"], "pad": b["attention_mask"]} for b in padded_batches()]

    def forward(model, batch):
        ids = batch[0] if isinstance(batch, tuple) else batch["input_ids"]
        return model(input_ids=ids)

    by_callable = collect_hessians(model, tuples, forward=forward, token_mask=lambda batch: batch[1])
    by_key = collect_hessians(model, renamed, forward=forward, token_mask="pad")
    for name, ref in reference.items():
        # GPT-2's causal attention: the real tokens do not see the padding after them
        assert by_callable[name].n == by_key[name].n == ref.n
        assert_close(by_callable[name].hessians()[0], ref.hessians()[0])
        assert_close(by_key[name].hessians()[0], ref.hessians()[0])
    assert as_token_mask(False) is None and as_token_mask(None) is None
    with pytest.raises(TypeError, match="token_mask"):
        collect_hessians(model, padded_batches(), token_mask=1)
    with pytest.raises(TypeError, match="token_mask"):
        compress(model, padded_batches(), LayerConfig(bits=4), token_mask=torch.ones(2, 2), quiet=True)
    with pytest.raises(ValueError, match="token_mask"):
        as_token_mask("")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {"attention_mask": b["attention_mask"][:, :-1]}, r"shape \(3, 23\), and 'input_ids' \(3, 24\)"),
        (lambda b: {"attention_mask": b["attention_mask"] * 2}, "only 0 and 1"),
        (lambda b: {"attention_mask": b["attention_mask"] - 0.5}, "only 0 and 1"),
        (lambda b: {"attention_mask": torch.zeros_like(b["attention_mask"])}, "masks every token"),
        (lambda b: {"attention_mask": b["attention_mask"][:, None, None, :]}, r"\(batch, tokens\)"),
        (lambda b: {"attention_mask": b["attention_mask"].tolist()}, "must be a tensor"),
    ],
)
def test_bad_masks_name_the_batch(change, message):
    model = tiny_bert()
    batches = padded_batches()
    batches[1] = {**batches[1], **change(batches[1])}
    with pytest.raises(CalibrationError, match=f"calibration batch 1: .*{message}"):
        collect_hessians(model, batches)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="calibration batch 1"):
        compress(model, batches, LayerConfig(bits=4), quiet=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_inputs_embeds_and_a_none_mask():
    model = tiny_bert()
    reference = collect_hessians(model, padded_batches())
    embed = model.embeddings.word_embeddings
    embedded = [
        {"inputs_embeds": embed(b["input_ids"]).detach(), "attention_mask": b["attention_mask"]} for b in padded_batches()
    ]
    stats = collect_hessians(model, embedded)
    assert stats["encoder.layer.0.attention.self.query"].n == reference["encoder.layer.0.attention.self.query"].n
    embedded[2] = {**embedded[2], "attention_mask": embedded[2]["attention_mask"][:, :-2]}
    with pytest.raises(CalibrationError, match=r"calibration batch 2: .*shape \(2, 22\), and 'inputs_embeds'"):
        collect_hessians(model, embedded)
    unmasked = [{**b, "attention_mask": None} for b in padded_batches()]  # "auto": a None mask is no mask
    assert collect_hessians(model, unmasked)["encoder.layer.0.output.dense"].n == len(LENGTHS) * PAD_TO


def test_a_missing_key_names_the_batch():
    batches = [{"input_ids": b["input_ids"]} for b in padded_batches()]
    model = tiny_bert()
    assert collect_hessians(model, batches)["pooler.dense"].n == len(LENGTHS)  # "auto": no mask, all positions
    with pytest.raises(CalibrationError, match=r"calibration batch 0: token_mask='pad' names a key"):
        collect_hessians(model, batches, token_mask="pad")
    with pytest.raises(CalibrationError, match="calibration batch 0: token_mask='pad'"):
        batch_token_mask(torch.zeros(2, 3), "pad", 0)


def test_a_checkpoint_from_before_token_mask_resumes_only_unmasked(tmp_path, monkeypatch):
    """run.json format 1 (written before the token_mask option, every token counted) fingerprinted
    no mask, and the default "auto" added nothing: it was resumed under the default, solving the
    layers still to do on masked Hessians after unmasked ones. Now only token_mask=None resumes it."""
    import json

    import importlib

    checkpoint_module = importlib.import_module("obc_native.torch.checkpoint")
    compress_module = importlib.import_module("obc_native.torch.compress")

    def compress_tiny(**options):
        return compress(tiny_gpt2(), padded_batches(), LayerConfig(bits=4), checkpoint=tmp_path, quiet=True, **options)

    with monkeypatch.context() as old_version:  # as the version before token_mask wrote it
        old_version.setattr(compress_module, "_token_mask_description", lambda token_mask: {})
        old_version.setattr(checkpoint_module, "_FORMAT", 1)
        first = compress_tiny(token_mask=None)
    assert json.loads((tmp_path / "run.json").read_text())["format"] == 1
    for options in ({}, {"token_mask": "auto"}, {"token_mask": "attention_mask"}):
        with pytest.raises(ValueError, match=r"was written before the token_mask option existed, when every token of "
                                             r"a padded batch counted; this run's token_mask \((the default|"
                                             r"'attention_mask')\) could give the layers still to do other Hessians. "
                                             r"Resume it with token_mask=None"):
            compress_tiny(**options)
    resumed = compress_tiny(token_mask=None)
    assert [(r.name, r.loss, r.samples) for r in resumed.compressed] == [
        (r.name, r.loss, r.samples) for r in first.compressed]
    with pytest.raises(ValueError, match="holds layers of another run"):  # another recipe: as before
        compress(tiny_gpt2(), padded_batches(), LayerConfig(bits=8), token_mask=None, checkpoint=tmp_path, quiet=True)
    # a checkpoint written now records the default too
    compress(tiny_gpt2(), padded_batches(), LayerConfig(bits=4), checkpoint=tmp_path / "new", quiet=True)
    assert json.loads((tmp_path / "new" / "run.json").read_text())["format"] == 2


def test_a_checkpoint_belongs_to_its_token_mask(tmp_path):
    """Another mask gives other Hessians: a checkpoint of one is not resumed by the other."""
    compress(tiny_gpt2(), padded_batches(), LayerConfig(bits=4), token_mask=None, checkpoint=tmp_path, quiet=True)
    with pytest.raises(ValueError, match="holds layers of another run"):
        compress(tiny_gpt2(), padded_batches(), LayerConfig(bits=4), checkpoint=tmp_path, quiet=True)
    resumed = compress(
        tiny_gpt2(), padded_batches(), LayerConfig(bits=4), token_mask=False, checkpoint=tmp_path, quiet=True
    )
    assert {row.samples for row in resumed.compressed} == {len(LENGTHS) * PAD_TO}
