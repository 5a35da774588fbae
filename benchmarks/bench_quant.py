"""Quantization quality and GPTQ speed: obc_native.quantize (auto, refine, gptq, obq) against RTN
and the batched PyTorch GPTQ baseline (benchmarks/gptq_baseline.py), layer by layer.

For each layer (rows x cols, float32, fixed seeds), input kind, bit width, grouping and grid
fitting, the program runs on the SAME grid (the one quantize_rtn fits):

  rtn          quantize_rtn: round-to-nearest (the denominator of every loss ratio)
  default      quantize(): method="auto" (obq and gptq, each refined and scale-refitted, best
               per row; above 1024 inputs gptq alone, i.e. gptq+refine, which is not re-run)
  gptq         quantize(method="gptq", refine=False)   (on the fitted grid)
  gptq+refine  quantize(method="gptq", refine=True)    (refined and scale-refitted)
  obq          quantize(method="obq", refine=False)
  torch-gptq   gptq_baseline.gptq in float32 (act-order, lazy blocks of 128, static groups)

and reports each loss / RTN loss, default / torch-gptq (target <= 0.9), whether default is never
worse than the best single candidate on any row (per row: default <= min(gptq, gptq+refine,
obq) + 1e-9 relative), the time of obc's gptq against torch-gptq (speed ratio; target >= 5x on
LLM shapes at 2 threads; "speed" = torch / obc's whole call, which also fits the grid and
computes the losses; "sweep" = torch / (obc's gptq call - its rtn call), i.e. without what only
obc's call does, as the grid is handed to the baseline) and the GFLOP/s of obc's gptq call against a float32 and a float64
numpy GEMM of the lazy-block shape (rows x 128) @ (128 x cols), measured right before the call.

Input kinds: "realistic" = correlated features with a decaying spectrum and a few outlier
features at 10-50x scale (the generator of tests/python/problems.py's make_realistic_layer,
repeated here so that benchmarks do not import the tests); "white" = X ~ N(0, 1). n = 2 cols
samples, H = 2/n X X^T, W ~ N(0, 1/cols).

Nominal GPTQ flops (for GFLOP/s): rows cols^2 (the sweep: each step updates the later columns
of every row) + 4/3 cols^3 (inverse of H by Cholesky, then the Cholesky of the inverse). obc's
sweep runs in float64, so the float64 GEMM rate is its ceiling.

A program, never a test: prints a table and writes JSON into benchmarks/results/.
Run:  .venv/bin/python benchmarks/bench_quant.py [--large] [--layers 256x256,...] [--threads 2]
      [--kinds realistic,white] [--bits 4,3] [--groups row,128] [--grids mse[,minmax]]
The default (small layers, MSE grids) took 320 s on 2 loaded cores: OBQ (alone and
inside default's auto up to 1024 inputs) dominates; --grids minmax,mse doubles it.
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402,F401  (--threads into the OpenMP / BLAS variables, before numpy and torch)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gptq_baseline as gb  # noqa: E402

SMALL_LAYERS = ["256x256", "256x1024", "768x768"]
LARGE_LAYERS = ["768x3072", "4096x4096", "4096x11008"]
LAZY = gb.LAZY_BLOCK
PAUSE_S = 0.5  # before each timed call: numpy's and torch's spinning threads settle first
ROW_TOL = 1e-9  # relative slack of "default never worse than the best candidate" per row


def make_layer(rows: int, cols: int, *, kind: str = "realistic", seed: int = 0, outliers: int = 6):
    """(W float32 (rows, cols), H float64 (cols, cols)) for one benchmark layer.

    realistic: X (cols x 2 cols) = Q diag(s) Z + mean, s_i = 1/sqrt(1 + i/8) (a decaying
    spectrum), Q a random rotation, non-zero feature means, `outliers` features scaled by
    10..50; white: X ~ N(0, 1). W ~ N(0, 1/cols). H = 2/n X X^T, exactly symmetric.
    """
    rng = np.random.default_rng(seed)
    n = 2 * cols
    if kind == "realistic":
        Q, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
        s = 1.0 / np.sqrt(1.0 + np.arange(cols) / 8.0)
        X = (Q * s) @ rng.standard_normal((cols, n))
        X += 0.5 * rng.standard_normal((cols, 1))
        if outliers:
            idx = rng.choice(cols, size=outliers, replace=False)
            X[idx] *= rng.uniform(10, 50, size=outliers)[:, None]
    elif kind == "white":
        X = rng.standard_normal((cols, n))
    else:
        raise ValueError(f"kind: expected 'realistic' or 'white', got {kind!r}")
    H = 2.0 / n * (X @ X.T)
    H = 0.5 * (H + H.T)
    W = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    return W, H


def gemm_gflops(rows: int, cols: int, dtype, min_seconds: float = 0.2) -> float:
    """GFLOP/s of numpy (rows x 128) @ (128 x cols) in dtype, best of repeated calls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, LAZY)).astype(dtype)
    b = rng.standard_normal((LAZY, cols)).astype(dtype)
    a @ b  # warm-up
    best = float("inf")
    t_end = time.perf_counter() + min_seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * rows * LAZY * cols / best / 1e9


