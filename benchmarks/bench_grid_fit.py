"""MSE grid fit speed: make_grid(grid="mse") by its fast path against the plain scan, per ISA.

The plain scan (`_core.f32._make_grid(..., plain_scan=True)`, the reference the fast path must
match bit for bit) sums every one of the 80 shrink factors' errors in full with std::pow; the fast
path screens them with a vectorized estimate (generic SSE2, AVX2+FMA or AVX-512 copy) and sums
exactly only the candidates that can still win. For each row length (4096, 11008), bit width
(3, 4), sym / asym and per-channel / group 128, on --rows rows of gaussian weights with sparse
outliers: median seconds of --reps calls of each, at 1 and 2 threads, the ratio plain / fast, and
a check that both chose the same grids. The SIMD copy is fixed per process (OBC_SIMD), so each
ISA runs in a subprocess of this script (`--worker`): generic, avx2 (OBC_SIMD=avx2: AVX2 even on
AVX-512 CPUs) and the default (AVX-512 where the CPU has it).

--gptq: the share of make_grid in a whole quantize(method="gptq", refine=False) call (4-bit sym,
per-row grids or --gptq-group) on a ROWSxCOLS layer (default 4096x4096, H of rank 512 +
diagonal): the call's median time, the make_grid time in the same process (fast path, and the
plain scan once), so share = grid / call.
--before DIR: the same cases' make_grid time (row lengths --before-cols, default 4096) with
another build (DIR: a python/ directory with its obc_native, e.g. main's before this change)
against this one, both estimated as t(quantize_rtn, mse) - t(quantize_rtn, minmax), 1 thread
(that build has no _make_grid).
--gptq-before DIR additionally runs the same layer on another build (DIR: a python/ directory
holding its obc_native, e.g. a copy of main's), whose make_grid share is estimated as
t(gptq, mse) - t(gptq, minmax) (it has no _make_grid binding).

Usage: python benchmarks/bench_grid_fit.py [--rows 32] [--reps 3] [--cols 4096,11008]
       [--isas generic,avx2,default] [--before DIR] [--before-cols 4096] [--gptq]
       [--gptq-layer 4096x4096]
       [--gptq-before DIR]
       [--out path.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """float32 rows x cols: gaussian (std 0.02) with 0.2% outliers at 8x, like LLM linear layers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    w[rng.random((rows, cols)) < 0.002] *= 8
    return np.ascontiguousarray(w, dtype=np.float32)


