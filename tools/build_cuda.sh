#!/usr/bin/env bash
# Configure and build mtp_cy's CUDA backend module (libggml-cuda.so) with the
# local CUDA toolkit, for ONE GPU architecture: compile and link only.
#
# It uses the settings of the CUDA wheels (tools/cibuildwheel-cuda.toml:
# MTP_CY_BACKEND_DL, GGML_NATIVE=OFF, GGML_CUDA=ON, GGML_CUDA_NCCL=OFF,
# compressed fatbins) except the architecture list, which is one architecture
# here (the wheels build several), so that it fits a 2-core machine.  Too slow
# for every CI run; run it by hand:
#
#     tools/build_cuda.sh                                   # CUDA_ARCH=89-real by default
#     CUDA_ARCH=90-real MTP_CY_JOBS=16 tools/build_cuda.sh  # H100 / H200
#
# Stages:
#   1. configure + build libggml-cuda.so; prints the time and the library size.
#   2. (on a machine with a usable NVIDIA GPU, or with MTP_CY_CUDA_PACKAGE=1)
#      build mtp_cy in this mode as a wheel ($BUILD_DIR/dist) and upstream's
#      llama-speculative-simple / llama-completion ($BUILD_DIR/native/bin).
#   3. (GPU only) install the wheel into a fresh virtualenv, check that the
#      CUDA backend loads (a CUDA0 device), run the test-suite against it and
#      benchmarks/bench_mtp.py (mtp_cy vs the native loop) on the GPU.
# SKIP_BUILD=1 runs stage 3 only, with a wheel already in $BUILD_DIR/dist and
# upstream's programs in $MTP_CY_UPSTREAM_BIN (default $BUILD_DIR/native/bin):
# for a GPU machine that should not spend its time compiling (build the wheel
# elsewhere with MTP_CY_CUDA_PACKAGE=1 and the same CUDA_ARCH).
#
# Environment:
#   CUDA_ARCH       one CMAKE_CUDA_ARCHITECTURES entry (default 89-real)
#   CUDA_HOME       toolkit root (default: from nvcc on PATH, else /usr/local/cuda)
#   MTP_CY_LLAMA_CPP_DIR  llama.cpp source (default: vendor/llama.cpp, fetched if
#                   missing); not used with SKIP_BUILD=1 (the wheel ships what the tests need)
#   BUILD_DIR       default build/cuda
#   MTP_CY_JOBS     parallel jobs (default 1)
#   PYTEST_ARGS     extra pytest arguments (stage 3)
#   TEST_TIMEOUT    stop the test run after this many seconds (stage 3; default: no limit)
#   BENCH_ARGS      arguments of benchmarks/bench_mtp.py (stage 3; default: its defaults)
# cuBLAS: when the toolkit has no cuBLAS headers and libraries (a pip-installed
# toolkit), they are taken from an installed NVIDIA pip wheel (nvidia-cublas for
# CUDA 13, nvidia-cublas-cu12 for CUDA 12), else that wheel is installed with pip
# into $BUILD_DIR/deps.  libcuda.so (the driver) is only needed to link; without a
# driver or the toolkit's stubs/libcuda.so an empty stub with the SONAME
# libcuda.so.1 is made for linking (the real driver is resolved at run time).
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

gpu_usable() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
SKIP_BUILD=${SKIP_BUILD:-0}
if [ "$SKIP_BUILD" != 1 ]; then
    SRC=$("$PY" vendor/fetch_llama_cpp.py | tail -1)   # honours MTP_CY_LLAMA_CPP_DIR
    echo "== llama.cpp source: $SRC"
fi

# the directories of the installed NVIDIA pip wheels (site-packages/nvidia/...)
pip_nvidia_dirs() {
    "$PY" - <<'PYEOF' 2>/dev/null || true
import site, sys, os
for d in site.getsitepackages() + [site.getusersitepackages()]:
    n = os.path.join(d, "nvidia")
    if os.path.isdir(n):
        print(n)
PYEOF
}
# first directory under the given roots holding a file matching $1
find_dir_of() {
    local pat=$1; shift
    local f
    for root in "$@"; do
        [ -d "$root" ] || continue
        f=$(find -L "$root" -name "$pat" -print -quit 2>/dev/null)
        [ -n "$f" ] && { dirname "$f"; return 0; }
    done
    return 0
}

OVERLAY=$BUILD_DIR/overlay
mkdir -p "$OVERLAY/lib" "$OVERLAY/include"
extra_inc=""
DEPS=""
if [ "$SKIP_BUILD" != 1 ] && [ ! -f "$CUDA_HOME/include/cublas_v2.h" ]; then
    # an installed NVIDIA pip wheel of cuBLAS, else one installed here with pip
    roots=$(pip_nvidia_dirs)
    extra_inc=$(find_dir_of cublas_v2.h $roots)
    if [ -z "$extra_inc" ]; then
        DEPS=$BUILD_DIR/deps
        if [ "$CUDA_MAJOR" -ge 13 ]; then pkg="nvidia-cublas==${CUDA_MAJOR}.*"; else pkg="nvidia-cublas-cu${CUDA_MAJOR}"; fi
        [ -d "$DEPS/nvidia" ] || "$PY" -m pip install -q --no-deps --target "$DEPS" "$pkg"
        roots=$DEPS
        extra_inc=$(find_dir_of cublas_v2.h "$DEPS")
    fi
    for l in cublas cublasLt; do
        so=$(find -L $roots -name "lib$l.so.${CUDA_MAJOR}*" -print -quit)
        ln -sf "$so" "$OVERLAY/lib/lib$l.so"
    done
    echo "== cuBLAS headers from a pip wheel: $extra_inc"
