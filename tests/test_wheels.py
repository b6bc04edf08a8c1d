"""The wheel matrix (issue 6): what cibuildwheel would build, and the CUDA flavour's renaming.

These read the source checkout's packaging files (pyproject.toml, tools/); when the tests run
against an installed wheel outside the checkout (tools/wheel_check.sh), they are skipped.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_TOML = ROOT / "tools" / "cibuildwheel-cuda.toml"
pytestmark = pytest.mark.skipif(
    not (ROOT / "setup.py").is_file() or not CUDA_TOML.is_file(),
    reason="needs the source checkout's packaging files")

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYTHONS = ["cp310", "cp311", "cp312", "cp313"]


def load(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def identifiers(platform, *extra):
    """``cibuildwheel --print-build-identifiers`` for ``platform`` (no containers needed)."""
    if importlib.util.find_spec("cibuildwheel") is None:
        pytest.skip("cibuildwheel is not installed (pip install -e '.[test]' on Python >= 3.11)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    out = subprocess.run(
        [sys.executable, "-m", "cibuildwheel", "--print-build-identifiers", "--platform", platform,
         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.split() if line]


def test_cpu_matrix_linux():
    ids = identifiers("linux")
    assert sorted(ids) == sorted(f"{py}-manylinux_{arch}" for py in PYTHONS
                                 for arch in ("x86_64", "aarch64"))


def test_cpu_matrix_macos_arm64_only():
    assert sorted(identifiers("macos")) == sorted(f"{py}-macosx_arm64" for py in PYTHONS)


def test_cuda_matrix_linux_x86_64_only():
    ids = identifiers("linux", "--config-file", str(CUDA_TOML))
    assert sorted(ids) == sorted(f"{py}-manylinux_x86_64" for py in PYTHONS)


def test_cpu_wheels_are_portable_abi3_and_dynamic_cpu_variants():
    cfg = load(ROOT / "pyproject.toml")["tool"]["cibuildwheel"]
    linux = cfg["linux"]
    assert linux["manylinux-x86_64-image"] == linux["manylinux-aarch64-image"] == "manylinux_2_28"
    env = linux["environment"]
    # no -march=native: a portable build with ggml's runtime-selected CPU modules, abi3
    assert env == {"MTP_CY_PORTABLE": "1", "MTP_CY_BACKEND_DL": "1",
                   "MTP_CY_CPU_VARIANTS": "ALL", "MTP_CY_LIMITED_API": "1"}
    assert linux["repair-wheel-command"].startswith("auditwheel repair")
    mac = cfg["macos"]["environment"]
    assert mac["MTP_CY_PORTABLE"] == "1" and mac["MTP_CY_LIMITED_API"] == "1"
    assert "-DGGML_METAL=ON" in mac["CMAKE_ARGS"] and "-DGGML_METAL_EMBED_LIBRARY=ON" in mac["CMAKE_ARGS"]
    # the wheels are tested installed, from a copy of tests/, not from the source tree, and
    # without llama.cpp (issue 11: the wheel ships what the synthetic models need)
    assert "pytest" in cfg["test-command"] and cfg["test-sources"] == ["tests", "pyproject.toml"]
    assert cfg["test-command"].startswith("env -u MTP_CY_LLAMA_CPP_DIR ")
    assert "{project}" not in cfg["test-command"]


def test_cuda_wheels_settings():
    cfg = load(CUDA_TOML)["tool"]["cibuildwheel"]
    env = cfg["linux"]["environment"]
    assert env["MTP_CY_BACKEND_DL"] == "1" and env["MTP_CY_PORTABLE"] == "1"
    args = env["CMAKE_ARGS"]
    assert "-DGGML_CUDA=ON" in args and "-DGGML_CUDA_COMPRESSION_MODE=size" in args
    archs = args.split("-DCMAKE_CUDA_ARCHITECTURES=")[1].split("'")[0].split(";")
    # the list docs/wheels.md documents: native code for Turing..Blackwell, PTX for newer GPUs
    assert archs == ["75-real", "80-real", "86-real", "89-real", "90-real", "120a-real", "90-virtual"]
    readme = (ROOT / "docs" / "wheels.md").read_text()
    for cc in ("7.5", "8.0", "8.6", "8.9", "9.0", "12.0"):
        assert f"{cc} (" in readme, cc
    assert cfg["test-command"] == load(ROOT / "pyproject.toml")["tool"]["cibuildwheel"]["test-command"]
    repair = cfg["linux"]["repair-wheel-command"]
    for lib in ("libcuda.so.1", "libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12"):
        assert f"--exclude {lib}" in repair, lib
    assert any("set_dist_name.py cu12" in step for step in cfg["linux"]["before-all"])


def test_cuda_flavour_rename(tmp_path):
    """tools/set_dist_name.py gives the CUDA wheels their own name and NVIDIA's pip libraries."""
    copy = tmp_path / "pyproject.toml"
    copy.write_text((ROOT / "pyproject.toml").read_text())
    run = [sys.executable, str(ROOT / "tools" / "set_dist_name.py"), "cu12", str(copy)]
    subprocess.run(run, check=True, capture_output=True)
    project = load(copy)["project"]
    original = load(ROOT / "pyproject.toml")["project"]
    assert project["name"] == "mtp_cy_cu12"
    assert project["dependencies"] == original["dependencies"] + [
        "nvidia-cuda-runtime-cu12>=12.8", "nvidia-cublas-cu12>=12.8"]
    # everything else unchanged; a second rename is refused instead of renaming twice
    assert {k: v for k, v in project.items() if k not in ("name", "dependencies")} == \
        {k: v for k, v in original.items() if k not in ("name", "dependencies")}
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode != 0 and "already renamed" in again.stderr


