"""Build mtp_cy: the pinned llama.cpp as static libraries + one Cython extension.

Build knobs (environment variables):

* ``MTP_CY_LLAMA_CPP_DIR``: use this llama.cpp checkout instead of fetching the pinned one.
* ``MTP_CY_PORTABLE=1``: no ``-march=native`` (``GGML_NATIVE=OFF``), for wheels.
* ``MTP_CY_BACKEND_DL=1`` (implies ``MTP_CY_PORTABLE=1``; the Linux wheels): ggml and
  llama as shared libraries and ggml's backends as modules loaded at run time
  (``GGML_BACKEND_DL``), with one CPU module per instruction-set level
  (``GGML_CPU_ALL_VARIANTS``), all copied next to ``mtp_cy/_core`` (run path
  ``$ORIGIN``); ``mtp_cy.init()`` loads the best CPU module for the machine.
* ``MTP_CY_CPU_VARIANTS``: with ``MTP_CY_BACKEND_DL``, ``ALL`` (default) or ``ONE``
  (a single baseline CPU module: a much cheaper build, for CI's packaging check).
* ``MTP_CY_LIMITED_API=1``: build ``_core`` for CPython's stable ABI (abi3, 3.10+).
* ``MTP_CY_BUILD_DIR``: CMake build directory (default ``build/native``, or
  ``build/native-dl`` with ``MTP_CY_BACKEND_DL=1``).
* ``MTP_CY_DEBUG=1``: debug build of llama.cpp and the extension (``make debug``).
* ``CMAKE_ARGS``: passed to CMake as is, e.g. ``-DGGML_CUDA=ON``, ``-DGGML_METAL=ON``.
* ``MTP_CY_JOBS``: parallel build jobs (default: all cores).
* ``CCACHE``: ``0`` disables ccache even when it is installed.

Every build also copies the vocabularies that ``mtp_cy.synthetic`` makes its models from
(``VOCABS``) and llama.cpp's MIT license out of the llama.cpp source into ``mtp_cy/vocab/``
(git-ignored; the sdist carries the llama.cpp source instead), so that an installed package
works without a llama.cpp checkout.
"""
import filecmp
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
from setuptools.command.build_py import build_py
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


#: llama.cpp's ``models/ggml-vocab-<name>.gguf`` shipped in ``mtp_cy/vocab/`` (the synthetic
#: models' default vocabulary, and Qwen3.5's)
VOCABS = ("gpt-2", "qwen35")
VOCAB_DIR = ROOT / "mtp_cy" / "vocab"


def stage_vocab(src: Path) -> None:
    """Copy ``VOCABS`` and llama.cpp's LICENSE from the llama.cpp source ``src`` into
    ``mtp_cy/vocab/`` (only what changed; anything else there is removed)."""
    files = {f"ggml-vocab-{v}.gguf": src / "models" / f"ggml-vocab-{v}.gguf" for v in VOCABS}
    files["LICENSE.llama.cpp"] = src / "LICENSE"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"the llama.cpp source lacks {', '.join(missing)}")
    VOCAB_DIR.mkdir(exist_ok=True)
    for old in VOCAB_DIR.iterdir():
        if old.name not in files and old.is_file():
            old.unlink()
    for name, p in files.items():
        dest = VOCAB_DIR / name
        if not dest.is_file() or not filecmp.cmp(p, dest, shallow=False):
            shutil.copy2(p, dest)


def backend_dl() -> bool:
    return os.environ.get("MTP_CY_BACKEND_DL") == "1"


def limited_api() -> bool:
    return os.environ.get("MTP_CY_LIMITED_API") == "1"


def build_dir() -> Path:
    default = ROOT / "build" / ("native-dl" if backend_dl() else "native")
    return Path(os.environ.get("MTP_CY_BUILD_DIR", default)).resolve()


def cmake_args(src: Path) -> list:
    debug = os.environ.get("MTP_CY_DEBUG") == "1"
    dl = backend_dl()
    portable = os.environ.get("MTP_CY_PORTABLE") == "1" or dl
    args = [
        "-G", "Ninja",
        f"-DMTP_CY_LLAMA_DIR={src}",
        f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
        f"-DGGML_NATIVE={'OFF' if portable else 'ON'}",
        "-DMTP_CY_UPSTREAM_TOOLS=ON",
        # ggml's RPC backend (mtp_cy.Model(rpc_servers=...), python -m mtp_cy rpc-server);
        # RDMA off: a static build does not link libibverbs (CMAKE_ARGS can override both)
        "-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF",
        f"-DMTP_CY_BACKEND_DL={'ON' if dl else 'OFF'}",
    ]
    if dl:
        args.append(f"-DMTP_CY_CPU_VARIANTS={os.environ.get('MTP_CY_CPU_VARIANTS', 'ALL')}")
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


