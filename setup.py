"""Build mtp_cy: the pinned llama.cpp as static libraries + one Cython extension.

Build knobs (environment variables):

* ``MTP_CY_LLAMA_CPP_DIR``: use this llama.cpp checkout instead of fetching the pinned one.
* ``MTP_CY_PORTABLE=1``: no ``-march=native`` (``GGML_NATIVE=OFF``), for wheels.
* ``MTP_CY_BUILD_DIR``: CMake build directory (default ``build/native``).
* ``MTP_CY_DEBUG=1``: debug build of llama.cpp and the extension (``make debug``).
* ``CMAKE_ARGS``: passed to CMake as is, e.g. ``-DGGML_CUDA=ON``, ``-DGGML_METAL=ON``.
* ``MTP_CY_JOBS``: parallel build jobs (default: all cores).
* ``CCACHE``: ``0`` disables ccache even when it is installed.
"""
import glob
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _vendor_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "vendor" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fetcher():
    return _vendor_module("fetch_llama_cpp")


def llama_dir() -> Path:
    return _fetcher().ensure()


def build_dir() -> Path:
    return Path(os.environ.get("MTP_CY_BUILD_DIR", ROOT / "build" / "native")).resolve()


def cmake_args(src: Path) -> list:
    debug = os.environ.get("MTP_CY_DEBUG") == "1"
    portable = os.environ.get("MTP_CY_PORTABLE") == "1"
    args = [
        "-G", "Ninja",
        f"-DMTP_CY_LLAMA_DIR={src}",
        f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
        f"-DGGML_NATIVE={'OFF' if portable else 'ON'}",
        "-DMTP_CY_UPSTREAM_TOOLS=ON",
        # ggml's RPC backend (mtp_cy.Model(rpc_servers=...), python -m mtp_cy rpc-server);
        # RDMA off: a static build does not link libibverbs (CMAKE_ARGS can override both)
        "-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF",
    ]
    if os.environ.get("CCACHE", "1") != "0" and shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache",
                 "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
    # a ninja that outlives pip's temporary build environment, so the tree can be rebuilt
    ninja = _vendor_module("native_build").stable_tool("ninja")
    if ninja:
        args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
    return args


def build_native() -> tuple:
    """Configure (when needed) and build the static libraries; return (build dir, source dir)."""
    src = llama_dir()
    bdir = build_dir()
    bdir.mkdir(parents=True, exist_ok=True)
    args = cmake_args(src)
    stamp = bdir / ".mtp_cy_configure"
    key = hashlib.sha256(repr(args).encode()).hexdigest()
    nb = _vendor_module("native_build")
    cmake = nb.stable_tool("cmake") or "cmake"
    if (not (bdir / "CMakeCache.txt").exists() or not stamp.exists() or stamp.read_text() != key
            or nb.tools_missing(bdir)):
        subprocess.check_call([cmake, "-S", str(ROOT / "vendor"), "-B", str(bdir)] + args)
        stamp.write_text(key)
    jobs = os.environ.get("MTP_CY_JOBS") or str(os.cpu_count() or 2)
    subprocess.check_call([cmake, "--build", str(bdir), "--target", "llama-common", "-j", jobs])
    return bdir, src


def cmake_cache(bdir: Path) -> dict:
    out = {}
    for line in (bdir / "CMakeCache.txt").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "//")):
            k, v = line.split("=", 1)
            out[k.split(":")[0]] = v
    return out


class BuildExt(build_ext):
    """Builds llama.cpp out of tree with CMake + Ninja, then links it statically."""

    def run(self):
        bdir, src = build_native()
        cache = cmake_cache(bdir)
        libs = sorted(glob.glob(str(bdir / "**" / "*.a"), recursive=True))
        # the upstream programs' objects are not libraries we want
        libs = [l for l in libs if "/examples/" not in l and "/tools/" not in l]
        is_mac = sys.platform == "darwin"
        extra_link = []
        if is_mac:
            extra_link += libs
            if cache.get("GGML_METAL", "OFF").upper() in ("ON", "1", "TRUE"):
                extra_link += ["-framework", "Foundation", "-framework", "Metal", "-framework", "MetalKit"]
            extra_link += ["-framework", "Accelerate"]
        else:
            extra_link += ["-Wl,--start-group"] + libs + ["-Wl,--end-group"]
            extra_link += ["-lpthread", "-ldl", "-lm"]
        if cache.get("GGML_OPENMP", "ON").upper() in ("ON", "1", "TRUE") and not is_mac:
            extra_link += ["-fopenmp"]
        if cache.get("GGML_CUDA", "OFF").upper() in ("ON", "1", "TRUE"):
            cuda_root = cache.get("CUDAToolkit_LIBRARY_ROOT") or os.environ.get("CUDA_HOME", "/usr/local/cuda")
            for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
                if os.path.isdir(os.path.join(cuda_root, d)):
                    extra_link += [f"-L{os.path.join(cuda_root, d)}"]
            extra_link += ["-lcudart", "-lcublas", "-lcublasLt", "-lcuda"]
        for ext in self.extensions:
            ext.include_dirs += [str(src / "include"), str(src / "ggml" / "include"),
                                 str(src / "common"), str(ROOT / "mtp_cy")]
            ext.extra_link_args += extra_link
            ext.depends += libs
        super().run()


class SDist(sdist):
    """The sdist carries the fetched llama.cpp source so that installing it needs no fetch."""

    def run(self):
        if os.environ.get("MTP_CY_LLAMA_CPP_DIR"):
            raise SystemExit("unset MTP_CY_LLAMA_CPP_DIR to build an sdist of the pinned llama.cpp")
        llama_dir()
        super().run()


def extensions():
    from Cython.Build import cythonize
    debug = os.environ.get("MTP_CY_DEBUG") == "1"
    cflags = ["-std=c++17", "-O0" if debug else "-O2"]
    if debug:
        cflags += ["-g"]
    ext = Extension(
        "mtp_cy._core",
        sources=["mtp_cy/_core.pyx"],
        language="c++",
        extra_compile_args=cflags,
        depends=glob.glob("mtp_cy/*.pxi") + glob.glob("mtp_cy/includes/*.pxd") + ["mtp_cy/_native.h", "mtp_cy/_chat.h", "mtp_cy/_rpc.h"],
    )
    return cythonize([ext], language_level=3, include_path=[str(ROOT)],
                     compiler_directives={"embedsignature": True, "binding": False},
                     gdb_debug=debug)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "sdist": SDist})
