"""Embedding quantization (recipe "embeddings"): compress, save/load, ONNX export, --hf, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from obc_native.torch import (
    EmbeddingRule,
    ExportError,
    LayerConfig,
    Recipe,
    RecipeError,
    SerializationError,
    compress,
    export_onnx,
    load_compressed,
    load_recipe,
    read_manifest,
    save_compressed,
)
from obc_native.torch.embeddings import describe_embedding
from obc_native.torch.serialize import _quantize_exact

nn = torch.nn


class Tagger(nn.Module):
    """Token embeddings (with a padding row) -> Linear, called with integer ids."""

    def __init__(self, vocab: int = 96, dim: int = 64, **embedding_options):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0, **embedding_options)
        self.fc = nn.Linear(dim, 24)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def tagger(seed: int = 0, **options) -> Tagger:
    torch.manual_seed(seed)
    return Tagger(**options).eval()


def id_batches(high: int = 48, seed: int = 1, count: int = 3) -> list[torch.Tensor]:
    """Calibration ids below ``high``: rows ``high..vocab-1`` are never seen."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (4, 12), generator=generator) for _ in range(count)]


def embedding_recipe(**rule) -> Recipe:
    options = {"bits": 4, "sym": False, "group_size": 32, **rule}
    return Recipe(default=LayerConfig(bits=4, method="rtn"), embeddings=[EmbeddingRule("emb", **options)])


def onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- recipe


def test_recipe_embeddings_round_trip_and_are_opt_in(tmp_path):
    data = {"default": {"bits": 4}, "embeddings": [{"pattern": "*.wte", "bits": 3, "sym": False, "group_size": 16}]}
    recipe = Recipe.from_dict(data)
    assert recipe.embeddings == [EmbeddingRule("*.wte", bits=3, sym=False, group_size=16)]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    (tmp_path / "r.yaml").write_text("default: {bits: 4}\nembeddings:\n  - {pattern: emb, bits: 8}\n")
    assert load_recipe(tmp_path / "r.yaml").embeddings == [EmbeddingRule("emb", bits=8)]
    # recipes without embeddings keep their dict and repr (a checkpoint's fingerprint)
    plain = Recipe(default=LayerConfig(bits=4))
    assert "embeddings" not in plain.to_dict() and "embeddings" not in repr(plain)

    # a default (and a "*" override) never reaches an embedding: only the embeddings list does
    model = tagger()
    before = model.emb.weight.detach().clone()
    report = compress(model, id_batches(), Recipe(default=LayerConfig(bits=4, method="rtn")), quiet=True)
    assert torch.equal(model.emb.weight, before)
    assert [layer.name for layer in report.layers] == ["fc"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"pattern": "emb", "bits": 9}, "bits must be None or an integer in 2..8"),
        ({"pattern": "emb", "bits": 1}, "bits must be"),
        ({"pattern": "emb", "bits": None}, "bits must be an integer in 2..8, got None"),
        ({"pattern": "emb", "bits": True}, "bits must be"),
        ({"pattern": "emb", "group_size": 0}, "group_size must be"),
        ({"pattern": "emb", "grid": "l1"}, "grid must be one of"),
        ({"pattern": "emb", "prune": "nm"}, "unknown field(s) ['prune']"),
        ({"bits": 4}, "with a 'pattern'"),
        ({"pattern": "", "bits": 4}, "non-empty string"),
    ],
)
def test_bad_embedding_entries(entry, message):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({"embeddings": [entry]})
    assert message in str(err.value)


def test_embeddings_must_be_a_list():
    with pytest.raises(RecipeError, match="'embeddings' must be a list"):
        Recipe.from_dict({"embeddings": {"pattern": "emb"}})


# ----------------------------------------------------------------------------- compress


