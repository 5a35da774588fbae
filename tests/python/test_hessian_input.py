"""H is read where it lies: float32 or float64, C- or Fortran-ordered, without a copy.

A float32 H holds exactly the values of its float64 widening, and the core always prepares the
inverse in float64, so every result must be bit-identical between the two; likewise between the
two memory orders of a symmetric H. solve_masked picks one of two closed forms per row (with the
inverse when a row keeps more than it prunes, with H itself otherwise, no inverse computed at
all): both are checked against the float64 least-squares reference at, below and above 50%.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc

from problems import make_problem
import reference as ref

CALLS = {
    "unstructured": lambda W, H: obc.prune_unstructured(W, H, 0.6, num_threads=2),
    "uniform": lambda W, H: obc.prune_unstructured(W, H, 0.5, spread="uniform", num_threads=2),
    "blocked": lambda W, H: obc.prune_blocked(W, H, 0.5, 4, num_threads=2),
    "nm": lambda W, H: obc.prune_nm(W, H, 2, 4, num_threads=2),
    "structured": lambda W, H: obc.prune_structured(W, H, 0.4, group=2, num_threads=2),
    "quant": lambda W, H: obc.quantize(W, H, 3, sym=False, grid="minmax", num_threads=2),
    "trace": lambda W, H: obc.trace_unstructured(W, H, num_threads=2),
}


def _fields(result):
    if isinstance(result, obc.Trace):
        return {"order": result.order, "losses": result.losses}
    out = {"weight": result.weight, "row_losses": result.row_losses}
    if getattr(result, "codes", None) is not None:
        out["codes"] = result.codes
    return out


@pytest.mark.parametrize("mode", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_fortran_hessians_give_identical_results(mode, dtype):
    W, H, _ = make_problem(12, 48, seed=71, zeros=0.1, dead=2, dtype=dtype)
    H32 = H.astype(np.float32)
    H32_wide = H32.astype(np.float64)
    a = _fields(CALLS[mode](W, H32))
    b = _fields(CALLS[mode](W, H32_wide))
    c = _fields(CALLS[mode](W, np.asfortranarray(H32_wide)))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{mode} {key}: float32 H")
        np.testing.assert_array_equal(a[key], c[key], err_msg=f"{mode} {key}: Fortran H")


def test_hessian_is_not_copied(monkeypatch):
    from obc_native import _arrays

    H = make_problem(2, 16, seed=3)[1].astype(np.float32)
    assert _arrays.as_hessian(H, 16) is H
    Hf = np.asfortranarray(make_problem(2, 16, seed=3)[1])
    assert _arrays.as_hessian(Hf, 16) is Hf
    strided = np.zeros((32, 16))[::2]
    assert _arrays.as_hessian(strided, 16).flags.c_contiguous
    assert _arrays.as_hessian(H.astype(np.float16), 16).dtype == np.float32


@pytest.mark.parametrize("kind,damp", [("random", 0.01), ("illcond", 1e-5)])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_solve_masked_both_closed_forms_match_reference(kind, damp, fraction):
    W, H, _ = make_problem(6, 40, seed=5, kind=kind, zeros=0.05, dead=1)
    rng = np.random.default_rng(9)
    pruned = np.zeros(W.shape, dtype=bool)
    for r in range(W.shape[0]):  # exactly `fraction` of each row, so both forms are exercised
        pruned[r, rng.permutation(40)[: int(fraction * 40)]] = True
    got = obc.solve_masked(W, H, ~pruned, damp=damp)
    Hd, dead, _ = ref.damped_hessian(H, damp)
    for r in range(W.shape[0]):
        fixed = pruned[r] | (W[r] == 0) | dead
        want = ref.constrained_optimum(W[r], Hd, fixed, 0.0)[0]
        scale = np.abs(want).max()
        np.testing.assert_allclose(got.weight[r], want, rtol=0, atol=1e-6 * scale)
        assert np.all(got.weight[r][fixed] == 0)
    np.testing.assert_allclose(got.row_losses, ref.layer_losses(W, got.weight, H), rtol=1e-9)



@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_solve_masked_slightly_asymmetric_hessian_uses_its_symmetric_part(order, fraction):
    """An exactly symmetric H takes a one-triangle fast path; an H that is symmetric only within
    the validation tolerance must give the result of its symmetric part (H + H^T) / 2, bit for
    bit (the core averages the two triangles in float64 just like numpy does here)."""
    W, H, _ = make_problem(5, 36, seed=8, zeros=0.05, dead=1)
    rng = np.random.default_rng(4)
    live = np.diag(H) > 0
    noise = np.triu(rng.standard_normal(H.shape), 1) * 1e-9 * np.abs(H).max()
    noise *= np.outer(live, live)  # dead inputs keep their exactly zero rows and columns
    H_asym = np.asarray(H + noise, order=order)
    H_sym = np.asarray(0.5 * (H_asym + H_asym.T), order=order)
    assert not np.array_equal(H_asym, H_asym.T) and np.array_equal(H_sym, H_sym.T)
    pruned = np.zeros(W.shape, dtype=bool)
    for r in range(W.shape[0]):
        pruned[r, rng.permutation(36)[: int(fraction * 36)]] = True
    a = obc.solve_masked(W, H_asym, ~pruned)
    b = obc.solve_masked(W, H_sym, ~pruned)
    np.testing.assert_array_equal(a.weight, b.weight)
    Hd, dead, _ = ref.damped_hessian(H_sym, 0.01)
    for r in range(W.shape[0]):
        want = ref.constrained_optimum(W[r], Hd, pruned[r] | (W[r] == 0) | dead, 0.0)[0]
        np.testing.assert_allclose(b.weight[r], want, rtol=0, atol=1e-6 * np.abs(want).max())

def test_bad_hessian_dtype_and_layout_are_rejected():
    W, H, _ = make_problem(2, 8, seed=1)
    with pytest.raises(TypeError, match="H"):
        obc.prune_nm(W, H.astype(np.int64), 2, 4)
    with pytest.raises(ValueError, match="H"):
        obc.prune_nm(W, H.astype(np.float32)[:, :, None], 2, 4)
