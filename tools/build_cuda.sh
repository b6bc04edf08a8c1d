#!/usr/bin/env bash
# Configure and build mtp_cy's CUDA backend module (libggml-cuda.so) with the
# local CUDA toolkit, for ONE GPU architecture: compile and link only.
#
# It uses the settings of the CUDA wheels (pyproject.toml's CUDA override /
# .github/workflows/wheels.yml: MTP_CY_BACKEND_DL, GGML_NATIVE=OFF, GGML_CUDA=ON,
# GGML_CUDA_NCCL=OFF, compressed fatbins) except the architecture list, which
# is one architecture here (the wheels build several), so that it fits a
# 2-core machine.  Too slow for every CI run; run it by hand:
#
#     nice -n 19 tools/build_cuda.sh            # CUDA_ARCH=89 by default
#     CUDA_ARCH=90 MTP_CY_JOBS=2 tools/build_cuda.sh
#
# When an NVIDIA GPU is usable (nvidia-smi works) it then builds the whole
# package in this mode, installs it into a fresh virtualenv and runs the
# test-suite and (if present) benchmarks/bench_mtp.py on the GPU.
#
# Environment:
#   CUDA_ARCH       one CMAKE_CUDA_ARCHITECTURES entry (default 89-real)
#   CUDA_HOME       toolkit root (default: from nvcc on PATH, else /usr/local/cuda)
#   MTP_CY_LLAMA_CPP_DIR  llama.cpp source (default: vendor/llama.cpp, fetched if missing)
#   BUILD_DIR       default build/cuda
#   MTP_CY_JOBS     parallel jobs (default 1)
# cuBLAS: when the toolkit has no cuBLAS headers and libraries (a pip-installed
# toolkit), they are taken from NVIDIA's pip wheel nvidia-cublas (CUDA 13) or
# nvidia-cublas-cu12 (CUDA 12), installed with pip into $BUILD_DIR/deps.
# libcuda.so (the driver) is only needed to link; without a driver or the
# toolkit's stubs/libcuda.so an empty stub with the SONAME libcuda.so.1 is
# made for linking (the real driver is resolved at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
CUDA_ARCH=${CUDA_ARCH:-89-real}
BUILD_DIR=${BUILD_DIR:-$ROOT/build/cuda}
JOBS=${MTP_CY_JOBS:-1}
mkdir -p "$BUILD_DIR"
LOG=$BUILD_DIR/build_cuda.log
exec > >(tee "$LOG") 2>&1

if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc itself
        [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || \
            CUDA_HOME=$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    fi
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
NVCC=$CUDA_HOME/bin/nvcc
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC"; exit 1; }
CUDA_VER=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
CUDA_MAJOR=${CUDA_VER%%.*}
echo "== CUDA $CUDA_VER at $CUDA_HOME, arch $CUDA_ARCH, $JOBS job(s)"

SRC=$("$PY" vendor/fetch_llama_cpp.py)   # honours MTP_CY_LLAMA_CPP_DIR
echo "== llama.cpp source: $SRC"

OVERLAY=$BUILD_DIR/overlay
mkdir -p "$OVERLAY/lib" "$OVERLAY/include"
extra_inc=""
if [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    DEPS=$BUILD_DIR/deps
    if [ "$CUDA_MAJOR" -ge 13 ]; then pkg="nvidia-cublas==${CUDA_MAJOR}.*"; else pkg="nvidia-cublas-cu${CUDA_MAJOR}"; fi
    [ -d "$DEPS/nvidia" ] || "$PY" -m pip install -q --no-deps --target "$DEPS" "$pkg"
    hdr=$(find "$DEPS" -name cublas_v2.h | head -1)
    extra_inc=$(dirname "$hdr")
    for l in cublas cublasLt; do
        so=$(find "$DEPS" -name "lib$l.so.*" | head -1)
        ln -sf "$so" "$OVERLAY/lib/lib$l.so"
    done
    echo "== cuBLAS from pip ($pkg): $extra_inc"
fi
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1 \
        && ! ldconfig -p | grep -q 'libcuda.so '; then
    echo 'void mtp_cy_libcuda_link_stub(void) {}' > "$OVERLAY/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$OVERLAY/lib/libcuda.so" "$OVERLAY/stub.c"
    echo "== no libcuda.so here: linking against an empty stub (SONAME libcuda.so.1)"
fi

flags=""
[ -n "$extra_inc" ] && flags="-I$extra_inc"
t0=$(date +%s)
cmake -S vendor -B "$BUILD_DIR/native" -G Ninja \
    -DMTP_CY_LLAMA_DIR="$SRC" -DCMAKE_BUILD_TYPE=Release \
    -DMTP_CY_BACKEND_DL=ON -DMTP_CY_CPU_VARIANTS=ONE -DGGML_NATIVE=OFF \
    -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=size \
    -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$CUDA_HOME" \
    -DCMAKE_LIBRARY_PATH="$OVERLAY/lib" \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_CUDA_FLAGS="$flags" \
    $( [ "${CCACHE:-1}" != 0 ] && command -v ccache >/dev/null && echo -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache )
t1=$(date +%s)
cmake --build "$BUILD_DIR/native" --target ggml-cuda -j "$JOBS"
t2=$(date +%s)
LIB=$BUILD_DIR/native/bin/libggml-cuda.so
echo "== configure: $((t1 - t0)) s, build (ggml-cuda + ggml-base): $((t2 - t1)) s"
echo "== $LIB: $(stat -c %s "$LIB") bytes ($(du -h "$LIB" | cut -f1))"
readelf -d "$LIB" | grep -E 'NEEDED|RUNPATH|RPATH'
"$CUDA_HOME/bin/cuobjdump" --list-elf "$LIB" 2>/dev/null | head -5 || true

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "== GPU found: building the package in CUDA mode and testing it"
    nvidia-smi -L
    export MTP_CY_PORTABLE=1 MTP_CY_BACKEND_DL=1 MTP_CY_CPU_VARIANTS=ONE MTP_CY_BUILD_DIR="$BUILD_DIR/native"
    export CMAKE_ARGS="-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=size -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DCMAKE_CUDA_COMPILER=$NVCC -DCUDAToolkit_ROOT=$CUDA_HOME -DCMAKE_LIBRARY_PATH=$OVERLAY/lib -DCMAKE_CXX_FLAGS=$flags -DCMAKE_CUDA_FLAGS=$flags"
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$BUILD_DIR/dist" .
    VENV=$BUILD_DIR/venv
    rm -rf "$VENV" && "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q "$BUILD_DIR"/dist/mtp_cy-*.whl pytest
    [ -n "${DEPS:-}" ] && export LD_LIBRARY_PATH="$(dirname "$(find "$DEPS" -name 'libcublas.so.*' | head -1)"):${LD_LIBRARY_PATH:-}"
    "$VENV/bin/python" -c "import mtp_cy; print(mtp_cy.system_info()); print(mtp_cy.devices())"
    (cd "$BUILD_DIR" && "$VENV/bin/python" -m pytest -ra -p no:cacheprovider "$ROOT/tests")
    if [ -f "$ROOT/benchmarks/bench_mtp.py" ]; then
        (cd "$BUILD_DIR" && "$VENV/bin/python" "$ROOT/benchmarks/bench_mtp.py")
    else
        echo "== benchmarks/bench_mtp.py not present: no benchmark run"
    fi
else
    echo "== no usable NVIDIA GPU (nvidia-smi): compile and link only, no GPU tests"
fi