def test_rows_on_their_grid_independent_of_calibration():
    """Per-row round-to-nearest: every row on its own grid, rows never seen included; the table
    does not depend on which tokens the calibration saw (the Hessian of a row is count * I)."""
    model = tagger()
    dense = model.emb.weight.detach().clone()
    report = compress(model, id_batches(high=48), embedding_recipe(grid="minmax"), quiet=True)
    row = report.layer("emb")
    assert (row.kind, row.mode, row.method, row.bits) == ("embedding", "int4 asym g32", "rtn", 4)
    assert report.layers[0].name == "emb"  # quantized first: fc calibrates on the quantized table
    grid = row.grid
    assert grid.scale.shape == (96, 2) and grid.zero.shape == (96, 2) and grid.group_size == 32
    table = model.emb.weight.detach().numpy()
    codes = _quantize_exact(describe_embedding("emb", model.emb), table, grid)
    assert codes is not None and codes.max() <= 15
    # minmax grid: round to nearest, so no entry moves by more than half its group's step
    step = np.repeat(grid.scale, 32, axis=1)
    assert np.all(np.abs(table - dense.numpy()) <= step / 2 + 1e-6)
    assert torch.equal(model.emb.weight[0], torch.zeros(64))  # the zero padding row stays exactly zero
    unseen = slice(48, 96)
    assert np.all(grid.scale[unseen] > 0)  # a real grid for rows never looked up
    assert row.quant_loss == pytest.approx(0.5 * float(((table - dense.numpy()) ** 2).sum()), rel=1e-5)

    other = tagger()
    compress(other, id_batches(high=8, seed=7), embedding_recipe(grid="minmax"), quiet=True)
    assert torch.equal(other.emb.weight, model.emb.weight)


def test_same_table_for_any_thread_count():
    tables = []
    for threads in (1, 2, 3):
        model = tagger()
        compress(model, id_batches(), embedding_recipe(group_size=None), quiet=True, num_threads=threads)
        tables.append(model.emb.weight.detach().clone())
    assert all(torch.equal(tables[0], table) for table in tables[1:])


@pytest.mark.parametrize("sequential", [False, True])
def test_later_layers_calibrate_on_the_quantized_table(sequential):
    with_embedding, without = tagger(), tagger()
    recipe = embedding_recipe()
    recipe.default = LayerConfig(bits=4)  # Hessian-aware: the fc result depends on its calibration inputs
    compress(with_embedding, id_batches(), recipe, quiet=True, correction=None, sequential=sequential)
    with torch.no_grad():
        without.emb.weight.copy_(with_embedding.emb.weight)  # the same quantized table, given as dense
    compress(without, id_batches(), Recipe(default=LayerConfig(bits=4)), quiet=True, correction=None,
             sequential=sequential)
    assert torch.equal(with_embedding.fc.weight, without.fc.weight)
    dense = tagger()
    compress(dense, id_batches(), Recipe(default=LayerConfig(bits=4)), quiet=True, correction=None)
    assert not torch.equal(dense.fc.weight, with_embedding.fc.weight)  # so the comparison above can fail


def test_only_embeddings():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 32)

        def forward(self, ids):
            return self.emb(ids)

    torch.manual_seed(0)
    model = Lookup()
    report = compress(model, id_batches(high=40), {"embeddings": [{"pattern": "emb", "bits": 8}]}, quiet=True)
    assert [layer.name for layer in report.compressed] == ["emb"]
    assert len(torch.unique(model.emb.weight[3])) <= 256


def test_bad_embeddings_fail_before_any_work():
    model = tagger()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError) as err:
        compress(model, id_batches(), Recipe(default=LayerConfig(bits=4), embeddings=[
            EmbeddingRule("emb", group_size=24), EmbeddingRule("tok_emb")]), quiet=True)
    text = str(err.value)
    assert "group_size=24 must divide embedding_dim (64)" in text and "'tok_emb' matches no nn.Embedding" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    with pytest.raises(RecipeError, match="max_norm=1.0 renormalises"):
        compress(tagger(max_norm=1.0), id_batches(), embedding_recipe(), quiet=True)
    with pytest.raises(ValueError, match="not supported with a budget"):
        compress(tagger(), id_batches(), embedding_recipe(), budget="bits=4", quiet=True)


