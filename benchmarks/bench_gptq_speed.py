"""GPTQ speed: obc_native's quantize(method="gptq") against the batched torch baseline, side by side.

For each layer: the machine's GEMM rate (numpy float32 and float64, square matmul of the
largest size <= 2048 that the layer allows, on --threads threads, best of a few), GPTQ's nominal
flop count (rows cols^2 for the lazy updates + 4/3 cols^3 for the inverse and the factor, as
bench_quant.py), then --reps alternating timed calls of obc's whole gptq call (grid fit, inverse,
factor, sweep, losses) and of gptq_baseline.gptq (float32, grid handed over; it fits nothing and
computes no loss). Reported: best wall seconds and process CPU seconds of each, the ratio torch /
obc (wall and CPU); the baseline's own grid fit (gptq_baseline.fit_grid, the same rule done the
batched torch way, as GPTQ's reference quantizer fits it; timed once) and the like-for-like ratio
(torch grid fit + torch GPTQ) / obc, whose call fits its grid too; and obc's rate on the nominal flops as a share of the float32 and float64
GEMM rates. On a shared machine the CPU-time ratio is the steadier figure; the load average is
printed with every row.

Layers: "realistic" inputs as bench_quant.py (correlated features, 6 outliers) up to 4096
inputs; above that a cheaper Hessian of the same kind (diag + rank-1024 correlated part with
outliers), which costs O(cols^2 1024) to build instead of O(cols^3).

--float64: also obc's gptq call on the same layer as float64 arrays (W widened, H as built: numpy's
default dtype), alternating with the float32 call; a second table gives both calls' best wall and
CPU seconds and the float64 / float32 CPU ratio (the flops are the same; float64 GEMMs run at
half the float32 rate, so ~2x is the expected cost).

Usage: python benchmarks/bench_gptq_speed.py [--layers 768x3072,4096x4096] [--threads 2]
       [--bits 4] [--group row|128] [--reps 2] [--cheap-h] [--float64] [--out path.json]
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402,F401  (--threads into the OpenMP / BLAS variables, before numpy and torch)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_quant as bq  # noqa: E402
import gptq_baseline as gb  # noqa: E402

DEFAULT_LAYERS = ["768x3072", "4096x4096"]


def cheap_layer(rows: int, cols: int, seed: int = 0, rank: int = 1024, outliers: int = 6):
    """(W float32, H float64) with H = 2/n (X X^T) for X = [diag part; rank-`rank` correlated
    part with `outliers` features at 10-50x]: full rank, decaying spectrum, O(cols^2 rank)."""
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(1.0 + np.arange(cols) / 8.0)
    A = rng.standard_normal((cols, rank)) * s[:, None]
    idx = rng.choice(cols, size=outliers, replace=False)
    A[idx] *= rng.uniform(10, 50, size=outliers)[:, None]
    H = A @ A.T / rank + np.diag(0.1 * s**2)
    H = 0.5 * (H + H.T)
    W = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    return W, H


def gemm_rate(n: int, dtype, min_seconds: float = 0.5) -> float:
    """GFLOP/s of numpy's n x n matmul in dtype, best of repeated calls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b
    best, reps, t_end = float("inf"), 0, time.perf_counter() + min_seconds
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best / 1e9


