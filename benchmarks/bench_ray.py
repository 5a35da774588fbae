"""The Ray executor on this machine: per-task overhead, throughput against the local executor,
and a wall-time estimate for a 7B LLM's linear layers on N nodes of M cores.

Measured (one process, side by side, the same machine, so ratios show the overhead):

  empty task      round trip of a no-op Ray task (tasks submitted together, per task)
  1-row solve     a 1-row unit solved locally vs as one Ray task (Hessian put in the object
                  store first): the fixed cost a task adds to a solve
  layer           one layer (rows x cols, int4 GPTQ and 2:4 ExactOBS) solved by the local
                  executor (the solver's own threads) vs the Ray executor (row ranges of 256
                  rows as tasks of 1 CPU each), bit-identical results checked
  rates           a solve call of r rows costs fixed(cols) + r * per_row(cols) at 1 thread:
                  the fixed part (damping, inverse / Cholesky of H: ~cols^3) is paid by EVERY
                  task, the per-row part is split. Both from calls of --rate-rows r1,r2 rows at
                  each of --cols; the fitted exponent p (least squares in log space) is printed,
                  but the extrapolation to 4096 / 11008 cols uses the exponent of the algorithm
                  (fixed: cols^3; per row: cols^2 for GPTQ, cols^3 for OBQ / ExactOBS) with the
                  constant of the largest measured cols (small cols are dominated by overheads
                  and a loaded machine's noise, which bends the fitted exponents)

The estimate: a LLaMA-7B-shaped model, 32 blocks x {4 x (4096 rows, 4096 cols) [q, k, v, o],
2 x (11008 rows, 4096 cols) [gate, up], 1 x (4096 rows, 11008 cols) [down]}, every layer split
into ranges of 256 rows (what the executor does when the cluster has at least that many CPUs);
core-seconds = sum over tasks of fixed(cols) + 256 per_row(cols) + the measured task overhead;
wall time on N nodes x M cores = max(core-seconds / (N M), the longest task) plus the Hessian
broadcast (every node receives every Hessian once: cols^2 x 8 bytes at --link-gbps).
Calibration (the model's forward passes) is not included. The fits are only as good as their
exponents over the measured range (small cols: cache effects; a loaded machine: noise).

A program, never a test: prints a table and writes JSON into benchmarks/results/.
Run:  .venv/bin/python benchmarks/bench_ray.py [--cols 128,256,512] [--rows 512] [--cpus 2]
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

HERE = os.path.dirname(os.path.abspath(__file__))

import obc_native  # noqa: E402  (no torch: cheap; tells where the package under test lives)

# Ray workers import obc_native from where this process does (the installed package, or the
# source tree of a dev build on PYTHONPATH); never the unbuilt python/ of a checkout
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(obc_native.__file__)))

LLAMA_7B = [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]  # (rows, cols, count) per block
BLOCKS = 32


def _noop(x):
    return x


def _problem(rows, cols, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * cols, cols))
    hessian = 2 * x.T @ x / (2 * cols)
    weight = (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)
    return weight, hessian


def _timed(fn, repeat=1):
    best = float("inf")
    value = None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cols", default="256,512,1024", help="column counts of the rate fits")
    parser.add_argument("--rate-rows", default="4,36", help="r1,r2: rows of the two calls per cols")
    parser.add_argument("--rows", type=int, default=512, help="rows of the throughput layer")
    parser.add_argument("--layer-cols", type=int, default=256, help="cols of the throughput layer")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--tasks", type=int, default=40, help="empty tasks timed")
    parser.add_argument("--link-gbps", type=float, default=10.0, help="network per node, Gbit/s (estimate)")
    parser.add_argument("--nodes", default="1,4,16,64", help="N of the estimate")
    parser.add_argument("--cores", default="32,64", help="M of the estimate")
    args = parser.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join([PACKAGE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import numpy as np
    import ray
    import torch
    from torch import nn

    import obc_native
    from obc_native.torch.executors import LayerJob, LocalExecutor, solve_rows
    from obc_native.torch.layers import describe_layer
    from obc_native.torch.ray_executor import RayExecutor
    from obc_native.torch.recipe import LayerConfig

    modes = {
        "int4 gptq": LayerConfig(bits=4, quant_method="gptq"),
        "int4 auto (obq+gptq)": LayerConfig(bits=4),
        "2:4 exactobs": LayerConfig(prune="nm", n=2, m=4),
    }
    theory = {"int4 gptq": 2.0, "int4 auto (obq+gptq)": 3.0, "2:4 exactobs": 3.0}  # per-row exponents
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results: dict = {"config": vars(args), "versions": {
        "obc_native": obc_native.__version__, "ray": ray.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "python": platform.python_version()}, "machine": platform.machine(),
        "date": dt.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count()}
    try:
        # ---- per-task overhead
        remote = ray.remote(_noop)
        ray.get([remote.remote(0) for _ in range(args.cpus * 2)])  # workers up
        seconds, _ = _timed(lambda: ray.get([remote.remote(i) for i in range(args.tasks)]), repeat=3)
        empty = seconds / args.tasks
        weight, hessian = _problem(1, args.layer_cols)
        info = describe_layer("one", nn.Linear(args.layer_cols, 1))
        config = modes["int4 gptq"]
        local_one, _ = _timed(lambda: solve_rows(info, weight, hessian, config, None, False, 1), repeat=5)
        executor = RayExecutor(row_tasks=1)
        executor.start(quiet=True)
        job = LayerJob(info, weight, [hessian], config, None, False, 1)
        ray_one, _ = _timed(lambda: executor.layer_solution(job), repeat=5)
        results["overhead"] = {"empty_task_s": empty, "one_row_local_s": local_one, "one_row_ray_s": ray_one,
                               "task_overhead_s": ray_one - local_one}

        # ---- throughput: one layer, local executor vs Ray row tasks
        rows, cols = args.rows, args.layer_cols
        weight, hessian = _problem(rows, cols, seed=1)
        info = describe_layer("layer", nn.Linear(cols, rows))
        throughput = {}
        for label, config in modes.items():
            job = LayerJob(info, weight, [hessian], config, None, False, None)
            local_s, local = _timed(lambda job=job: LocalExecutor().layer_solution(job), repeat=2)
            ray_job = LayerJob(info, weight, [hessian], config, None, False, None)
            ray_executor = RayExecutor(row_tasks=args.cpus * 2)
            ray_executor.start(quiet=True)
            ray_s, remote_solution = _timed(lambda job=ray_job, ex=ray_executor: ex.layer_solution(job), repeat=2)
            same = np.array_equal(local[0].result.weight, remote_solution[0].result.weight)
            throughput[label] = {"local_s": local_s, "ray_s": ray_s, "ray_over_local": ray_s / local_s,
                                 "bit_identical": bool(same), "tasks": -(-rows // 256)}
        results["throughput"] = {"rows": rows, "cols": cols, "modes": throughput}

        # ---- fixed and per-row costs at 1 thread, fit a * cols^p
        col_list = [int(c) for c in args.cols.split(",")]
        r1, r2 = (int(v) for v in args.rate_rows.split(","))
        rates = {}
        for label, config in modes.items():
            points = []
            for c in col_list:
                weight, hessian = _problem(r2, c, seed=2)
                info = describe_layer("rate", nn.Linear(c, r2))
                t1, _ = _timed(lambda w=weight[:r1], h=hessian, cf=config, i=info: solve_rows(i, w, h, cf, None,
                                                                                            False, 1), repeat=2)
                t2, _ = _timed(lambda w=weight, h=hessian, cf=config, i=info: solve_rows(i, w, h, cf, None,
                                                                                       False, 1), repeat=2)
                per_row = max((t2 - t1) / (r2 - r1), 1e-9)
                points.append((c, max(t1 - r1 * per_row, 1e-9), per_row))
            logc = np.log([p[0] for p in points])
            fits = {}
            largest = max(points)
            for key, column, power in (("fixed", 1, 3.0), ("per_row", 2, theory[label])):
                fitted, _ = np.polyfit(logc, np.log([p[column] for p in points]), 1)
                fits[key] = {"fitted_power": float(fitted), "power": power, "a": largest[column] / largest[0] ** power}
            rates[label] = {"points": points, **fits}
        results["rates"] = rates
    finally:
        ray.shutdown()

    # ---- the 7B estimate
    overhead = max(results["overhead"]["task_overhead_s"], results["overhead"]["empty_task_s"])
    estimate = {}
    for label, fit in results["rates"].items():

        def cost(key, cols, fit=fit):
            return fit[key]["a"] * cols ** fit[key]["power"]

        core_s = 0.0
        tasks = 0
        longest = 0.0
        hessian_bytes = 0
        for rows, cols, count in LLAMA_7B:
            ranges = -(-rows // 256)
            task_s = cost("fixed", cols) + min(rows, 256) * cost("per_row", cols) + overhead
            core_s += BLOCKS * count * ranges * task_s
            longest = max(longest, task_s)
            tasks += BLOCKS * count * ranges
            hessian_bytes += BLOCKS * count * cols * cols * 8
        one_task_per_layer_s = sum(
            BLOCKS * count * (cost("fixed", cols) + rows * cost("per_row", cols)) for rows, cols, count in LLAMA_7B
        )
        table = {}
        for n in [int(v) for v in args.nodes.split(",")]:
            for m in [int(v) for v in args.cores.split(",")]:
                broadcast = hessian_bytes * 8 / (args.link_gbps * 1e9) if n > 1 else 0.0
                table[f"{n}x{m}"] = max(core_s / (n * m), longest) + broadcast
        estimate[label] = {"core_hours": core_s / 3600, "core_hours_unsplit": one_task_per_layer_s / 3600,
                           "tasks": tasks, "longest_task_s": longest, "hessian_gb": hessian_bytes / 1e9,
                           "wall_hours": {k: v / 3600 for k, v in table.items()}}
    results["estimate_7b"] = estimate

    # ---- print
    o = results["overhead"]
    print(f"empty Ray task: {o['empty_task_s'] * 1e3:.2f} ms/task ({args.tasks} submitted together)")
    print(f"1-row solve: local {o['one_row_local_s'] * 1e3:.2f} ms, one Ray task {o['one_row_ray_s'] * 1e3:.2f} ms "
          f"(task overhead {o['task_overhead_s'] * 1e3:.2f} ms)")
    t = results["throughput"]
    print(f"\nlayer {t['rows']} x {t['cols']}: local executor vs Ray ({args.cpus} CPUs, row tasks of 256 rows)")
    print(f"{'mode':<22} {'local s':>9} {'ray s':>9} {'ray/local':>10} {'identical':>10}")
    for label, row in t["modes"].items():
        print(f"{label:<22} {row['local_s']:9.3f} {row['ray_s']:9.3f} {row['ray_over_local']:10.2f} "
              f"{str(row['bit_identical']):>10}")
    print("\nseconds per call at 1 thread: fixed(cols) + rows * per_row(cols); fitted exponents")
    for label, fit in results["rates"].items():
        points = ", ".join(f"{c}: {f:.1e} + r*{r:.1e}" for c, f, r in fit["points"])
        print(f"{label:<22} fixed p = {fit['fixed']['fitted_power']:.2f}, per-row p = "
              f"{fit['per_row']['fitted_power']:.2f}   {points}")
    print("\n7B LLM linear layers (224 layers, ranges of 256 rows), estimated wall hours on N nodes x M cores")
    keys = list(next(iter(estimate.values()))["wall_hours"])
    print(f"{'mode':<22} {'core-h':>8} {'unsplit':>8} {'tasks':>6} {'max task s':>10} " + " ".join(f"{k:>8}" for k in keys))
    for label, row in estimate.items():
        print(f"{label:<22} {row['core_hours']:8.1f} {row['core_hours_unsplit']:8.1f} {row['tasks']:6d} "
              f"{row['longest_task_s']:10.0f} " + " ".join(f"{row['wall_hours'][k]:8.2f}" for k in keys))

    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench_ray_{dt.datetime.now():%Y%m%d_%H%M%S}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