class TiedLM(nn.Module):
    """Input embeddings tied to the output head (one Parameter, as in GPT-2), plus positions."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(64, 32)
        self.wpe = nn.Embedding(16, 32)
        self.mix = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1])
        return self.lm_head(self.mix(self.wte(ids) + self.wpe(positions)))


def test_tied_embedding_and_head_are_refused_not_untied():
    torch.manual_seed(0)
    model = TiedLM()
    before = model.wte.weight.detach().clone()
    ids = id_batches(high=64)
    recipe = Recipe(default=LayerConfig(bits=4, method="rtn"), embeddings=[EmbeddingRule("wte", bits=4)])
    with pytest.raises(RecipeError, match=r"embedding 'wte' \(64 x 32\): its weight is shared with lm_head.weight"):
        compress(model, ids, recipe, quiet=True)
    assert model.lm_head.weight is model.wte.weight  # the tie is intact
    assert torch.equal(model.wte.weight, before)
    # the untied position embeddings of the same model are fine; the tied head stays as it was
    recipe.embeddings = [EmbeddingRule("wpe", bits=4)]
    report = compress(model, ids, recipe, quiet=True)
    assert report.layer("wpe").kind == "embedding" and "tied" in report.layer("lm_head").skipped
    assert model.lm_head.weight is model.wte.weight and torch.equal(model.wte.weight, before)


def test_failed_run_restores_the_table(monkeypatch):
    import sys

    compress_module = sys.modules["obc_native.torch.compress"]
    model = tagger()
    before = model.emb.weight.detach().clone()

    def fail(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(compress_module._Run, "compress_layers", fail)
    with pytest.raises(RuntimeError, match="solver exploded"):
        compress(model, id_batches(), embedding_recipe(), quiet=True)
    assert torch.equal(model.emb.weight, before)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = tagger()
    report = compress(model, id_batches(), embedding_recipe(bits=3), quiet=True)
    manifest = save_compressed(model, tmp_path / "m", report)
    entry = manifest["layers"]["emb"]
    assert (entry["kind"], entry["storage"], entry["bits"], entry["group_size"]) == ("embedding", "quantized", 3, 32)
    fresh = tagger(seed=3)
    load_compressed(fresh, tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # where the saved embedding is no longer an nn.Embedding
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(64, 96, bias=False)  # the same state-dict key "emb.weight", another kind
            self.fc = nn.Linear(64, 24)

    with pytest.raises(SerializationError, match="layer 'emb' is Linear, saved as 'embedding'"):
        load_compressed(Other(), tmp_path / "m")


# ----------------------------------------------------------------------------- ONNX


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """onnxruntime's uint8 packing for GatherBlockQuantized, from its spec: first value in the low bits."""
    per_byte = 8 // bits
    values = (packed[..., None] >> (np.arange(per_byte) * bits)) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def decode_gather_block_quantized(graph_model, name: str) -> np.ndarray:
    """The ``rows x cols`` float32 table a GatherBlockQuantized node of ``name`` reads, decoded by the spec."""
    from onnx import helper, numpy_helper

    node = next(n for n in graph_model.graph.node if n.name == f"{name}/GatherBlockQuantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and (attrs["gather_axis"], attrs["quantize_axis"]) == (0, 1)
    arrays = {i.name: numpy_helper.to_array(i) for i in graph_model.graph.initializer}
    bits, block = attrs["bits"], attrs["block_size"]
    scales = arrays[node.input[2]]
    rows, blocks = scales.shape
    codes = unpack_low_first(arrays[node.input[0]], bits, blocks * block)
    zeros = unpack_low_first(arrays[node.input[3]], bits, blocks)
    index = np.arange(blocks * block) // block
    return ((codes.astype(np.float32) - zeros[:, index].astype(np.float32)) * scales[:, index]).astype(np.float32)


@pytest.mark.parametrize(
    "rule, form",
    [
        ({"bits": 4, "sym": False, "group_size": 32}, "GatherBlockQuantized 4-bit block 32"),
        ({"bits": 2, "sym": True, "group_size": None}, "GatherBlockQuantized 2-bit block 64"),
        ({"bits": 3, "sym": False, "group_size": 16}, "GatherBlockQuantized 4-bit block 16"),
        ({"bits": 8, "sym": True, "group_size": 64}, "GatherBlockQuantized 8-bit block 64"),
    ],
)
def test_onnx_gather_block_quantized_exact_codes(rule, form, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = tagger()
    report = compress(model, id_batches(), embedding_recipe(**rule), quiet=True)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(5))
    exported = export_onnx(model, (ids,), tmp_path / "m.onnx", report=report)
    assert exported.layers["emb"] == form
    graph_model = onnx.load(tmp_path / "m.onnx")
    assert not any(i.name == "emb.weight" for i in graph_model.graph.initializer)  # no float copy left
    table = decode_gather_block_quantized(graph_model, "emb")
    assert np.array_equal(table.view(np.uint32), model.emb.weight.detach().numpy().view(np.uint32))
    with torch.no_grad():
        expected = model(ids).numpy()
    got = onnx_session(tmp_path / "m.onnx").run(None, {"input_0": ids.numpy()})[0]
    assert float(np.abs(got - expected).max() / np.abs(expected).max()) < 1e-3


@pytest.mark.parametrize("matmul_nbits, group_size", [(False, 32), (True, 8)])
def test_onnx_dequantize_linear_gather(matmul_nbits, group_size, tmp_path):
    """Standard ONNX (matmul_nbits=False), or a group size without a power-of-two block >= 16."""
    model = tagger()
    report = compress(model, id_batches(), embedding_recipe(group_size=group_size), quiet=True)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    exported = export_onnx(model, (ids,), tmp_path / "m.onnx", report=report, matmul_nbits=matmul_nbits)
    assert exported.layers["emb"] == f"DequantizeLinear uint4 blocked {group_size}"
    with torch.no_grad():
        expected = model.emb(ids).numpy()
    # the table the graph looks up: the embedding's output alone, bit for bit
    lookup = torch.nn.Sequential()
    lookup.emb = model.emb
    table_only = dataclasses.replace(report, layers=[report.layer("emb")])
    only = export_onnx(lookup, (ids,), tmp_path / "e.onnx", report=table_only, matmul_nbits=matmul_nbits)
    assert only.layers == {"emb": exported.layers["emb"]}
    got = onnx_session(tmp_path / "e.onnx").run(None, {"input_0": ids.numpy()})[0]
    assert np.array_equal(got, expected)


def test_onnx_from_saved_folder_and_shared_table(tmp_path):
    """The saved folder gives the same file; a table looked up twice gets two nodes, one copy."""
    onnx = pytest.importorskip("onnx")

    class TwoLookups(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)

        def forward(self, a, b):
            return self.emb(a) - 2 * self.emb(b)

    torch.manual_seed(0)
    model = TwoLookups()
    report = compress(model, [(i, i) for i in id_batches(high=64)], embedding_recipe(), quiet=True)
    save_compressed(model, tmp_path / "saved", report)
    a = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    first = export_onnx(model, (a, b), tmp_path / "a.onnx", report=report)
    second = export_onnx(model, (a, b), tmp_path / "b.onnx", report=tmp_path / "saved")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.layers == {"emb": "GatherBlockQuantized 4-bit block 32"} == second.layers
    nodes = [n.op_type for n in onnx.load(tmp_path / "a.onnx").graph.node]
    assert nodes.count("GatherBlockQuantized") == 2 and "Gather" not in nodes
    got = onnx_session(tmp_path / "a.onnx").run(None, {"input_0": a.numpy(), "input_1": b.numpy()})[0]
    with torch.no_grad():
        assert np.array_equal(got, model(a, b).numpy())


def test_onnx_table_also_read_by_an_output_layer(tmp_path):
    """An output layer reading the (untied, hand-shared) table: the exporter folds its transpose
    into a float constant of its own, which stays float and is named in the summary."""

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)

        def forward(self, ids):
            return torch.nn.functional.linear(self.emb(ids), self.emb.weight)

    torch.manual_seed(0)
    model = Scores()
    report = compress(model, id_batches(high=64), {"embeddings": [{"pattern": "emb", "bits": 4}]}, quiet=True)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    exported = export_onnx(model, (ids,), tmp_path / "m.onnx", report=report)
    assert exported.layers["emb"].startswith("GatherBlockQuantized 4-bit block 32 (+ a float32 transposed copy for ")
    got = onnx_session(tmp_path / "m.onnx").run(None, {"input_0": ids.numpy()})[0]
    with torch.no_grad():
        expected = model(ids).numpy()
    assert float(np.abs(got - expected).max() / np.abs(expected).max()) < 1e-3
    assert export_onnx(model, (ids,), tmp_path / "d.onnx", report=report, dense=["emb"]).layers == {}