def gptq_flops(rows: int, cols: int) -> float:
    """Nominal flops of one GPTQ call (see the module docstring)."""
    return rows * cols**2 + 4.0 / 3.0 * cols**3


def timed(fn, reps: int = 1):
    """(result of the first call, best wall time of `reps` calls): the best of a few is the
    least disturbed by other work on a shared machine."""
    out, best = None, float("inf")
    for i in range(reps):
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
        out = res if i == 0 else out
    return out, best


def auto_methods(obc, cols: int) -> list:
    """The default's candidates at this width (obq + gptq before auto_quant_methods existed)."""
    return obc.auto_quant_methods(cols) if hasattr(obc, "auto_quant_methods") else ["obq", "gptq"]


def run_case(obc, W, H, bits, group, grid, threads, skip_obq: bool, reps: int) -> dict:
    """All quantizers on one layer and grid; returns the JSON record of the case."""
    kw = dict(sym=True, group_size=group, grid=grid, num_threads=threads)
    rtn, t_rtn = timed(lambda: obc.quantize_rtn(W, H, bits, **kw), reps)
    rows, cols = W.shape
    rec: dict = {"rtn_loss": rtn.loss}
    gemm32 = gemm_gflops(rows, cols, np.float32)
    gemm64 = gemm_gflops(rows, cols, np.float64)
    gptq, t_gptq = timed(lambda: obc.quantize(W, H, bits, method="gptq", refine=False, **kw),
                         reps)
    assert np.array_equal(gptq.scale, rtn.scale), "quantize and quantize_rtn grids differ"
    base, t_base = timed(lambda: gb.gptq(W, H, bits, rtn.scale, rtn.zero, group), reps)
    base_loss = float(gb.layer_loss(W, base.weight, H).sum())
    gptq_r, t_gptq_r = timed(lambda: obc.quantize(W, H, bits, method="gptq", refine=True, **kw))
    cands = {"gptq": gptq, "gptq+refine": gptq_r}
    times = {"rtn": t_rtn, "gptq": t_gptq, "gptq+refine": t_gptq_r, "torch-gptq": t_base}
    if not skip_obq:
        obq, times["obq"] = timed(lambda: obc.quantize(W, H, bits, method="obq", refine=False,
                                                       **kw))
        cands["obq"] = obq
    if auto_methods(obc, cols) == ["gptq"]:
        # above AUTO_OBQ_MAX_COLS the default is refined GPTQ, bit for bit (tested): not re-run
        default, times["default"] = gptq_r, t_gptq_r
        rec["default_is_gptq_refine"] = True
    elif not skip_obq:
        default, times["default"] = timed(lambda: obc.quantize(W, H, bits, **kw))
    else:  # the default runs OBQ here, which is out of reach of this run (--obq-max-cols)
        default = None
    losses = {name: r.loss for name, r in cands.items()}
    losses["torch-gptq"] = base_loss
    if default is not None:
        losses["default"] = default.loss
        best_row = np.min(np.stack([r.row_losses for r in cands.values()]), axis=0)
        worse = default.row_losses > best_row * (1 + ROW_TOL) + 1e-30
        rec["default_rows_worse_than_best_candidate"] = int(worse.sum())
        names = obc.QUANT_METHODS if hasattr(obc, "QUANT_METHODS") else None
        if names is not None and default.row_methods is not None:
            kept = np.bincount(default.row_methods, minlength=len(names))
            rec["default_row_methods"] = {names[i]: int(k) for i, k in enumerate(kept) if k}
        rec["default_refine_passes"] = default.refine_passes
    rec["loss"] = losses
    rec["loss_over_rtn"] = {k: v / rtn.loss for k, v in losses.items()}
    if default is not None:
        rec["default_over_torch_gptq"] = default.loss / base_loss
    rec["gptq_over_torch_gptq"] = gptq.loss / base_loss
    rec["seconds"] = times
    rec["speedup_gptq_vs_torch"] = t_base / t_gptq
    # Both sides without what only obc's call does (fitting the grid, the loss): the rtn call
    # does exactly that, so obc's gptq - rtn = Hessian inversion + factorization + sweep.
    # (None when the difference is lost in the timing noise.)
    sweep = t_gptq - t_rtn
    rec["speedup_sweep_vs_torch"] = t_base / sweep if sweep > 0.05 * t_gptq else None
    rec["gflops_gptq"] = gptq_flops(rows, cols) / t_gptq / 1e9
    rec["gemm_gflops_float32"] = gemm32
    rec["gemm_gflops_float64"] = gemm64
    return rec