fi
if [ "$SKIP_BUILD" != 1 ] && ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so "$CUDA_HOME"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1 \
        && ! ldconfig -p | grep -q 'libcuda.so '; then
    # (a stub from an earlier run already defines the driver functions: keep it)
    [ -f "$OVERLAY/stub.c" ] || echo 'void mtp_cy_libcuda_link_stub(void) {}' > "$OVERLAY/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$OVERLAY/lib/libcuda.so" "$OVERLAY/stub.c"
    echo "== no libcuda.so here: linking against a stub with the SONAME libcuda.so.1"
fi

flags=""
[ -n "$extra_inc" ] && flags="-I$extra_inc"
# the arguments setup.py adds for the package build, so that stage 2 reuses stage 1's objects
CUDA_CMAKE_ARGS="-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=size \
-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DCMAKE_CUDA_COMPILER=$NVCC -DCUDAToolkit_ROOT=$CUDA_HOME \
-DCMAKE_LIBRARY_PATH=$OVERLAY/lib"
[ -n "$flags" ] && CUDA_CMAKE_ARGS="$CUDA_CMAKE_ARGS -DCMAKE_CXX_FLAGS=$flags -DCMAKE_CUDA_FLAGS=$flags"
LIB=$BUILD_DIR/native/bin/libggml-cuda.so

if [ "$SKIP_BUILD" != 1 ]; then
    # --- 1. compile and link the CUDA backend module
    t0=$(date +%s)
    cmake -S vendor -B "$BUILD_DIR/native" -G Ninja \
        -DMTP_CY_LLAMA_DIR="$SRC" -DCMAKE_BUILD_TYPE=Release \
        -DMTP_CY_BACKEND_DL=ON -DMTP_CY_CPU_VARIANTS=ONE -DGGML_NATIVE=OFF \
        $CUDA_CMAKE_ARGS \
        $( [ "${CCACHE:-1}" != 0 ] && command -v ccache >/dev/null && echo -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache )
    t1=$(date +%s)
    cmake --build "$BUILD_DIR/native" --target ggml-cuda -j "$JOBS"
    t2=$(date +%s)
    # The module calls the driver API (cuMemCreate, ...): it must record libcuda.so.1 as
    # NEEDED, or it fails to load ("undefined symbol: cuMemCreate").  An empty link stub
    # gets dropped by the linker (as-needed), so give the stub exactly the driver
    # functions the module uses and relink.
    driver_syms=$(nm -D --undefined-only "$LIB" | awk '$2 ~ /^cu[A-Z]/ {print $2}' | sort -u)
    if [ -n "$driver_syms" ] && [ -f "$OVERLAY/stub.c" ] && ! readelf -d "$LIB" | grep -q 'libcuda\.so\.1'; then
        for sym in $driver_syms; do echo "void $sym(void) {}"; done > "$OVERLAY/stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$OVERLAY/lib/libcuda.so" "$OVERLAY/stub.c"
        echo "== link stub now defines the $(echo $driver_syms | wc -w) driver functions the module uses; relinking"
        cmake --build "$BUILD_DIR/native" --target ggml-cuda -j "$JOBS"
        t2=$(date +%s)
    fi
    readelf -d "$LIB" | grep -q 'libcuda\.so\.1' || [ -z "$driver_syms" ] \
        || { echo "libggml-cuda.so does not record libcuda.so.1"; exit 1; }
    echo "== configure: $((t1 - t0)) s, build (ggml-cuda + ggml-base): $((t2 - t1)) s"
    echo "== $LIB: $(stat -c %s "$LIB") bytes ($(du -h "$LIB" | cut -f1))"
    readelf -d "$LIB" | grep -E 'NEEDED|RUNPATH|RPATH'
    "$CUDA_HOME/bin/cuobjdump" --list-elf "$LIB" 2>/dev/null | head -5 || true

    # --- 2. the package in this mode, and upstream's programs
    if gpu_usable || [ "${MTP_CY_CUDA_PACKAGE:-0}" = 1 ]; then
        echo "== building the mtp_cy wheel in CUDA mode and upstream's programs"
        t0=$(date +%s)
        rm -rf "$BUILD_DIR/dist"
        env MTP_CY_PORTABLE=1 MTP_CY_BACKEND_DL=1 MTP_CY_CPU_VARIANTS=ONE MTP_CY_LIMITED_API=1 \
            MTP_CY_BUILD_DIR="$BUILD_DIR/native" MTP_CY_JOBS="$JOBS" CMAKE_ARGS="$CUDA_CMAKE_ARGS" \
            "$PY" -m pip wheel --no-deps --no-build-isolation -w "$BUILD_DIR/dist" . > "$BUILD_DIR/wheel.log" 2>&1 \
            || { tail -40 "$BUILD_DIR/wheel.log"; echo "wheel build failed (log: $BUILD_DIR/wheel.log)"; exit 1; }
        cmake --build "$BUILD_DIR/native" --target llama-speculative-simple llama-completion -j "$JOBS" > /dev/null
        echo "== wheel + upstream programs: $(( $(date +%s) - t0 )) s: $(ls "$BUILD_DIR"/dist/*.whl)" \
             "($(stat -c %s "$BUILD_DIR"/dist/*.whl) bytes)"
    fi
