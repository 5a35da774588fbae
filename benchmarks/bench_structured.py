"""Structured pruning made physical: latency of dense vs shrunk models in PyTorch and onnxruntime.

For each model, the dense model and structured pruning at 25% and 50% of the channels
(``LayerConfig(prune="structured")``, then ``shrink_structured``), at batch 1 and 32:

  cnn    the demo digits CNN (shipped weights; features.3, features.6 and the classifier pruned,
         the classifier in whole blocks of 2x2 flattened inputs (structured_group=4), so
         features.0, features.3 and features.6 lose output channels); with --channel-multiple M
         (default: onnxruntime's NCHWc block on this CPU, 0: none) also "25% xM" and "50% xM":
         the same recipes with LayerConfig(channel_multiple=M) (min(M, 8) for features.3, which
         has 16 inputs), the kept widths rounded down to multiples of M; with --cnn-first F (default
         0.75) also "50% f3:F": 50% with features.3 (the first pruned conv) at F. CNN levels report
         their top-1 accuracy on the 500 test digits (one-shot, BatchNorm re-estimated); with
         --width-sweep, DigitsCNN shapes of other widths (random weights) are timed against the
         dense shape: what any choice of kept channels can reach in onnxruntime
  mlp    Linear 512 -> 2048 -> ReLU -> 2048 -> ReLU -> 512 (random weights, ExactOBS structured
         pruning of the two later layers on random calibration data)
  bert   a BERT-base-sized encoder from a transformers BertConfig (hidden 768, 12 heads,
         intermediate 3072, --bert-layers layers, --seq tokens; random weights, no download);
         --bert-prune heads+ffn (default): the attention heads (attention.output.dense pruned in
         groups of the head size, structured_group=64, then shrink_attention_heads) and the FFN
         intermediate width (output.dense, shrunk with hf_ffn_chains) at the same fraction;
         --bert-prune ffn: the FFN width only. Both by magnitude: the latency does not depend on
         which channels go

Reported: the kept channels of each shrunk chain, the fraction of the prunable channels removed
and the multiply-adds per sample (Conv/Linear), parameters, ONNX file size, median latency (ms) over --repeats runs after warm-up in
PyTorch (torch.inference_mode, --threads intra-op threads) and onnxruntime (CPU provider,
intra_op_num_threads = --threads, the model exported with plain torch.onnx.export), and the
speed-up over the dense model measured in the same run (the models are timed round-robin, one
call each per round, so that a shared machine's load falls on all alike; best-of-N times and
speed-ups are recorded too, "(min)" in the table). The shrunk model's outputs are checked
against the masked model's (max abs difference reported). Target: 50% structured >= 1.6x
faster than dense in onnxruntime at batch 32. Also printed: onnxruntime's NCHWc block size on this
CPU (read from the optimized graph of a one-channel conv), the load average before and after,
and with --profile the per-node times of onnxruntime's profiler at batch 32 (CNN levels).

A program, never a test: prints a table and writes JSON into benchmarks/results/.
Run:  .venv/bin/python benchmarks/bench_structured.py [--models cnn,mlp,bert] [--threads 2]
      [--repeats 20] [--bert-layers 2] [--seq 64] [--bert-prune heads+ffn|ffn]
      [--channel-multiple M] [--cnn-first F,...] [--width-sweep] [--profile]
      [--graph-level all|extended|basic|disable]
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402,F401  (--threads into the OpenMP / BLAS variables, before numpy and torch)

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from obc_native.torch import (  # noqa: E402
    LayerConfig,
    Override,
    Recipe,
    compress,
    hf_ffn_chains,
    shrink_attention_heads,
    shrink_structured,
)

SPARSITIES = (0.25, 0.5)
BATCHES = (1, 32)


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self, sizes=(512, 2048, 2048, 512)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


def build(name: str, args) -> tuple[nn.Module, callable, list, callable]:
    """(model, inputs(batch) -> tuple of tensors, prune(model, sparsity) -> (chains, heads)): the
    chains for shrink_structured (None: traced) and whether shrink_attention_heads runs too."""
    generator = torch.Generator().manual_seed(0)
    if name == "cnn":
        from obc_native.demo.model import evaluate, load_data, load_pretrained

        model, data = load_pretrained(), load_data()

        def prune(m, s, multiple=1, first=None):
            # the classifier reads features.6's 32 channels x 2 x 2 flattened: whole channel blocks;
            # features.3 reads only 16 channels: a multiple of 16 would keep none of them at 50%.
            # first: another sparsity for features.3 (the input of the first pruned conv)
            first_override = {} if first is None else {"sparsity": first}
            recipe = Recipe(default=LayerConfig(prune="structured", sparsity=s, channel_multiple=multiple),
                            skip=["features.0"],
                            overrides=[Override("features.3", channel_multiple=min(multiple, 8), **first_override),
                                       Override("classifier", structured_group=4)])
            compress(m, data.calibration(256), recipe, quiet=True)
            return None, False

        prune.accuracy = lambda m: evaluate(m, data.test_x, data.test_y)[0]  # top-1 % of the 500 test digits
        return model, lambda b: (data.test_x[:b].clone(),), prune
    if name == "mlp":
        torch.manual_seed(0)
        model = MLP().eval()
        calibration = [torch.randn(256, 512, generator=generator) for _ in range(4)]

        def prune(m, s):
            compress(m, calibration, Recipe(default=LayerConfig(prune="structured", sparsity=s), skip=["layers.0"]),
                     quiet=True)
            return None, False

        return model, lambda b: (torch.randn(b, 512, generator=torch.Generator().manual_seed(b)),), prune
    if name == "bert":
        import transformers

        config = transformers.BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                         num_hidden_layers=args.bert_layers, max_position_embeddings=512)
        torch.manual_seed(0)
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
        calibration = [{"input_ids": torch.randint(0, config.vocab_size, (4, args.seq), generator=generator)}]

        heads = args.bert_prune == "heads+ffn"
        head_size = config.hidden_size // config.num_attention_heads

        def prune(m, s):
            # "*.output.dense" matches the attention projections too: with heads, the later override
            # prunes those by whole heads; without, they are skipped (left dense)
            overrides = [Override("*.output.dense", prune="structured", sparsity=s, method="magnitude")]
            if heads:
                overrides.append(Override("*.attention.output.dense", structured_group=head_size))
            skip = [] if heads else ["*.attention.output.dense"]
            compress(m, calibration, Recipe(default=None, overrides=overrides, skip=skip), quiet=True)
            return hf_ffn_chains(m), heads

        def inputs(b):
            ids = torch.randint(0, config.vocab_size, (b, args.seq), generator=torch.Generator().manual_seed(b))
            return (ids,)

        return model, inputs, prune
    raise SystemExit(f"unknown model {name!r}; choose from cnn, mlp, bert")


class Wrapped(nn.Module):
    """A HF model's last_hidden_state as a plain tensor output (for export and timing alike)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed round-robin (one call of each per round) so that
    the load of a shared machine falls on all of them alike; warm-up rounds first."""
    times = {key: [] for key in fns}
    for round_ in range(max(2, repeats // 5) + repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= max(2, repeats // 5):
                times[key].append(time.perf_counter() - start)
    return {key: (1e3 * statistics.median(values), 1e3 * min(values)) for key, values in times.items()}


def export(model, example, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)


GRAPH_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                "disable": "ORT_DISABLE_ALL"}
GRAPH_LEVEL = "all"  # --graph-level: the same for every model of a run


def session_options(threads, level=None, **extra):
    """The one set of onnxruntime options every model gets (plus ``extra`` attributes); ``level``:
    a key of GRAPH_LEVELS (None: --graph-level)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[level or GRAPH_LEVEL])
    for key, value in extra.items():
        setattr(options, key, value)
    return options


