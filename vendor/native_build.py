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


def upstream_program(name: str, root: Path) -> Optional[Path]:
    """Path of upstream's program ``name`` (``llama-speculative-simple``, ``llama-completion``).

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
        build_targets(bdir, [name])
        path = bdir / "bin" / name
    return path if path.is_file() else None
