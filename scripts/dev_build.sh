#!/usr/bin/env bash
# Development build: compiles the extension module obc_native._core with CMake into
# build/dev and links it into python/obc_native/, so that `PYTHONPATH=python` runs the
# working tree without a pip install (incremental rebuilds take seconds for Python-only
# changes and only recompile touched C++ files). Needs the venv of scripts/test.sh.
# Usage: scripts/dev_build.sh [--tests]   then   PYTHONPATH=python .venv/bin/python -m pytest ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OBC_VENV:-.venv}
VPY=$VENV/bin/python
$VPY -c "import pybind11" 2>/dev/null || $VPY -m pip install --quiet "pybind11>=2.12"
$VPY -c "import cmeel" 2>/dev/null || $VPY -m pip install --quiet "cmeel-eigen>=3.4"
EIGEN_PREFIX=$($VPY -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix'))")
LAUNCHER=()
if command -v ccache >/dev/null; then  # worktrees share one cache (paths relative to the base)
  export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(dirname "$(pwd)")} CCACHE_NOHASHDIR=1
  LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
TESTS=OFF
[ "${1:-}" = "--tests" ] && TESTS=ON
cmake -S . -B build/dev -DCMAKE_BUILD_TYPE=Release -DOBC_BUILD_PYTHON=ON -DOBC_BUILD_TESTS=$TESTS \
  -DPython_EXECUTABLE="$(cd "$(dirname "$VPY")" && pwd)/$(basename "$VPY")" \
  -Dpybind11_DIR="$($VPY -m pybind11 --cmakedir)" -DCMAKE_PREFIX_PATH="$EIGEN_PREFIX" "${LAUNCHER[@]}" >/dev/null
cmake --build build/dev -j "$(nproc 2>/dev/null || echo 2)"
so=$(ls build/dev/cpp/bindings/_core*.so)
ln -sf "$(pwd)/$so" python/obc_native/
echo "built $so; run: PYTHONPATH=python $VPY -m pytest"
