#!/usr/bin/env bash
# Builds the C++ core without Python, installs it into a fresh prefix under build/, checks the
# install tree, then builds tests/cmake_consumer against it with find_package(obc_native) and runs
# the C++ and C consumers. The C++ consumer's outputs (build/cmake_consumer/out) are compared with
# the Python module by tests/python/test_hessian_io.py.
# Env: EIGEN_PREFIX (prefix holding Eigen3's CMake config; default: the .venv's cmeel-eigen),
#      JOBS (parallel build jobs; default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${EIGEN_PREFIX:-}" ]; then
  EIGEN_PREFIX=$(.venv/bin/python -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix'))")
fi
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
WORK=$ROOT/build/cmake_consumer
PREFIX=$WORK/prefix
rm -rf "$PREFIX" "$WORK/consumer" "$WORK/out"
mkdir -p "$WORK/out"

echo "== core: configure, build, install into $PREFIX (no Python, no tests)"
cmake -S . -B "$WORK/core" -DCMAKE_BUILD_TYPE=Release -DOBC_BUILD_PYTHON=OFF \
  -DOBC_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$EIGEN_PREFIX" >/dev/null
cmake --build "$WORK/core" -j "$JOBS"
cmake --install "$WORK/core" --prefix "$PREFIX" >/dev/null

echo "== install tree"
LIBDIR=lib
if [ -d "$PREFIX/lib64/cmake/obc_native" ]; then LIBDIR=lib64; fi
missing=0
for f in include/obc/obc.h include/obc/accumulator.hpp include/obc/hessian_io.hpp \
         include/obc/prune.hpp include/obc/quant.hpp include/obc/interrupt.hpp \
         "$LIBDIR/cmake/obc_native/obc_native-config.cmake" \
         "$LIBDIR/cmake/obc_native/obc_native-config-version.cmake" \
         "$LIBDIR/cmake/obc_native/obc_native-targets.cmake"; do
  if [ ! -f "$PREFIX/$f" ]; then echo "missing: $f"; missing=1; fi
done
if ! ls "$PREFIX/$LIBDIR"/libobc_native.* >/dev/null 2>&1; then echo "missing: library"; missing=1; fi
if [ -n "$(find "$PREFIX" -path '*internal*')" ]; then echo "internal headers installed"; missing=1; fi
if grep -rqi pybind11 "$PREFIX/$LIBDIR/cmake/obc_native"; then echo "package mentions pybind11"; missing=1; fi
[ "$missing" = 0 ] || exit 1
echo "ok: headers, library, config, version file, exported targets"

echo "== consumer: find_package(obc_native) from the installed prefix only"
# Only the obc_native prefix is given: the package config finds Eigen3 (and OpenMP) itself.
cmake -S tests/cmake_consumer -B "$WORK/consumer" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX"
cmake --build "$WORK/consumer" -j "$JOBS"
"$WORK/consumer/obc_consumer" "$WORK/out"
"$WORK/consumer/obc_consumer_c"

echo "== example host: examples/cpp against the installed prefix"
cmake -S examples/cpp -B "$WORK/example" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$WORK/example" -j "$JOBS"
EX=$WORK/example/obc_compress
OUT=$WORK/out
"$EX" accumulate --out "$OUT/example_acts.obchess" "$OUT/X.npy"
"$EX" merge --out "$OUT/example_merged.obchess" "$OUT/example_acts.obchess" "$OUT/hessian.obchess"
"$EX" info "$OUT/example_merged.obchess"
# Same Hessian file and settings as the consumer's C API calls: tests/python compares exactly.
"$EX" prune --weight "$OUT/W.npy" --hessian "$OUT/hessian.obchess" --sparsity 0.5 \
  --out "$OUT/example_prune_weight.npy" --mask "$OUT/example_prune_kept.npy"
"$EX" quantize --weight "$OUT/W.npy" --hessian "$OUT/hessian.obchess" --bits 4 \
  --out "$OUT/example_quant_weight.npy" --codes "$OUT/example_quant_codes.npy"
"$EX" prune --weight "$OUT/W.npy" --acts "$OUT/X.npy" --nm 2:4 --threads 2 --out "$OUT/example_nm.npy"
status=0
"$EX" prune --weight "$OUT/W.npy" --hessian "$OUT/hessian.obchess" --sparsity 0.5 --timeout 0 \
  --out "$OUT/never_written.npy" || status=$?
if [ "$status" != 3 ] || [ -e "$OUT/never_written.npy" ]; then
  echo "expected exit status 3 and no output for an expired --timeout, got $status"; exit 1
fi
echo "== cmake consumer: all passed"
