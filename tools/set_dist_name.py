#!/usr/bin/env python3
"""Rename the distribution in pyproject.toml for a wheel flavour (CUDA builds).

The CPU wheels are published as ``mtp_cy``; the CUDA wheels as ``mtp_cy_cu12``
(the import name stays ``mtp_cy``), so that the two never share a file name or
a version on an index.  The CUDA flavour also depends on NVIDIA's pip wheels of
the CUDA runtime and cuBLAS, which the CUDA backend module finds through its
run path (``$ORIGIN/../nvidia/cuda_runtime/lib``, ``$ORIGIN/../nvidia/cublas/lib``).

cibuildwheel runs this in ``before-all`` inside the build container, on the
container's copy of the project (tools/cibuildwheel-cuda.toml)::

    python tools/set_dist_name.py cu12 [pyproject.toml]
"""
import re
import sys
from pathlib import Path

FLAVOURS = {
    # flavour: (distribution name, extra requirements)
    "cu12": ("mtp_cy_cu12", ["nvidia-cuda-runtime-cu12>=12.8", "nvidia-cublas-cu12>=12.8"]),
}


def rename(text: str, flavour: str) -> str:
    name, extra = FLAVOURS[flavour]
    text, n = re.subn(r'(?m)^name = "mtp_cy"$', f'name = "{name}"', text, count=1)
    if n != 1:
        raise SystemExit('pyproject.toml: no line `name = "mtp_cy"` (already renamed?)')
    m = re.search(r'(?m)^dependencies = \[(.*)\]$', text)
    if not m:
        raise SystemExit("pyproject.toml: no one-line `dependencies = [...]`")
    deps = m.group(1) + "".join(f', "{d}"' for d in extra)
    return text[:m.start()] + f"dependencies = [{deps}]" + text[m.end():]


def main() -> None:
    flavour = sys.argv[1]
    path = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "pyproject.toml")
    path.write_text(rename(path.read_text(), flavour))
    print(f"{path}: distribution {FLAVOURS[flavour][0]}")


if __name__ == "__main__":
    main()
