"""Package-level contract: no torch at import, one version source, build_info, public names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import obc_native

ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_import_torch():
    code = "import sys; import obc_native; print('torch' in sys.modules, any(m.startswith('torch') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out


def test_version_matches_cmake():
    text = (ROOT / "CMakeLists.txt").read_text()
    match = re.search(r"project\(obc_native\s+VERSION\s+([0-9.]+)", text)
    assert match, "project(obc_native VERSION x.y.z) not found in CMakeLists.txt"
    assert obc_native.__version__ == match.group(1)
    assert obc_native.build_info()["version"] == match.group(1)


def test_build_info_keys():
    info = obc_native.build_info()
    assert set(info) >= {"version", "openmp", "max_threads", "eigen_version", "cuda", "simd", "compiler"}
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    for key in ("version", "eigen_version", "simd", "compiler"):
        assert isinstance(info[key], str)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["eigen_version"])


def test_public_names():
    for name in (
        "prune_unstructured", "prune_nm", "prune_blocked", "prune_structured", "quantize",
        "quantize_rtn", "trace_unstructured", "trace_blocked", "prune_magnitude", "layer_loss",
        "build_info", "HessianError", "PruneResult", "QuantResult", "Trace", "__version__",
    ):
        assert hasattr(obc_native, name), name
        assert name in obc_native.__all__, name
    assert issubclass(obc_native.HessianError, ValueError)


def test_signatures_follow_the_api_contract():
    """Keyword arguments and defaults listed in docs/python_api.md are accepted."""
    import inspect

    contract = {
        "prune_unstructured": {"damp": 0.01, "spread": "global", "num_threads": None},
        "prune_nm": {"damp": 0.01, "num_threads": None},
        "prune_blocked": {"damp": 0.01, "spread": "global", "num_threads": None},
        "prune_structured": {"group": 1, "damp": 0.01, "num_threads": None},
        "quantize": {"sym": True, "group_size": None, "grid": "mse", "damp": 0.01, "num_threads": None},
        "quantize_rtn": {"sym": True, "group_size": None, "grid": "mse", "num_threads": None},
        "trace_unstructured": {"damp": 0.01, "num_threads": None},
        "trace_blocked": {"damp": 0.01, "num_threads": None},
        "prune_magnitude": {"spread": "global"},
    }
    problems = []
    for fn, kwargs in contract.items():
        params = inspect.signature(getattr(obc_native, fn)).parameters
        for key, default in kwargs.items():
            if key not in params:
                problems.append(f"{fn}: no keyword {key!r}")
            elif params[key].default != default:
                problems.append(f"{fn}: {key} defaults to {params[key].default!r}, not {default!r}")
            elif params[key].kind is not inspect.Parameter.KEYWORD_ONLY:
                problems.append(f"{fn}: {key} is not keyword-only")
    assert not problems, problems
