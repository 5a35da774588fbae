"""Speed, memory and loss of obc_native against the batched PyTorch baseline, layer by layer.

For each layer (rows x cols, float32, W ~ N(0, 1), H = 2/n X X^T from X ~ N(0, 1) with
n = 4 * cols samples, fixed seeds) and each mode, the program times obc_native (num_threads=2)
and the straightforward batched PyTorch implementation of the same greedy loops
(benchmarks/torch_baseline.py, torch.set_num_threads(2)) side by side in this process, compares
their losses, and measures the peak memory of each in a fresh spawned subprocess.

Modes:
  unstructured  full ExactOBS trace (all cols steps per row) + weights at 50% uniform sparsity
  nm            2:4 N:M pruning
  blocked       blocks of 4, 50% of the blocks of every row (uniform)
  structured    whole input columns (group = 1), 50%
  obq           OBQ, 4 bits, symmetric per-row min-max grid (with the outlier rule)

Targets (reported, never asserted): losses equal within 1e-3 relative and obc_native >= 3x
faster than the baseline on every layer; peak memory of the unstructured trace on 256x2304 under
a tenth of the baseline's.

Run:  .venv/bin/python benchmarks/bench_layers.py [--quick] [--modes a,b] [--layers 256x256,...]
See benchmarks/README.md for what exactly is measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_baseline as tb  # noqa: E402

try:
    import obc_native as obc
except ImportError:  # reported in main(); --baseline-only works without it
    obc = None

FULL_LAYERS = ["256x256", "512x576", "256x2304"]
QUICK_LAYERS = ["64x64", "128x144", "32x576"]
ALL_MODES = ["unstructured", "nm", "blocked", "structured", "obq"]
SPARSITY = 0.5
NM = (2, 4)
BLOCK = 4
BITS = 4
DAMP = 0.01
SAMPLES_PER_COL = 4
SEED = 1234
# "auto" baseline row subset: the baseline's unstructured trace costs ~ rows * cols^3; layers
# above this budget are timed on a subset of rows (whole 32-row batches).
AUTO_ROW_BUDGET = 2.0e10


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def parse_layer(text: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def make_layer(rows: int, cols: int, seed: int = SEED):
    """W (float32, N(0,1)) and H = 2/n X X^T (float32, exactly symmetric), n = 4 * cols."""
    rng = np.random.default_rng([seed, rows, cols])
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    n = SAMPLES_PER_COL * cols
    X = rng.standard_normal((cols, n))
    H = 2.0 / n * (X @ X.T)
    H = 0.5 * (H + H.T)
    return W, H.astype(np.float32)


def auto_baseline_rows(rows: int, cols: int) -> int:
    """All rows within the budget, else whole 32-row batches (at least one).

    Never a partial batch: per row, a batch of 16 measured up to 1.4x slower than one of 32 at
    cols = 2304, which would inflate the scaled baseline time.
    """
    fit = int(AUTO_ROW_BUDGET // cols**3)
    if fit >= rows:
        return rows
    return min(rows, tb.BATCH_ROWS * max(1, fit // tb.BATCH_ROWS))


# --------------------------------------------------------------------------------------------
# The modes: obc_native call, baseline call, magnitude / RTN reference
# --------------------------------------------------------------------------------------------


@dataclass
class Mode:
    name: str
    label: str
    ours: Callable  # (W, H, threads) -> (weight, extra dict)
    base: Callable  # (W, H, max_steps) -> (weight, extra dict)
    ref: Callable  # (W) -> weight
    ref_label: str
    row_subset_ok: bool = True  # rows independent (False: structured couples all rows)


def _ours_unstructured(W, H, threads):
    # Recording the 50% weights during the trace is the baseline's own way (no re-solve).
    trace = obc.trace_unstructured(W, H, damp=DAMP, num_threads=threads, record=(SPARSITY,))
    res = trace.weights(SPARSITY, spread="uniform")
    return res.weight, {"order": trace.order, "step_losses": trace.losses,
                        "reported_row_losses": res.row_losses}


def _base_unstructured(W, H, max_steps=None):
    res = tb.trace_unstructured(W, H, sparsity=SPARSITY, damp=DAMP, max_steps=max_steps)
    return res.weight, {"order": res.order, "step_losses": res.losses,
                        "setup_s": res.info["setup_s"]}


def _ours_nm(W, H, threads):
    res = obc.prune_nm(W, H, NM[0], NM[1], damp=DAMP, num_threads=threads)
    return res.weight, {"reported_row_losses": res.row_losses}


def _base_nm(W, H, max_steps=None):
    res = tb.prune_nm(W, H, NM[0], NM[1], damp=DAMP, max_steps=max_steps)
    return res.weight, {"setup_s": res.info["setup_s"]}


def _ours_blocked(W, H, threads):
    res = obc.prune_blocked(W, H, SPARSITY, BLOCK, damp=DAMP, spread="uniform",
                            num_threads=threads)
    return res.weight, {"reported_row_losses": res.row_losses}


def _base_blocked(W, H, max_steps=None):
    res = tb.prune_blocked(W, H, SPARSITY, BLOCK, damp=DAMP, max_steps=max_steps)
    return res.weight, {"setup_s": res.info["setup_s"]}


def _ours_structured(W, H, threads):
    res = obc.prune_structured(W, H, SPARSITY, group=1, damp=DAMP, num_threads=threads)
    return res.weight, {"reported_row_losses": res.row_losses}


def _base_structured(W, H, max_steps=None):
    res = tb.prune_structured(W, H, SPARSITY, damp=DAMP, max_steps=max_steps)
    return res.weight, {"setup_s": res.info["setup_s"]}


def _ours_obq(W, H, threads):
    res = obc.quantize(W, H, BITS, sym=True, grid="minmax", damp=DAMP, method="obq", refine=False,
                       num_threads=threads)
    return res.weight, {"reported_row_losses": res.row_losses}


def _base_obq(W, H, max_steps=None):
    res = tb.quantize_obq(W, H, BITS, sym=True, damp=DAMP, max_steps=max_steps)
    return res.weight, {"setup_s": res.info["setup_s"]}


MODES = {
    "unstructured": Mode("unstructured", "unstructured 50% (full trace)", _ours_unstructured,
                         _base_unstructured, lambda W: tb.magnitude_uniform(W, SPARSITY),
                         "magnitude 50%/row"),
    "nm": Mode("nm", "N:M 2:4", _ours_nm, _base_nm, lambda W: tb.magnitude_nm(W, *NM),
               "magnitude 2:4"),
    "blocked": Mode("blocked", "blocked 4, 50%/row", _ours_blocked, _base_blocked,
                    lambda W: tb.magnitude_blocked(W, SPARSITY, BLOCK), "block-norm 50%/row"),
    "structured": Mode("structured", "structured cols 50%", _ours_structured, _base_structured,
                       lambda W: tb.magnitude_structured(W, SPARSITY), "column-norm 50%",
                       row_subset_ok=False),
    "obq": Mode("obq", "OBQ 4-bit sym minmax", _ours_obq, _base_obq,
                lambda W: tb.quantize_rtn(W, BITS, sym=True), "RTN 4-bit"),
}


# --------------------------------------------------------------------------------------------
# Peak memory in a fresh spawned child
# --------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_child(conn, impl: str, mode: str, data_path: str, threads: int,
                  base_max_steps: int | None) -> None:
    """Runs one call in this fresh process and sends back its peak RSS increase (MiB).

    The peak is the kernel's high-water mark of this process image's RSS (VmHWM, the counter
    behind ru_maxrss), reset to the current RSS just before the call. ru_maxrss itself cannot
    be used directly in a spawned child: after exec it keeps the RSS the forked parent had as a
    floor, which hides any call that stays below it; it is recorded too, for reference.
    """
    try:
        torch.set_num_threads(threads)
        with np.load(data_path) as data:
            W, H = data["W"], data["H"]
        m = MODES[mode]
        # Warm both libraries up on a tiny layer (thread pools, lazy initialisation), so that
        # the measured increase belongs to the call only.
        Ws, Hs = make_layer(8, 16, seed=1)
        m.base(Ws, Hs, None)
        if obc is not None:
            m.ours(Ws, Hs, threads)
        del Ws, Hs
        gc.collect()
        reset = _reset_peak_rss()
        rss_before = _status_kib("VmRSS")
        hwm_before = _status_kib("VmHWM")
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if impl == "ours":
            out = m.ours(W, H, threads)
        else:
            out = m.base(W, H, base_max_steps)
        hwm_after = _status_kib("VmHWM")
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
        if reset and hwm_before is not None and hwm_after is not None:
            delta, method = hwm_after - hwm_before, "VmHWM after clear_refs reset"
        else:
            delta, method = ru_after - ru_before, "ru_maxrss delta (may be floored)"
        conn.send({"peak_delta_mib": delta / 1024.0, "method": method,
                   "rss_before_mib": (rss_before or 0) / 1024.0,
                   "hwm_before_mib": (hwm_before or 0) / 1024.0,
                   "hwm_after_mib": (hwm_after or 0) / 1024.0,
                   "ru_maxrss_before_mib": ru_before / 1024.0,
                   "ru_maxrss_after_mib": ru_after / 1024.0})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def measure_memory(impl: str, mode: str, data_path: str, threads: int,
                   base_max_steps: int | None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child,
                       args=(child, impl, mode, data_path, threads, base_max_steps))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": "child died without a result"}
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"exit code {proc.exitcode}"
    return result


# --------------------------------------------------------------------------------------------
# Timing and one case
# --------------------------------------------------------------------------------------------


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


# Pause before each timed call: the other library's idle OpenMP / BLAS threads spin for a while
# after its last parallel region and take a core (a 15 ms structured case measured 36 ms right
# after the baseline).
SETTLE_S = 0.5


def timed(fn, cpu_times: list):
    """Wall seconds of fn() (returned) and its process CPU seconds (appended to cpu_times)."""
    gc.collect()
    time.sleep(SETTLE_S)
    c0 = _cpu_s()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    cpu_times.append(_cpu_s() - c0)
    return wall, out


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def run_case(rows, cols, mode: Mode, W, H, args, data_path) -> dict:
    subset = rows
    if mode.row_subset_ok:
        subset = (auto_baseline_rows(rows, cols) if args.baseline_rows == "auto"
                  else min(rows, int(args.baseline_rows)))
    Wb = W[:subset]
    times_ours: list[float] = []
    times_base: list[float] = []
    setups_base: list[float] = []
    cpu_ours: list[float] = []
    cpu_base: list[float] = []
    out_ours = out_base = None
    spent_base = spent_ours = 0.0
    for rep in range(max(args.repeats, 1)):
        if not args.baseline_only and (rep == 0 or spent_ours < args.budget):
            t, out_ours = timed(lambda: mode.ours(W, H, args.threads), cpu_ours)
            times_ours.append(t)
            spent_ours += t
        if not args.ours_only and (rep == 0 or spent_base < args.baseline_budget):
            t, out_base = timed(lambda: mode.base(Wb, H), cpu_base)
            times_base.append(t)
            setups_base.append(out_base[1]["setup_s"])
            spent_base += t
    case = {"layer": f"{rows}x{cols}", "rows": rows, "cols": cols, "mode": mode.name,
            "label": mode.label, "baseline_rows": subset, "reference": mode.ref_label}
    ref_rows = tb.layer_loss(W, mode.ref(W), H)
    case["loss_ref_full"] = float(ref_rows.sum())
    case["loss_ref"] = float(ref_rows[:subset].sum())
    if times_ours:
        w_ours, extra = out_ours
        rows_ours = tb.layer_loss(W, w_ours, H)
        case["time_ours_s"] = statistics.median(times_ours)
        case["times_ours_s"] = times_ours
        case["cpu_ours_s"] = statistics.median(cpu_ours)
        case["cpus_ours_s"] = cpu_ours
        case["loss_ours_full"] = float(rows_ours.sum())
        case["loss_ours"] = float(rows_ours[:subset].sum())
        if "reported_row_losses" in extra:
            rep_loss = float(np.sum(extra["reported_row_losses"]))
            case["loss_ours_reported"] = rep_loss
            case["loss_ours_reported_rel_diff"] = rel_diff(rep_loss, case["loss_ours_full"])
        case["sparsity_ours"] = float(np.mean(w_ours == 0))
    if times_base:
        w_base, extra_b = out_base
        rows_base = tb.layer_loss(Wb, w_base, H)
        case["time_base_measured_s"] = statistics.median(times_base)
        case["times_base_measured_s"] = times_base
        # Whole-layer time: the one-off Hessian preparation (damping, Cholesky inverse) once,
        # the per-row work scaled by rows / subset (no-op when the baseline ran on all rows).
        scaled = [s + (t - s) * rows / subset for t, s in zip(times_base, setups_base)]
        case["times_base_s"] = scaled
        case["time_base_s"] = statistics.median(scaled)
        case["base_setup_s"] = statistics.median(setups_base)
        # CPU seconds, scaled to the whole layer in the same proportion as the wall time.
        cpu_scaled = [c * ts / t for c, ts, t in zip(cpu_base, scaled, times_base)]
        case["cpus_base_s"] = cpu_scaled
        case["cpu_base_s"] = statistics.median(cpu_scaled)
        case["loss_base"] = float(rows_base.sum())
        case["sparsity_base"] = float(np.mean(w_base == 0))
    if times_ours and times_base:
        case["ratio"] = case["time_base_s"] / case["time_ours_s"]
        case["ratio_cpu"] = case["cpu_base_s"] / max(case["cpu_ours_s"], 1e-9)
        case["loss_rel_diff"] = rel_diff(case["loss_ours"], case["loss_base"])
        case["mask_agreement"] = float(np.mean((w_ours[:subset] != 0) == (w_base != 0)))
        case["weight_max_abs_diff"] = float(np.max(np.abs(w_ours[:subset] - w_base)))
        if mode.name == "unstructured":
            o_ours, o_base = extra["order"][:subset], extra_b["order"]
            case["trace_order_agreement"] = float(np.mean(o_ours == o_base))
            # first step where the orders differ, per row (cols = never)
            diff = o_ours != o_base
            first = np.where(diff.any(axis=1), diff.argmax(axis=1), cols)
            case["trace_first_divergence_median"] = float(np.median(first))
            s_ours = float(np.sum(extra["step_losses"][:subset]))
            s_base = float(np.sum(extra_b["step_losses"]))
            case["trace_step_loss_sum_ours"] = s_ours
            case["trace_step_loss_sum_base"] = s_base
            case["trace_step_loss_sum_rel_diff"] = rel_diff(s_ours, s_base)
    if args.memory:
        mem = {}
        if not args.baseline_only:
            mem["ours"] = measure_memory("ours", mode.name, data_path, args.threads, None)
        if not args.ours_only:
            steps = args.baseline_mem_steps if args.baseline_mem_steps > 0 else None
            mem["base"] = measure_memory("base", mode.name, data_path, args.threads, steps)
            mem["base"]["greedy_steps_per_batch"] = steps
            mem["base"]["rows"] = rows
        case["memory"] = mem
        if "peak_delta_mib" in mem.get("ours", {}):
            case["mem_ours_mib"] = mem["ours"]["peak_delta_mib"]
        if "peak_delta_mib" in mem.get("base", {}):
            case["mem_base_mib"] = mem["base"]["peak_delta_mib"]
        if "mem_ours_mib" in case and "mem_base_mib" in case:
            case["mem_ratio"] = case["mem_base_mib"] / max(case["mem_ours_mib"], 1e-9)
    return case


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(cases: list[dict]) -> str:
    head = (f"{'layer':>9} {'mode':<12} {'rows_b':>6} {'t_ours':>8} {'t_base':>9} {'ratio':>7} "
            f"{'r_cpu':>6} "
            f"{'loss_ours':>11} {'loss_base':>11} {'rel_diff':>8} {'loss_ref':>11} "
            f"{'mem_ours':>8} {'mem_base':>8} {'mem_x':>6}")
    lines = [head, "-" * len(head)]
    for c in cases:
        lines.append(
            f"{c['layer']:>9} {c['mode']:<12} {c['baseline_rows']:>6} "
            f"{_fmt(c.get('time_ours_s'), '8.3f')} {_fmt(c.get('time_base_s'), '9.2f')} "
            f"{_fmt(c.get('ratio'), '7.1f')} {_fmt(c.get('ratio_cpu'), '6.1f')} "
            f"{_fmt(c.get('loss_ours'), '11.5g')} "
            f"{_fmt(c.get('loss_base'), '11.5g')} {_fmt(c.get('loss_rel_diff'), '8.1e')} "
            f"{_fmt(c.get('loss_ref'), '11.5g')} {_fmt(c.get('mem_ours_mib'), '8.1f')} "
            f"{_fmt(c.get('mem_base_mib'), '8.1f')} {_fmt(c.get('mem_ratio'), '6.1f')}")
    lines += [
        "",
        "t_ours: obc_native median seconds (num_threads=2); t_base: baseline seconds for the whole",
        "layer (median; when rows_b < rows, measured on rows_b rows: its Hessian preparation",
        "counted once and the rest scaled by rows/rows_b);",
        "ratio = t_base / t_ours; r_cpu: the same ratio of process CPU seconds. Losses:",
        "1/2 sum dw H dw^T (undamped H) over the rows_b rows the baseline ran; loss_ref:",
        "magnitude pruning / RTN on the same rows. mem: peak RSS",
        "increase of the call in a fresh process, MiB (baseline: all rows, first greedy steps",
        "of every batch, see README); mem_x = mem_base / mem_ours.",
    ]
    text = "\n".join(lines)
    print(text)
    return text


def evaluate_targets(cases: list[dict]) -> dict:
    out: dict = {"loss_within_1e-3": {}, "speedup_at_least_3x": {}}
    for c in cases:
        key = f"{c['layer']} {c['mode']}"
        if "loss_rel_diff" in c:
            out["loss_within_1e-3"][key] = c["loss_rel_diff"] <= 1e-3
        if "ratio" in c:
            out["speedup_at_least_3x"][key] = c["ratio"] >= 3.0
    mem = [c for c in cases if c["layer"] == "256x2304" and c["mode"] == "unstructured"
           and "mem_ratio" in c]
    if mem:
        out["unstructured_256x2304_memory_under_tenth"] = mem[0]["mem_ratio"] > 10.0
    losses_ok = out["loss_within_1e-3"]
    out["all_losses_ok"] = all(losses_ok.values()) if losses_ok else None
    out["all_speedups_ok"] = (all(out["speedup_at_least_3x"].values())
                              if out["speedup_at_least_3x"] else None)
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    return info


def versions() -> dict:
    v = {"torch": torch.__version__, "numpy": np.__version__}
    if obc is not None:
        v["obc_native"] = getattr(obc, "__version__", None)
        try:
            v["obc_native_build_info"] = obc.build_info()
        except Exception as exc:  # noqa: BLE001
            v["obc_native_build_info"] = f"unavailable: {exc}"
    return v


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small layers ({','.join(QUICK_LAYERS)}) and 2 repeats")
    p.add_argument("--layers", help=f"comma list of ROWSxCOLS (default {','.join(FULL_LAYERS)})")
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help=f"comma list from {','.join(ALL_MODES)}")
    p.add_argument("--repeats", type=int,
                   help="timed repeats, median reported (default 5; 2 quick)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="stop repeating obc_native once its runs of a case took this many "
                        "seconds (it always runs once); default 60")
    p.add_argument("--baseline-budget", type=float, default=60.0,
                   help="stop repeating the baseline once its runs of a case took this many "
                        "seconds (it always runs once); default 60")
    p.add_argument("--baseline-rows", default="auto",
                   help="rows the baseline is timed on ('auto': all rows up to rows*cols^3 = "
                        f"{AUTO_ROW_BUDGET:.0e}, else a subset; times are scaled by rows)")
    p.add_argument("--baseline-mem-steps", type=int, default=3,
                   help="greedy steps per batch of the baseline's memory run (its buffers are all "
                        "allocated by the first step); 0 = the whole run")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--ours-only", action="store_true", help="skip the torch baseline")
    p.add_argument("--baseline-only", action="store_true", help="skip obc_native")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                        "bench_layers.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = ",".join(QUICK_LAYERS if args.quick else FULL_LAYERS)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {ALL_MODES}")
    args.mode_list = modes
    args.layer_list = [parse_layer(s) for s in args.layers.split(",") if s.strip()]
    return args


def warm_up(args, modes) -> None:
    W, H = make_layer(16, 32, seed=7)
    for m in modes:
        if not args.ours_only:
            m.base(W, H)
        if not args.baseline_only:
            m.ours(W, H, args.threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    if obc is None and not args.baseline_only:
        print("obc_native is not importable; install it or pass --baseline-only", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    modes = [MODES[m] for m in args.mode_list]
    started = time.perf_counter()
    report = {
        "benchmark": "bench_layers",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": {
            "layers": args.layers, "modes": args.mode_list, "quick": args.quick,
            "repeats": args.repeats, "budget_s": args.budget,
            "baseline_budget_s": args.baseline_budget,
            "baseline_rows": args.baseline_rows, "baseline_mem_steps": args.baseline_mem_steps,
            "baseline_batch_rows": tb.BATCH_ROWS, "dtype": "float32", "damp": DAMP,
            "sparsity": SPARSITY, "nm": list(NM), "block": BLOCK, "bits": BITS,
            "quant_grid": "sym minmax per row", "spread": "uniform",
            "samples_per_col": SAMPLES_PER_COL, "seed": SEED, "memory": args.memory,
        },
        "threads": {"obc_native_num_threads": args.threads,
                    "torch_num_threads": torch.get_num_threads()},
        "versions": versions(),
        "machine": machine_info(),
        "cases": [],
    }
    print(f"obc_native {report['versions'].get('obc_native')}  torch {torch.__version__}  "
          f"numpy {np.__version__}  threads {args.threads}  "
          f"cpu {report['machine'].get('cpu_model')} x{report['machine']['cpu_count']}")
    warm_up(args, modes)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="obc_bench_") as tmp:
        for rows, cols in args.layer_list:
            W, H = make_layer(rows, cols)
            data_path = os.path.join(tmp, f"layer_{rows}x{cols}.npz")
            np.savez(data_path, W=W, H=H)
            for mode in modes:
                t0 = time.perf_counter()
                case = run_case(rows, cols, mode, W, H, args, data_path)
                case["wall_s"] = time.perf_counter() - t0
                case["loadavg_after"] = os.getloadavg()  # the machine may be shared
                report["cases"].append(case)
                print(f"  {rows}x{cols} {mode.name:<12} done in {case['wall_s']:.1f} s: "
                      f"ours {_fmt(case.get('time_ours_s'), '.3f')} s, base "
                      f"{_fmt(case.get('time_base_s'), '.2f')} s (rows {case['baseline_rows']}), "
                      f"rel loss diff {_fmt(case.get('loss_rel_diff'), '.1e')}", flush=True)
                # Write as we go: a long run that is interrupted still leaves its results.
                out_path.write_text(json.dumps(_jsonable(report), indent=2))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["total_wall_s"] = time.perf_counter() - started
    report["targets"] = evaluate_targets(report["cases"])
    print()
    report["table"] = print_table(report["cases"])
    t = report["targets"]
    print(f"\ntargets (reported, not asserted): losses within 1e-3: {t['all_losses_ok']}; "
          f">= 3x faster everywhere: {t['all_speedups_ok']}; unstructured 256x2304 memory "
          f"< 1/10 of baseline: {t.get('unstructured_256x2304_memory_under_tenth')}")
    out_path.write_text(json.dumps(_jsonable(report), indent=2))
    print(f"wrote {out_path}  (total {report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