def onnx_session(model, example, path, threads):
    import onnxruntime as ort

    export(model, example, path)
    return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])


def nchwc_block_size(workdir) -> int:
    """Channels per block of onnxruntime's NCHWc convolutions on this CPU (8 with AVX2, 16 with
    AVX-512; 1: no NCHWc), read from the optimized graph: a one-output-channel conv's reordered
    filter is padded to one block."""
    import onnx
    import onnxruntime as ort

    path, optimized = os.path.join(workdir, "block.onnx"), os.path.join(workdir, "block_optimized.onnx")
    export(nn.Conv2d(1, 1, 3, padding=1), (torch.zeros(1, 1, 8, 8),), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort.InferenceSession(path, session_options(1, "all", optimized_model_filepath=optimized, log_severity_level=3),
                             providers=["CPUExecutionProvider"])
    graph = onnx.load(optimized).graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc"]
    if not convs:
        return 1
    weights = {t.name: t for t in graph.initializer}
    return int(weights[convs[0].input[1]].dims[0])


def node_times(path, feed, threads, runs) -> dict:
    """Median microseconds per node of ``runs`` calls, from onnxruntime's profiler (the optimized
    graph's node names: NCHWc convs are named after their fused output)."""
    import onnxruntime as ort

    options = session_options(threads, enable_profiling=True,
                              profile_file_prefix=os.path.join(os.path.dirname(path), "profile"))
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    with open(session.end_profiling(), encoding="utf-8") as handle:
        events = json.load(handle)
    times, calls = {}, []
    for event in events[len(events) // 5:]:  # the first fifth: warm-up
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            label = f"{event['args'].get('op_name', '?')} {event['name'][:-len('_kernel_time')]}"
            times.setdefault(label, []).append(event["dur"])
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            calls.append(event["dur"])
    result = {label: statistics.median(values) for label, values in times.items()}
    result["(whole call)"] = statistics.median(calls)
    return result


def multiply_adds(model: nn.Module, example) -> int:
    """Multiply-adds per sample of the model's Conv and Linear layers (forward hooks, batch of
    ``example``)."""
    total, batch = [0], example[0].shape[0]

    def count(module, inputs, output):
        if isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features
        else:
            kernel = module.weight[0].numel()  # in_channels / groups * kernel size
            total[0] += output.numel() * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.inference_mode():
        model(*example)
    for hook in hooks:
        hook.remove()
    return total[0] // batch


def measure(models: dict, inputs, args, workdir, name) -> dict:
    """Per model: ONNX file size and median latency (ms) per runtime and batch, timed interleaved."""
    models = {label: Wrapped(model).eval() for label, model in models.items()}
    rows, sessions = {}, {}
    for i, (label, model) in enumerate(models.items()):
        path = os.path.join(workdir, f"{name}_{i}.onnx")
        sessions[label] = onnx_session(model, inputs(2), path, args.threads)
        rows[label] = {"onnx_bytes": os.path.getsize(path), "torch_ms": {}, "ort_ms": {}, "torch_min_ms": {},
                       "ort_min_ms": {}, "ort_vs_torch_max_abs": {}}
        if args.profile and name == "cnn":
            rows[label]["ort_node_us_b32"] = node_times(path, {"x": inputs(32)[0].numpy()}, args.threads,
                                                        max(50, 5 * args.repeats))
    for batch in BATCHES:
        x = inputs(batch)
        feed = {"x": x[0].numpy()}
        with torch.inference_mode():
            torch_ms = interleaved_medians({k: (lambda m=m: m(*x)) for k, m in models.items()}, args.repeats)
        ort_ms = interleaved_medians({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()},
                                     args.repeats)
        for label, model in models.items():
            with torch.inference_mode():
                reference = model(*x).numpy()
            rows[label]["torch_ms"][batch], rows[label]["torch_min_ms"][batch] = torch_ms[label]
            rows[label]["ort_ms"][batch], rows[label]["ort_min_ms"][batch] = ort_ms[label]
            difference = abs(sessions[label].run(None, feed)[0] - reference)
            rows[label]["ort_vs_torch_max_abs"][batch] = float(difference.max())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,mlp,bert")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bert-layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--bert-prune", choices=("heads+ffn", "ffn"), default="heads+ffn",
                        help="what structured pruning removes from the BERT encoder")
    parser.add_argument("--channel-multiple", type=int, default=None,
                        help="CNN: also prune with LayerConfig(channel_multiple=M) (default: the NCHWc block; 0: no)")
    parser.add_argument("--cnn-first", type=lambda text: [float(v) for v in text.split(",") if v], default=[0.75],
                        help="CNN: also 50%% with features.3 (the first pruned conv's input) at these sparsities")
    parser.add_argument("--width-sweep", action="store_true",
                        help="CNN: time DigitsCNN shapes of other widths (random weights) against the dense shape")
    parser.add_argument("--graph-level", choices=list(GRAPH_LEVELS), default="all",
                        help="onnxruntime graph optimization level of every session (all: NCHWc convolutions)")
    parser.add_argument("--profile", action="store_true",
                        help="CNN: onnxruntime's per-node times at batch 32 (its profiler, a session of its own)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    global GRAPH_LEVEL
    GRAPH_LEVEL = args.graph_level
    torch.set_num_threads(args.threads)
    import onnxruntime

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        block = nchwc_block_size(workdir)
        multiple = block if args.channel_multiple is None else args.channel_multiple
        print(f"onnxruntime NCHWc block: {block} channels; load average {load_before[0]:.1f}", flush=True)
        for name in args.models.split(","):
            dense, inputs, prune = build(name, args)
            dense_macs = multiply_adds(dense, inputs(2))
            models = {"dense": dense}
            extra = {"dense": {"parameters": sum(p.numel() for p in dense.parameters()), "macs": dense_macs}}
            accuracy = getattr(prune, "accuracy", None)
            if accuracy:
                extra["dense"]["accuracy"] = accuracy(dense)
            levels = [(sparsity, {}) for sparsity in SPARSITIES]
            if name == "cnn":
                if multiple > 1:
                    levels += [(sparsity, {"multiple": multiple}) for sparsity in SPARSITIES]
                levels += [(0.5, {"first": first}) for first in args.cnn_first]
            for sparsity, options in levels:
                model = copy.deepcopy(dense)
                chains, heads = prune(model, sparsity, **options)
                masked = copy.deepcopy(model)
                report = shrink_structured(model, chains)
                removed_heads = sum(a.removed for a in shrink_attention_heads(model).attentions) if heads else 0
                x = inputs(8)
                with torch.inference_mode():
                    diff = float((Wrapped(model)(*x) - Wrapped(masked)(*x)).abs().max())
                label = (f"structured {int(sparsity * 100)}%" + (f" x{options['multiple']}" if "multiple" in options else "")
                         + (f" f3:{options['first']:.0%}" if "first" in options else ""))
                models[label] = model
                macs = multiply_adds(model, inputs(2))
                extra[label] = {"parameters": sum(p.numel() for p in model.parameters()),
                                "shrunk_vs_masked_max_abs": diff, "heads_removed": removed_heads,
                                "channels_removed": sum(c.removed for c in report.chains),
                                "channels": [c.channels for c in report.chains],
                                "channels_kept": [c.kept for c in report.chains],
                                "removed_fraction": (sum(c.removed for c in report.chains)
                                                     / max(1, sum(c.channels for c in report.chains))),
                                "macs": macs, "macs_ratio": dense_macs / macs}
                if accuracy:
                    extra[label]["accuracy"] = accuracy(model)
            rows = measure(models, inputs, args, workdir, name)
            for label, row in rows.items():
                row.update(extra[label])
                row["torch_speedup"] = {b: rows["dense"]["torch_ms"][b] / row["torch_ms"][b] for b in BATCHES}
                row["ort_speedup"] = {b: rows["dense"]["ort_ms"][b] / row["ort_ms"][b] for b in BATCHES}
                # best-of-N: what the hardware can do, less sensitive to a loaded machine than the median
                row["ort_speedup_min"] = {b: rows["dense"]["ort_min_ms"][b] / row["ort_min_ms"][b] for b in BATCHES}
                row["torch_speedup_min"] = {b: rows["dense"]["torch_min_ms"][b] / row["torch_min_ms"][b]
                                            for b in BATCHES}
                results.append(dict(model=name, level=label, **row))
            print(f"{name}: done", flush=True)
        sweep = width_sweep(args, workdir) if args.width_sweep else None
    load_after = os.getloadavg()
    print()
    print_table(results)
    print(f"\nonnxruntime NCHWc block: {block} channels; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after ({os.cpu_count()} CPUs)")
    print_widths(results)
    if sweep:
        print_sweep(sweep)
    if args.profile:
        print_profiles(results)
    record = {
        "benchmark": "bench_structured",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": vars(args),
        "nchwc_block": block,
        "load_average": {"before": load_before, "after": load_after},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "results": results,
        "width_sweep": sweep,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_structured_{dt.datetime.now():%Y%m%d_%H%M%S}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"\nwrote {path}")


def print_widths(results) -> None:
    """Per shrunk level: the kept channels of each chain, the removed fraction, the multiply-adds."""
    print(f"\n{'model':<5} {'level':<22} {'kept channels (of)':<32} {'removed':>8} {'MACs/sample':>12} {'x MACs':>7} "
          f"{'accuracy':>8}")
    for r in results:
        if "channels_kept" in r or "accuracy" in r:
            kept = (" / ".join(map(str, r["channels_kept"])) + " (" + " / ".join(map(str, r["channels"])) + ")"
                    if "channels_kept" in r else "")
            accuracy = f"{r['accuracy']:.1f}%" if "accuracy" in r else ""
            print(f"{r['model']:<5} {r['level']:<22} {kept:<32} {r.get('removed_fraction', 0.0):>8.1%} "
                  f"{r['macs']:>12,} {r.get('macs_ratio', 1.0):>7.2f} {accuracy:>8}")


SWEEP_WIDTHS = ((16, 32, 32), (12, 24, 24), (8, 16, 16), (16, 16, 16), (8, 8, 8), (4, 16, 16), (4, 16, 32),
                (2, 16, 16), (1, 1, 1))


def digits_shape(widths) -> nn.Module:
    """The demo CNN's layers with output widths ``widths`` of features.0/.3/.6, random weights."""
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
        nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.Conv2d(b, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Flatten(1), nn.Linear(4 * c, 10)).eval()


def width_sweep(args, workdir) -> list[dict]:
    """onnxruntime batch-32 latency of DigitsCNN shapes of other widths against the dense shape (the
    first of SWEEP_WIDTHS), round-robin: what any choice of kept channels can reach. Random
    weights: the latency does not depend on them."""
    torch.manual_seed(0)
    example = (torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(32)),)
    feed = {"x": example[0].numpy()}
    sessions, rows = {}, []
    for widths in SWEEP_WIDTHS:
        model = digits_shape(widths)
        sessions[widths] = onnx_session(model, example[:1], os.path.join(workdir, "sweep.onnx"), args.threads)
        rows.append({"widths": list(widths), "removed_fraction": 1 - sum(widths) / sum(SWEEP_WIDTHS[0]),
                     "macs": multiply_adds(model, example)})
    times = interleaved_medians({w: (lambda s=s: s.run(None, feed)) for w, s in sessions.items()}, 5 * args.repeats)
    dense = times[SWEEP_WIDTHS[0]]
    for row, widths in zip(rows, SWEEP_WIDTHS):
        row.update(ort_ms=times[widths][0], ort_min_ms=times[widths][1], speedup=dense[0] / times[widths][0],
                   speedup_min=dense[1] / times[widths][1], macs_ratio=rows[0]["macs"] / row["macs"])
    return rows


def print_sweep(rows) -> None:
    print("\nCNN widths (features.0 / .3 / .6, random weights), onnxruntime batch 32, against 16 / 32 / 32:")
    print(f"{'kept':<14} {'removed':>8} {'x MACs':>7} {'ort b32':>8} {'x ort b32':>9} {'(min)':>6}")
    for r in rows:
        print(f"{' / '.join(map(str, r['widths'])):<14} {r['removed_fraction']:>8.1%} {r['macs_ratio']:>7.2f} "
              f"{r['ort_ms']:>8.3f} {r['speedup']:>9.2f} {r['speedup_min']:>6.2f}")


def print_profiles(results) -> None:
    """onnxruntime's per-node median microseconds at batch 32, one block per profiled level."""
    for r in results:
        if "ort_node_us_b32" in r:
            print(f"\n{r['model']} {r['level']}: onnxruntime profile, batch 32, median us per node")
            for label, us in r["ort_node_us_b32"].items():
                print(f"  {label:<60} {us:>8.1f}")


def print_table(results) -> None:
    head = (f"{'model':<5} {'level':<22} {'params':>10} {'onnx MB':>8} "
            f"{'torch b1':>9} {'torch b32':>10} {'ort b1':>8} {'ort b32':>9} "
            f"{'x torch b32':>11} {'x ort b1':>8} {'x ort b32':>9} {'(min)':>6} {'max|shrunk-masked|':>18}")
    print(head)
    for r in results:
        diff = r.get("shrunk_vs_masked_max_abs")
        print(f"{r['model']:<5} {r['level']:<22} {r['parameters']:>10} {r['onnx_bytes'] / 1e6:>8.2f} "
              f"{r['torch_ms'][1]:>9.3f} {r['torch_ms'][32]:>10.3f} {r['ort_ms'][1]:>8.3f} {r['ort_ms'][32]:>9.3f} "
              f"{r['torch_speedup'][32]:>11.2f} {r['ort_speedup'][1]:>8.2f} {r['ort_speedup'][32]:>9.2f} "
              f"{r['ort_speedup_min'][32]:>6.2f} "
              f"{'' if diff is None else f'{diff:.2e}':>18}")


if __name__ == "__main__":
    main()
