#!/usr/bin/env bash
# Build the sdist and prove that it installs offline: the pinned llama.cpp
# source travels inside it (vendor/llama.cpp), so installing it never fetches.
#
#     tools/sdist_check.sh
#
# The install runs in a fresh virtualenv with the build requirements
# preinstalled (--no-build-isolation), pip cut off from any index (--no-index),
# HTTP(S) proxies pointing at a closed port (a fetch of llama.cpp, by urllib or
# by pip download, would fail) and an empty mtp_cy cache (no cached
# llama-cpp-python sdist to fall back on).  Then it imports the installed
# package from outside the source tree and runs a quick part of the tests
# there, without any llama.cpp directory (the build ships the vocabularies).
# Environment: SDIST_CHECK_DIR (default build/sdist-check), MTP_CY_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
OUT=${SDIST_CHECK_DIR:-$ROOT/build/sdist-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
now() { date +%s; }

# --- 1. the sdist (vendor/llama.cpp is fetched into the checkout first if missing)
unset MTP_CY_LLAMA_CPP_DIR
TOOLS=$OUT/tools-venv
[ -x "$TOOLS/bin/python" ] || { "$PY" -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q build; }
rm -rf "$OUT/dist"
t0=$(now)
(cd "$OUT" && "$TOOLS/bin/python" -m build --sdist -o "$OUT/dist" "$ROOT" > "$OUT/sdist.log" 2>&1) \
    || { tail -30 "$OUT/sdist.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/mtp_cy-*.tar.gz)
echo "== $(basename "$SDIST"): $(stat -c %s "$SDIST") bytes, built in $(( $(now) - t0 )) s"
tar tzf "$SDIST" > "$OUT/sdist-files.txt"
for f in vendor/llama.cpp/.mtp_cy_fetched vendor/llama.cpp/include/llama.h vendor/llama.cpp/ggml/src/ggml.c \
         vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf vendor/llama.cpp/models/ggml-vocab-qwen35.gguf \
         vendor/llama.cpp/LICENSE vendor/CMakeLists.txt vendor/fetch_llama_cpp.py \
         vendor/native_build.py setup.py mtp_cy/_core.pyx; do
    grep -q "^mtp_cy-[^/]*/$f\$" "$OUT/sdist-files.txt" || { echo "missing in the sdist: $f"; exit 1; }
done
echo "== the sdist carries vendor/llama.cpp ($(grep -c '/vendor/llama.cpp/' "$OUT/sdist-files.txt") files)"

# --- 2. offline install into a fresh virtualenv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtp_cy_sdist_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
V=$WORK/venv
"$PY" -m venv "$V"
# build requirements (pyproject.toml [build-system]) and run-time dependencies, while online
"$V/bin/pip" install -q setuptools wheel "Cython>=3.1" "cmake>=3.21" ninja numpy gguf pytest
mkdir "$WORK/empty-cache"
t0=$(now)
env https_proxy=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
    HTTP_PROXY=http://127.0.0.1:9 MTP_CY_CACHE_DIR="$WORK/empty-cache" PIP_NO_INDEX=1 \
    "$V/bin/pip" install -v --no-index --no-build-isolation --no-deps "$SDIST" > "$OUT/install.log" 2>&1 \
    || { tail -40 "$OUT/install.log"; echo "offline install failed (log: $OUT/install.log)"; exit 1; }
echo "== installed offline in $(( $(now) - t0 )) s"
if grep -q "llama_cpp_python-0.3.36.tar.gz\|could not download" "$OUT/install.log"; then
    echo "the install tried to fetch llama.cpp"; exit 1
fi
[ -z "$(ls -A "$WORK/empty-cache")" ] || { echo "the install wrote to the mtp_cy cache"; exit 1; }

# --- 3. use it from outside the source tree
mkdir "$WORK/t" && cp -r tests "$WORK/t/" && cp pyproject.toml "$WORK/t/"
cd "$WORK/t"
"$V/bin/python" -c "import mtp_cy, sys; assert mtp_cy.__file__.startswith(sys.argv[1]); print('== import', mtp_cy.__file__); print('==', mtp_cy.system_info())" "$V"
env -u MTP_CY_BUILD_DIR MTP_CY_CACHE_DIR="$WORK/models" \
    "$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_standalone.py tests/test_foundation.py tests/test_session.py
