"""Checks of the float64 brute-force reference against itself: independent formulations (KKT
systems, OBS formulas from fresh inverses) and exhaustive enumeration on tiny problems.
Needs neither obc_native nor torch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reference as ref
from problems import ILL_DAMP, make_problem


def kkt_optimum(w, Hd, fixed, target):
    """The constrained optimum from the Lagrangian KKT system (an independent formulation):
    [[Hd, E^T], [E, 0]] [w'; mu] = [Hd w; t_P], E selecting the fixed coordinates."""
    cols = w.size
    P = np.nonzero(fixed)[0]
    E = np.zeros((P.size, cols))
    E[np.arange(P.size), P] = 1.0
    K = np.block([[Hd, E.T], [E, np.zeros((P.size, P.size))]])
    rhs = np.concatenate([Hd @ w, target[P]])
    return np.linalg.solve(K, rhs)[:cols]


@pytest.mark.parametrize("kind", ["random", "illcond"])
@pytest.mark.parametrize("dead", [0, 2])
def test_constrained_optimum_matches_kkt(kind, dead):
    W, H, _ = make_problem(4, 12, seed=3, kind=kind, dead=dead)
    damp = ILL_DAMP if kind == "illcond" else 0.01
    Hd, dead_mask, _ = ref.damped_hessian(H, damp)
    rng = np.random.default_rng(0)
    for w in W:
        for _ in range(5):
            fixed = (rng.random(12) < 0.4) | dead_mask
            target = np.where(fixed, rng.standard_normal(12), 0.0)
            got = ref.constrained_optimum(w, Hd, fixed, target)[0]
            # Dead inputs are decoupled (zero rows in Hd): replace them by unit rows for the KKT.
            Hk = Hd.copy()
            Hk[dead_mask, dead_mask] = 1.0
            want = kkt_optimum(w, Hk, fixed, target)
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7 * np.abs(want).max())
            assert np.array_equal(got[fixed], target[fixed])
            # Stationarity on the free coordinates: (Hd (w' - w))_F = 0.
            grad = Hd @ (got - w)
            free = ~fixed
            assert np.abs(grad[free]).max() <= 1e-8 * np.abs(Hd).max() * np.abs(got - w).max() + 1e-300


def test_damped_hessian():
    _, H, _ = make_problem(2, 10, seed=1, dead=3)
    Hd, dead, lam = ref.damped_hessian(H, 0.05)
    live = ~dead
    assert dead.sum() == 3
    assert lam == pytest.approx(0.05 * np.mean(np.diag(H)[live]))
    assert np.allclose(np.diag(Hd)[live], np.diag(H)[live] + lam)
    assert np.all(Hd[dead] == 0) and np.all(Hd[:, dead] == 0)


@pytest.mark.parametrize("kind", ["random", "illcond"])
@pytest.mark.parametrize("zeros,dead", [(0.0, 0), (0.25, 2)])
def test_trace_step_losses_are_consistent(kind, zeros, dead):
    """score_check asserts every candidate's increase equals loss(P+q) - loss(P); in addition:
    step losses telescope to the loss of the prefix, and each step's loss equals the OBS
    formula w'_q^2 / (2 [inv(Hd_FF)]_qq) computed from a fresh inverse."""
    W, H, _ = make_problem(3, 10, seed=7, kind=kind, zeros=zeros, dead=dead)
    damp = ILL_DAMP if kind == "illcond" else 0.01
    Hd, dead_mask, _ = ref.damped_hessian(H, damp)
    for w in W:
        tr = ref.trace_row(w, None, Hd=Hd, dead=dead_mask, score_check=True, keep_weights=True)
        assert sorted(tr.order.tolist()) == list(range(10))
        pre = np.nonzero(tr.initial_fixed)[0]
        assert tr.order[: pre.size].tolist() == pre.tolist()
        assert np.all(tr.losses[: pre.size] == 0)
        fixed = tr.initial_fixed.copy()
        for k, q in enumerate(tr.order[pre.size :]):
            w_cur = tr.weights[k]
            F = np.nonzero(~fixed)[0]
            hinv = np.linalg.inv(Hd[np.ix_(F, F)])
            pos = int(np.nonzero(F == q)[0][0])
            obs = 0.5 * w_cur[q] ** 2 / hinv[pos, pos]
            assert tr.losses[pre.size + k] == pytest.approx(obs, rel=1e-6)
            # And q has the minimal OBS score among the free coordinates.
            scores = 0.5 * w_cur[F] ** 2 / np.diag(hinv)
            assert obs <= scores.min() * (1 + 1e-6)
            fixed[q] = True
            prefix_loss = ref.constrained_loss(w, Hd, fixed, 0.0)[0]
            assert prefix_loss == pytest.approx(tr.losses[: pre.size + k + 1].sum(), rel=1e-6)
        assert np.all(tr.weights[-1] == 0)