fi

# --- 3. tests and benchmark on the GPU (GPU_CHECK=force: also without one, to try this
# stage on any machine; the tests then run on the CPU)
if ! gpu_usable && [ "${GPU_CHECK:-}" != force ]; then
    echo "== no usable NVIDIA GPU (nvidia-smi): compile and link only, no GPU tests"
    exit 0
fi
if gpu_usable; then echo "== GPU found: testing the CUDA build on it"
else echo "== GPU_CHECK=force without a GPU: running stage 3 on the CPU"; fi
nvidia-smi -L || true
WHEEL=$(ls "$BUILD_DIR"/dist/mtp_cy*.whl | head -1)
UPSTREAM=${MTP_CY_UPSTREAM_BIN:-$BUILD_DIR/native/bin}
VENV=$BUILD_DIR/venv
rm -rf "$VENV"
VPIP=("$VENV/bin/python" -m pip)
if ! "$PY" -m venv --system-site-packages "$VENV" > /dev/null 2>&1; then
    # no ensurepip for this interpreter (a distribution's Python): $PY's pip installs into it
    rm -rf "$VENV" && "$PY" -m venv --system-site-packages --without-pip "$VENV"
    VPIP=("$PY" -m pip --python "$VENV/bin/python")
fi
# when $PY is itself a virtualenv, its packages are not the "system" ones: add them too
"$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_mtp_cy_parent.pth"
"${VPIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
# numpy, gguf and pytest from the system when there (a GPU box may have no index)
"$VENV/bin/python" -c "import numpy, gguf, pytest" 2>/dev/null || "${VPIP[@]}" install -q numpy gguf pytest
# CUDA runtime and cuBLAS for the CUDA module when the loader does not find them by itself
if ! ldconfig -p | grep -q "libcublas.so.$CUDA_MAJOR "; then
    for l in "libcudart.so.$CUDA_MAJOR" "libcublas.so.$CUDA_MAJOR"; do
        d=$(find_dir_of "$l" "$CUDA_HOME/lib64" "$CUDA_HOME/targets" $(pip_nvidia_dirs) ${DEPS:+"$DEPS"})
        [ -n "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    echo "== LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
fi
T=$BUILD_DIR/t
rm -rf "$T" && mkdir -p "$T" && cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$T/"
cd "$T"
# the installed wheel alone (it ships the synthetic models' vocabularies), plus upstream's programs
export MTP_CY_UPSTREAM_BIN="$UPSTREAM"
unset MTP_CY_BUILD_DIR PYTHONPATH MTP_CY_LLAMA_CPP_DIR
"$VENV/bin/python" - "$VENV" <<'PYEOF'
import os, sys, mtp_cy
venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(mtp_cy.__file__).startswith(venv), f"mtp_cy imported from {mtp_cy.__file__}, not the wheel"
print("== system_info:", mtp_cy.system_info())
print("== build_info:", mtp_cy.build_info())
devs = mtp_cy.devices()
print("== devices:", devs)
if not any("CUDA" in str(d) for d in devs):
    msg = "the CUDA backend did not load: the tests would run on the CPU"
    if os.environ.get("GPU_CHECK") != "force":
        raise SystemExit(msg)
    print("== WARNING:", msg)
PYEOF
t0=$(date +%s)
# TEST_TIMEOUT (seconds): Ctrl-C the test run then (pytest still reports what ran), so the
# benchmark below runs even when a GPU machine is lent for a few minutes only
${TEST_TIMEOUT:+timeout -s INT "$TEST_TIMEOUT"} "$VENV/bin/python" -m pytest -ra -p no:cacheprovider ${PYTEST_ARGS:-} tests \
    || echo "== TESTS FAILED OR INTERRUPTED"
echo "== tests: $(( $(date +%s) - t0 )) s"
if [ -f "$ROOT/benchmarks/bench_mtp.py" ]; then
    t0=$(date +%s)
    "$VENV/bin/python" "$ROOT/benchmarks/bench_mtp.py" ${BENCH_ARGS:-}
    echo "== benchmark: $(( $(date +%s) - t0 )) s"
else
    echo "== benchmarks/bench_mtp.py not present: no benchmark run"
fi
