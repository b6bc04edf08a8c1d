#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into ``vendor/llama.cpp``.

llama.cpp is not committed to this repository.  Its source for upstream commit
``0c1e57098`` ships inside the PyPI sdist ``llama-cpp-python==0.3.36`` (under
``vendor/llama.cpp``), so the build fetches that sdist from the package index,
verifies its pinned sha256, extracts only what mtp_cy's build, tests and
benchmarks need, and applies mtp_cy's own small fixes to it: the patch files in
``vendor/patches/`` (``NNNN-name.patch``, unified diffs against the pinned source,
applied in name order, each with a comment on top that says why).  A patch that
no longer applies exactly (no fuzz) stops the fetch with the file and hunk that
failed: review it against the new source when llama.cpp is bumped.

The download is cached (``$MTP_CY_CACHE_DIR`` or ``~/.cache/mtp_cy``), so a
second fetch does not touch the network.  Set ``MTP_CY_LLAMA_CPP_DIR`` to use an
existing llama.cpp checkout instead (then nothing is fetched at all).

Usage::

    python vendor/fetch_llama_cpp.py [--dest vendor/llama.cpp] [--force]
    python vendor/fetch_llama_cpp.py --apply-to DIR     # patch an existing checkout
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/" + SDIST_FILE
)
INNER = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"

# What the build, the tests and the benchmarks need (prefixes relative to llama.cpp/).
KEEP_PREFIXES = (
    "CMakeLists.txt", "LICENSE", "AUTHORS",
    "cmake/", "ggml/", "src/", "include/", "common/", "vendor/", "licenses/", "gguf-py/",
    "models/templates/",
    "examples/speculative-simple/", "examples/speculative/",
    "tools/completion/", "tools/rpc/",
    "grammars/",
)
SKIP_PARTS = ("/.git", ".github/")
STAMP = ".mtp_cy_fetched"

HERE = Path(__file__).resolve().parent
PATCH_DIR = HERE / "patches"


class PatchError(RuntimeError):
    """A patch of vendor/patches/ does not apply to the pinned source."""


def patch_files() -> list:
    """The patches mtp_cy applies to llama.cpp, in the order they are applied."""
    return sorted(PATCH_DIR.glob("*.patch")) if PATCH_DIR.is_dir() else []


def patches_digest() -> str:
    """sha256 over the patch files (names and contents): part of the fetch stamp, so that a
    changed patch set extracts the source again."""
    h = hashlib.sha256()
    for f in patch_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _parse_patch(text: str, name: str) -> list:
    """[(path, [(old_start, old_lines, new_lines), ...]), ...] of a unified diff."""
    files, cur, i = [], None, 0
    lines = text.splitlines(keepends=True)
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            path = lines[i + 1][4:].strip().split("\t")[0]
            if path.startswith("b/"):
                path = path[2:]
            cur = (path, [])
            files.append(cur)
            i += 2
            continue
        if ln.startswith("@@ "):
            if cur is None:
                raise PatchError(f"{name}: hunk before any file header")
            try:
                old = ln.split()[1]
                start = int(old[1:].split(",")[0])
            except (IndexError, ValueError):
                raise PatchError(f"{name}: bad hunk header {ln.strip()!r}") from None
            old_l, new_l = [], []
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\\"):
                t = lines[i]
                if t.startswith("\\"):          # "\ No newline at end of file"
                    i += 1
                    continue
                if t[0] in " -":
                    old_l.append(t[1:])
                if t[0] in " +":
                    new_l.append(t[1:])
                i += 1
            cur[1].append((start, old_l, new_l))
            continue
        i += 1
    if not files:
        raise PatchError(f"{name}: no file in the patch")
    return files


def apply_patch(root: Path, patch: Path) -> None:
    """Apply one unified diff to the tree at ``root``: every hunk must match exactly, at
    its stated line (no fuzz, no offset); raises PatchError naming the file and hunk."""
    for rel, hunks in _parse_patch(patch.read_text(), patch.name):
        target = root / rel
        if not target.is_file():
            raise PatchError(f"{patch.name}: {rel} does not exist in the llama.cpp source")
        src = target.read_text().splitlines(keepends=True)
        out, pos = [], 0
        for n, (start, old_l, new_l) in enumerate(hunks, 1):
            at = max(start - 1, 0) if old_l else start
            if at < pos or src[at:at + len(old_l)] != old_l:
                raise PatchError(f"{patch.name}: hunk {n} of {rel} (line {start}) does not match the pinned "
                                 "source; update the patch for this llama.cpp")
            out += src[pos:at] + new_l
            pos = at + len(old_l)
        out += src[pos:]
        target.write_text("".join(out))