def test_trace_exhaustive_subsets():
    """On 8 inputs: the greedy prefix loss after k steps is >= the best over all k-subsets, with
    equality for k = 1 (the first greedy step is the best single removal) and k = 8."""
    W, H, _ = make_problem(3, 8, seed=11)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    for w in W:
        tr = ref.trace_row(w, None, Hd=Hd, dead=dead)
        for k in range(1, 9):
            subsets = list(itertools.combinations(range(8), k))
            fixed = np.zeros((len(subsets), 8), dtype=bool)
            for i, s in enumerate(subsets):
                fixed[i, list(s)] = True
            best = ref.constrained_loss(w, Hd, fixed, 0.0).min()
            greedy = tr.losses[:k].sum()
            assert greedy >= best * (1 - 1e-10)
            if k in (1, 8):
                assert greedy == pytest.approx(best, rel=1e-10)


def test_blocked_trace_block1_is_unstructured_and_blocks_consistent():
    W, H, _ = make_problem(3, 12, seed=5, zeros=0.2)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    for w in W:
        a = ref.trace_row(w, None, Hd=Hd, dead=dead, block=1)
        b = ref.trace_row(w, None, Hd=Hd, dead=dead, block=1, score_check=True)
        assert a.order.tolist() == b.order.tolist()
        blk = ref.trace_row(w, None, Hd=Hd, dead=dead, block=3, score_check=True, keep_weights=True)
        assert sorted(blk.order.tolist()) == list(range(4))
        # A block step's loss equals 1/2 w_B^T inv([inv(Hd_FF)]_BB) w_B from a fresh inverse.
        fixed = (w == 0) | dead
        for k, bidx in enumerate(blk.order[blk.num_prepruned :]):
            w_cur = blk.weights[k]
            F = np.nonzero(~fixed)[0]
            B = [c for c in range(3 * bidx, 3 * bidx + 3) if not fixed[c]]
            pos = [int(np.nonzero(F == c)[0][0]) for c in B]
            hinv = np.linalg.inv(Hd[np.ix_(F, F)])
            obs = 0.5 * w_cur[B] @ np.linalg.solve(hinv[np.ix_(pos, pos)], w_cur[B])
            assert blk.losses[blk.num_prepruned + k] == pytest.approx(obs, rel=1e-6)
            fixed[B] = True


def test_steps_per_row_global_and_uniform():
    losses = np.array([[0.0, 1.0, 5.0, 2.0], [0.5, 0.5, 3.0, 9.0]])
    assert ref.steps_per_row(losses, 0.5, "global").tolist() == [2, 2]
    assert ref.steps_per_row(losses, 0.375, "global").tolist() == [1, 2]
    assert ref.steps_per_row(losses, 0.625, "global").tolist() == [3, 2]  # 1.0 < 2.0 ties none
    assert ref.steps_per_row(losses, 0.3, "uniform").tolist() == [2, 2]  # ceil(1.2)
    assert ref.steps_per_row(losses, 0.25, "uniform").tolist() == [1, 1]
    # Ties in loss: the lower row wins.
    tied = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert ref.steps_per_row(tied, 0.25, "global").tolist() == [1, 0]
    assert ref.count_for_sparsity(0.3, 10) == 3
    assert ref.count_for_sparsity(0.31, 10) == 4


