"""Cost of quantize()'s refinement (coordinate descent over the codes, and the scale refit rounds
that re-run it) against GPTQ alone, on realistic layers.

For each layer (tests/python/problems.py's make_realistic_layer, float32, seed 0; 4 bits,
symmetric, per-row MSE grid, damp 0.01) three calls of quantize(method="gptq"): refine=False
(GPTQ alone), refit_rounds=0 (GPTQ + refinement) and the default (GPTQ + refinement + 2 refit
rounds, each refined again). Reported: best wall and process CPU seconds of --reps calls, the
total loss (sum of row_losses), the refinement's share (call - GPTQ alone) and the pass count.
On a shared machine the CPU seconds are the steadier figure; the load average is printed with
every row. For an old-vs-new comparison run it once per build (--obc-path: the directory that
holds the obc_native package to import, e.g. a copy of another build's python/) and compare the
JSON files.

Usage: python benchmarks/bench_refine.py [--layers 256x1024,768x3072,4096x4096] [--threads 2]
       [--reps 1] [--obc-path DIR] [--out path.json]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402,F401  (--threads into the OpenMP / BLAS variables, before numpy)

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

CALLS = (("gptq", dict(refine=False)), ("gptq+refine", dict(refit_rounds=0)), ("default", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="256x1024,768x3072,4096x4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--obc-path", default=None, help="directory holding the obc_native package")
    ap.add_argument("--out", default=None, help="JSON output (default results/refine_<time>.json)")
    args = ap.parse_args()
    sys.path.insert(0, args.obc_path or str(ROOT / "python"))
    import obc_native  # noqa: PLC0415  (after --obc-path)
    from problems import make_realistic_layer  # noqa: PLC0415

    rows_out = []
    print(f"{'layer':>10} {'call':>12} {'wall s':>8} {'cpu s':>8} {'refine s':>9} {'loss':>12} "
          f"{'passes':>6} {'load':>5}")
    for layer in args.layers.split(","):
        rows, cols = (int(v) for v in layer.split("x"))
        W, H = make_realistic_layer(rows, cols, seed=0)
        base_wall = base_cpu = None
        for name, kw in CALLS:
            best = None
            for _ in range(args.reps):
                t0, c0 = time.perf_counter(), time.process_time()
                res = obc_native.quantize(W, H, 4, method="gptq", num_threads=args.threads, **kw)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if best is None or wall < best[0]:
                    best = (wall, cpu, res)
            wall, cpu, res = best
            if name == "gptq":
                base_wall, base_cpu = wall, cpu
            row = dict(layer=layer, call=name, wall_s=wall, cpu_s=cpu,
                       refine_wall_s=wall - base_wall, refine_cpu_s=cpu - base_cpu,
                       loss=float(np.sum(res.row_losses)), passes=int(res.refine_passes),
                       load=os.getloadavg()[0])
            rows_out.append(row)
            print(f"{layer:>10} {name:>12} {wall:8.2f} {cpu:8.2f} {row['refine_wall_s']:9.2f} "
                  f"{row['loss']:12.8g} {row['passes']:6d} {row['load']:5.1f}", flush=True)
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"refine_{dt.datetime.now():%Y%m%d_%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(threads=args.threads, reps=args.reps,
                                   obc_path=args.obc_path, rows=rows_out), indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