def timed(fn):
    """(result, wall seconds, process CPU seconds) of one call after a short pause."""
    time.sleep(bq.PAUSE_S)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(DEFAULT_LAYERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", default="row")
    ap.add_argument("--grid", default="mse")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cheap-h", action="store_true",
                    help="the diag + low-rank Hessian for every layer (fast to build)")
    ap.add_argument("--float64", action="store_true",
                    help="also time obc's gptq call on float64 W and H (second table)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import obc_native as obc

    torch.set_num_threads(args.threads)
    group = None if args.group == "row" else int(args.group)
    info = obc.build_info()
    # kernel_isa is the row kernels' copy; GPTQ's factor and sweep also have an AVX-512 copy
    isa = "avx512" if info.get("avx512_kernels") else info.get("kernel_isa", "?")
    print(f"obc_native {getattr(obc, '__version__', '?')} (gptq kernels: {isa}), "
          f"torch {torch.__version__}, {args.threads} threads, {args.bits} bit, group "
          f"{args.group}, grid {args.grid}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print("| layer | sgemm GF/s | dgemm GF/s | GPTQ GFLOP | obc s | torch s | torch/obc wall | "
          "obc CPU s | torch CPU s | torch/obc CPU | obc GF/s | % sgemm | % dgemm | loss obc/torch "
          "| load | torch grid s | (torch grid + torch) / obc wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases = []
    for li, layer in enumerate(args.layers.split(",")):
        rows, cols = (int(x) for x in layer.split("x"))
        W, H = (bq.make_layer(rows, cols, kind="realistic", seed=li)
                if cols <= 4096 and not args.cheap_h else cheap_layer(rows, cols, seed=li))
        n = min(2048, cols)
        sgemm, dgemm = gemm_rate(n, np.float32), gemm_rate(n, np.float64)
        kw = dict(sym=True, group_size=group, grid=args.grid, num_threads=args.threads)
        grid = obc.quantize_rtn(W, H, args.bits, **kw)
        obc_t, obc_c, base_t, base_c, f64_t, f64_c = [], [], [], [], [], []
        W64, H64 = W.astype(np.float64), np.asarray(H, dtype=np.float64)
        for _ in range(args.reps):  # alternating, so that both see the same load
            res, t, c = timed(lambda: obc.quantize(W, H, args.bits, method="gptq", refine=False,
                                                   **kw))
            obc_t.append(t)
            obc_c.append(c)
            if args.float64:
                _, t, c = timed(lambda: obc.quantize(W64, H64, args.bits, method="gptq",
                                                     refine=False, **kw))
                f64_t.append(t)
                f64_c.append(c)
            base, t, c = timed(lambda: gb.gptq(W, H, args.bits, grid.scale, grid.zero, group))
            base_t.append(t)
            base_c.append(c)
        (torch_scale, torch_zero), t_grid, _ = timed(
            lambda: gb.fit_grid(W, args.bits, sym=True, group_size=group, grid=args.grid))
        grids_same = bool(np.array_equal(torch_scale, grid.scale)
                          and np.array_equal(torch_zero, grid.zero))
        flops = bq.gptq_flops(rows, cols)
        t_obc, t_base = min(obc_t), min(base_t)
        rate = flops / t_obc / 1e9
        loss_ratio = res.loss / float(gb.layer_loss(W, base.weight, H).sum())
        rec = {"layer": layer, "sgemm_gflops": sgemm, "dgemm_gflops": dgemm,
               "gptq_gflop": flops / 1e9, "obc_s": t_obc, "torch_s": t_base,
               "obc_cpu_s": min(obc_c), "torch_cpu_s": min(base_c),
               "speedup_wall": t_base / t_obc, "speedup_cpu": min(base_c) / min(obc_c),
               "obc_gflops": rate, "share_sgemm": rate / sgemm, "share_dgemm": rate / dgemm,
               "loss_obc_over_torch": loss_ratio, "loadavg": os.getloadavg()[0],
               "obc_s_all": obc_t, "torch_s_all": base_t, "torch_grid_s": t_grid,
               "speedup_wall_with_grid": (t_grid + t_base) / t_obc,
               "torch_grid_equals_obc_grid": grids_same}
        if args.float64:
            rec.update({"obc_f64_s": min(f64_t), "obc_f64_cpu_s": min(f64_c),
                        "obc_f64_s_all": f64_t,
                        "f64_over_f32_cpu": min(f64_c) / min(obc_c),
                        "f64_over_f32_wall": min(f64_t) / t_obc})
        cases.append(rec)
        print(f"| {layer} | {sgemm:.0f} | {dgemm:.0f} | {flops / 1e9:.0f} | {t_obc:.2f} | "
              f"{t_base:.2f} | {rec['speedup_wall']:.2f}x | {rec['obc_cpu_s']:.2f} | "
              f"{rec['torch_cpu_s']:.2f} | {rec['speedup_cpu']:.2f}x | {rate:.1f} | "
              f"{100 * rec['share_sgemm']:.0f}% | {100 * rec['share_dgemm']:.0f}% | "
              f"{loss_ratio:.4f} | {rec['loadavg']:.1f} | {t_grid:.2f}"
              f"{'' if grids_same else ' (other grid)'} | {rec['speedup_wall_with_grid']:.2f}x |",
              flush=True)
    if args.float64:
        print("\n| layer | obc f32 s | obc f64 s | f64/f32 wall | f32 CPU s | f64 CPU s | "
              "f64/f32 CPU |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for rec in cases:
            print(f"| {rec['layer']} | {rec['obc_s']:.2f} | {rec['obc_f64_s']:.2f} | "
                  f"{rec['f64_over_f32_wall']:.2f}x | {rec['obc_cpu_s']:.2f} | "
                  f"{rec['obc_f64_cpu_s']:.2f} | {rec['f64_over_f32_cpu']:.2f}x |")
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results"
        / f"bench_gptq_speed_{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": args.threads,
                               "utc": dt.datetime.now(dt.timezone.utc).isoformat(
                                   timespec="seconds"),
                               "cases": cases}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
