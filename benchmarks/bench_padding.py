"""Padded calibration batches: how far the padding moves Hessians and compressed layers, with and
without the token mask, on tiny BERT and GPT-2 models built from configs (no download).

Calibration: sentences of 3..16 random tokens, right-padded to --pad-to in batches of 4 with
their attention masks. For each model:

  Hessians   ||H - H_ref||_F / ||H_ref||_F per layer (median, max), where H_ref comes from the
             same sentences run one by one, unpadded; "padded" counts every position
             (token_mask=None, the behaviour before masking), "masked" the real tokens only
  loss       the compressed layers' loss on the real tokens, sum over layers of
             1/2 tr(dW H_ref dW^T), after compress(recipe) on the unpadded sentences, on the
             padded batches and on the masked batches (correction=None: weights only)
  time       collect_hessians on the padded batches, masked vs not, interleaved rounds (wall and
             CPU seconds, medians; the forward, the same in both, is most of it)

A program, never a test: prints a table and writes JSON into benchmarks/results/.
Run:  .venv/bin/python benchmarks/bench_padding.py [--pad-to 64] [--sentences 28] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_models(pad_to: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=pad_to,
    )).eval()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=pad_to,
    )).eval()
    return {"bert": bert, "gpt2": gpt2}


def calibration(pad_to: int, count: int) -> tuple[list, list, int]:
    """(padded batches of 4, the sentences one by one unpadded, real tokens)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [3 + i % 14 for i in range(count)]
    sentences = [torch.randint(1, 100, (length,), generator=generator) for length in lengths]
    padded = []
    for start in range(0, count, 4):
        group = sentences[start : start + 4]
        ids = torch.zeros(len(group), pad_to, dtype=torch.long)
        mask = torch.zeros(len(group), pad_to, dtype=torch.long)
        for row, text in enumerate(group):
            ids[row, : len(text)] = text
            mask[row, : len(text)] = 1
        padded.append({"input_ids": ids, "attention_mask": mask})
    single = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in sentences]
    return padded, single, sum(lengths)


def real_token_loss(model, dense, reference) -> float:
    from obc_native.torch.layers import find_layers, weight_matrix

    dense_layers = find_layers(dense)
    total = 0.0
    for name, info in find_layers(model).items():
        delta = (weight_matrix(info).double() - weight_matrix(dense_layers[name]).double()).numpy()
        hessian = reference[name].hessians()[0]
        total += 0.5 * float(np.einsum("ij,jk,ik->", delta, hessian, delta))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-to", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import obc_native
    from obc_native.torch import LayerConfig, collect_hessians, compress

    padded, single, tokens = calibration(args.pad_to, args.sentences)
    recipes = {"int4": LayerConfig(bits=4), "unstructured50": LayerConfig(prune="unstructured", sparsity=0.5)}
    results: dict = {"config": vars(args), "versions": {
        "obc_native": obc_native.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version()}, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "real_tokens": tokens, "positions": sum(b["input_ids"].numel() for b in padded), "models": {}}
    for label, model in tiny_models(args.pad_to).items():
        reference = collect_hessians(model, single)
        row: dict = {"hessian": {}, "loss": {}, "time": {}}
        for mode, mask in (("padded", None), ("masked", "auto")):
            stats = collect_hessians(model, padded, token_mask=mask)
            errors = [
                float(np.linalg.norm(stats[n].hessians()[0] - h.hessians()[0]) / np.linalg.norm(h.hessians()[0]))
                for n, h in reference.items()
            ]
            row["hessian"][mode] = {"median": float(np.median(errors)), "max": max(errors),
                                    "n": sorted({stats[n].n for n in reference})}
        for recipe, config in recipes.items():
            losses = {}
            for mode, batches, mask in (("unpadded", single, "auto"), ("padded", padded, None), ("masked", padded, "auto")):
                compressed = copy.deepcopy(model)
                compress(compressed, batches, config, correction=None, baseline=False, quiet=True, token_mask=mask)
                losses[mode] = real_token_loss(compressed, model, reference)
            row["loss"][recipe] = losses
        timings: dict = {"masked": [], "padded": []}
        for _ in range(args.rounds):
            for mode, mask in (("masked", "auto"), ("padded", None)):
                wall, cpu = time.perf_counter(), time.process_time()
                collect_hessians(model, padded, token_mask=mask)
                timings[mode].append((time.perf_counter() - wall, time.process_time() - cpu))
        for mode, values in timings.items():
            values = np.array(values)
            row["time"][mode] = {"wall_s": float(np.median(values[:, 0])), "cpu_s": float(np.median(values[:, 1]))}
        results["models"][label] = row

    print(f"{results['real_tokens']} real tokens of {results['positions']} positions (padded to {args.pad_to})")
    print(f"{'model':<6} {'mode':<7} {'n':>6} {'H err median':>13} {'H err max':>10} "
          + " ".join(f"{'loss ' + r:>22}" for r in recipes) + f" {'wall s':>8} {'cpu s':>8}")
    for label, row in results["models"].items():
        for mode in ("unpadded", "padded", "masked"):
            hessian = row["hessian"].get(mode)
            first = (f"{'/'.join(map(str, hessian['n'])):>6} {hessian['median']:13.3g} {hessian['max']:10.3g}"
                     if hessian else f"{tokens:>6} {0:13.3g} {0:10.3g}")
            losses = " ".join(
                f"{row['loss'][r][mode]:12.5g} ({row['loss'][r][mode] / row['loss'][r]['unpadded']:5.3f}x)"
                for r in recipes
            )
            timing = row["time"].get(mode)
            times = f"{timing['wall_s']:8.3f} {timing['cpu_s']:8.3f}" if timing else f"{'':>8} {'':>8}"
            print(f"{label:<6} {mode:<7} {first} {losses} {times}")

    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench_padding_{dt.datetime.now():%Y%m%d_%H%M%S}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