@pytest.mark.slow
def test_sdist_carries_the_pinned_llama_cpp(tmp_path):
    """The sdist holds the fetched llama.cpp source (so that installing it fetches nothing,
    tools/sdist_check.sh proves the offline install) and no build outputs."""
    import json
    import tarfile
    marker = ROOT / "vendor" / "llama.cpp" / ".mtp_cy_fetched"
    if not marker.is_file():
        pytest.skip("vendor/llama.cpp not fetched yet (pip install -e . fetches it)")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (sdist,) = tmp_path.glob("mtp_cy-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        fetched = json.loads(tar.extractfile(tar.getmember(
            f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/.mtp_cy_fetched")).read())
    assert fetched == json.loads(marker.read_text())           # the pinned commit and sha256
    for f in ("vendor/llama.cpp/include/llama.h", "vendor/llama.cpp/ggml/src/ggml.c",
              "vendor/llama.cpp/common/speculative.h", "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf",
              "vendor/CMakeLists.txt", "vendor/fetch_llama_cpp.py", "vendor/native_build.py",
              "vendor/llama.cpp/models/ggml-vocab-qwen35.gguf", "vendor/llama.cpp/LICENSE",
              "setup.py", "pyproject.toml", "mtp_cy/_core.pyx", "mtp_cy/_core.pyi", "mtp_cy/py.typed"):
        assert f in names, f
    assert not [n for n in names if n.endswith((".so", ".o", ".a")) or n.startswith("build/")]
    # no second copy of the vocabularies: the build stages them from vendor/llama.cpp
    assert not [n for n in names if n.startswith("mtp_cy/vocab")]


def test_build_py_ships_the_vocabularies(tmp_path):
    """setup.py's build_py puts the vocabularies mtp_cy.synthetic makes its models from, and
    llama.cpp's license, into the package (issue 11: a wheel works without llama.cpp)."""
    import filecmp
    import shutil
    d = os.environ.get("MTP_CY_LLAMA_CPP_DIR")
    src = Path(d) if d else ROOT / "vendor" / "llama.cpp"
    if not (src / "include" / "llama.h").is_file():
        pytest.skip("vendor/llama.cpp not fetched yet (pip install -e . fetches it)")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    vocab = tmp_path / "mtp_cy" / "vocab"
    assert sorted(p.name for p in vocab.iterdir()) == [
        "LICENSE.llama.cpp", "ggml-vocab-gpt-2.gguf", "ggml-vocab-qwen35.gguf"]
    for v in ("gpt-2", "qwen35"):
        assert filecmp.cmp(vocab / f"ggml-vocab-{v}.gguf", src / "models" / f"ggml-vocab-{v}.gguf",
                           shallow=False), v
    assert filecmp.cmp(vocab / "LICENSE.llama.cpp", src / "LICENSE", shallow=False)
    # a build output: never committed
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", "mtp_cy/vocab/ggml-vocab-gpt-2.gguf"], cwd=ROOT)
        assert ignored.returncode == 0
