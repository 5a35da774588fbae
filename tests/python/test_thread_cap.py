"""num_threads is capped at MAX_THREADS (1024) in Python, in the core and in the CLI.

Uncapped, num_threads=10**6 made OpenMP try to start that many threads and libgomp abort the
whole process; the CLI's --threads 10**12 surfaced as a pybind11 TypeError that printed arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import obc_native as obc
from obc_native import _api, _arrays, cli


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 32))
    return rng.standard_normal((3, 8)), 2 / 32 * X @ X.T


CALLS = {
    "prune_unstructured": lambda W, H, t: obc.prune_unstructured(W, H, 0.5, num_threads=t),
    "prune_nm": lambda W, H, t: obc.prune_nm(W, H, 2, 4, num_threads=t),
    "prune_blocked": lambda W, H, t: obc.prune_blocked(W, H, 0.5, 2, num_threads=t),
    "prune_structured": lambda W, H, t: obc.prune_structured(W, H, 0.5, group=2, num_threads=t),
    "quantize": lambda W, H, t: obc.quantize(W, H, 3, num_threads=t),
    "quantize_rtn": lambda W, H, t: obc.quantize_rtn(W, H, 3, num_threads=t),
    "trace_unstructured": lambda W, H, t: obc.trace_unstructured(W, H, num_threads=t),
    "solve_masked": lambda W, H, t: obc.solve_masked(W, H, np.ones(W.shape, bool), num_threads=t),
    "layer_loss": lambda W, H, t: obc.layer_loss(W, W * 0.5, H, num_threads=t),
    "HessianAccumulator": lambda W, H, t: obc.HessianAccumulator(8, num_threads=t),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("threads", [_arrays.MAX_THREADS + 1, 10**6, 10**12])
def test_too_many_threads_is_a_value_error(layer, call, threads):
    with pytest.raises(ValueError, match=r"num_threads: expected an integer in \[0, 1024\]"):
        CALLS[call](*layer, threads)


def test_the_bound_itself_is_allowed(layer):
    W, H = layer
    assert obc.prune_unstructured(W, H, 0.5, num_threads=_arrays.MAX_THREADS).weight.shape == W.shape


@pytest.mark.parametrize("threads", [1025, 10**6])
def test_core_caps_threads_too(layer, threads):
    # The compiled module checks on its own, for callers that bypass the Python front.
    W, H = layer
    with pytest.raises(ValueError, match="num_threads"):
        _api._kernels(W).prune_structured(W, H, 0.5, 2, 0.01, threads)


@pytest.mark.parametrize("value", ["1025", "1000000000000", "many"])
def test_cli_threads_clean_message(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compress", "--model", "m.pt", "--calibration", "c.npy", "--out", "o",
                  "--threads", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # argparse's usage, then one line naming the option: no traceback, no arrays.
    assert err.splitlines()[-1].startswith("obc-native compress: error: argument --threads: "
                                           "expected an integer in 0..1024, got")
    assert "Traceback" not in err and "array(" not in err
