# Backend initialisation, devices and system information.

from mtp_cy._version import LLAMA_CPP_COMMIT as _LLAMA_CPP_COMMIT

cdef extern from "_dl.h" nogil:
    const int MTP_CY_IS_BACKEND_DL
    const char * mtp_cy_module_path(const void * addr)

cdef bint _initialized = False
cdef object _init_lock = threading.Lock()


cdef _load_backend_modules():
    # Portable builds (MTP_CY_BACKEND_DL): ggml's backends are modules in the
    # package directory; load the best CPU variant (and CUDA, ...) from there,
    # before llama_backend_init() would search the executable's directory and
    # the current directory instead.
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    cdef bytes bdir = os.fsencode(pkg_dir)
    cdef const char * cdir = bdir
    with nogil:
        ggml_backend_load_all_from_path(cdir)
    if ggml_backend_reg_by_name(b"CPU") == NULL:
        raise MTPError(f"no usable ggml CPU backend module (libggml-cpu-*) in {pkg_dir}; "
                       f"{_take_errors() or 'is the installation complete?'}")


def init():
    """Initialise llama.cpp's backends (idempotent, thread-safe).

    Importing mtp_cy does not need it: :class:`Model` calls it on first use.
    In a portable build (the Linux wheels) it first loads ggml's backend
    modules from the package directory, picking the CPU variant that best
    fits this CPU (see :func:`build_info`).  Returns ``None``.
    """
    global _initialized
    if _initialized:
        return
    with _init_lock:
        if not _initialized:
            if MTP_CY_IS_BACKEND_DL:
                _load_backend_modules()
            with nogil:
                llama_backend_init()
                ggml_time_init()
            _initialized = True


def _variant_of(path):
    # libggml-cpu-haswell.so -> "haswell"; libggml-cpu.so (a single module) -> "default"
    name = os.path.basename(path).split(".")[0]
    for prefix in ("libggml-cpu", "ggml-cpu"):
        if name.startswith(prefix):
            return name[len(prefix) + 1:] or "default"
    return None


def build_info():
    """Describe how this mtp_cy was built and which backends are loaded.

    Returns a dict with ``backend_dl`` (``True`` for a portable build whose
    backends are modules loaded at run time, ``False`` for a static build),
    ``backends`` (registry name -> path of the file the backend was loaded
    from; for a static build that is ``_core`` itself) and ``cpu_variant``
    (the CPU module that was picked for this CPU, e.g. ``"haswell"`` or
    ``"icelake"``; ``None`` for a static build).
    """
    init()
    cdef size_t i
    cdef ggml_backend_reg_t reg
    cdef const char * path
    backends = {}
    for i in range(ggml_backend_reg_count()):
        reg = ggml_backend_reg_get(i)
        path = mtp_cy_module_path(<const void *>reg)
        backends[(<bytes>ggml_backend_reg_name(reg)).decode("utf-8", "replace")] = \
            os.fsdecode(<bytes>path) if path != NULL else None
    cpu = backends.get("CPU")
    return {
        "backend_dl": bool(MTP_CY_IS_BACKEND_DL),
        "backends": backends,
        "cpu_variant": _variant_of(cpu) if (MTP_CY_IS_BACKEND_DL and cpu) else None,
    }


def system_info():
    """Return ggml's feature string for this build (e.g. ``"CPU : SSE3 = 1 | AVX2 = 1 | ..."``).

    In a portable build it ends with the CPU variant that was loaded, e.g.
    ``"| CPU variant = haswell (libggml-cpu-haswell.so)"``.
    """
    init()
    info = (<bytes>llama_print_system_info()).decode("utf-8", "replace").strip()
    if MTP_CY_IS_BACKEND_DL:
        b = build_info()
        cpu = b["backends"].get("CPU")
        info = f"{info.rstrip(' |')} | CPU variant = {b['cpu_variant']} ({os.path.basename(cpu or '?')})"
    return info


_DEV_TYPES = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
    GGML_BACKEND_DEVICE_TYPE_META: "meta",
}


cdef list _local_devices():
    cdef size_t i, n = ggml_backend_dev_count()
    cdef size_t mfree = 0, mtotal = 0
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(n):
        dev = ggml_backend_dev_get(i)
        ggml_backend_dev_memory(dev, &mfree, &mtotal)
        out.append({
            "name": (<bytes>ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
            "description": (<bytes>ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
            "type": _DEV_TYPES.get(<int>ggml_backend_dev_type(dev), "unknown"),
            "backend": (<bytes>ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))).decode("utf-8", "replace"),
            "memory_free": mfree,
            "memory_total": mtotal,
        })
    return out


def devices(rpc_servers=None, *, timeout=5.0):
    """List the backend devices llama.cpp can use.

    Returns a list of dicts with keys ``name``, ``description``, ``type``
    (``"cpu"``, ``"gpu"``, ``"igpu"``, ``"accel"``), ``backend`` (the registry
    name, e.g. ``"CPU"``, ``"CUDA"``, ``"RPC"``), ``memory_free`` and
    ``memory_total`` (bytes).

    This machine's devices come first, then the devices of the RPC servers
    used so far by this process (``Model(rpc_servers=...)``) and of
    ``rpc_servers`` (a list of ``"host:port"``, connected now), with two more
    keys: ``endpoint`` (the server) and ``available`` (``False`` when the
    server does not answer within ``timeout`` seconds, or its connection
    failed; its memory is then reported as 0).  An endpoint given in
    ``rpc_servers`` that does not answer raises :class:`RPCError`.
    """
    init()
    out = _local_devices()
    if rpc_servers is not None or _rpc_known:
        out += _rpc_devices(rpc_servers, timeout)
    return out


llama_cpp_commit = _LLAMA_CPP_COMMIT


def cpu_pools():
    """The CPU thread pools the sessions of this process share, for diagnostics.

    The sessions of a process share ggml thread pools (one set of helper threads per
    thread count, more only while steps of that size run at once), and their native
    steps share the CPUs the process may run on, first come first served: sessions
    used from several threads split the CPUs instead of running several pools on the
    same cores.  A pool whose last call ended is paused: its helper threads sleep
    instead of polling for work.

    Returns ``{"pools": n, "helper_threads": n, "pauses": n, "can_pause": bool,
    "open_calls": n, "cpu_budget": n}``: the pools alive now, their helper threads
    (each pool of ``n`` threads has ``n - 1``: the calling thread is the first), how
    often mtp_cy paused a pool, whether this build's CPU backend lets it pause them
    (``vendor/patches/0001``), the calls (streams) open now and the CPUs their steps
    share (a step runs with at most ``cpu_budget / open_calls`` threads, at least
    one, never more than its session's ``n_threads``).
    """
    init()
    cdef int n_pools = 0, n_helpers = 0, can_pause = 0, n_calls = 0, budget = 0
    cdef int64_t n_paused = 0
    mtp_cy_pools_info(n_pools, n_helpers, n_paused, can_pause, n_calls, budget)
    return {"pools": n_pools, "helper_threads": n_helpers, "pauses": n_paused, "can_pause": bool(can_pause),
            "open_calls": n_calls, "cpu_budget": budget}


def _set_pause_idle_pools(bint on):
    """Pause a pool when its last call ends (the default) or leave its helpers polling
    (for benchmarks that measure what pausing costs; not public API)."""
    mtp_cy_set_pause_idle(on)