def test_onnx_folded_lookup_of_constant_ids_names_the_embedding(tmp_path):
    """Position embeddings of a fixed length: the exporter folds the lookup away; a clear error."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(64, 32)
            self.pos = nn.Embedding(16, 32)
            self.register_buffer("positions", torch.arange(12))  # a fixed length: constant ids

        def forward(self, ids):
            return self.tok(ids) + self.pos(self.positions)

    torch.manual_seed(0)
    model = Positions()
    recipe = {"embeddings": [{"pattern": "*", "bits": 4}]}
    report = compress(model, id_batches(high=64), recipe, quiet=True)
    ids = torch.randint(0, 64, (2, 12))
    with pytest.raises(ExportError, match=r"embedding 'pos': its table is not a constant of the exported graph"):
        export_onnx(model, (ids,), tmp_path / "m.onnx", report=report)
    exported = export_onnx(model, (ids,), tmp_path / "m.onnx", report=report, dense=["pos"])
    assert exported.layers == {"tok": "GatherBlockQuantized 4-bit block 32"}
    got = onnx_session(tmp_path / "m.onnx").run(None, {"input_0": ids.numpy()})[0]
    with torch.no_grad():
        assert np.array_equal(got, model(ids).numpy())


def test_onnx_table_not_read_by_gather_names_the_embedding(tmp_path):
    """A graph where the table itself feeds another operator: an ExportError naming the embedding."""
    import sys

    export_module = sys.modules["obc_native.torch.export_onnx"]
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    model = tagger()
    report = compress(model, id_batches(), embedding_recipe(), quiet=True)
    table = model.emb.weight.detach().numpy()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb.weight", "ids"], ["looked_up"]),
         helper.make_node("Identity", ["emb.weight"], ["table"])],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("looked_up", onnx.TensorProto.FLOAT, [3, 64]),
         helper.make_tensor_value_info("table", onnx.TensorProto.FLOAT, list(table.shape))],
        [numpy_helper.from_array(table, "emb.weight")],
    )
    rewriter = export_module._GraphRewriter(helper.make_model(graph), export_module._TensorData())
    info = describe_embedding("emb", model.emb)
    grid = report.layer("emb").grid
    codes = _quantize_exact(info, table, grid)
    expected = r"embedding 'emb': its table is not only looked up by Gather.*also read by \['Identity'\]"
    with pytest.raises(ExportError, match=expected):
        rewriter.quantize_embedding("emb", info, grid, codes, True)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.slow
def test_hf_output_dequantizes_embeddings_and_exports(tmp_path, capsys):
    """`compress --hf` with quantized word embeddings: from_pretrained loads the dequantized table;
    `export --format onnx` of the folder stores it as GatherBlockQuantized and matches PyTorch."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from obc_native.cli import main

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (8, 8), generator=generator)
    example = {"input_ids": ids, "attention_mask": torch.ones(8, 8, dtype=torch.long)}
    save_file(example, str(tmp_path / "ids.safetensors"))
    recipe = {"default": {"bits": 4, "group_size": 16, "method": "rtn"},
              "embeddings": [{"pattern": "embeddings.word_embeddings", "bits": 4, "sym": False, "group_size": 16}]}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    assert main(["compress", "--hf", str(tmp_path / "bert"), "--calibration", str(tmp_path / "ids.safetensors"),
                 "--batch-size", "4", "--recipe", str(tmp_path / "r.json"), "--out", str(out), "--quiet"]) == 0
    assert read_manifest(out)["layers"]["embeddings.word_embeddings"]["storage"] == "quantized"

    loaded, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = transformers.BertModel(config)
    load_compressed(ours, out)
    table = loaded.embeddings.word_embeddings.weight
    assert torch.equal(table, ours.embeddings.word_embeddings.weight)
    assert len(torch.unique(table[70, :16])) <= 16  # a row never seen, on its 4-bit grid
    original = transformers.BertModel.from_pretrained(tmp_path / "bert")
    assert not torch.equal(table, original.embeddings.word_embeddings.weight)

    onnx_path = tmp_path / "bert.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(onnx_path),
                 "--example", str(tmp_path / "ids.safetensors")]) == 0
    assert "embeddings.word_embeddings: GatherBlockQuantized 4-bit block 16" in capsys.readouterr().out
    test_ids = torch.randint(0, 100, (3, 8), generator=generator)
    mask = torch.ones(3, 8, dtype=torch.long)
    got = onnx_session(onnx_path).run(None, {"input_ids": test_ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = loaded.eval()(input_ids=test_ids, attention_mask=mask).last_hidden_state.numpy()
    assert float(np.abs(got - expected).max() / np.abs(expected).max()) < 1e-3
