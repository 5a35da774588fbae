"""ONNX export: file size and onnxruntime latency of dense float32 vs quantized exports.

Models (random or shipped weights, nothing downloaded):

  cnn   the demo DigitsCNN (python/obc_native/demo, 1x8x8 inputs): convs int8 (DequantizeLinear)
        and the Linear head int4 (MatMulNBits); features.0 (one input channel) skipped
  bert  a BERT-base encoder built from transformers.BertConfig() (12 layers, hidden 768, random
        weights, no pooler): every Linear int4 with groups of 128 (MatMulNBits) and the word
        embeddings (30522 x 768) int4 asymmetric with groups of 128 (recipe "embeddings":
        GatherBlockQuantized; ``--embedding-bits 0`` keeps them float32); the position and
        token-type embeddings (0.4M parameters) stay float32
  mlp   Linear 1024 -> 4096 -> 4096 -> 1024 with GELU: every Linear int4, groups of 128
  emb   BERT-base's word-embedding table alone (nn.Embedding(30522, 768), random weights), int4
        asymmetric, groups of 128: the lookup of ``--seq`` tokens per sequence
        (GatherBlockQuantized against Gather); not in the default ``--models``

Each model is compressed with ``compress`` (``--method rtn`` by default: round-to-nearest codes
on the MSE grid, fast on a shared machine; the file size and latency do not depend on which
solver chose the codes; ``--method obc`` runs the Hessian-aware quantizer), then exported twice
with ``export_onnx``: without a report (dense float32 weights, the baseline) and with it.
Reported: both file sizes and their ratio ("wts": the same ratio for the quantized layers'
weights alone: float32 bytes vs codes, scales and zero points), the largest relative output difference of the
quantized export against the compressed PyTorch model, and onnxruntime latencies (CPU provider,
``--threads`` intra-op threads, default graph optimizations) at batch 1 and 32: the median of
``--repeats`` runs after one warm-up run, with the speed ratio dense / quantized measured in the
same process. BERT runs on sequences of ``--seq`` tokens.

A program, never a test: prints a table and writes JSON to benchmarks/results/bench_export.json.
Run:  .venv/bin/python benchmarks/bench_export.py [--models cnn,bert,mlp] [--bert-layers 12]
      [--seq 64] [--repeats 5] [--threads 2] [--method rtn|obc] [--embedding-bits 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

import obc_native  # noqa: E402
from obc_native.torch import EmbeddingRule, LayerConfig, Override, Recipe, compress, export_onnx  # noqa: E402

BATCHES = (1, 32)


class BertEncoder(torch.nn.Module):
    """last_hidden_state of a transformers BertModel, called with ids and an attention mask."""

    def __init__(self, layers: int):
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config = transformers.BertConfig(num_hidden_layers=layers)
        self.bert = transformers.BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build(name: str, args) -> tuple[torch.nn.Module, Recipe, callable, list]:
    """(model, recipe, make_inputs(batch) -> tuple, calibration batches) of a benchmark model."""
    generator = torch.Generator().manual_seed(1)
    config = {"method": args.method} if args.method == "rtn" else {}
    if name == "cnn":
        from obc_native.demo.model import load_data, load_pretrained

        model = load_pretrained().eval()
        recipe = Recipe(default=LayerConfig(bits=8, **config), skip=["features.0"],
                        overrides=[Override("classifier", bits=4, group_size=32)])
        data = load_data().train_x
        return model, recipe, lambda b: (data[:b].clone(),), [data[:256]]
    if name == "bert":
        model = BertEncoder(args.bert_layers)
        embeddings = []
        if args.embedding_bits:
            embeddings = [EmbeddingRule("bert.embeddings.word_embeddings", bits=args.embedding_bits, sym=False,
                                        group_size=128)]
        recipe = Recipe(default=LayerConfig(bits=4, group_size=128, sym=False, **config), embeddings=embeddings)

        def inputs(batch):
            ids = torch.randint(0, 30522, (batch, args.seq), generator=generator)
            return ids, torch.ones(batch, args.seq, dtype=torch.long)

        calibration = [dict(zip(("input_ids", "attention_mask"), inputs(8))) for _ in range(2)]
        return model, recipe, inputs, calibration
    if name == "emb":
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.word_embeddings = torch.nn.Embedding(30522, 768)
        recipe = Recipe(embeddings=[EmbeddingRule("word_embeddings", bits=args.embedding_bits or 4, sym=False,
                                                  group_size=128)])

        def ids(batch):
            return (torch.randint(0, 30522, (batch, args.seq), generator=generator),)

        return model.eval(), recipe, ids, [ids(8)]
    if name == "mlp":
        torch.manual_seed(0)
        sizes = (1024, 4096, 4096, 1024)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
        model = torch.nn.Sequential(*layers[:-1]).eval()
        recipe = Recipe(default=LayerConfig(bits=4, group_size=128, sym=False, **config))
        return model, recipe, lambda b: (torch.randn(b, 1024, generator=generator),), [
            torch.randn(256, 1024, generator=generator)
        ]
    raise SystemExit(f"unknown model {name!r}")


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(sess, inputs) -> dict:
    return {spec.name: x.numpy() for spec, x in zip(sess.get_inputs(), inputs)}


def median_seconds(sess, feed, repeats: int) -> float:
    sess.run(None, feed)  # warm-up (allocations, prepacking)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_model(name: str, args, folder: str) -> dict:
    model, recipe, make_inputs, calibration = build(name, args)
    start = time.perf_counter()
    # baseline=False: the baseline losses (a second round-to-nearest per layer) are not reported here
    report = compress(model, calibration, recipe, quiet=True, correction=None, baseline=False,
                      num_threads=args.threads)
    compress_s = time.perf_counter() - start
    example = make_inputs(2)
    dense_path, quant_path = os.path.join(folder, f"{name}_dense.onnx"), os.path.join(folder, f"{name}_q.onnx")
    start = time.perf_counter()
    dense = export_onnx(model, example, dense_path)
    quant = export_onnx(model, example, quant_path, report=report)
    export_s = time.perf_counter() - start
    import onnx

    stored = {init.name: len(init.raw_data) or init.ByteSize() for init in onnx.load(quant_path).graph.initializer}
    weights_dense = sum(model.get_submodule(name).weight.numel() * 4 for name in quant.layers)
    weights_quant = sum(size for key, size in stored.items() if key.split(":")[0] in
                        {f"{name}.weight" for name in quant.layers})
    forms: dict[str, int] = {}
    for form in quant.layers.values():
        kind = " ".join(form.split()[:2])
        forms[kind] = forms.get(kind, 0) + 1
    row = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "quantized_layers": len(quant.layers),
        "forms": forms,
        "dense_bytes": dense.file_size,
        "quant_bytes": quant.file_size,
        "size_ratio": quant.file_size / dense.file_size,
        # the quantized layers' weights alone: float32 bytes vs codes + scales + zero points
        "quantized_weights_ratio": weights_quant / weights_dense if weights_dense else None,
        "compress_s": compress_s,
        "export_s": export_s,
        "latency": {},
    }
    sessions = {"dense": session(dense_path, args.threads), "quant": session(quant_path, args.threads)}
    for batch in BATCHES:
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        got = sessions["quant"].run(None, feeds(sessions["quant"], inputs))[0]
        if batch == BATCHES[-1]:
            row["max_rel_diff"] = float(np.abs(got - expected).max() / np.abs(expected).max())
        dense_s = median_seconds(sessions["dense"], feeds(sessions["dense"], inputs), args.repeats)
        quant_s = median_seconds(sessions["quant"], feeds(sessions["quant"], inputs), args.repeats)
        row["latency"][str(batch)] = {
            "dense_ms": dense_s * 1e3, "quant_ms": quant_s * 1e3, "speedup": dense_s / quant_s
        }
    return row


def print_row(row: dict) -> None:
    lat = row["latency"]
    print(
        f"{row['model']:>5} {row['params'] / 1e6:>7.2f}M "
        f"{row['dense_bytes'] / 1e6:>9.2f} {row['quant_bytes'] / 1e6:>9.2f} "
        f"{row['size_ratio']:>6.3f} {row['quantized_weights_ratio'] or 0:>6.3f} {row['max_rel_diff']:>9.1e} "
        + " ".join(
            f"{lat[str(b)]['dense_ms']:>9.2f} {lat[str(b)]['quant_ms']:>9.2f} {lat[str(b)]['speedup']:>5.2f}x"
            for b in BATCHES
        )
        + f"  {', '.join(f'{k} x{v}' for k, v in row['forms'].items())}",
        flush=True,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,mlp,bert")
    p.add_argument("--bert-layers", type=int, default=12, help="encoder layers (default 12, BERT-base)")
    p.add_argument("--seq", type=int, default=64, help="BERT sequence length (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per latency (median; default 5)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op and compression threads")
    p.add_argument("--method", default="rtn", choices=["rtn", "obc"], help="how the codes are chosen")
    p.add_argument("--embedding-bits", type=int, default=4,
                   help="bits of BERT's word embeddings (default 4; 0 = float32, as before issue 17's embeddings)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_export.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import onnx
    import onnxruntime

    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "bench_export",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"batches": list(BATCHES)},
        "versions": {"obc_native": obc_native.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "models": [],
    }
    head = " ".join(f"{'b' + str(b) + ' dense':>9} {'b' + str(b) + ' q':>9} {'speed':>6}" for b in BATCHES)
    print(f"{'model':>5} {'params':>8} {'dense MB':>9} {'quant MB':>9} {'ratio':>6} {'wts':>6} {'max rel':>9} {head}  (ms)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            row = run_model(name, args, folder)
            report["models"].append(row)
            print_row(row)
            report["machine"]["loadavg_end"] = os.getloadavg()
            out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
