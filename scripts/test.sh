#!/usr/bin/env bash
# Install-and-test: builds obc_native into ./.venv (with pinned torch and the test extras),
# runs the C++ tests (ctest), the CMake-package consumer check and the Python test suite.
# Usage: scripts/test.sh [extra pytest args]      (slow tests: scripts/test.sh -m slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch is pinned, and installed BEFORE the extras: they ask only torch>=2.0, which the pin then
# satisfies, so pip never resolves an unpinned torch (the newest, a multi-GB CUDA build).
$VPY -m pip install --quiet --upgrade pip
$VPY -m pip install --quiet "torch==2.13.0"
$VPY -m pip install --quiet ".[test,torch]"

# C++ core without Python: build, unit tests, install, and an outside find_package consumer.
EIGEN_PREFIX=$($VPY -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix'))")
if [ ! -d "$EIGEN_PREFIX" ]; then
  $VPY -m pip install --quiet "cmeel-eigen>=3.4"
fi
JOBS=$(nproc 2>/dev/null || echo 2)
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DOBC_BUILD_TESTS=ON \
  -DCMAKE_PREFIX_PATH="$EIGEN_PREFIX" >/dev/null
cmake --build build/cpp -j "$JOBS"
ctest --test-dir build/cpp --output-on-failure
if [ -x scripts/test_cmake_consumer.sh ]; then
  EIGEN_PREFIX="$EIGEN_PREFIX" scripts/test_cmake_consumer.sh
fi

# Python tests run against the installed package (python/ is not on sys.path).
$VPY -m pytest -m "not slow" "$@"