def _keep(rel: str) -> bool:
    if any(p in rel for p in SKIP_PARTS):
        return False
    if rel.startswith("models/ggml-vocab-") and rel.endswith(".gguf"):
        return True
    return rel.startswith(KEEP_PREFIXES)


def cache_dir() -> Path:
    d = os.environ.get("MTP_CY_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "mtp_cy"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_pip(dest_dir: Path) -> None:
    # pip knows the user's index configuration (mirrors, proxies, certificates).
    # ``--no-binary llama-cpp-python`` (rather than ``:all:``) keeps pip from
    # compiling the sdist's own build requirements from source.
    subprocess.check_call([
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--no-binary", SDIST_NAME, f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest_dir),
    ])


def _download_url(dest: Path) -> None:
    with urllib.request.urlopen(SDIST_URL, timeout=120) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def fetch_sdist() -> Path:
    """Return the path of the verified sdist, downloading it into the cache if needed."""
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    target = cdir / SDIST_FILE
    if target.exists() and _sha256(target) == SDIST_SHA256:
        return target
    errors = []
    with tempfile.TemporaryDirectory(dir=cdir) as tmp:
        tmp_file = Path(tmp) / SDIST_FILE
        for how in (_download_url, lambda p: _download_pip(p.parent)):
            try:
                how(tmp_file)
                if tmp_file.exists():
                    break
            except Exception as exc:  # try the next way
                errors.append(f"{getattr(how, '__name__', 'pip')}: {exc}")
        if not tmp_file.exists():
            raise SystemExit("could not download %s: %s" % (SDIST_FILE, "; ".join(errors)))
        got = _sha256(tmp_file)
        if got != SDIST_SHA256:
            raise SystemExit(f"sha256 mismatch for {SDIST_FILE}: got {got}, pinned {SDIST_SHA256}")
        os.replace(tmp_file, target)
    return target


def extract(sdist: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tf:
        members = []
        for m in tf.getmembers():
            if not m.name.startswith(INNER):
                continue
            rel = m.name[len(INNER):]
            if not rel or not _keep(rel) or not (m.isfile() or m.isdir()):
                continue
            m.name = rel
            members.append(m)
        tf.extractall(tmp, members=members, filter="data") if sys.version_info >= (3, 12) \
            else tf.extractall(tmp, members=members)
    for patch in patch_files():
        apply_patch(tmp, patch)
    (tmp / STAMP).write_text(json.dumps({
        "commit": LLAMA_CPP_COMMIT, "sdist": SDIST_FILE, "sha256": SDIST_SHA256,
        "patches": patches_digest(), "patch_files": [f.name for f in patch_files()]}) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def is_fetched(dest: Path) -> bool:
    stamp = dest / STAMP
    if not stamp.exists():
        return False
    try:
        st = json.loads(stamp.read_text())
    except ValueError:
        return False
    return st.get("sha256") == SDIST_SHA256 and st.get("patches") == patches_digest()


def ensure(dest: Path | None = None, force: bool = False) -> Path:
    """Make sure the pinned llama.cpp source is at *dest*; return the source dir to build.

    ``MTP_CY_LLAMA_CPP_DIR`` (an existing checkout) takes precedence.
    """
    override = os.environ.get("MTP_CY_LLAMA_CPP_DIR")
    if override:
        p = Path(override).resolve()
        if not (p / "include" / "llama.h").exists():
            raise SystemExit(f"MTP_CY_LLAMA_CPP_DIR={override} is not a llama.cpp checkout")
        return p
    dest = Path(dest or HERE / "llama.cpp")
    if force or not is_fetched(dest):
        if dest.exists() and not force and (dest / "include" / "llama.h").exists() \
                and not (dest / STAMP).exists():
            return dest  # a user-provided tree placed here by hand
        extract(fetch_sdist(), dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=HERE / "llama.cpp")
    ap.add_argument("--force", action="store_true", help="extract again even if present")
    ap.add_argument("--apply-to", type=Path, default=None, metavar="DIR",
                    help="apply vendor/patches/ to an existing llama.cpp tree of the pinned commit "
                         "(for MTP_CY_LLAMA_CPP_DIR) and exit")
    a = ap.parse_args()
    if a.apply_to is not None:
        for patch in patch_files():
            apply_patch(a.apply_to, patch)
            print(f"applied {patch.name}")
        return
    print(ensure(a.dest, a.force))


if __name__ == "__main__":
    main()