def fmt_row(layer, kind, bits, group, grid, rec) -> str:
    r = rec["loss_over_rtn"]

    def g(name):
        return f"{r[name]:7.3f}" if name in r else "      -"

    d_t = rec.get("default_over_torch_gptq")
    worse = rec.get("default_rows_worse_than_best_candidate")
    sweep = rec["speedup_sweep_vs_torch"]
    sweep_s = "  n/a " if sweep is None else f"{sweep:5.1f}x"
    return (f"| {layer:>10s} | {kind:9s} | {bits} | {group or 'row':>3} | {grid:6s} | "
            f"{g('default')} | {g('gptq')} | {g('gptq+refine')} | {g('obq')} | "
            f"{g('torch-gptq')} | {(f'{d_t:6.3f}' if d_t is not None else '     -')} | "
            f"{('-' if worse is None else worse):>5} | "
            f"{rec['seconds']['gptq']:7.3f} | {rec['seconds']['torch-gptq']:7.3f} | "
            f"{rec['speedup_gptq_vs_torch']:5.1f}x | "
            f"{sweep_s} | "
            f"{rec['gflops_gptq']:6.1f} | "
            f"{rec['gemm_gflops_float32']:6.1f} | {rec['gemm_gflops_float64']:6.1f} |")


HEADER = ("| layer      | inputs    | b | grp | grid   | default | gptq    | gptq+rf | obq     | "
          "torch   | def/tg | worse | obc s   | torch s | speed  | sweep  | GF/s   | sgemm  | dgemm  |\n"
          "|-----------:|-----------|---|----:|--------|--------:|--------:|--------:|--------:|"
          "--------:|-------:|------:|--------:|--------:|-------:|-------:|-------:|-------:|-------:|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help=f"layers {','.join(LARGE_LAYERS)}")
    ap.add_argument("--layers", default=None, help="comma-separated ROWSxCOLS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="realistic,white")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--groups", default="row,128", help="'row' = one grid per row, or a size")
    ap.add_argument("--grids", default="mse", help="comma-separated: minmax, mse")
    ap.add_argument("--obq-max-cols", type=int, default=1024,
                    help="skip obq (and the default where it runs OBQ) above this many inputs")
    ap.add_argument("--reps", type=int, default=2,
                    help="timed calls of rtn, gptq and torch-gptq; the best counts")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    import obc_native as obc

    torch.set_num_threads(args.threads)
    layers = (args.layers.split(",") if args.layers
              else LARGE_LAYERS if args.large else SMALL_LAYERS)
    kinds = args.kinds.split(",")
    bits_list = [int(b) for b in args.bits.split(",")]
    groups = [None if g == "row" else int(g) for g in args.groups.split(",")]
    grids = args.grids.split(",")
    print(f"obc_native {getattr(obc, '__version__', '?')}, torch {torch.__version__}, numpy "
          f"{np.__version__}, {args.threads} threads; losses are / RTN on the same grid")
    print(HEADER)
    cases = []
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    for li, layer in enumerate(layers):
        rows, cols = (int(x) for x in layer.split("x"))
        for ki, kind in enumerate(kinds):
            W, H = make_layer(rows, cols, kind=kind, seed=1000 * li + ki)
            for bits in bits_list:
                for group in groups:
                    if group is not None and cols % group:
                        continue
                    for grid in grids:
                        rec = run_case(obc, W, H, bits, group, grid, args.threads,
                                       skip_obq=cols > args.obq_max_cols, reps=args.reps)
                        print(fmt_row(layer, kind, bits, group, grid, rec), flush=True)
                        rec.update(layer=layer, kind=kind, bits=bits, group_size=group,
                                   grid=grid, sym=True, loadavg_after=os.getloadavg()[0])
                        cases.append(rec)
    total = time.perf_counter() - t_start
    d_t = [c["default_over_torch_gptq"] for c in cases if "default_over_torch_gptq" in c]
    worse = sum(c.get("default_rows_worse_than_best_candidate", 0) for c in cases)
    summary = {
        "cases": len(cases),
        "default_over_torch_gptq_max": max(d_t) if d_t else None,
        "default_over_torch_gptq_geomean": float(np.exp(np.mean(np.log(d_t)))) if d_t else None,
        "cases_meeting_0.9": sum(v <= 0.9 for v in d_t),
        "rows_where_default_worse_than_best_candidate": worse,
        "speedup_gptq_vs_torch_min": min(c["speedup_gptq_vs_torch"] for c in cases),
        "speedup_gptq_vs_torch_max": max(c["speedup_gptq_vs_torch"] for c in cases),
        "speedup_sweep_vs_torch_min": min((c["speedup_sweep_vs_torch"] for c in cases
                                           if c["speedup_sweep_vs_torch"] is not None),
                                          default=None),
        "seconds_total": total,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }
    print(f"\nsummary: {json.dumps(summary)}")
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results"
        / f"bench_quant_{'large' if args.large else 'small'}_"
          f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {"layers": layers, "kinds": kinds, "bits": bits_list,
                   "groups": [g or "row" for g in groups], "grids": grids, "sym": True,
                   "damp": 0.01, "lazy_block": LAZY, "obq_max_cols": args.obq_max_cols,
                   "row_tol": ROW_TOL, "reps": args.reps},
        "versions": {"obc_native": getattr(obc, "__version__", None), "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "threads": args.threads,
        "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "cases": cases,
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
