#!/usr/bin/env bash
# The GPU check, run on the lent GPU machine (no registry, 16 cores, CUDA, Python 3.12 + torch):
#   here:   make gpu-kit                      (fills .gpu-kit/: pruned llama.cpp sources + wheels)
#   there:  run(command="bash bench/gpu_check.sh", carry=[".gpu-kit"], timeout_s=600)
# It builds llama-cpp-python with CUDA for one GPU architecture (CUDA_ARCH, default 90 = H100/H200)
# with scripts/llama_wheel.py, then runs bench/gpu_check.py (convert, serve with every layer offloaded,
# checks, decode tok/s with and without offload). Results land in $OUT/gpu-check.json.
#
# The build runs in its own process session, so it survives the end of a call: if it is not
# done within BUILD_WAIT_S, this exits 75 ("build still running") and the same command, called
# again while the machine is warm, picks up where it left off.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
KIT=${KIT:-.gpu-kit}
SITE=${SITE:-/tmp/gguf-serve-site}
WORK=${WORK:-/tmp/gguf-serve-gpu-work}
CUDA_ARCH=${CUDA_ARCH:-90}
BUILD_WAIT_S=${BUILD_WAIT_S:-480}
mkdir -p "$OUT" "$WORK"
started=$(date +%s)

if [ ! -e "$SITE/.deps-installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/wheels/*.whl
  touch "$SITE/.deps-installed"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

wheel_dir="$WORK/llama-wheel"
if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  if [ ! -e "$WORK/build.pid" ] || ! kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null; then
    echo "gpu-check: building llama-cpp-python with CUDA for sm_$CUDA_ARCH on $(nproc) cores"
    GGUF_SERVE_WHEEL_CACHE="$WORK/cache" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_GENERATOR=Ninja \
      setsid python3 scripts/llama_wheel.py build --gpu cuda --cuda-arch "$CUDA_ARCH" \
        --sdist "$KIT/llama-src.tar.gz" --no-build-isolation --out "$wheel_dir" \
        >"$WORK/build.log" 2>&1 </dev/null &
    echo $! >"$WORK/build.pid"
  fi
  while kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null; do
    if [ $(( $(date +%s) - started )) -gt "$BUILD_WAIT_S" ]; then
      tail -5 "$WORK/build.log"; cp "$WORK/build.log" "$OUT/build.log"
      echo "gpu-check: the CUDA build is still running; call the same command again now"
      exit 75
    fi
    sleep 5
  done
  cp "$WORK/build.log" "$OUT/build.log"
  ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
  echo "gpu-check: built in $(( $(date +%s) - started )) s"
fi
if [ ! -e "$SITE/.llama-installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$wheel_dir"/llama_cpp_python-*.whl
  touch "$SITE/.llama-installed"
fi
python3 -m bench.gpu_check --out "$OUT" --work "$WORK/check" "$@"
