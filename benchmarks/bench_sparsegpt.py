"""ExactOBS vs SparseGPT (obc_native) vs a batched PyTorch SparseGPT: loss and time per layer width.

For each layer (rows x cols, float32, W ~ N(0, 1/cols)), each input kind and each pattern, the
program runs in this process, on the same float32 W and H = 2/n X X^T (n = 2 * cols samples):
  exact      obc_native ExactOBS (method="exact"), skipped above --exact-max-cols (its cost grows
             as rows * cols^3)
  sparsegpt  obc_native method="sparsegpt" (lazy_block 128)
  torch      torch_sparsegpt below: the straightforward batched PyTorch SparseGPT of the paper
and reports the loss 1/2 sum_rows dw H dw^T (float64, obc_native.layer_loss), the best time of
--repeats runs, and the ratios sparsegpt/exact (loss) and torch/sparsegpt (time).

Input kinds:
  realistic  correlated features with a decaying spectrum (singular values ~ 1/sqrt(k)) and 4
             outlier features 10-50x larger (tests/python/sparsegpt_reference.realistic_inputs)
  white      X ~ N(0, 1)
Patterns: "50%" unstructured, 50% of every row (spread="uniform", the paper's per-row rule);
"2:4" N:M.

Before timing, the PyTorch baseline is checked against the float64 replay of the tests
(tests/python/sparsegpt_reference.py) on a small layer: same mask, weights within 1e-4.

Run:  .venv/bin/python benchmarks/bench_sparsegpt.py [--quick] [--layers 256x1024,...]
Writes benchmarks/results/bench_sparsegpt.json (config, versions, threads, machine, cases).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))
import sparsegpt_reference as ref  # noqa: E402

import obc_native as obc  # noqa: E402

FULL_LAYERS = ["256x256", "256x512", "512x1024", "512x2048", "1024x4096"]
QUICK_LAYERS = ["64x128", "64x256"]
PATTERNS = ["50%", "2:4"]
KINDS = ["realistic", "white"]
LAZY_BLOCK = 128
DAMP = 0.01
SEED = 4321


# --------------------------------------------------------------------------------------------
# The PyTorch baseline
# --------------------------------------------------------------------------------------------


def torch_sparsegpt(W, H, *, sparsity=None, nm=None, lazy_block=LAZY_BLOCK, damp=DAMP):
    """SparseGPT as the paper describes it, batched over rows in PyTorch (float32).

    U = upper Cholesky factor of the damped H^-1; columns in lazy blocks of `lazy_block`; the mask
    of a block is chosen at its start (unstructured: per row the smallest w^2 / U_jj^2, as many as
    the row's share of the block, floor(k * end / cols) - floor(k * start / cols) of
    k = ceil(sparsity * cols)), or at an N:M group's first column; errors update the block column
    by column and the later columns with one GEMM per block. No zeros or dead inputs handled
    (the benchmark's layers have none). Returns the new W (torch float32).
    """
    W = W.clone()
    rows, cols = W.shape
    H = H.to(torch.float64)
    lam = damp * torch.mean(torch.diag(H))
    Hd = H + lam * torch.eye(cols, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    U = torch.linalg.cholesky(hinv, upper=True).to(torch.float32)
    d = torch.diag(U)
    if sparsity is not None:
        k = int(math.ceil(sparsity * cols - 1e-9 * max(1.0, sparsity * cols)))
    for b0 in range(0, cols, lazy_block):
        b1 = min(cols, b0 + lazy_block)
        w = W[:, b0:b1].clone()
        u = U[b0:b1, b0:b1]
        err = torch.zeros_like(w)
        mask = torch.zeros_like(w, dtype=torch.bool)
        if sparsity is not None:
            quota = k * b1 // cols - k * b0 // cols
            if quota > 0:
                score = w**2 / d[b0:b1] ** 2
                idx = torch.argsort(score, dim=1, stable=True)[:, :quota]
                mask.scatter_(1, idx, True)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                score = w[:, j : j + m] ** 2 / d[b0 + j : b0 + j + m] ** 2
                idx = torch.argsort(score, dim=1, stable=True)[:, :n]
                mask[:, j : j + m].scatter_(1, idx, True)
            col = w[:, j]
            q = torch.where(mask[:, j], torch.zeros_like(col), col)
            e = (col - q) / u[j, j]
            w[:, j] = q
            w[:, j + 1 :] -= e.unsqueeze(1) * u[j, j + 1 :].unsqueeze(0)
            err[:, j] = e
        W[:, b0:b1] = w
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return W


def check_baseline() -> dict:
    """The baseline against the float64 replay on a 24 x 64 layer (lazy block 16)."""
    rng = np.random.default_rng(7)
    X = ref.realistic_inputs(64, 128, seed=7)
    H = 2.0 / X.shape[1] * (X @ X.T)
    H = 0.5 * (H + H.T)
    W = rng.standard_normal((24, 64))
    out = {}
    for name, kw, torch_kw in (
        ("50%", dict(pattern="unstructured", sparsity=0.5, spread="uniform"), dict(sparsity=0.5)),
        ("2:4", dict(pattern="nm", n=2, m=4), dict(nm=(2, 4))),
    ):
        w_ref, pruned_ref = ref.sparsegpt(W, H, lazy_block=16, **kw)
        got = torch_sparsegpt(torch.from_numpy(W.astype(np.float32)), torch.from_numpy(H),
                              lazy_block=16, **torch_kw).numpy()
        same_mask = bool(np.array_equal(got == 0, pruned_ref))
        rel = float(np.max(np.abs(got - w_ref)) / np.max(np.abs(w_ref)))
        out[name] = {"same_mask": same_mask, "max_rel_weight_error": rel,
                     "ok": same_mask and rel <= 1e-4}
    return out


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def make_layer(rows, cols, kind):
    n = 2 * cols
    seed = [SEED, rows, cols]
    if kind == "realistic":
        X = ref.realistic_inputs(cols, n, seed=seed)
    else:
        X = ref.white_inputs(cols, n, seed=seed)
    H = 2.0 / n * (X @ X.T)
    H = (0.5 * (H + H.T)).astype(np.float32)
    W = (np.random.default_rng(seed + [1]).standard_normal((rows, cols)) / math.sqrt(cols))
    return W.astype(np.float32), H


def best_time(fn, repeats):
    best, result = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def run_case(rows, cols, kind, pattern, args) -> dict:
    W, H = make_layer(rows, cols, kind)
    threads = args.threads
    if pattern == "50%":
        ours_fn = lambda method: obc.prune_unstructured(  # noqa: E731
            W, H, 0.5, spread="uniform", method=method, num_threads=threads,
            **({"lazy_block": LAZY_BLOCK} if method == "sparsegpt" else {}))
        torch_kw = dict(sparsity=0.5)
    else:
        ours_fn = lambda method: obc.prune_nm(  # noqa: E731
            W, H, 2, 4, method=method, num_threads=threads,
            **({"lazy_block": LAZY_BLOCK} if method == "sparsegpt" else {}))
        torch_kw = dict(nm=(2, 4))
    case = {"layer": f"{rows}x{cols}", "kind": kind, "pattern": pattern}
    t, res = best_time(lambda: ours_fn("sparsegpt"), args.repeats)
    case["sparsegpt_s"], case["sparsegpt_loss"] = t, float(res.row_losses.sum())
    Wt, Ht = torch.from_numpy(W), torch.from_numpy(H)
    t, res_t = best_time(lambda: torch_sparsegpt(Wt, Ht, **torch_kw), args.repeats)
    case["torch_s"] = t
    case["torch_loss"] = float(obc.layer_loss(W, res_t.numpy(), H, num_threads=threads).sum())
    case["torch_over_sparsegpt_time"] = case["torch_s"] / case["sparsegpt_s"]
    if cols <= args.exact_max_cols:
        t, res_e = best_time(lambda: ours_fn("exact"), 1)
        case["exact_s"], case["exact_loss"] = t, float(res_e.row_losses.sum())
        case["sparsegpt_over_exact_loss"] = case["sparsegpt_loss"] / case["exact_loss"]
        case["exact_over_sparsegpt_time"] = case["exact_s"] / case["sparsegpt_s"]
    case["loadavg"] = os.getloadavg()
    return case


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_row(c):
    print(f"{c['layer']:>10} {c['kind']:>9} {c['pattern']:>4} "
          f"{fmt(c.get('exact_loss'), '11.4g')} {fmt(c['sparsegpt_loss'], '11.4g')} "
          f"{fmt(c['torch_loss'], '11.4g')} {fmt(c.get('sparsegpt_over_exact_loss'), '6.3f')} | "
          f"{fmt(c.get('exact_s'), '8.3f')} {fmt(c['sparsegpt_s'], '8.3f')} "
          f"{fmt(c['torch_s'], '8.3f')} {fmt(c['torch_over_sparsegpt_time'], '6.2f')}",
          flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small layers ({','.join(QUICK_LAYERS)}), 1 repeat: a smoke run")
    p.add_argument("--layers", help=f"comma list of ROWSxCOLS (default {','.join(FULL_LAYERS)})")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--repeats", type=int, default=None, help="best of N (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2, help="obc_native and torch threads")
    p.add_argument("--exact-max-cols", type=int, default=1024,
                   help="run ExactOBS only up to this width (default 1024)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_sparsegpt.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    default_layers = QUICK_LAYERS if args.quick else FULL_LAYERS
    layers = args.layers.split(",") if args.layers else default_layers
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "bench_sparsegpt",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"layers": layers, "kinds": args.kinds.split(","),
                   "patterns": args.patterns.split(","), "repeats": args.repeats,
                   "threads": args.threads, "lazy_block": LAZY_BLOCK, "damp": DAMP,
                   "exact_max_cols": args.exact_max_cols, "samples_per_col": 2, "seed": SEED},
        "versions": {"obc_native": obc.__version__, "build_info": obc.build_info(),
                     "torch": torch.__version__, "numpy": np.__version__},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_start": os.getloadavg()},
        "baseline_check": check_baseline(),
        "cases": [],
    }
    print("baseline check against the float64 replay:", report["baseline_check"])
    print(f"{'layer':>10} {'inputs':>9} {'pat':>4} {'exact loss':>11} {'sgpt loss':>11} "
          f"{'torch loss':>11} {'s/e':>6} | {'exact s':>8} {'sgpt s':>8} {'torch s':>8} "
          f"{'t/s':>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        rows, cols = (int(v) for v in layer.lower().split("x"))
        for kind in args.kinds.split(","):
            for pattern in args.patterns.split(","):
                case = run_case(rows, cols, kind, pattern, args)
                report["cases"].append(case)
                print_row(case)
                out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