_SHLIB_SUFFIXES = (".so", ".dylib", ".dll")


def dl_libraries(bdir: Path) -> list:
    """The shared libraries and backend modules of a MTP_CY_BACKEND_DL build, as listed
    by vendor/CMakeLists.txt for the current configuration."""
    listing = bdir / "mtp_cy_shared_libs.txt"
    out = [Path(line) for line in listing.read_text().splitlines() if line.strip()]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise SystemExit(f"not built: {', '.join(missing)}")
    return out


class BuildExt(build_ext):
    """Builds llama.cpp out of tree with CMake + Ninja, then links it into ``_core``:
    statically (default), or against its shared libraries (``MTP_CY_BACKEND_DL=1``),
    which are then copied next to ``_core``."""

    def _remove_stale_outputs(self):
        # The build directory (build/lib.*) outlives builds with other settings: an
        # in-place static _core.cpython-3XX-*.so next to an abi3 build, or the shared
        # libraries of a MTP_CY_BACKEND_DL build next to a static one.  Whatever is
        # there ends up in the wheel, so remove what this build does not make.
        for ext in self.extensions:
            target = Path(self.get_ext_fullpath(ext.name))
            if not target.parent.is_dir():
                continue
            stem = ext.name.rsplit(".", 1)[-1] + "."
            for old in target.parent.iterdir():
                if old == target or old.suffix not in _SHLIB_SUFFIXES:
                    continue
                if old.name.startswith(stem) or old.name.startswith(("libggml", "libllama")):
                    old.unlink()

    def run(self):
        bdir, src = build_native()
        if self.inplace:  # `make` / `setup.py build_ext --inplace`: no build_py
            stage_vocab(src)
        self._remove_stale_outputs()
        if backend_dl():
            self._run_dl(bdir, src)
            return
        cache = _vendor_module("native_build").read_cache(bdir)
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
                                 str(src / "common"), str(src / "src"), str(ROOT / "mtp_cy")]
            ext.extra_link_args += extra_link
            ext.depends += libs
        super().run()

    def _run_dl(self, bdir: Path, src: Path):
        if sys.platform == "win32":
            raise SystemExit("MTP_CY_BACKEND_DL=1 is not supported on Windows yet")
        libs = dl_libraries(bdir)
        if not any(p.name.startswith(("libggml-cpu", "ggml-cpu")) for p in libs):
            raise SystemExit(f"no CPU backend module in {bdir / 'bin'}")
        origin = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
        for ext in self.extensions:
            ext.include_dirs += [str(src / "include"), str(src / "ggml" / "include"),
                                 str(src / "common"), str(src / "src"), str(ROOT / "mtp_cy")]
            ext.define_macros += [("MTP_CY_BACKEND_DL", "1")]
            ext.library_dirs += [str(bdir / "bin")]
            ext.libraries += ["llama-common", "llama", "ggml", "ggml-base"]
            ext.extra_link_args += [f"-Wl,-rpath,{origin}"]
            ext.depends += [str(p) for p in libs]
        super().run()
        # ship the libraries and the backend modules next to the extension
        for ext in self.extensions:
            dest = Path(self.get_ext_fullpath(ext.name)).parent
            dest.mkdir(parents=True, exist_ok=True)
            for p in libs:
                shutil.copy2(p, dest / p.name)


class BuildPy(build_py):
    """Stages ``mtp_cy/vocab/`` (package data) from the llama.cpp source before copying the
    package (also in editable mode, where the package is the source tree itself)."""

    def run(self):
        stage_vocab(llama_dir())
        self.__dict__.pop("data_files", None)  # forget a file list globbed before the copy
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
    macros = []
    if limited_api():
        macros.append(("Py_LIMITED_API", "0x030A0000"))  # CPython 3.10+
    ext = Extension(
        "mtp_cy._core",
        sources=["mtp_cy/_core.pyx"],
        language="c++",
        extra_compile_args=cflags,
        define_macros=macros,
        py_limited_api=limited_api(),
        depends=glob.glob("mtp_cy/*.pxi") + glob.glob("mtp_cy/includes/*.pxd") + glob.glob("mtp_cy/*.h"),
    )
    return cythonize([ext], language_level=3, include_path=[str(ROOT)],
                     compiler_directives={"embedsignature": True, "binding": False},
                     gdb_debug=debug)


options = {}
if limited_api():
    options["bdist_wheel"] = {"py_limited_api": "cp310"}
setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy, "sdist": SDist}, options=options)
