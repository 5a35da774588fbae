"""Whole-model compression time: where it goes (forward passes, Hessians, solves, correction).

The model is a BERT-sized encoder built from a transformers ``BertConfig`` (random weights, no
download): by default 6 layers of BERT-base (hidden 768, 12 heads, intermediate 3072), i.e. 36
Linear layers (per block: query, key, value, attention output, intermediate, output), calibrated
on 256 random sequences of 64 tokens in batches of 32. For each setting (a recipe) and mode
(dense: one pass; sequential: one pass per group of layers, on the model compressed so far) the
program runs ``compress`` and reports the report's breakdown:

  passes      forward passes over the calibration set (model compute; hooks' Hessian work excluded)
  hessians    accumulating the layer Hessians (float64) in the hooks
  solves      the layer solves with their loss and baseline (report.solve_seconds)
  correction  bias correction
  total       report.seconds

and the issue-16 targets: calibration (passes + Hessians) at most 1/4 of the total, and the
total at most 2x the sum of the layer solves. With ``--compare`` every run is repeated with the
sharing of inputs turned off (the behaviour before: one Hessian, and in sequential mode one
pass, per layer), side by side, and the two compressed models are checked to be bit-identical.
With ``--compare-gram`` every variant is also run with torch's float64 ``baddbmm`` for the Hessian
sums instead of the core's symmetric Gram update (label suffix ``+torchH``, the path before).
With ``--cache-outputs`` sequential mode is also run with ``compress(cache_outputs=True)`` (variant
"cached": finished modules' outputs looked up instead of recomputed), checked bit-identical too.

A program, never a test: prints a table and writes JSON into benchmarks/results/.
Run:  .venv/bin/python benchmarks/bench_whole_model.py [--threads 2] [--settings gptq4,2:4,int4]
      [--modes dense,sequential] [--compare] [--cache-outputs] [--skip-uncached] [--compare-gram] [--sequences 256] [--tokens 64] [--layers 6]
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402,F401  (--threads into the OpenMP / BLAS variables, before numpy and torch)

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from obc_native.torch import LayerConfig, compress  # noqa: E402

compress_module = importlib.import_module("obc_native.torch.compress")
hessian_module = importlib.import_module("obc_native.torch.hessian")

SETTINGS = {
    "gptq4": LayerConfig(bits=4, quant_method="gptq", refine=False),  # cheap: GPTQ alone
    "2:4": LayerConfig(prune="nm", n=2, m=4),  # ExactOBS N:M
    "int4": LayerConfig(bits=4),  # the default quantizer: OBQ and GPTQ, best per row, refined
}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        max_position_embeddings=max(512, args.tokens),
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def calibration(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.sequences, args.tokens), generator=generator)
    return [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.sequences, args.batch_size)]


def run(
    base: torch.nn.Module, batches, config: LayerConfig, *, sequential: bool, share: bool, cache: bool, threads: int,
    core_gram: bool = True,
):
    """One compress() run on a copy of ``base``: (figures, compressed state)."""
    compress_module._SHARE_INPUTS = share
    hessian_module._CORE_GRAM = core_gram
    try:
        model = copy.deepcopy(base)
        report = compress(
            model, batches, config, sequential=sequential, cache_outputs=cache, num_threads=threads, quiet=True
        )
    finally:
        compress_module._SHARE_INPUTS = True
        hessian_module._CORE_GRAM = True
    calibration_seconds = report.pass_seconds + report.hessian_seconds
    figures = {
        "passes": report.passes,
        "seconds": report.seconds,
        "pass_seconds": report.pass_seconds,
        "hessian_seconds": report.hessian_seconds,
        "solve_seconds": report.solve_seconds,
        "correction_seconds": report.correction_seconds,
        "calibration_share": calibration_seconds / report.seconds,
        "total_over_solves": report.seconds / report.solve_seconds,
        "layers": len(report.compressed),
        "loss": report.total_loss,
    }
    return figures, model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="gptq4,int4", help=f"comma-separated of {list(SETTINGS)}")
    parser.add_argument("--modes", default="dense,sequential")
    parser.add_argument("--compare", action="store_true", help="also run without input sharing (before)")
    parser.add_argument(
        "--cache-outputs", action="store_true", help="sequential mode: also run with cache_outputs=True (cached)"
    )
    parser.add_argument(
        "--skip-uncached", action="store_true",
        help="sequential mode with --cache-outputs: run only the cached variant (no 'after' run)",
    )
    parser.add_argument(
        "--compare-gram", action="store_true",
        help="also run each variant's Hessian sums with torch's baddbmm (variant '+torchH'; the "
             "path before the core's Gram update: results differ by float64 rounding)",
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = build_model(args)
    batches = calibration(args, base.config.vocab_size)
    rows = []
    for setting in args.settings.split(","):
        for mode in args.modes.split(","):
            sequential = mode == "sequential"
            variants = [] if sequential and args.cache_outputs and args.skip_uncached else [("after", True, False)]
            if sequential and args.cache_outputs:
                variants.append(("cached", True, True))
            if args.compare:
                variants.append(("before", False, False))
            if args.compare_gram:
                variants = [v for variant in variants for v in (variant, (variant[0] + "+torchH", *variant[1:]))]
            states = {}
            for label, share, cache in variants:
                figures, states[label] = run(
                    base, batches, SETTINGS[setting], sequential=sequential, share=share, cache=cache,
                    threads=args.threads, core_gram=not label.endswith("+torchH"),
                )
                figures.update(setting=setting, mode=mode, variant=label)
                rows.append(figures)
                print(_line(figures), flush=True)
                if label.endswith("+torchH"):
                    base_label = label[: -len("+torchH")]
                    diff = max(
                        float((states[base_label][k].double() - states[label][k].double()).abs().max())
                        for k in states[label] if states[label][k].is_floating_point()
                    )
                    figures["max_abs_weight_diff_vs_core_gram"] = diff
                    print(f"    {label}/{base_label}: largest parameter difference {diff:.3g}", flush=True)
                elif label != "after" and "after" in states:
                    identical = all(torch.equal(states["after"][k], states[label][k]) for k in states["after"])
                    figures["identical_to_after"] = identical
                    print(f"    {label}/after models bit-identical: {identical}", flush=True)

    print()
    print(_table(rows))
    record = {
        "benchmark": "bench_whole_model",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"whole_model-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {path}")


def _line(f: dict) -> str:
    return (
        f"{f['setting']:>6} {f['mode']:>10} {f['variant']:>6}: total {f['seconds']:.1f} s, "
        f"passes {f['passes']} {f['pass_seconds']:.1f} s, Hessians {f['hessian_seconds']:.1f} s, "
        f"solves {f['solve_seconds']:.1f} s, correction {f['correction_seconds']:.2f} s"
    )


def _table(rows: list[dict]) -> str:
    header = ("setting", "mode", "variant", "passes", "pass s", "hessian s", "solve s", "corr s", "total s",
              "calib/total", "total/solves")
    body = [
        (r["setting"], r["mode"], r["variant"], str(r["passes"]), f"{r['pass_seconds']:.1f}",
         f"{r['hessian_seconds']:.1f}", f"{r['solve_seconds']:.1f}", f"{r['correction_seconds']:.2f}",
         f"{r['seconds']:.1f}", f"{r['calibration_share']:.2f}", f"{r['total_over_solves']:.2f}")
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.append("targets: calib/total <= 0.25, total/solves <= 2")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
