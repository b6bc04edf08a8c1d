"""Helpers around the CMake build tree of the vendored llama.cpp (``build/native``).

Shared by ``setup.py`` (configure + build the static libraries), the tests and
the benchmarks (build upstream's reference programs from the same tree).

Why this exists: ``pip install`` builds in an isolated environment whose
``cmake``/``ninja`` live in a temporary directory that is deleted afterwards.
A build tree configured with those paths cannot be rebuilt later (``ninja``
is gone).  So we configure with tools that outlive the build when there are
any, and repair a tree whose recorded tools vanished.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

_TEMP_MARKERS = ("pip-build-env", "pip-req-build", "build-env-")


def stable_tool(name: str) -> Optional[str]:
    """The first ``name`` on PATH that is not inside pip's temporary build environment."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK) and not any(m in str(p) for m in _TEMP_MARKERS):
            return str(p)
    return shutil.which(name)


def read_cache(bdir: Path) -> Dict[str, str]:
    """CMakeCache.txt of ``bdir`` as a dict (empty when not configured)."""
    out: Dict[str, str] = {}
    f = Path(bdir) / "CMakeCache.txt"
    if not f.is_file():
        return out
    for line in f.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "//")):
            k, v = line.split("=", 1)
            out[k.split(":")[0]] = v
    return out


def tools_missing(bdir: Path) -> bool:
    """True when the tree records a cmake/ninja that no longer exists."""
    c = read_cache(bdir)
    return any(c.get(k) and not Path(c[k]).exists() for k in ("CMAKE_MAKE_PROGRAM", "CMAKE_COMMAND"))


def repair(bdir: Path) -> None:
    """Point a configured tree whose tools vanished at tools that exist now."""
    if not tools_missing(bdir):
        return
    cmake, ninja = stable_tool("cmake"), stable_tool("ninja")
    if not cmake or not ninja:
        raise RuntimeError(f"{bdir} was configured with a cmake/ninja that no longer exists and none is on PATH")
    subprocess.run([cmake, f"-DCMAKE_MAKE_PROGRAM={ninja}", str(bdir)], check=True, stdout=subprocess.DEVNULL)


