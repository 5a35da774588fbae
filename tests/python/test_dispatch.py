"""The run-time SIMD dispatch: portable and AVX2+FMA row kernels agree (not bitwise: FMA rounds
differently), and OBC_SIMD=generic forces the portable ones."""

import json
import os
import subprocess
import sys

import numpy as np

import obc_native

_SCRIPT = r"""
import json, sys
import numpy as np
import obc_native as obc
rng = np.random.default_rng(7)
X = rng.standard_normal((96, 400))
H = 2.0 / 400 * X @ X.T
W = rng.standard_normal((12, 96))
out = {
    "isa": obc.build_info()["kernel_isa"],
    "avx512": obc.build_info()["avx512_kernels"],
    "trace": obc.trace_unstructured(W, H).order.tolist(),
    "nm": obc.prune_nm(W, H, 2, 4).weight.tolist(),
    "blocked": obc.prune_blocked(W, H, 0.5, 4).weight.tolist(),
    "quant": obc.quantize(W, H, 4).codes.tolist(),
}
json.dump(out, sys.stdout)
"""


def _run(env_simd):
    env = dict(os.environ)
    env.pop("OBC_SIMD", None)
    if env_simd:
        env["OBC_SIMD"] = env_simd
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, check=True, timeout=120)
    return json.loads(proc.stdout)


def test_generic_can_be_forced_and_agrees_with_dispatched():
    generic = _run("generic")
    dispatched = _run(None)
    assert generic["isa"] == "generic"
    assert dispatched["isa"] == obc_native.build_info()["kernel_isa"]
    assert generic["trace"] == dispatched["trace"]
    np.testing.assert_allclose(generic["nm"], dispatched["nm"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(generic["blocked"], dispatched["blocked"], rtol=1e-9, atol=1e-9)
    assert generic["quant"] == dispatched["quant"]


def test_avx512_copies_follow_the_simd_setting():
    # OBC_SIMD=generic and OBC_SIMD=avx2 both keep the AVX-512 copies off; the default uses them
    # exactly when the row kernels are the AVX2 ones and the CPU has AVX-512.
    assert _run("generic")["avx512"] is False
    avx2 = _run("avx2")
    assert avx2["avx512"] is False
    assert avx2["isa"] == _run(None)["isa"]
    info = obc_native.build_info()
    if info["kernel_isa"] == "generic":
        assert info["avx512_kernels"] is False