def test_nm_exhaustive_and_pattern():
    """2:4 on 8 inputs: the greedy loss is >= the best of all 36 valid patterns and the pattern
    holds; the first N:M step equals the first unstructured step."""
    W, H, _ = make_problem(4, 8, seed=21)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    pats = [c for c in itertools.combinations(range(4), 2)]
    for w in W:
        wq, pruned, order = ref.prune_nm_row(w, Hd, dead, 2, 4, score_check=True)
        assert pruned.reshape(2, 4).sum(1).tolist() == [2, 2]
        assert np.all(wq[pruned] == 0)
        fixed = np.zeros((36, 8), dtype=bool)
        for i, (a, b) in enumerate(itertools.product(pats, pats)):
            fixed[i, list(a)] = True
            fixed[i, [4 + j for j in b]] = True
        best = ref.constrained_loss(w, Hd, fixed, 0.0).min()
        greedy = ref.constrained_loss(w, Hd, pruned[None], 0.0)[0]
        assert greedy >= best * (1 - 1e-10)
        tr = ref.trace_row(w, None, Hd=Hd, dead=dead)
        assert order[0] == tr.order[0]


def test_nm_existing_zeros_count():
    W, H, _ = make_problem(1, 8, seed=2)
    w = W[0].copy()
    w[[0, 1, 2]] = 0.0  # first group already has 3 zeros (> n = 2): nothing more pruned there
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    wq, pruned, order = ref.prune_nm_row(w, Hd, dead, 2, 4)
    assert pruned[:4].tolist() == [True, True, True, False]
    assert pruned[4:].sum() == 2
    assert all(c >= 4 for c in order)


def test_structured_single_row_equals_trace_prefix():
    W, H, _ = make_problem(1, 10, seed=8)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    tr = ref.trace_row(W[0], None, Hd=Hd, dead=dead)
    for k in range(11):
        _, kept, _, order = ref.prune_structured(W, H, k / 10, group=1, damp=0.01, return_order=True)
        assert order == tr.order[:k].tolist()
        assert (~kept[0]).sum() == k