def median_time(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def worker(args) -> dict:
    """One ISA (this process's OBC_SIMD): every case, fast and plain, 1 and 2 threads."""
    import obc_native as obc
    from obc_native import _core

    info = obc.build_info()
    cases = []
    for cols in args.cols:
        W = weights(args.rows, cols, seed=cols)
        for bits in (3, 4):
            for sym in (True, False):
                for group in (0, 128):
                    for threads in (1, 2):
                        def fit(plain):
                            return _core.f32._make_grid(W, bits, sym, group, "mse", threads, plain)
                        t_fast, fast = median_time(lambda: fit(False), args.reps)
                        t_plain, plain = median_time(lambda: fit(True), args.plain_reps)
                        same = bool(np.array_equal(fast[0], plain[0])
                                    and np.array_equal(fast[1], plain[1]))
                        cases.append({"cols": cols, "bits": bits, "sym": sym,
                                      "group": group or "row", "threads": threads,
                                      "fast_s": t_fast, "plain_s": t_plain,
                                      "fast_ms_per_row": 1e3 * t_fast / args.rows,
                                      "plain_ms_per_row": 1e3 * t_plain / args.rows,
                                      "speedup": t_plain / t_fast, "same_grids": same})
    return {"isa": info["grid_screen_isa"], "kernel_isa": info["kernel_isa"], "cases": cases,
            "loadavg": os.getloadavg()[0]}


def rtn_worker(args) -> dict:
    """make_grid(mse) of this process's build, for builds without _make_grid: the median of
    quantize_rtn(grid="mse") minus that of quantize_rtn(grid="minmax") (same rounding and loss
    work, H = identity), 1 thread, each case as in worker() on 4x the rows."""
    import obc_native as obc

    info = obc.build_info()
    cases = []
    for cols in args.before_cols:
        W = weights(4 * args.rows, cols, seed=cols)  # 4x the rows: make_grid above the noise
        H = np.eye(cols)
        for bits in (3, 4):
            for sym in (True, False):
                for group in (0, 128):
                    def rtn(grid):
                        return obc.quantize_rtn(W, H, bits, sym=sym, group_size=group or None,
                                                grid=grid, num_threads=1)
                    t_mse, _ = median_time(lambda: rtn("mse"), args.reps + 2)
                    t_minmax, _ = median_time(lambda: rtn("minmax"), args.reps + 2)
                    cases.append({"cols": cols, "bits": bits, "sym": sym, "group": group or "row",
                                  "make_grid_s": max(t_mse - t_minmax, 1e-9)})
    return {"isa": info.get("grid_screen_isa", info["kernel_isa"]), "cases": cases,
            "build": obc.__file__}


def gptq_layer(rows: int, cols: int, rank: int = 512, seed: int = 1):
    """(W float32, H float64): H = A A^T / rank + small diagonal, full rank, decaying spectrum."""
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(1.0 + np.arange(cols) / 8.0)
    A = rng.standard_normal((cols, rank)) * s[:, None]
    H = A @ A.T / rank + np.diag(0.1 * s**2)
    return weights(rows, cols, seed), 0.5 * (H + H.T)


def gptq_worker(args) -> dict:
    """The gptq call on one layer with this process's obc_native; make_grid timed beside it."""
    import obc_native as obc
    from obc_native import _core

    rows, cols = (int(x) for x in args.gptq_layer.split("x"))
    W, H = gptq_layer(rows, cols)
    out = {"layer": args.gptq_layer, "build": obc.__file__, "loadavg": os.getloadavg()[0]}

    def call(grid):
        return obc.quantize(W, H, 4, sym=True, group_size=args.gptq_group or None, grid=grid,
                            method="gptq",
                            refine=False, num_threads=args.gptq_threads)

    out["gptq_mse_s"], _ = median_time(lambda: call("mse"), args.gptq_reps)
    out["gptq_minmax_s"], _ = median_time(lambda: call("minmax"), args.gptq_reps)
    if hasattr(_core.f32, "_make_grid"):
        def fit(plain):
            return _core.f32._make_grid(W, 4, True, args.gptq_group, "mse", args.gptq_threads,
                                        plain)
        out["make_grid_s"], _ = median_time(lambda: fit(False), args.gptq_reps)
        out["plain_scan_s"], _ = median_time(lambda: fit(True), 1)
        out["share"] = out["make_grid_s"] / out["gptq_mse_s"]
        # the same call had make_grid been the plain scan
        plain_call = out["gptq_mse_s"] - out["make_grid_s"] + out["plain_scan_s"]
        out["share_if_plain_scan"] = out["plain_scan_s"] / plain_call
    out["share_by_difference"] = (out["gptq_mse_s"] - out["gptq_minmax_s"]) / out["gptq_mse_s"]
    return out


def run_worker(flag: str, env_extra: dict, args) -> dict:
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, os.path.abspath(__file__), flag, "--rows", str(args.rows), "--reps",
           str(args.reps), "--plain-reps", str(args.plain_reps), "--cols",
           ",".join(map(str, args.cols)), "--before-cols", ",".join(map(str, args.before_cols)),
           "--gptq-layer", args.gptq_layer, "--gptq-reps",
           str(args.gptq_reps), "--gptq-threads", str(args.gptq_threads), "--gptq-group",
           str(args.gptq_group)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="fast-path calls per case (median)")
    ap.add_argument("--plain-reps", type=int, default=1, help="plain-scan calls per case")
    ap.add_argument("--cols", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 11008])
    ap.add_argument("--isas", default="generic,avx2,default")
    ap.add_argument("--before-cols", type=lambda s: [int(x) for x in s.split(",")], default=[4096],
                    help="row lengths of the --before comparison (its H is cols x cols)")
    ap.add_argument("--gptq", action="store_true")
    ap.add_argument("--gptq-layer", default="4096x4096")
    ap.add_argument("--gptq-reps", type=int, default=3)
    ap.add_argument("--gptq-threads", type=int, default=2)
    ap.add_argument("--gptq-group", type=int, default=0, help="0: per-row grids (default)")
    ap.add_argument("--gptq-before", default=None, metavar="DIR")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gptq-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rtn-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="also time make_grid of the build in DIR (a python/ directory) and of "
                         "this one by the quantize_rtn difference, per ISA, 1 thread")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.rtn_worker:
        print(json.dumps(rtn_worker(args)))
        return 0
    if args.gptq_worker:
        print(json.dumps(gptq_worker(args)))
        return 0

    import obc_native as obc

    print(f"obc_native {obc.__version__}, {obc.build_info()['compiler']}, rows {args.rows}, "
          f"fast median of {args.reps}, plain median of {args.plain_reps}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    per_isa = []
    for isa in args.isas.split(","):
        env = {} if isa == "default" else {"OBC_SIMD": isa}
        res = run_worker("--worker", env, args)
        res["requested"] = isa
        per_isa.append(res)
        print(f"\n### {isa} (screening copy: {res['isa']}, load average {res['loadavg']:.1f})\n")
        print("| cols | bits | sym | group | threads | plain ms/row | fast ms/row | plain/fast "
              "| same |")
        print("|---:|---:|---|---|---:|---:|---:|---:|---|")
        for c in res["cases"]:
            sym = "sym" if c["sym"] else "asym"
            print(f"| {c['cols']} | {c['bits']} | {sym} | {c['group']} | "
                  f"{c['threads']} | {c['plain_ms_per_row']:.3f} | {c['fast_ms_per_row']:.3f} | "
                  f"{c['speedup']:.1f}x | {'yes' if c['same_grids'] else 'NO'} |", flush=True)
        if args.before:
            before = run_worker("--rtn-worker", dict(env, PYTHONPATH=os.path.abspath(args.before)),
                                args)
            after = run_worker("--rtn-worker", env, args)
            res["rtn_diff_before"], res["rtn_diff_after"] = before, after
            ratios = [b["make_grid_s"] / a["make_grid_s"]
                      for b, a in zip(before["cases"], after["cases"])]
            print(f"\nbefore ({before['isa']}) / after ({after['isa']}), make_grid by the "
                  f"quantize_rtn difference, 1 thread, per case: "
                  + " ".join(f"{r:.2f}" for r in ratios)
                  + f"; median {statistics.median(ratios):.2f}x", flush=True)
            res["before_over_after_median"] = statistics.median(ratios)
    # ISA against ISA on the fast path: the same cases, same order
    if len(per_isa) > 1:
        base = per_isa[0]
        print(f"\nfast path, time relative to {base['requested']} (lower is faster):")
        for res in per_isa[1:]:
            ratios = [c["fast_s"] / b["fast_s"] for c, b in zip(res["cases"], base["cases"])]
            print(f"  {res['requested']}: median {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    gptq = []
    if args.gptq:
        builds = [("after", {})]
        if args.gptq_before:
            builds.insert(0, ("before", {"PYTHONPATH": os.path.abspath(args.gptq_before)}))
        group = args.gptq_group or "row"
        print(f"\n### make_grid in quantize(method='gptq', 4 bit sym, group {group}, "
              f"refine=False), {args.gptq_layer}, {args.gptq_threads} threads\n")
        for name, env in builds:
            res = run_worker("--gptq-worker", env, args)
            res["which"] = name
            gptq.append(res)
            line = (f"{name}: gptq call {res['gptq_mse_s']:.2f} s (minmax grid "
                    f"{res['gptq_minmax_s']:.2f} s, difference "
                    f"{100 * res['share_by_difference']:.0f}%)")
            if "make_grid_s" in res:
                line += (f"; make_grid {res['make_grid_s']:.2f} s = {100 * res['share']:.1f}% of "
                         f"the call; plain scan {res['plain_scan_s']:.2f} s "
                         f"(would be {100 * res['share_if_plain_scan']:.0f}%)")
            print(line, flush=True)
    out = Path(args.out) if args.out else (
        Path(__file__).resolve().parent / "results"
        / f"bench_grid_fit_{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    utc = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out.write_text(json.dumps({"args": vars(args), "build_info": obc.build_info(), "utc": utc,
                               "isas": per_isa, "gptq": gptq}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
