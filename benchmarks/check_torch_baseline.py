"""Checks the torch baseline against brute-force numpy least squares on tiny layers (4 x 12).

For every mode the greedy loop is replayed one step at a time (``max_steps = k``) in float64:

* every intermediate state must equal the least-squares re-solve of the layer for the set of
  pruned (or quantized) coordinates reached so far, computed independently with
  ``np.linalg.lstsq`` on the augmented design ``[X, sqrt(n*lambda/2) I]`` (the damped H);
* every greedy choice must be the argmin of the brute-force loss increase over all allowed
  candidates (for OBQ unless the outlier rule fires, which is checked separately);
* step losses of the unstructured trace must equal those increases;
* existing zeros and dead inputs must stay exactly zero.

A program, not a test: prints one line per check and exits non-zero on a failure.
Run: .venv/bin/python benchmarks/check_torch_baseline.py
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

import torch_baseline as tb

torch.set_num_threads(2)
F64 = torch.float64
FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILURES.append(name)


class Problem:
    """A layer with its calibration inputs X (cols x n), H = 2/n X X^T and the damped design."""

    def __init__(self, rows=4, cols=12, seed=0, zeros=(), dead=()):
        rng = np.random.default_rng(seed)
        self.n = 3 * cols
        X = rng.standard_normal((cols, self.n))
        X[list(dead), :] = 0
        self.X = X
        self.H = 2.0 / self.n * X @ X.T
        self.W = rng.standard_normal((rows, cols))
        for r, c in zeros:
            self.W[r, c] = 0.0
        self.dead = np.zeros(cols, bool)
        self.dead[list(dead)] = True
        live = ~self.dead
        self.lam = 0.01 * np.diag(self.H)[live].mean()
        # Damped design: 2/n Xa Xa^T = H + lam I on the live inputs.
        extra = np.sqrt(self.n * self.lam / 2) * np.diag(live.astype(float))
        self.Xa = np.concatenate([X, extra], axis=1)
        self.W0 = self.W.copy()
        self.W0[:, self.dead] = 0

    def resolve_row(self, r, fixed_idx, fixed_val):
        """Least squares: w_hat with w_hat[fixed_idx] = fixed_val minimizing ||(w - w_hat) Xa||^2.

        Dead inputs are fixed to 0 (they are decoupled); returns (w_hat, damped loss).
        """
        w = self.W0[r]
        cols = w.shape[0]
        fixed = np.zeros(cols, bool)
        vals = np.zeros(cols)
        fixed[list(fixed_idx)] = True
        vals[list(fixed_idx)] = list(fixed_val)
        fixed |= self.dead
        vals[self.dead] = 0
        free = ~fixed
        target = (w - vals) @ self.Xa  # residual the free weights have to fit
        w_hat = vals.copy()
        if free.any():
            sol, *_ = np.linalg.lstsq(self.Xa[free].T, target, rcond=None)
            w_hat[free] = sol
        loss = np.sum(((w - w_hat) @ self.Xa) ** 2) / self.n
        return w_hat, loss


def t64(x):
    return torch.as_tensor(x, dtype=F64)


def check_unstructured(p: Problem, tag: str) -> None:
    rows, cols = p.W.shape
    full = tb.trace_unstructured(p.W, p.H, sparsity=0.5, dtype=F64)
    worst_w = worst_l = 0.0
    choice_ok = True
    for r in range(rows):
        pruned: list[int] = []
        prev_loss = p.resolve_row(r, [], [])[1]
        for t in range(cols):
            q = int(full.order[r, t])
            if p.W0[r, q] == 0:  # existing zero or dead: first, zero loss
                choice_ok &= abs(full.losses[r, t]) < 1e-12
                pruned.append(q)
                prev_loss = p.resolve_row(r, pruned, [0] * len(pruned))[1]
                continue
            incs = {}
            for c in range(cols):
                if c not in pruned:
                    incs[c] = p.resolve_row(r, pruned + [c], [0] * (len(pruned) + 1))[1] - prev_loss
            best = min(incs, key=lambda c: (round(incs[c], 10), c))
            if best != q and abs(incs[best] - incs[q]) > 1e-9:
                choice_ok = False
            worst_l = max(worst_l, abs(incs[q] - full.losses[r, t]))
            pruned.append(q)
            prev_loss += incs[q]
    # Weights at the count (ceil(0.5*cols) pruned per row) vs the re-solve of that mask.
    k = math.ceil(0.5 * cols)
    for r in range(rows):
        w_hat, _ = p.resolve_row(r, list(full.order[r, :k]), [0] * k)
        worst_w = max(worst_w, np.abs(w_hat - full.weight[r]).max())
    report(f"unstructured[{tag}] greedy choice = brute-force argmin", choice_ok)
    report(f"unstructured[{tag}] step loss = least-squares increase", worst_l < 1e-9,
           f"max err {worst_l:.2e}")
    report(f"unstructured[{tag}] weights at count = least-squares re-solve", worst_w < 1e-9,
           f"max err {worst_w:.2e}")
    zeros_ok = np.all(full.weight[p.W0 == 0] == 0)
    report(f"unstructured[{tag}] existing zeros / dead inputs stay zero", bool(zeros_ok))


def replay_masks(run, steps):
    """States after 0..steps greedy steps: list of (weight, pruned mask)."""
    return [run(k) for k in range(steps + 1)]


def check_prune_mode(p: Problem, tag: str, name: str, run, steps, allowed, unit_cols) -> None:
    """Generic replay check for N:M, blocked and structured.

    run(k) -> PruneOut after k greedy steps; allowed(pruned_units_by_row) -> candidate units per
    row; unit_cols(u) -> the columns of unit u. Structured chooses one unit for all rows.
    """
    rows, cols = p.W.shape
    states = replay_masks(run, steps)
    worst_w = 0.0
    choice_ok = True
    for k in range(1, steps + 1):
        before, after = states[k - 1], states[k]
        newly = (before.weight != 0) & (after.weight == 0) & (p.W0 != 0)
        for r in range(rows):
            pr_before = np.flatnonzero(before.weight[r] == 0)
            pr_after = np.flatnonzero(after.weight[r] == 0)
            w_hat, _ = p.resolve_row(r, pr_after, [0] * len(pr_after))
            worst_w = max(worst_w, np.abs(w_hat - after.weight[r]).max())
            if name == "structured":
                continue
            if not newly[r].any():
                continue
            base = p.resolve_row(r, pr_before, [0] * len(pr_before))[1]
            incs = {}
            for u in allowed(r, before.weight[r]):
                cs = sorted(set(pr_before) | set(unit_cols(u)))
                incs[u] = p.resolve_row(r, cs, [0] * len(cs))[1] - base
            chosen = [u for u in incs if all(after.weight[r, c] == 0 for c in unit_cols(u))
                      and not all(before.weight[r, c] == 0 for c in unit_cols(u))]
            best = min(incs, key=lambda u: (incs[u], u))
            if len(chosen) != 1 or (chosen[0] != best and incs[chosen[0]] - incs[best] > 1e-9):
                choice_ok = False
        if name == "structured":
            gone = [c for c in range(cols) if (after.weight[:, c] == 0).all()
                    and not (before.weight[:, c] == 0).all()]
            pr_before = [c for c in range(cols) if (before.weight[:, c] == 0).all()]
            base = sum(p.resolve_row(r, pr_before, [0] * len(pr_before))[1] for r in range(rows))
            incs = {}
            for c in range(cols):
                if c in pr_before:
                    continue
                cs = pr_before + [c]
                incs[c] = sum(p.resolve_row(r, cs, [0] * len(cs))[1] for r in range(rows)) - base
            best = min(incs, key=lambda c: (incs[c], c))
            if len(gone) != 1 or (gone[0] != best and incs[gone[0]] - incs[best] > 1e-9):
                choice_ok = False
    report(f"{name}[{tag}] greedy choice = brute-force argmin", choice_ok)
    report(f"{name}[{tag}] every state = least-squares re-solve", worst_w < 1e-9,
           f"max err {worst_w:.2e}")
    final = states[-1].weight
    report(f"{name}[{tag}] existing zeros / dead inputs stay zero",
           bool(np.all(final[p.W0 == 0] == 0)))


def check_nm(p: Problem, tag: str, n=2, m=4) -> None:
    rows, cols = p.W.shape

    def allowed(r, w):
        out = []
        for g in range(cols // m):
            grp = w[g * m:(g + 1) * m]
            if np.sum(grp == 0) < n:
                out += [g * m + i for i in range(m) if grp[i] != 0]
        return out

    steps = cols // m * n
    check_prune_mode(p, tag, "nm2:4", lambda k: tb.prune_nm(p.W, p.H, n, m, dtype=F64, max_steps=k),
                     steps, allowed, lambda u: [u])
    final = tb.prune_nm(p.W, p.H, n, m, dtype=F64).weight
    per_group = (final.reshape(rows, cols // m, m) == 0).sum(axis=2)
    zeros_in = (p.W0.reshape(rows, cols // m, m) == 0).sum(axis=2)
    report(f"nm2:4[{tag}] pattern: max(n, existing zeros) per group",
           bool(np.all(per_group == np.maximum(n, zeros_in))))


def check_blocked(p: Problem, tag: str, block=2) -> None:
    rows, cols = p.W.shape
    nb = cols // block

    def allowed(r, w):
        return [b for b in range(nb) if np.any(w[b * block:(b + 1) * block] != 0)]

    steps = math.ceil(0.5 * nb)
    check_prune_mode(p, tag, f"blocked{block}",
                     lambda k: tb.prune_blocked(p.W, p.H, 0.5, block, dtype=F64, max_steps=k),
                     steps, allowed, lambda u: list(range(u * block, (u + 1) * block)))


def check_structured(p: Problem, tag: str) -> None:
    rows, cols = p.W.shape
    steps = math.ceil(0.5 * cols) - int((p.W0 == 0).all(axis=0).sum())
    check_prune_mode(p, tag, "structured",
                     lambda k: tb.prune_structured(p.W, p.H, 0.5, dtype=F64, max_steps=k),
                     steps, None, lambda u: [u])


def check_obq(p: Problem, tag: str, bits=3, shrink=1.0) -> None:
    """shrink < 1 narrows the min-max grid so that some weights start outside its range."""
    rows, cols = p.W.shape
    maxq = 2**bits - 1
    scale, zero = tb.minmax_grid(p.W0, bits, sym=True)
    scale, zero = scale.numpy() * shrink, zero.numpy()

    def qv(r, x):
        return scale[r] * (np.clip(np.round(x / scale[r]) + zero[r], 0, maxq) - zero[r])

    states = [tb.quantize_obq(p.W, p.H, bits, dtype=F64, max_steps=k, grid=(scale, zero)).weight
              for k in range(cols + 1)]
    worst_w = 0.0
    choice_ok = True
    outliers = 0
    for r in range(rows):
        order: list[int] = [c for c in range(cols) if p.W0[r, c] == 0]
        vals: list[float] = [0.0] * len(order)
        n_nonzero = cols - len(order)
        for k in range(1, n_nonzero + 1):
            before, after = states[k - 1][r], states[k][r]
            w_prev, base = p.resolve_row(r, order, vals)
            worst_w = max(worst_w, np.abs(w_prev - before).max())
            free = [c for c in range(cols) if c not in order]
            errs = {c: (w_prev[c] - qv(r, w_prev[c])) ** 2 for c in free}
            incs = {}
            for c in free:
                incs[c] = p.resolve_row(r, order + [c], vals + [qv(r, w_prev[c])])[1] - base
            best = min(incs, key=lambda c: (incs[c], c))
            if max(errs.values()) > (1 + 1e-3) * scale[r] ** 2 / 4:
                best = max(errs, key=lambda c: (errs[c], -c))
                outliers += 1
            # The state after the step must be the re-solve with the expected weight fixed.
            w_next, _ = p.resolve_row(r, order + [best], vals + [qv(r, w_prev[best])])
            if np.abs(w_next - after).max() > 1e-9:
                choice_ok = False
            order.append(best)
            vals.append(float(qv(r, w_prev[best])))
        final = states[-1][r]
        on_grid = np.allclose(final, qv(r, final), atol=1e-12, rtol=0)
        if not on_grid:
            choice_ok = False
    report(f"obq{bits}b[{tag}] each step = brute-force choice + least-squares update", choice_ok,
           f"({outliers} outlier-rule steps)")
    if shrink < 1:
        report(f"obq{bits}b[{tag}] the outlier rule fired", outliers > 0)
    report(f"obq{bits}b[{tag}] every state = least-squares re-solve", worst_w < 1e-9,
           f"max err {worst_w:.2e}")
    report(f"obq{bits}b[{tag}] zeros stay zero",
           bool(np.all(states[-1][p.W0 == 0] == 0)))


def check_float32_close(p: Problem) -> None:
    """float32 (the benchmark's dtype) should give nearly the float64 losses on this layer."""
    a = tb.trace_unstructured(p.W.astype(np.float32), p.H.astype(np.float32))
    b = tb.trace_unstructured(p.W, p.H, dtype=F64)
    la, lb = tb.layer_loss(p.W0, a.weight, p.H).sum(), tb.layer_loss(p.W0, b.weight, p.H).sum()
    report("float32 vs float64 unstructured loss", abs(la - lb) <= 1e-4 * lb,
           f"rel {abs(la - lb) / lb:.1e}")


def main() -> int:
    plain = Problem(seed=1)
    holes = Problem(seed=2, zeros=[(0, 3), (1, 0), (1, 1), (2, 7), (3, 9)], dead=[5])
    for tag, p in (("plain", plain), ("zeros+dead", holes)):
        check_unstructured(p, tag)
        check_nm(p, tag)
        check_blocked(p, tag)
        if tag == "plain":  # structured with partial zeros: see prune_structured's docstring
            check_structured(p, tag)
        check_obq(p, tag)
    # Structured with dead inputs and an all-zero column (no partial zeros: see its docstring).
    sp = Problem(seed=3, dead=[2])
    sp.W[:, 6] = 0
    sp.W0[:, 6] = 0
    check_structured(sp, "dead+zero column")
    # An OBQ case that exercises the outlier rule: a grid narrowed to 60% of the min-max range
    # leaves the largest weights outside it by more than half a step.
    check_obq(Problem(seed=4, rows=6), "narrow grid: outlier rule", bits=2, shrink=0.6)
    check_float32_close(plain)
    print("FAILED: " + ", ".join(FAILURES) if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