def test_structured_score_is_summed_group_obs():
    """Without existing zeros all rows share the free set, so a step's summed increase equals
    sum_r 1/2 w_rG^T inv([inv(Hd_FF)]_GG) w_rG from one fresh inverse."""
    W, H, _ = make_problem(5, 12, seed=9)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    weight, kept, _, order = ref.prune_structured(W, H, 0.5, group=2, damp=0.01, score_check=True, return_order=True)
    assert len(order) == 3
    fixed = np.zeros(12, dtype=bool)
    w_cur = W.copy()
    for g in order:
        F = np.nonzero(~fixed)[0]
        hinv = np.linalg.inv(Hd[np.ix_(F, F)])
        scores = []
        for cand in range(6):
            G = [c for c in (2 * cand, 2 * cand + 1) if not fixed[c]]
            if not G:
                scores.append(np.inf)
                continue
            pos = [int(np.nonzero(F == c)[0][0]) for c in G]
            M = hinv[np.ix_(pos, pos)]
            scores.append(sum(0.5 * w_cur[r, G] @ np.linalg.solve(M, w_cur[r, G]) for r in range(5)))
        assert int(np.argmin(scores)) == g
        fixed[2 * g : 2 * g + 2] = True
        w_cur = np.stack([ref.constrained_optimum(W[r], Hd, fixed, 0.0)[0] for r in range(5)])
    np.testing.assert_allclose(weight, w_cur, rtol=1e-10, atol=1e-12)
    assert np.array_equal(~kept[0], fixed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("grid", ["mse", "minmax"])
def test_grid_properties(bits, sym, grid):
    rng = np.random.default_rng(bits)
    maxq = 2**bits - 1
    for trial in range(20):
        x = rng.standard_normal(16) * rng.uniform(0.1, 10)
        if trial % 4 == 1:
            x = np.abs(x)  # all positive
        if trial % 4 == 2:
            x = -np.abs(x)  # all negative
        scale, zero = ref.grid_1d(x, bits, sym, grid)
        assert scale > 0 and zero == int(zero) and 0 <= zero <= maxq
        codes = ref.quantize_codes(x, scale, zero, bits)
        assert codes.min() >= 0 and codes.max() <= maxq
        assert ref.quantize_value(0.0, scale, zero, bits) == 0.0  # 0 on the grid
        if sym:
            assert zero == 2 ** (bits - 1)
        if grid == "minmax":
            if sym:
                amax = np.abs(x).max()
                assert scale == pytest.approx(amax / (2 ** (bits - 1) - 1), rel=1e-15)
                # +max|x| and -max|x| are both representable.
                assert ref.quantize_value(amax, scale, zero, bits) == pytest.approx(amax, rel=1e-12)
                assert ref.quantize_value(-amax, scale, zero, bits) == pytest.approx(-amax, rel=1e-12)
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                assert scale == pytest.approx((hi - lo) / maxq, rel=1e-15)
                assert zero == np.rint(-lo / scale)
        else:
            # The search picks the first minimiser of sum |q(x) - x|^2.4 over the 80 shrink factors.
            errs = []
            for i in range(80):
                s, z = ref._grid_params(x, bits, sym, 1 - i / 100)
                errs.append(np.sum(np.abs(ref.quantize_value(x, s, z, bits) - x) ** 2.4))
            i_best = int(np.argmin(errs))
            assert (scale, zero) == ref._grid_params(x, bits, sym, 1 - i_best / 100)
            s1, z1 = ref.grid_1d(x, bits, sym, "minmax")
            assert errs[i_best] <= np.sum(np.abs(ref.quantize_value(x, s1, z1, bits) - x) ** 2.4)


def test_grid_all_zero_and_rounding_half_even():
    assert ref.grid_1d(np.zeros(8), 4, True, "minmax") == (1.0, 8.0)
    assert ref.grid_1d(np.zeros(8), 4, True, "mse") == (1.0, 8.0)
    s, z = ref.grid_1d(np.zeros(8), 4, False, "mse")
    assert s == 1.0 and z == 0.0
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0
    codes = ref.quantize_codes(np.array([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 8.0, 4)
    assert codes.tolist() == [8, 10, 10, 8, 6]


@pytest.mark.parametrize("kind", ["random", "illcond"])
def test_obq_reference_properties(kind):
    W, H, _ = make_problem(6, 12, seed=31, kind=kind, zeros=0.2, dead=1)
    damp = ILL_DAMP if kind == "illcond" else 0.01
    for bits, sym, gs in [(2, True, None), (3, False, 4), (4, True, 6), (8, False, None)]:
        q = ref.quantize(W, H, bits, sym=sym, group_size=gs, damp=damp, score_check=True)
        maxq = 2**bits - 1
        assert q.codes.min() >= 0 and q.codes.max() <= maxq
        sc = ref._per_column(q.scale, 12)
        zc = ref._per_column(q.zero, 12)
        assert np.array_equal(q.weight, sc * (q.codes - zc))
        assert np.all(q.weight[~q.kept] == 0)
        assert all(sorted(o) == sorted(np.nonzero(k)[0].tolist()) for o, k in zip(q.orders, q.kept))
        rtn_w, _, s2, z2, rtn_loss = ref.quantize_rtn(W, H, bits, sym=sym, group_size=gs)
        assert np.array_equal(s2, q.scale) and np.array_equal(z2, q.zero)


def test_obq_first_step_is_best_single_quantization():
    """Without outliers, OBQ's first fixed weight is the one whose rounding (with optimal update
    of the others) costs least, enumerated directly with the KKT formulation."""
    W, H, _ = make_problem(6, 8, seed=41)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    for w in W:
        scale, zero = ref.grid_1d(w, 4, False, "minmax")  # asymmetric min-max: no outliers at start
        sc, zc = np.full(8, scale), np.full(8, zero)
        _, _, _, order, nout = ref.quantize_row(w, Hd, dead, sc, zc, 4, score_check=True)
        qv = ref.quantize_value(w, scale, zero, 4)
        costs = []
        for j in range(8):
            fixed = np.zeros(8, dtype=bool)
            fixed[j] = True
            opt = kkt_optimum(w, Hd, fixed, np.where(fixed, qv, 0.0))
            costs.append(0.5 * (opt - w) @ Hd @ (opt - w))
        assert order[0] == int(np.argmin(costs))


def test_obq_outlier_rule_fires_first():
    """Weights outside the grid's range by more than half a step are fixed first, the one with
    the largest rounding error first; afterwards the greedy score decides."""
    W, H, _ = make_problem(4, 10, seed=51)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    for w in W:
        # A grid made for half the range: the largest weights lie far outside it.
        scale, zero = ref.grid_1d(w / 2, 3, True, "minmax")
        sc, zc = np.full(10, scale), np.full(10, zero)
        _, codes, _, order, nout = ref.quantize_row(w, Hd, dead, sc, zc, 3, score_check=True)
        err = (w - ref.quantize_value(w, scale, zero, 3)) ** 2
        assert nout >= 1
        assert order[0] == int(np.argmax(err))
        assert sorted(order) == list(range(10))
        # Within tolerance of the half-step boundary the rule does not fire.
        edge = np.array([1.0, -0.5, 0.25])
        s_e, z_e = ref.grid_1d(edge, 2, True, "minmax")  # max|w| = 1 sits exactly on the grid
        _, _, _, _, n_edge = ref.quantize_row(edge, np.eye(3), np.zeros(3, bool), np.full(3, s_e), np.full(3, z_e), 2)
        assert n_edge == 0


def test_structured_with_scattered_zeros_is_exact_greedy():
    """With rows that have zeros of their own, every structured step removes the group whose
    removal gives the smallest true layer loss (each row's own zeros held at zero), checked by
    solving every candidate's KKT system directly."""
    W, H, _ = make_problem(4, 12, seed=13, zeros=0.3, dead=1)
    Hd, dead, _ = ref.damped_hessian(H, 0.01)
    Hk = Hd.copy()
    Hk[dead, dead] = 1.0  # decoupled unit rows for the KKT solves
    _, kept, _, order = ref.prune_structured(W, H, 0.5, group=2, damp=0.01, score_check=True, return_order=True)
    fixed = (W == 0) | dead[None, :]
    pre = [g for g in range(6) if fixed[:, 2 * g : 2 * g + 2].all()]
    assert order[: len(pre)] == pre
    for g in order[len(pre) :]:
        totals = []
        for cand in range(6):
            if fixed[:, 2 * cand : 2 * cand + 2].all():
                totals.append(np.inf)
                continue
            f = fixed.copy()
            f[:, 2 * cand : 2 * cand + 2] = True
            loss = 0.0
            for r in range(4):
                opt = kkt_optimum(W[r], Hk, f[r], np.zeros(12))
                loss += 0.5 * (opt - W[r]) @ Hd @ (opt - W[r])
            totals.append(loss)
        assert int(np.argmin(totals)) == g
        fixed[:, 2 * g : 2 * g + 2] = True
    assert np.array_equal(~kept, fixed)