def build_targets(bdir: Path, targets: Sequence[str], jobs: Optional[str] = None, quiet: bool = True) -> None:
    """``cmake --build bdir --target ...`` (after :func:`repair`); upstream programs need
    the tree configured with ``MTP_CY_UPSTREAM_TOOLS=ON`` (setup.py does that)."""
    bdir = Path(bdir)
    repair(bdir)
    cmake = stable_tool("cmake") or "cmake"
    if read_cache(bdir).get("MTP_CY_UPSTREAM_TOOLS", "ON").upper() in ("OFF", "0", "FALSE"):
        subprocess.run([cmake, "-DMTP_CY_UPSTREAM_TOOLS=ON", str(bdir)], check=True, stdout=subprocess.DEVNULL)
    jobs = jobs or os.environ.get("MTP_CY_JOBS") or str(os.cpu_count() or 2)
    subprocess.run([cmake, "--build", str(bdir), "--target", *targets, "-j", jobs], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


#: upstream programs whose source vendor/fetch_llama_cpp.py does not extract:
#: program -> the llama.cpp directory that upstream_program() extracts from the
#: pinned sdist into ``<build tree>/upstream-src/`` when the source tree lacks it
EXTRA_SOURCES = {"llama-quantize": "tools/quantize/"}


def ensure_extra_source(bdir: Path, name: str) -> bool:
    """Make the source of upstream program ``name`` (see :data:`EXTRA_SOURCES`) available
    to the build tree ``bdir``; True when it was missing and has been extracted (the tree
    then has to be configured again, which :func:`upstream_program` does)."""
    rel = EXTRA_SOURCES.get(name)
    if rel is None:
        return False
    llama_dir = read_cache(bdir).get("MTP_CY_LLAMA_DIR")
    if llama_dir and (Path(llama_dir) / rel).is_dir():
        return False
    dest = Path(bdir) / "upstream-src"
    if (dest / rel).is_dir():
        return False
    import importlib.util
    import tarfile
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", Path(__file__).with_name("fetch_llama_cpp.py"))
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    prefix = fetch.INNER + rel
    with tarfile.open(fetch.fetch_sdist(), "r:gz") as tf:     # sha256-pinned, cached
        for m in tf.getmembers():
            if m.isfile() and m.name.startswith(prefix):
                out = dest / m.name[len(fetch.INNER):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    return (dest / rel).is_dir()


def upstream_program(name: str, root: Path) -> Optional[Path]:
    """Path of upstream's program ``name`` (``llama-speculative-simple``, ``llama-completion``,
    ``llama-quantize``).

    ``$MTP_CY_UPSTREAM_BIN`` names a directory of prebuilt programs; otherwise the program is
    built (on first use; the targets reuse the libraries already built) in the native build
    tree, ``$MTP_CY_BUILD_DIR`` or ``root/build/native``.  None when neither has it, e.g. when
    testing an installed wheel without ``$MTP_CY_UPSTREAM_BIN``.
    """
    d = os.environ.get("MTP_CY_UPSTREAM_BIN")
    if d:
        path = Path(d) / name
    else:
        bdir = Path(os.environ.get("MTP_CY_BUILD_DIR", Path(root) / "build" / "native"))
        if not (bdir / "CMakeCache.txt").is_file():
            return None
        path = _build_program(bdir, name)
    return path if path.is_file() else None


def _build_program(bdir: Path, name: str) -> Path:
    """Build upstream's program ``name`` in the configured tree ``bdir`` (extracting its
    source first when the tree lacks it); its path."""
    if ensure_extra_source(bdir, name):
        repair(bdir)
        subprocess.run([stable_tool("cmake") or "cmake", str(bdir)], check=True, stdout=subprocess.DEVNULL)
    build_targets(bdir, [name])
    return bdir / "bin" / name


def upstream_default_program(name: str, root: Path) -> Optional[Path]:
    """Upstream's program ``name`` built the way upstream builds it by default, i.e. with
    OpenMP threading (mtp_cy itself and :func:`upstream_program` use ggml thread pools), in
    ``root/build/upstream-default`` (configured and built on first use, a few minutes).
    For benchmarks: the native loop a llama.cpp user runs.  None when it cannot be built."""
    root = Path(root)
    bdir = root / "build" / "upstream-default"
    cmake, ninja = stable_tool("cmake") or "cmake", stable_tool("ninja")
    if not (bdir / "CMakeCache.txt").is_file():
        args = [cmake, "-S", str(root / "vendor"), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
                "-DMTP_CY_UPSTREAM_TOOLS=ON", "-DMTP_CY_OPENMP=ON", "-DGGML_NATIVE=ON"]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    path = _build_program(bdir, name)
    return path if path.is_file() else None


def _fetch_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", Path(__file__).with_name("fetch_llama_cpp.py"))
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    return fetch


def upstream_server(root: Path, quiet: bool = True) -> Optional[Path]:
    """Upstream's ``llama-server`` built from the pinned sdist with mtp_cy's patches, the way
    upstream builds it (OpenMP threads, ``GGML_NATIVE``), for the benchmarks' peer: the whole
    llama.cpp tree of the sdist is extracted into ``root/build/upstream-server-src`` (the
    package build extracts only what it needs) and patched (vendor/patches), then configured and
    built in ``root/build/upstream-server`` on first use (some minutes); it has no web UI (its
    assets are not in the sdist; no measurement uses it).
    None when it cannot be built."""
    import tarfile
    root = Path(root)
    src = root / "build" / "upstream-server-src"
    bdir = root / "build" / "upstream-server"
    exe = bdir / "bin" / "llama-server"
    fetch = _fetch_module()
    stamp = src / ".mtp_cy_fetched"
    want = fetch.SDIST_SHA256 + ":" + fetch.patches_digest()
    if not (stamp.is_file() and stamp.read_text() == want):
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(fetch.fetch_sdist(), "r:gz") as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.startswith(fetch.INNER) and "/.git" not in m.name:
                    out = src / m.name[len(fetch.INNER):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tf.extractfile(m).read())
        for patch in fetch.patch_files():
            fetch.apply_patch(src, patch)
        stamp.write_text(want)
        shutil.rmtree(bdir, ignore_errors=True)
    cmake, ninja = stable_tool("cmake") or "cmake", stable_tool("ninja")
    if not (bdir / "CMakeCache.txt").is_file():
        args = [cmake, "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL if quiet else None)
    jobs = os.environ.get("MTP_CY_JOBS") or str(os.cpu_count() or 2)
    subprocess.run([cmake, "--build", str(bdir), "--target", "llama-server", "-j", jobs], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)
    return exe if exe.is_file() else None
